"""bench/bench_dpo.py's CPU smoke mode: phift and TRL's DPOTrainer each time DPO LoRA steps on the same pairs."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import bench_dpo  # noqa: E402

pytestmark = pytest.mark.integration  # the bench harness's smoke runs


def test_tiny_run_times_phift_and_trl_on_the_same_pairs(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "dpo.md"
    bench_dpo.main(["--device", "cpu", "--tiny", "--warmup", "1", "--steps", "2", "--out", str(out)])
    lines = [json.loads(x) for x in out.with_suffix(".jsonl").read_text().splitlines()]
    meta, rows = lines[0]["meta"], {r["impl"]: r for r in lines[1:]}
    assert lines[0]["bench"] == "dpo" and meta["command"].startswith("python bench/bench_dpo.py --device cpu")
    assert set(rows) == {"phift", "phift+compile", "trl", "trl+compile"}, rows
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert len({r["data_checksum"] for r in rows.values()}) == 1
    assert all(r["pairs_per_s"] > 0 and r["tokens_per_step"] == 4 * 2 * meta["row_tokens"] for r in rows.values())
    # a fresh adapter: each side's first DPO loss is log 2
    assert rows["phift"]["loss_first"] == pytest.approx(0.6931, abs=1e-3)
    assert rows["phift+compile"]["loss_first"] == pytest.approx(0.6931, abs=1e-3)
    text = out.read_text()
    assert "TINY SMOKE TEST" in text and "Same pairs on every side: yes" in text and "| phift |" in text


def test_the_no_lora_kernel_row_runs_phift_with_the_lora_op_switched_off(tmp_path):
    out = tmp_path / "dpo.md"
    bench_dpo.main(["--device", "cpu", "--tiny", "--warmup", "1", "--steps", "1", "--impls",
                    "phift,phift (no LoRA kernel)", "--out", str(out)])
    rows = {r["impl"]: r for r in map(json.loads, out.with_suffix(".jsonl").read_text().splitlines()[1:])}
    assert rows["phift"]["status"] == rows["phift (no LoRA kernel)"]["status"] == "ok", rows
    assert "lora" not in rows["phift"]["kernels_off"] and "lora" in rows["phift (no LoRA kernel)"]["kernels_off"]


def test_the_prompt_not_shared_row_runs_a_row_per_answer_to_the_same_first_loss(tmp_path):
    out = tmp_path / "dpo.md"
    bench_dpo.main(["--device", "cpu", "--tiny", "--warmup", "1", "--steps", "1", "--impls",
                    "phift,phift (prompt not shared)", "--out", str(out)])
    rows = {r["impl"]: r for r in map(json.loads, out.with_suffix(".jsonl").read_text().splitlines()[1:])}
    shared, rows_each = rows["phift"], rows["phift (prompt not shared)"]
    assert shared["status"] == rows_each["status"] == "ok", rows
    assert shared["prompt_shared"] and not rows_each["prompt_shared"]
    assert shared["loss_first"] == pytest.approx(rows_each["loss_first"], abs=1e-3)


def test_a_failed_side_keeps_its_whole_traceback_in_the_log(tmp_path):
    """The row carries the last lines; the log beside the report has the worker's whole stderr."""
    log = tmp_path / "dpo.log"
    spec = {"device": "no-such-device", "tiny": True, "warmup": 1, "steps": 1, "checkpointing": "on", "seed": 0,
            "scratch": str(tmp_path), "profile": None}
    row = bench_dpo.run_impl("phift", spec, timeout_s=120, log=log)
    assert row["status"].startswith("error: ") and "no-such-device" in row["status"], row
    text = log.read_text()
    assert text.startswith("== phift: exit 1\n") and "Traceback (most recent call last)" in text
