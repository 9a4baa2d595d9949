"""--report_to: the scalars of trainer_log.jsonl reach TensorBoard's event files and a W&B run, at their steps."""
import json
import struct
import sys
from pathlib import Path

import pytest

from phift import train as train_mod
from phift.tracking import scalars
from test_train import run_args


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def test_entries_become_the_trainers_scalar_names():
    entry = {"current_steps": 3, "total_steps": 9, "loss": 1.5, "learning_rate": 1e-4, "grad_norm": 0.3, "epoch": 1.0}
    assert scalars(entry) == {"train/loss": 1.5, "train/learning_rate": 1e-4, "train/grad_norm": 0.3,
                              "train/epoch": 1.0}
    assert scalars({"current_steps": 4, "eval_loss": 2.0}) == {"eval/loss": 2.0}


def test_tensorboard_event_files_hold_every_logged_scalar(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    args = run_args(tmp_path, report_to="tensorboard", max_samples=16, val_size=4, eval_steps=2, num_train_epochs=2)
    train_mod.train(args)
    out = Path(args.training.output_dir)
    events = event_accumulator.EventAccumulator(str(out / "runs"))
    events.Reload()
    for name in ("train/loss", "train/grad_norm", "train/learning_rate", "eval/loss"):
        expected = [(e["current_steps"], v) for e in logged(out) for k, v in scalars(e).items() if k == name]
        got = [(s.step, s.value) for s in events.Scalars(name)]
        assert len(got) == len(expected) > 0, name
        for (step, value), (want_step, want) in zip(got, expected):
            assert step == want_step and value == pytest.approx(want, rel=1e-6), name


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run file: a LevelDB-style log (32 KiB blocks of records, each a 7-byte
    header: crc32, length, kind 1 whole / 2 first / 3 middle / 4 last) of protobuf Records, after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    data, rows, pos, pieces = run_file.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pieces, pos = pieces + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_run_holds_every_logged_scalar(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = run_args(tmp_path, report_to="wandb", num_train_epochs=1)
    train_mod.train(args)
    out = Path(args.training.output_dir)
    runs = list(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history = wandb_history(runs[0])
    entries = [e for e in logged(out) if "loss" in e]
    assert len(history) == len(entries) == 3
    for row, entry in zip(history, entries):
        assert row["_step"] == entry["current_steps"]
        for name, value in scalars(entry).items():
            assert row[name] == pytest.approx(value, rel=1e-9), name


def test_a_missing_tracker_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'phift\[wandb\]'"):
        train_mod.train(run_args(tmp_path, report_to="wandb", max_steps=1))
