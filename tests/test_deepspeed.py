"""DeepSpeed on the CPU: ZeRO-2/3 with the optimizer offloaded to DeepSpeed's CPU Adam trains like plain AdamW.

Each run is a subprocess: DeepSpeed initialises torch.distributed and picks its accelerator once per process.
The first run JIT-builds DeepSpeed's CPU ops (a minute or two), cached in TORCH_EXTENSIONS_DIR.
"""
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

pytestmark = pytest.mark.integration
pytest.importorskip("deepspeed")
ROOT = Path(__file__).resolve().parents[1]


def ds_config(stage: int) -> dict:
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                  "reduce_bucket_size": "auto", "contiguous_gradients": True}}


def run(tmp_path, name, *extra):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "phift.cli", "train", "--model_name_or_path", "tiny", "--dataset",
           "self_cognition", "--dataset_dir", str(ROOT / "data"), "--finetuning_type", "lora", "--lora_target", "all",
           "--lora_dropout", "0", "--max_samples", "16", "--per_device_train_batch_size", "4", "--cutoff_len", "64",
           "--num_train_epochs", "2", "--learning_rate", "1e-3", "--logging_steps", "1", "--seed", "0",
           "--disable_gradient_checkpointing", "True", "--output_dir", str(out), *extra]
    env = subprocess_env(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [e["loss"] for e in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines()) if "loss" in e]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_with_cpu_adam_matches_plain_adamw(tmp_path, stage):
    cfg = tmp_path / f"ds_z{stage}.json"
    cfg.write_text(json.dumps(ds_config(stage)))
    plain = run(tmp_path, "plain")
    # ZeRO-3 also runs with (reentrant) activation checkpointing: its parameters are gathered again in the recompute
    ckpt = ["--disable_gradient_checkpointing", "False"] if stage == 3 else []
    deepspeed = run(tmp_path, f"z{stage}", "--deepspeed", str(cfg), *ckpt)
    assert len(plain) == len(deepspeed) == 8
    assert plain[-1] < plain[0]
    for a, b in zip(plain, deepspeed):
        assert abs(a - b) <= 2e-3 * abs(a), (plain, deepspeed)


def test_deepspeed_skips_non_finite_steps_and_the_run_stops_after_five(tmp_path):
    cfg = tmp_path / "ds_z2.json"
    cfg.write_text(json.dumps(ds_config(2)))
    cmd = [sys.executable, "-m", "phift.cli", "train", "--model_name_or_path", "tiny", "--dataset", "self_cognition",
           "--dataset_dir", str(ROOT / "data"), "--finetuning_type", "lora", "--lora_target", "all", "--lora_dropout",
           "0", "--max_samples", "16", "--per_device_train_batch_size", "4", "--cutoff_len", "64", "--max_steps", "20",
           "--learning_rate", "1e8", "--seed", "0", "--disable_gradient_checkpointing", "True", "--deepspeed",
           str(cfg), "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=subprocess_env(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "the gradients were not finite (NaN or inf) 5 in a row" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def free_port() -> int:
    """A port no other run is listening on (tests in parallel workers launch at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, name, world, *extra, stage=2):
    """`world` processes of one DeepSpeed run over gloo, as the deepspeed launcher would start them."""
    out = tmp_path / name
    cfg = tmp_path / f"ds_z{stage}.json"
    cfg.write_text(json.dumps(ds_config(stage)))
    cmd = [sys.executable, "-m", "phift.cli", "train", "--model_name_or_path", "tiny", "--dataset",
           "self_cognition", "--dataset_dir", str(ROOT / "data"), "--finetuning_type", "lora", "--lora_target", "all",
           "--lora_dropout", "0", "--max_samples", "20", "--val_size", "4",
           "--per_device_train_batch_size", str(4 // world),
           "--cutoff_len", "64", "--num_train_epochs", "2", "--learning_rate", "1e-3", "--logging_steps", "1",
           "--seed", "0", "--disable_gradient_checkpointing", "True", "--save_steps", "4",
           "--deepspeed", str(cfg), "--output_dir", str(out), *extra]
    base = subprocess_env(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()), WORLD_SIZE=str(world))
    procs = [subprocess.Popen(cmd, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate(timeout=1200)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return out, logs


def losses_and_eval(out):
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [e["loss"] for e in log if "loss" in e], json.loads((out / "train_results.json").read_text())["eval_loss"]


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_follow_one_rank_write_once_and_resume_on_one(tmp_path, stage):
    one, _ = launch(tmp_path, "one", 1, stage=stage)
    two, logs = launch(tmp_path, "two", 2, stage=stage)
    curve1, eval1 = losses_and_eval(one)
    curve2, eval2 = losses_and_eval(two)
    assert len(curve1) == len(curve2) == 8  # one line a step: only rank 0 writes
    for a, b in zip(curve1, curve2):  # same global batch and data order; per-rank means differ slightly
        assert abs(a - b) <= 0.02 * a, (curve1, curve2)
    assert abs(eval1 - eval2) <= 0.02 * eval1  # the eval loss is summed over both ranks' halves of the split
    assert "trainable params" in logs[0] and "trainable params" not in logs[1]
    resumed, _ = launch(tmp_path, "two", 1, "--resume_from_checkpoint", str(two / "checkpoint-4"), stage=stage)
    log = [e for e in map(json.loads, (resumed / "trainer_log.jsonl").read_text().splitlines()) if "loss" in e]
    # the 2-rank run's lines up to the checkpoint, then the resumed run's
    assert [e["current_steps"] for e in log] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [e["loss"] for e in log[:4]] == curve2[:4]
    for a, b in zip([e["loss"] for e in log[4:]], curve2[4:]):
        assert abs(a - b) <= 0.02 * a, (log, curve2)


class Payload:
    """Unpickled, it creates `marker`: what a crafted checkpoint would do with a real command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def train_ds(out, *extra):
    cmd = [sys.executable, "-m", "phift.cli", "train", "--model_name_or_path", "tiny", "--dataset", "self_cognition",
           "--dataset_dir", str(ROOT / "data"), "--lora_target", "all", "--lora_dropout", "0", "--max_samples", "16",
           "--per_device_train_batch_size", "4", "--cutoff_len", "64", "--num_train_epochs", "2", "--seed", "0",
           "--disable_gradient_checkpointing", "True", "--save_steps", "4", "--output_dir", str(out), *extra]
    return subprocess.run(cmd, env=subprocess_env(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("stage, file, universal", [
    (2, "mp_rank_00_model_states.pt", False),
    (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt", False),
    (3, "zero_pp_rank_0_mp_rank_00_optim_states.pt", False),
    (2, "mp_rank_00_model_states.pt", True),  # another world size: ds_to_universal reads the files first
    (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt", True),
])
def test_resume_never_runs_code_that_a_deepspeed_checkpoint_names(tmp_path, stage, file, universal):
    import torch

    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({**ds_config(stage), "zero_optimization": {"stage": stage}}))
    out = tmp_path / "run"
    proc = train_ds(out, "--deepspeed", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "checkpoint-4"
    if universal:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        (ckpt / "trainer_state.json").write_text(json.dumps({**state, "world_size": 2}))
    proc = train_ds(out, "--deepspeed", str(cfg), "--resume_from_checkpoint", str(ckpt))
    assert proc.returncode == 0, proc.stderr[-3000:]  # DeepSpeed's own state loads with weights_only=True
    assert (ckpt / "deepspeed_universal").is_dir() == universal
    shutil.rmtree(ckpt / "deepspeed_universal", ignore_errors=True)

    marker = tmp_path / "payload-ran"
    target = ckpt / "deepspeed" / file
    state = torch.load(target, weights_only=False)  # the test's own file: trusted
    state["extra"] = Payload(marker)
    torch.save(state, target)
    proc = train_ds(out, "--deepspeed", str(cfg), "--resume_from_checkpoint", str(ckpt))
    assert not marker.exists(), "the checkpoint's pickle ran code"
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("phift train: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert file in errors[0] and "not allowed" in errors[0], errors[0]
