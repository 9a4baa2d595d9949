"""The training loop on the CPU: it learns, resumes exactly, survives a crash mid-save, parses the seed's flags."""
import errno
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import subprocess_env
from phift import kernels, lora
from phift import train as train_mod
from phift.args import ConfigError, Precision, decide_precision, parse_train_args
from phift.weights import save_model
from phift.config import PhiConfig
from phift.data import load_rows
from phift.engines import OptimSpec, build_engine, lr_lambda
from phift.engines.deepspeed import fill_deepspeed_config, refuse_unskipped_non_finite_steps
from phift.engines.plain import TorchEngine
from phift.model import Phi
from phift.state import TrainableWeights
from phift.tokenizer import train_demo_tokenizer

ROOT = Path(__file__).resolve().parents[1]

# Recipe 1 of the seed, verbatim but for the script path.
SEED_RECIPE_1 = """
    --stage sft --model_name_or_path microsoft/phi-1_5 --do_train True --finetuning_type lora --template vanilla
    --flash_attn False --shift_attn False --dataset_dir data --dataset self_cognition --cutoff_len 1024
    --learning_rate 2e-04 --num_train_epochs 20.0 --max_samples 1000 --per_device_train_batch_size 6
    --per_device_eval_batch_size 6 --gradient_accumulation_steps 1 --lr_scheduler_type cosine --max_grad_norm 1.0
    --logging_steps 5 --save_steps 100 --warmup_steps 0 --neft_alpha 0 --train_on_prompt False
    --upcast_layernorm False --lora_rank 8 --lora_dropout 0.1 --lora_target Wqkv --resume_lora_training True
    --output_dir saves/Phi1.5-1.3B/lora/my --fp16 True --plot_loss True"""


def run_args(tmp_path, **over):
    return parse_train_args(run_argv(tmp_path, **over))


def run_argv(tmp_path, **over) -> list[str]:
    flags = dict(model_name_or_path="tiny", dataset="self_cognition", dataset_dir=str(ROOT / "data"),
                 template="vanilla", finetuning_type="full", cutoff_len=64, max_samples=12,
                 per_device_train_batch_size=4, learning_rate=1e-3, num_train_epochs=3, logging_steps=1,
                 save_steps=1000, lr_scheduler_type="cosine", output_dir=str(tmp_path / "out"), seed=0,
                 disable_gradient_checkpointing=True)
    flags.update(over)
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def engine_for(model, run, device="cpu", total_steps=10):
    """The engine `phift train` would build for this run configuration."""
    device = torch.device(device)
    return build_engine(model, run, decide_precision(run, device), total_steps, device)


def losses(out_dir):
    return [e["loss"] for e in map(json.loads, (Path(out_dir) / "trainer_log.jsonl").read_text().splitlines())
            if "loss" in e]


def log_entries(out_dir) -> list[dict]:
    """trainer_log.jsonl without its timings (tokens_per_second, elapsed_time): what a rerun must reproduce."""
    log = map(json.loads, (Path(out_dir) / "trainer_log.jsonl").read_text().splitlines())
    return [{k: v for k, v in e.items() if k not in ("tokens_per_second", "elapsed_time")} for e in log]


def logged_steps(out_dir) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad_norm); a step logged twice (before a crash and after the resume) keeps its last entry."""
    log = map(json.loads, (Path(out_dir) / "trainer_log.jsonl").read_text().splitlines())
    return {e["current_steps"]: (e["loss"], e["grad_norm"]) for e in log if "loss" in e}


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A saved random tiny phi with a tokenizer: a run on it loads weights, unlike a preset name."""
    texts = [t for r in load_rows("self_cognition", ROOT / "data") for t in (r["prompt"], r["response"])]
    tok = train_demo_tokenizer(texts, vocab_size=512)
    torch.manual_seed(123)
    d = tmp_path / "tiny-checkpoint"
    save_model(Phi(PhiConfig.from_name("tiny", vocab_size=512)), d)
    tok.save(d)
    return d


def test_seed_recipe_flags_parse():
    args = parse_train_args(shlex.split(SEED_RECIPE_1))
    f = args.finetuning
    assert (f.finetuning_type, f.lora_target, f.lora_rank, f.lora_alpha) == ("lora", "Wqkv", 8, 16.0)
    assert args.training.fp16 and f.plot_loss and not args.data.train_on_prompt
    assert args.training.num_train_epochs == 20.0


def test_all_three_seed_commands_in_the_tutorial_parse(shared_data):
    seed = (shared_data.parent / "seed" / "000_34567658f76e8f51.txt").read_text()
    commands = re.findall(r"src/train_bash\.py \\\n(.*?)```", seed, flags=re.S)
    assert len(commands) == 3
    for cmd in commands:
        args = parse_train_args(shlex.split(cmd.replace("\\\n", " ")))
        assert args.finetuning.stage == "sft" and args.data.template == "vanilla"


@pytest.mark.parametrize("bad, message", [
    (["--stage", "ppo"], "argument --stage: invalid choice: 'ppo'"),
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
    (["--fp16", "maybe"], "argument --fp16: expected True or False, got 'maybe'"),
    (["--finetuning_type", "freeze"], "argument --finetuning_type: invalid choice: 'freeze'"),
    (["--shift_attn", "True"], "LLaMA-only")])
def test_unknown_flags_and_unsupported_values_are_errors(bad, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_train_args(shlex.split(SEED_RECIPE_1) + bad)


def test_cosine_schedule_matches_transformers_formula():
    f = lr_lambda("cosine", warmup=2, total=10)
    assert [f(0), f(1), f(2), f(6), f(10)] == [0.0, 0.5, 1.0, pytest.approx(0.5), pytest.approx(0.0)]


def test_deepspeed_auto_values_are_filled_from_flags(tmp_path):
    cfg = json.loads((ROOT / "examples" / "ds_config.json").read_text())
    args = run_args(tmp_path, per_device_train_batch_size=6, gradient_accumulation_steps=2, fp16=True)
    filled = fill_deepspeed_config(cfg, OptimSpec.from_training(args.training, 10), micro_batch=6, fp16=True,
                                   bf16=False, world_size=2, hidden_size=2048)
    assert filled["train_batch_size"] == 24 and filled["train_micro_batch_size_per_gpu"] == 6
    assert filled["gradient_accumulation_steps"] == 2 and filled["gradient_clipping"] == 1.0
    assert filled["fp16"]["enabled"] is True and filled["bf16"]["enabled"] is False
    assert filled["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("change, message", [({"zero_optimization": {"stage": 0}}, "ZeRO stage 0 in fp32"),
                                             ({"bf16": {"enabled": True, "check_grad_overflow": False}},
                                              "check_grad_overflow false")])
def test_deepspeed_configs_that_apply_non_finite_steps_are_refused(change, message):
    cfg = fill_deepspeed_config({**json.loads((ROOT / "examples" / "ds_config.json").read_text()), **change},
                                OptimSpec.from_training(run_args(Path("/nonexistent")).training, 10), micro_batch=4,
                                fp16=False, bf16="bf16" in change, world_size=1, hidden_size=64)
    with pytest.raises(ValueError, match=message):
        refuse_unskipped_non_finite_steps(cfg)


def test_tiny_model_learns_and_writes_log_plot_and_model(tmp_path):
    args = run_args(tmp_path, num_train_epochs=15, learning_rate=3e-3, plot_loss=True)
    train_mod.train(args)
    out = Path(args.training.output_dir)
    curve = losses(out)
    assert len(curve) == 45
    assert sum(curve[-5:]) / 5 < 0.5 * sum(curve[:5]) / 5
    assert (out / "training_loss.png").stat().st_size > 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "latest").read_text() == "checkpoint-45"


def test_lora_run_saves_only_the_adapter(tmp_path):
    args = run_args(tmp_path, finetuning_type="lora", lora_target="all", num_train_epochs=1)
    train_mod.train(args)
    out = Path(args.training.output_dir)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert (out / "base_model" / "model.safetensors").is_file()  # the random-init base, so chat can load it


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    full = run_args(tmp_path / "a", save_steps=4, finetuning_type="lora", lora_target="all", lora_dropout=0.1,
                    num_train_epochs=3)
    train_mod.train(full)
    uninterrupted = losses(full.training.output_dir)
    resumed = run_args(tmp_path / "b", finetuning_type="lora", lora_target="all", lora_dropout=0.1,
                       num_train_epochs=3, resume_from_checkpoint=str(Path(full.training.output_dir) / "checkpoint-4"))
    train_mod.train(resumed)
    assert losses(resumed.training.output_dir) == uninterrupted[4:]


def test_the_same_seed_gives_the_same_lora_run_on_a_loaded_checkpoint(tmp_path, tiny_checkpoint):
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(len(name) * 1000 + ord(name))  # whatever the process drew before: --seed decides
        args = run_args(tmp_path / name, model_name_or_path=str(tiny_checkpoint), finetuning_type="lora",
                        lora_target="all", lora_dropout=0.1, num_train_epochs=2, learning_rate=3e-3)
        train_mod.train(args)
        runs.append(logged_steps(args.training.output_dir))
    assert len(runs[0]) == 6 and runs[0] == runs[1]
    other = run_args(tmp_path / "c", model_name_or_path=str(tiny_checkpoint), finetuning_type="lora",
                     lora_target="all", lora_dropout=0.1, num_train_epochs=2, learning_rate=3e-3, seed=1)
    train_mod.train(other)
    assert logged_steps(other.training.output_dir)[1] != runs[0][1]  # and another seed another run


def test_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_log(tmp_path, tiny_checkpoint):
    """The resumed run's trainer_log.jsonl is the uninterrupted one's, line for line: the killed run's lines past the
    checkpoint are dropped, and the loss logged first after it (its window straddles the checkpoint, as logging
    every 2 steps and saving every 3 makes it) covers the steps the uninterrupted run's did.

    All three runs are fresh `phift train` processes with one environment: on a GPU, bit-equal logs need the same
    cuBLAS workspace setting (--full_determinism sets it, but only before a process's first cuBLAS call) and so the
    same kernels in every run."""
    flags = dict(model_name_or_path=str(tiny_checkpoint), finetuning_type="lora", lora_target="all",
                 lora_dropout=0.1, num_train_epochs=1000, max_steps=40, save_steps=3, logging_steps=2,
                 learning_rate=3e-3, full_determinism=True)
    # every run takes the ops this process runs (the spec tier turns the C++ AdamW off here)
    env = subprocess_env(PHIFT_DISABLE_KERNELS=",".join(sorted(kernels.DISABLED)))

    def train_argv(out, **more):
        return [sys.executable, "-m", "phift.cli", "train", *run_argv(out, **flags, **more)]

    def train_to_the_end(out, **more):
        proc = subprocess.run(train_argv(out, **more), env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]

    train_to_the_end(tmp_path / "whole")
    proc = subprocess.Popen(train_argv(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    out = tmp_path / "killed" / "out"
    deadline = time.time() + 300
    # killed once a checkpoint exists and a step past it has been logged (that line must not survive the resume)
    while proc.poll() is None and time.time() < deadline and not (
            (out / "latest").exists() and last_logged_step(out) > int((out / "latest").read_text().split("-")[1])):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
    at = int((out / "latest").read_text().split("-")[1])
    assert at < 40 and max(e["current_steps"] for e in log_entries(out)) > at
    train_to_the_end(tmp_path / "killed", resume_from_checkpoint="latest")
    assert log_entries(out) == log_entries(tmp_path / "whole" / "out")


def test_full_determinism_picks_deterministic_kernels_for_the_run(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # recorded, so the teardown puts back what was there
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    args = run_args(tmp_path, model_name_or_path=str(tiny_checkpoint), finetuning_type="lora", max_steps=1)
    train_mod.train(args)
    assert not torch.are_deterministic_algorithms_enabled()  # off unless asked for
    args = run_args(tmp_path / "d", model_name_or_path=str(tiny_checkpoint), finetuning_type="lora", max_steps=1,
                    full_determinism=True)
    train_mod.train(args)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def last_logged_step(out_dir) -> int:
    try:
        return max(json.loads(line)["current_steps"] for line in (out_dir / "trainer_log.jsonl").open())
    except (FileNotFoundError, ValueError):  # no log yet, or a line half written
        return 0


def test_resuming_from_an_earlier_checkpoint_rewrites_the_log_from_there(tmp_path):
    flags = dict(max_steps=12, save_steps=3, logging_steps=2)
    args = run_args(tmp_path, **flags)
    train_mod.train(args)
    whole = log_entries(args.training.output_dir)
    again = run_args(tmp_path, **flags, resume_from_checkpoint=str(Path(args.training.output_dir) / "checkpoint-3"))
    train_mod.train(again)
    assert log_entries(args.training.output_dir) == whole


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    args = run_args(tmp_path, save_steps=3, num_train_epochs=2)
    real_save = TrainableWeights.save
    calls = {"n": 0}

    def dying_save(*a, **kw):
        calls["n"] += 1
        real_save(*a, **kw)
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(TrainableWeights, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(args)
    out = Path(args.training.output_dir)
    assert (out / "latest").read_text() == "checkpoint-3"
    assert not (out / "checkpoint-6").exists() and (out / ".tmp-checkpoint-6").exists()
    monkeypatch.setattr(TrainableWeights, "save", real_save)
    resumed = run_args(tmp_path, save_steps=3, num_train_epochs=2, resume_from_checkpoint="latest")
    assert train_mod.train(resumed)["global_step"] == 6


@pytest.mark.parametrize("failure, message", [
    (OSError(errno.ENOSPC, "No space left on device"), "disk full"),
    # torch.save's own report of a full disk carries no errno: the free space tells
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"), "disk full"),
    (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
])
def test_a_failed_save_removes_the_partial_checkpoint_and_says_why(tmp_path, monkeypatch, failure, message):
    args = run_args(tmp_path, save_steps=3, num_train_epochs=2)
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] <= 2:  # the first checkpoint's optimizer and generator states
            return real_save(obj, f, *a, **kw)
        Path(f).write_bytes(b"\0" * 4096)  # what a full disk leaves: part of the file
        raise failure

    monkeypatch.setattr(torch, "save", failing_save)
    if isinstance(failure, RuntimeError):
        monkeypatch.setattr("shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 0))
    with pytest.raises(RuntimeError, match=re.escape(message)) as e:
        train_mod.train(args)
    out = Path(args.training.output_dir)
    assert "checkpoint-6" in str(e.value) and "removed" in str(e.value)
    assert not (out / ".tmp-checkpoint-6").exists() and not (out / "checkpoint-6").exists()
    assert (out / "latest").read_text() == "checkpoint-3" and (out / "checkpoint-3" / "optimizer.pt").is_file()


@pytest.mark.parametrize("entry", [train_mod.train, train_mod.evaluate])
def test_a_read_only_output_dir_is_an_error_before_the_model_loads(tmp_path, monkeypatch, entry):
    args = run_args(tmp_path, output_dir=tmp_path / "ro", do_eval=True)
    (tmp_path / "ro").mkdir(mode=0o500)
    if os.access(tmp_path / "ro", os.W_OK):  # root writes anyway: the write fails as it would for anyone else
        def refuse(*a, **kw):
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro"))
        monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)

    def loaded(*a, **kw):
        raise AssertionError("the model was loaded before the output directory was checked")
    monkeypatch.setattr(train_mod, "load_base", loaded)
    monkeypatch.setattr(train_mod, "load_for_inference", loaded)
    with pytest.raises(OSError, match=re.escape(f"--output_dir {tmp_path / 'ro'} is not writable (Permission denied)")):
        entry(args)


def test_output_dir_with_checkpoints_is_not_overwritten_silently(tmp_path):
    args = run_args(tmp_path, num_train_epochs=1)
    train_mod.train(args)
    with pytest.raises(FileExistsError, match="resume_from_checkpoint latest"):
        train_mod.train(args)


def test_fp16_overflow_step_is_skipped_and_not_applied(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = Phi(tiny_config)
    args = run_args(tmp_path, fp16=True)  # fp16 autocast and its loss scale, on the CPU (a GPU run's policy)
    fp16 = Precision(compute=torch.float16, load=torch.float32, upcast_trainable=True, autocast=torch.float16,
                     loss_scaling=True, master_weights=False)
    engine = TorchEngine(model, OptimSpec.from_training(args.training, 10), fp16, torch.device("cpu"))
    x = torch.randint(0, 128, (2, 8))
    before = [p.detach().clone() for p in model.parameters()]
    handle = model.wte.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    engine.backward(engine.forward({"input_ids": x, "labels": x}), boundary=True)
    info = engine.step(boundary=True)
    assert info["skipped"] and info["loss_scale"] == 2.0 ** 15
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert engine.scheduler.last_epoch == 0  # the schedule did not advance either
    handle.remove()
    engine.backward(engine.forward({"input_ids": x, "labels": x}), boundary=True)
    assert not engine.step(boundary=True)["skipped"]
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_config):
    x = torch.randint(0, 128, (4, 8))
    grads = []
    for accum in (1, 2):
        torch.manual_seed(0)
        model = Phi(tiny_config)
        engine = engine_for(model, run_args(tmp_path, gradient_accumulation_steps=accum))
        for chunk in x.chunk(accum):
            engine.backward(engine.forward({"input_ids": chunk, "labels": chunk}), boundary=False)
        grads.append(model.wte.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_validation_split_logs_eval_loss_every_eval_steps(tmp_path):
    args = run_args(tmp_path, max_samples=16, val_size=0.25, eval_steps=2, num_train_epochs=2)
    results = train_mod.train(args)
    log = [json.loads(line) for line in (Path(args.training.output_dir) / "trainer_log.jsonl").read_text().splitlines()]
    assert [e["current_steps"] for e in log if "eval_loss" in e] == [2, 4, 6]  # 12 train samples / 4 × 2 epochs
    assert results["eval_loss"] > 0


def test_packed_training_learns(tmp_path):
    args = run_args(tmp_path, packing=True, cutoff_len=128, num_train_epochs=45, learning_rate=3e-3)
    train_mod.train(args)
    curve = losses(args.training.output_dir)
    assert sum(curve[-3:]) / 3 < 0.6 * sum(curve[:3]) / 3


def test_checkpoint_dir_resumes_or_stacks_a_new_adapter_on_the_merged_one(tmp_path):
    first = run_args(tmp_path / "a", finetuning_type="lora", lora_target="all", learning_rate=3e-3,
                     num_train_epochs=6)
    train_mod.train(first)
    start, end = losses(first.training.output_dir)[0], losses(first.training.output_dir)[-1]
    first_A = load_file(str(Path(first.training.output_dir) / lora.ADAPTER_WEIGHTS))["layers.0.attn.Wqkv.lora_A"]
    for resume in (True, False):
        again = run_args(tmp_path / str(resume), finetuning_type="lora", lora_target="all", learning_rate=3e-3,
                         num_train_epochs=1, checkpoint_dir=first.training.output_dir, resume_lora_training=resume,
                         model_name_or_path=str(Path(first.training.output_dir) / "base_model"))
        train_mod.train(again)
        # either way the run starts from what the first one learned, not from the base model's loss
        assert losses(again.training.output_dir)[0] < end + 0.5 * (start - end)
        A = load_file(str(Path(again.training.output_dir) / lora.ADAPTER_WEIGHTS))["layers.0.attn.Wqkv.lora_A"]
        # True: the same adapter trained on (a few small steps away); False: a fresh one on the merged base
        assert ((A - first_A).norm() < 0.2 * first_A.norm()) == resume


def test_packed_rows_of_one_sample_each_batch_as_unpacked():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    single = train_mod.to_batch([[examples[0]], [examples[1]]], True, 0, "cpu")
    assert "attention_mask" not in single  # no segment mask: SDPA may take its flash kernel
    unpacked = train_mod.to_batch(examples, False, 0, "cpu")
    assert single.keys() == unpacked.keys()
    for k in single:
        assert torch.equal(single[k], unpacked[k]), k
    assert "attention_mask" in train_mod.to_batch([examples], True, 0, "cpu")  # two samples share a row


def test_pure_bf16_full_finetuning_learns_keeps_bf16_weights_and_resumes_exactly(tmp_path):
    args = run_args(tmp_path / "a", pure_bf16=True, num_train_epochs=6, learning_rate=3e-3, save_steps=9)
    train_mod.train(args)
    curve = losses(args.training.output_dir)
    assert sum(curve[-3:]) / 3 < 0.7 * sum(curve[:3]) / 3
    weights = load_file(str(Path(args.training.output_dir) / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    state = torch.load(Path(args.training.output_dir) / "checkpoint-9" / "optimizer.pt", weights_only=True)["optimizer"]
    assert all(s["master"].dtype == torch.float32 for s in state["state"].values())
    resumed = run_args(tmp_path / "b", pure_bf16=True, num_train_epochs=6, learning_rate=3e-3, save_steps=9,
                       resume_from_checkpoint=str(Path(args.training.output_dir) / "checkpoint-9"))
    train_mod.train(resumed)
    assert losses(resumed.training.output_dir) == curve[9:]


def test_pure_bf16_engine_steps_master_weights_without_autocast(tiny_config):
    args = run_args(Path("/nonexistent"), pure_bf16=True)
    model = train_mod.prepare_model(Phi(tiny_config).to(torch.bfloat16), args,
                                    decide_precision(args, torch.device("cpu")))
    engine = engine_for(model, args)
    assert type(engine.optimizer).__name__ == "MasterAdamW"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = torch.randint(0, tiny_config.vocab_size, (2, 16))
    loss = engine.forward({"input_ids": ids, "labels": ids})
    assert loss.dtype == torch.float32  # the chunked loss, computed in fp32 from bf16 logits
    engine.backward(loss, True)
    before = model.wte.weight.detach().clone()
    info = engine.step(True)
    assert info["grad_norm"] > 0 and not info["skipped"]
    assert not torch.equal(before, model.wte.weight) and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("bad, message", [
    (["--fp16", "True"], "--pure_bf16 and --fp16 are exclusive"),
    (["--deepspeed", "examples/ds_config.json"], "drop --pure_bf16 and pass --bf16 True"),
    (["--upcast_layernorm", "True"], "cannot be combined with --upcast_layernorm True"),
])
def test_pure_bf16_refuses_what_it_cannot_honour(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_train_args(["--pure_bf16", "True", "--model_name_or_path", "tiny", "--dataset", "self_cognition",
                          "--output_dir", str(tmp_path), *bad])


# ------------------------------------------------------------------------------------ non-finite gradients
def poison_gradients(model):
    """A NaN in one gradient of the next backward (as a diverging run's loss gives)."""
    return model.wte.weight.register_hook(lambda g: torch.full_like(g, float("nan")))


@pytest.mark.parametrize("flags", [{}, {"bf16": True}, {"pure_bf16": True}], ids=["fp32", "bf16", "pure_bf16"])
def test_a_step_with_non_finite_gradients_leaves_weights_and_optimizer_as_they_were(tmp_path, tiny_config, flags):
    args = run_args(tmp_path, **flags)
    precision = decide_precision(args, torch.device("cpu"))
    torch.manual_seed(0)
    model = train_mod.prepare_model(Phi(tiny_config).to(precision.load), args, precision)
    engine = engine_for(model, args)
    x = torch.randint(0, 128, (2, 8))
    engine.backward(engine.forward({"input_ids": x, "labels": x}), boundary=True)
    assert not engine.step(boundary=True)["skipped"]  # a clean step: the optimizer has state now
    weights = [p.detach().clone() for p in model.parameters()]
    moments = [{k: v.clone() for k, v in s.items() if k != "step"} for s in engine.optimizer.state.values()]
    handle = poison_gradients(model)
    engine.backward(engine.forward({"input_ids": x, "labels": x}), boundary=True)
    info = engine.step(boundary=True)
    handle.remove()
    assert info["skipped"] and not torch.isfinite(torch.as_tensor(info["grad_norm"]))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    for saved, now in zip(moments, engine.optimizer.state.values()):
        assert all(torch.equal(v, now[k]) for k, v in saved.items())
    engine.backward(engine.forward({"input_ids": x, "labels": x}), boundary=True)
    assert not engine.step(boundary=True)["skipped"]  # and the next clean step applies
    assert not all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def test_the_plain_engine_decides_a_skip_without_waiting_for_the_device(tmp_path, tiny_config):
    """The flag stays a device tensor, as grad_norm does: the loop reads them when it logs, not every step."""
    model = Phi(tiny_config)
    engine = engine_for(model, run_args(tmp_path))
    x = torch.randint(0, 128, (2, 8))
    engine.backward(engine.forward({"input_ids": x, "labels": x}), boundary=True)
    info = engine.step(boundary=True)
    assert isinstance(info["skipped"], torch.Tensor) and isinstance(info["grad_norm"], torch.Tensor)


@pytest.mark.parametrize("flags", [{"learning_rate": 1e8}, {"learning_rate": 1e3},
                                   {"learning_rate": 1e8, "pure_bf16": True},
                                   {"learning_rate": 1e8, "bf16": True, "offload_optimizer": "cpu"}],
                         ids=["lr1e8", "lr1e3", "pure_bf16", "offload"])
def test_a_diverging_run_stops_after_five_skipped_steps_and_saves_nothing_that_is_not_finite(tmp_path, flags, caplog):
    with caplog.at_level(logging.WARNING), pytest.raises(train_mod.TrainingDiverged) as e:
        train_mod.train(run_args(tmp_path, max_steps=30, save_steps=2, **flags))
    assert str(e.value).startswith("steps ") and "5 in a row" in str(e.value) and "--learning_rate" in str(e.value)
    skipped = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert len(skipped) == 5
    out = tmp_path / "out"
    assert not (out / "model.safetensors").exists()
    for ckpt in out.glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values())


def test_a_diverging_run_leaves_the_cli_with_one_line_and_exit_code_1(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "phift.cli", "train", *run_argv(tmp_path, learning_rate=1e8)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("phift train: error: steps 2-6: the gradients were not finite"), proc.stderr[-2000:]


def test_fewer_than_five_skipped_steps_in_a_row_are_logged_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    real_forward, calls = TorchEngine.forward, {"n": 0}

    def forward(self, batch):
        calls["n"] += 1
        loss = real_forward(self, batch)
        return loss * float("nan") if calls["n"] in (3, 4, 5, 6, 8) else loss

    monkeypatch.setattr(TorchEngine, "forward", forward)
    args = run_args(tmp_path, max_steps=12, per_device_train_batch_size=12, num_train_epochs=100)
    with caplog.at_level(logging.WARNING):
        results = train_mod.train(args)
    assert results["global_step"] == 12 and math.isfinite(results["train_loss"])
    skipped = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert [int(m.split()[1].rstrip(":")) for m in skipped] == [3, 4, 5, 6, 8]
