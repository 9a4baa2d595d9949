"""Training state on disk: what a run may write over, checkpoints that survive a crash at any point of their save,
rotation that never loses the checkpoint to resume from, and a resume that says which optimizer settings hold."""
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phift import state
from phift import train as train_mod
from phift.args import decide_precision
from phift.config import PhiConfig
from phift.engines import build_engine
from phift.engines.plain import TorchEngine
from phift.model import Phi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import logged_steps, run_args, run_argv  # noqa: E402


def checkpoints(out) -> list[str]:
    return sorted((p.name for p in Path(out).glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


def finite(directory) -> bool:
    weights = load_file(str(Path(directory) / "model.safetensors"))
    return all(torch.isfinite(t).all() for t in weights.values())


# ---------------------------------------------------------------------------------------------- the output dir
def test_overwrite_output_dir_starts_over_without_the_old_runs_checkpoints(tmp_path):
    train_mod.train(run_args(tmp_path, max_steps=8, save_steps=2))
    out = tmp_path / "out"
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    train_mod.train(run_args(tmp_path, max_steps=4, save_steps=2, save_total_limit=2, overwrite_output_dir=True))
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"] and (out / "latest").read_text() == "checkpoint-4"
    assert sorted(logged_steps(out)) == [1, 2, 3, 4]  # the old run's log is gone with it
    resumed = train_mod.train(run_args(tmp_path, max_steps=4, save_steps=2, resume_from_checkpoint="latest"))
    assert resumed["global_step"] == 4


def test_rotation_never_deletes_the_checkpoint_latest_names(tmp_path, monkeypatch):
    """Resuming from an older checkpoint leaves the run's newer ones; with one checkpoint kept, the step-4 save
    sorts below the old 6 and 8, and must still be there for `latest` to name it."""
    train_mod.train(run_args(tmp_path, max_steps=8, save_steps=2))
    out = tmp_path / "out"
    real, seen = state.save_checkpoint, []

    def save_and_look(*a, **kw):
        path = real(*a, **kw)
        seen.append((path.name, (path / "trainer_state.json").is_file(), (out / "latest").read_text()))
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save_and_look)
    train_mod.train(run_args(tmp_path, max_steps=8, save_steps=2, save_total_limit=1,
                             resume_from_checkpoint=str(out / "checkpoint-2")))
    assert seen == [(f"checkpoint-{s}", True, f"checkpoint-{s}") for s in (4, 6, 8)]
    assert checkpoints(out) == ["checkpoint-8"]


@pytest.mark.parametrize("leftover", [["model.safetensors", "config.json"], ["config.json"], ["tokenizer.json"]])
def test_a_non_empty_output_dir_is_refused_without_overwrite(tmp_path, leftover):
    out = tmp_path / "out"
    out.mkdir()
    for name in leftover:
        (out / name).write_text("{}")
    with pytest.raises(FileExistsError) as e:
        train_mod.train(run_args(tmp_path, max_steps=1))
    message = str(e.value)
    assert str(out) in message and leftover[0] in message and "--overwrite_output_dir True" in message
    assert "--resume_from_checkpoint" not in message  # no checkpoint to resume from
    assert all((out / name).read_text() == "{}" for name in leftover)


def test_another_ranks_write_probe_does_not_make_the_output_dir_occupied(tmp_path):
    # ranks start together: rank 0's writability probe may sit in the directory while rank 1 looks
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{state.WRITE_PROBE}abc123").write_bytes(b"x")
    train_mod.train(run_args(tmp_path, max_steps=1))
    assert (out / "latest").exists()


def test_a_finished_run_without_checkpoints_is_not_overwritten(tmp_path):
    train_mod.train(run_args(tmp_path, max_steps=2, save_strategy="no"))
    out = tmp_path / "out"
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="model.safetensors"):
        train_mod.train(run_args(tmp_path, max_steps=2, save_strategy="no", learning_rate=1e-2))
    assert (out / "model.safetensors").read_bytes() == before


def test_an_output_dir_with_a_checkpoint_names_both_ways_out(tmp_path):
    train_mod.train(run_args(tmp_path, max_steps=2))
    with pytest.raises(FileExistsError) as e:
        train_mod.train(run_args(tmp_path, max_steps=2))
    assert "--resume_from_checkpoint latest" in str(e.value) and "--overwrite_output_dir True" in str(e.value)


def test_overwrite_keeps_what_phift_did_not_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    train_mod.train(run_args(tmp_path, max_steps=2, overwrite_output_dir=True))
    assert (out / "notes.txt").read_text() == "mine"


def test_a_full_run_over_a_lora_run_leaves_no_adapter_behind(tmp_path):
    """Else evaluation after training would find the old adapter_config.json and load the old adapter."""
    train_mod.train(run_args(tmp_path, max_steps=2, finetuning_type="lora", lora_target="all"))
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file()
    train_mod.train(run_args(tmp_path, max_steps=2, overwrite_output_dir=True))
    assert not (out / "adapter_config.json").exists() and not (out / "base_model").exists()
    assert (out / "model.safetensors").is_file()


def test_eval_only_runs_write_beside_a_model_and_delete_nothing(tmp_path):
    train_mod.train(run_args(tmp_path, max_steps=2, save_strategy="no"))
    out = tmp_path / "out"
    model = (out / "model.safetensors").read_bytes()
    for overwrite in (False, True):  # the second run meets its own earlier results, and overwrite removes nothing
        train_mod.main(run_argv(tmp_path, model_name_or_path=str(out), do_train=False, do_eval=True,
                                overwrite_output_dir=overwrite))
        assert json.loads((out / "all_results.json").read_text())["eval_loss"] > 0
    assert (out / "model.safetensors").read_bytes() == model and (out / "trainer_log.jsonl").is_file()


# ------------------------------------------------------------------------------------- a crash during a save
class Crash(BaseException):
    """What a kill does to the save: nothing after the crash point runs (not even except clauses)."""


def crash_at(monkeypatch, n: int) -> dict:
    """Make the n-th rename or delete that phift.state performs raise before it happens."""
    calls = {"n": 0, "crashed": False}
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def gate(real):
        def op(*a, **kw):
            if sys._getframe(1).f_globals.get("__name__") == "phift.state":
                calls["n"] += 1
                if calls["n"] == n:
                    calls["crashed"] = True
                    raise Crash(f"killed before {real.__name__}{a}")
            return real(*a, **kw)
        return op

    monkeypatch.setattr(os, "replace", gate(real_replace))
    monkeypatch.setattr(shutil, "rmtree", gate(real_rmtree))
    return calls


def test_a_crash_anywhere_in_resaving_the_latest_checkpoint_leaves_a_resumable_run(tmp_path, monkeypatch):
    """A requeued job resumes a finished run, which saves the checkpoint `latest` names again: a kill at any point of
    that save must leave a run that resumes (from a complete copy the save left, if need be)."""
    finished = tmp_path / "finished"
    train_mod.train(run_args(finished, max_steps=4, save_steps=2))
    for n in range(1, 20):
        run = tmp_path / f"crash-{n}"
        shutil.copytree(finished, run)
        with monkeypatch.context() as m:
            calls = crash_at(m, n)
            try:
                train_mod.train(run_args(run, max_steps=4, save_steps=2, resume_from_checkpoint="latest"))
            except Crash:
                pass
        if not calls["crashed"]:
            break  # n is past the save's last file operation: every crash point was tried
        out = run / "out"
        again = run_args(run, max_steps=4, save_steps=2, resume_from_checkpoint="latest")
        assert train_mod.train(again)["global_step"] == 4, n
        assert (out / "latest").read_text() == "checkpoint-4"
        assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
        assert not list(out.glob(".*checkpoint-*")), (n, list(out.iterdir()))  # no leftovers after a clean save
    assert n > 3


def test_resume_restores_a_complete_copy_left_by_a_crash_and_says_so(tmp_path, caplog):
    train_mod.train(run_args(tmp_path, max_steps=4, save_steps=2))
    out = tmp_path / "out"
    # what a kill between the old copy's removal and the new one's rename left behind
    os.replace(out / "checkpoint-4", out / ".tmp-checkpoint-4")
    with caplog.at_level(logging.INFO):
        assert train_mod.train(run_args(tmp_path, max_steps=4, resume_from_checkpoint="latest"))["global_step"] == 4
    assert "restored" in caplog.text and ".tmp-checkpoint-4" in caplog.text


# ------------------------------------------------------------------------------------------ a diverging run
def test_a_run_that_diverges_keeps_its_last_checkpoint_with_finite_weights(tmp_path, monkeypatch):
    """Gradients go NaN after step 4: the updates are skipped, the run stops, and every checkpoint left (the last
    two) holds finite weights, those of step 4."""
    real_forward, calls = TorchEngine.forward, {"n": 0}

    def forward(self, batch):
        calls["n"] += 1
        loss = real_forward(self, batch)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(TorchEngine, "forward", forward)
    args = run_args(tmp_path, max_steps=12, save_steps=2, save_total_limit=2, per_device_train_batch_size=12,
                    num_train_epochs=100)
    with pytest.raises(train_mod.TrainingDiverged) as e:
        train_mod.train(args)
    out = tmp_path / "out"
    latest = (out / "latest").read_text()
    assert latest in str(e.value) and checkpoints(out)[-1] == latest
    assert all(finite(out / c) for c in checkpoints(out))
    assert not (out / "model.safetensors").exists()  # nor a final model


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    train_mod.train(run_args(tmp_path, max_steps=2, save_steps=1))
    out = tmp_path / "out"
    args = run_args(tmp_path, max_steps=2)
    engine = build_engine(Phi(PhiConfig.from_name("tiny", vocab_size=128)), args,
                          decide_precision(args, torch.device("cpu")), 2, torch.device("cpu"))
    with torch.no_grad():
        next(engine.module.parameters())[0] = float("inf")
    weights = state.TrainableWeights(False, "tiny", None, None)
    with pytest.raises(state.NonFiniteWeights, match="step 3"):
        state.save_checkpoint(engine, weights, out, {"global_step": 3, "epoch": 0, "samples_in_epoch": 0})
    assert (out / "latest").read_text() == "checkpoint-2" and not list(out.glob("*checkpoint-3"))


# ------------------------------------------------------------------------ optimizer settings on resume
@pytest.mark.parametrize("flag, new", [("learning_rate", 5e-3), ("lr_scheduler_type", "linear"),
                                       ("warmup_steps", 2), ("adam_beta2", 0.99)])
def test_a_changed_optimizer_flag_on_resume_is_named_and_the_checkpoints_value_holds(tmp_path, caplog, flag, new):
    flags = dict(max_steps=6, save_steps=3, learning_rate=1e-3, lr_scheduler_type="cosine")
    whole = run_args(tmp_path / "whole", **flags)
    train_mod.train(whole)
    ckpt = tmp_path / "whole" / "out" / "checkpoint-3"
    resumed = run_args(tmp_path / "resumed", **{**flags, flag: new}, resume_from_checkpoint=str(ckpt))
    with caplog.at_level(logging.WARNING):
        train_mod.train(resumed)
    warning = [r.getMessage() for r in caplog.records if f"--{flag}" in r.getMessage()]
    assert len(warning) == 1 and str(new) in warning[0] and str(getattr(whole.training, flag)) in warning[0]
    log = [json.loads(line) for line in (tmp_path / "resumed" / "out" / "trainer_log.jsonl").read_text().splitlines()]
    uninterrupted = [json.loads(line) for line in
                     (tmp_path / "whole" / "out" / "trainer_log.jsonl").read_text().splitlines()]
    assert [(e["learning_rate"], e["loss"]) for e in log] == [(e["learning_rate"], e["loss"])
                                                              for e in uninterrupted[3:]]


def test_a_longer_run_on_resume_says_the_schedule_is_stretched(tmp_path, caplog):
    train_mod.train(run_args(tmp_path / "a", max_steps=6, save_steps=3))
    resumed = run_args(tmp_path / "b", max_steps=12, save_steps=3,
                       resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-3"))
    with caplog.at_level(logging.WARNING):
        train_mod.train(resumed)
    assert "12 steps" in caplog.text and "planned 6" in caplog.text
