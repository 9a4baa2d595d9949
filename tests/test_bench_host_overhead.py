"""bench/bench_host_overhead.py on a 2-block model: every case gets a row with a positive step time (on the CPU,
every case but the CUDA-graph ones)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_host_overhead  # noqa: E402

pytestmark = pytest.mark.integration  # the bench harness's smoke runs


def test_small_run_times_every_case(tmp_path):
    out = tmp_path / "host.md"
    bench_host_overhead.main(["--layers", "2", "--steps", "2", "--seq", "8", "--out", str(out)])
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| full")
            or line.startswith("| LoRA")]
    assert [r[0].strip() for r in rows] == [name for name, flags, _ in bench_host_overhead.CASES
                                            if "--cuda_graphs" not in flags]
    assert all(float(r[1]) > 0 for r in rows)
