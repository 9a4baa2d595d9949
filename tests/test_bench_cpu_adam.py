"""bench/bench_cpu_adam.py on a few parameters: every optimizer gets a row with a positive step time and bandwidth."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_cpu_adam  # noqa: E402

pytestmark = pytest.mark.integration  # the bench harness's smoke runs


def test_small_run_times_each_optimizer(tmp_path):
    out = tmp_path / "cpu_adam.md"
    bench_cpu_adam.main(["--params", "1e5", "--threads", "1", "--repeats", "1", "--out", str(out)])
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| 1 |")]
    kinds = {r[1].strip(): r for r in rows}
    assert "torch fused AdamW" in kinds
    for kind, r in kinds.items():
        if kind == "deepspeed" and r[3].strip() == "—":
            continue  # deepspeed not installed here: its row says why
        assert float(r[3]) > 0 and float(r[4]) > 0, r
