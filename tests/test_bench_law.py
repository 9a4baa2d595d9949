"""bench/bench_law.py's CPU smoke mode: the harness trains phift unpacked and packed on the same synthetic samples
and reports every step it took (the tiny mode's built-in lengths, so it runs without .device/law_lengths.json)."""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import bench_law  # noqa: E402

pytestmark = pytest.mark.integration  # the bench harness's smoke runs


def test_tiny_run_reports_every_step_and_packing_takes_fewer(tmp_path):
    out = tmp_path / "law.md"
    bench_law.main(["--device", "cpu", "--tiny", "--only", r"^phift(\+packing)?$", "--out", str(out)])
    lines = [json.loads(x) for x in out.with_suffix(".jsonl").read_text().splitlines()]
    meta = lines[0]["meta"]
    rows = {r["impl"]: r for r in lines[1:]}
    assert set(rows) == {"phift", "phift+packing"}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    for r in rows.values():
        assert r["epochs_done"] == meta["epochs"] == 1 and not r["stopped_at_limit"]
        assert r["tokens"] == meta["stats"]["tokens_per_epoch"]
        assert r["data_checksum"] == meta["data_checksum"]
        assert math.isfinite(r["loss_first_epoch"]) and math.isfinite(r["loss_last_epoch"])
    assert rows["phift"]["steps"] == meta["samples"]
    assert rows["phift+packing"]["steps"] == meta["stats"]["steps_packed"] < meta["samples"]
    text = out.read_text()
    assert "TINY SMOKE TEST" in text and "Epochs run: **1 of the recipe's 5**" in text
    assert "| phift+packing | off |" in text
