"""--stage rm and dpo under DeepSpeed ZeRO-2 on the CPU (the optimizer on DeepSpeed's CPU Adam): the objectives train as
under plain AdamW, and a reward model resumes from a DeepSpeed checkpoint, value head included."""
import json
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
from test_deepspeed import ds_config

pytestmark = pytest.mark.integration
pytest.importorskip("deepspeed")
ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path, name, stage, *extra):
    import subprocess

    out = tmp_path / name
    cmd = [sys.executable, "-m", "phift.cli", "train", "--model_name_or_path", "tiny", "--stage", stage, "--dataset",
           "identity_dpo", "--dataset_dir", str(ROOT / "data"), "--template", "vanilla", "--lora_target", "all",
           "--lora_dropout", "0", "--max_samples", "16", "--per_device_train_batch_size", "4", "--cutoff_len", "48",
           "--num_train_epochs", "2", "--learning_rate", "1e-3", "--logging_steps", "1", "--seed", "0",
           "--disable_gradient_checkpointing", "True", "--output_dir", str(out), *extra]
    env = subprocess_env(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


@pytest.fixture
def zero2(tmp_path):
    cfg = tmp_path / "ds_z2.json"
    cfg.write_text(json.dumps(ds_config(2)))
    return str(cfg)


@pytest.mark.parametrize("stage, finetuning, keys", [
    ("rm", "lora", ("loss", "accuracy", "margin")),
    ("dpo", "lora", ("loss", "rewards/margins", "logps/chosen")),
    ("dpo", "full", ("loss", "rewards/margins", "logps/chosen")),  # the reference: a frozen copy beside DeepSpeed
])
def test_zero2_trains_the_stage_as_plain_adamw(tmp_path, zero2, stage, finetuning, keys):
    plain = run(tmp_path, "plain", stage, "--finetuning_type", finetuning)
    deepspeed = run(tmp_path, "zero2", stage, "--finetuning_type", finetuning, "--deepspeed", zero2)
    assert len(plain) == len(deepspeed) == 8
    assert plain[-1]["loss"] < plain[0]["loss"]
    for a, b in zip(plain, deepspeed):
        for key in keys:
            assert abs(a[key] - b[key]) <= 2e-3 * max(1.0, abs(a[key])), (key, plain, deepspeed)


def test_a_reward_model_resumes_from_a_deepspeed_checkpoint(tmp_path, zero2):
    flags = ["--finetuning_type", "lora", "--deepspeed", zero2, "--save_steps", "4"]
    whole = run(tmp_path, "whole", "rm", *flags)
    resumed = run(tmp_path, "resumed", "rm", *flags, "--resume_from_checkpoint",
                  str(tmp_path / "whole" / "checkpoint-4"))
    timing = ("tokens_per_second", "elapsed_time")
    assert [{k: v for k, v in e.items() if k not in timing} for e in resumed] == \
        [{k: v for k, v in e.items() if k not in timing} for e in whole[4:]]
    assert (tmp_path / "resumed" / "value_head.safetensors").is_file()
