"""bench/profile_decode.py's smoke mode: a tiny model on the CPU, a decode time per batch and kernel, the profile."""
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import profile_decode  # noqa: E402

pytestmark = pytest.mark.integration  # the bench harness's smoke runs


def test_decode_profile_smoke_run_times_each_batch_and_names_the_kernels(tmp_path):
    out = tmp_path / "decode.md"
    profile_decode.main(["--device", "cpu", "--tiny", "--batch", "1,2", "--steps", "3", "--prompt", "8",
                         "--out", str(out)])
    text = out.read_text()
    rows = re.findall(r"^\| (\d+) \| (PyTorch default|math) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
    assert [(b, k) for b, k, *_ in rows] == [("1", "PyTorch default"), ("1", "math"), ("2", "PyTorch default"),
                                            ("2", "math")]
    assert all(float(g) > 0 and float(f) > 0 for *_, g, f in rows)
    assert re.search(r"- decode, 1 query over 300 keys, padding mask: [A-Z_]+$", text, re.M)
    assert "by cpu_time_total" in text and "aten::scaled_dot_product_attention" in text
    header, *recorded = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert header["bench"] == "decode" and header["meta"]["tiny"] and header["meta"]["model"] == "tiny"
    assert [(r["batch"], r["kernel"]) for r in recorded] == [(1, "default"), (1, "math"), (2, "default"), (2, "math")]
    assert [(f"{r['grow_ms']:.2f}", f"{r['fixed_ms']:.2f}") for r in recorded] == [(g, f) for *_, g, f in rows]
