"""bench/bench_train.py's CPU smoke mode on the Phi-3.5-mini cases: each runs on the tiny Phi-3 shape (tiny-phi3), the
peers from the same config, and the run's report asks Phi-3.5-mini's question."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import bench_train  # noqa: E402
from bench.cases import CASES  # noqa: E402

pytestmark = pytest.mark.integration  # the bench harness's smoke runs


def test_the_phi3_5_mini_cases_run_on_the_tiny_phi3_shape(tmp_path, monkeypatch):
    # the compiled cases' inductor builds in one thread each: beside a parallel suite on a many-core machine, a pool
    # of compile workers per case starved the cases past their time limits
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")
    out = tmp_path / "train.md"
    bench_train.main(["--device", "cpu", "--tiny", "--only", r"^phi3\.5", "--no-prepass", "--budget-s", "900",
                      "--warmup", "1", "--steps", "2", "--out", str(out)])
    rows = [json.loads(x) for x in out.with_suffix(".jsonl").read_text().splitlines()][1:]
    assert [r["id"] for r in rows] == [c.id for c in CASES if c.model == "phi-3.5-mini"]
    for r in rows:  # litgpt is on the GPU machine's carried wheels, not necessarily here
        assert r["status"] == "ok" or (r["impl"].startswith("litgpt") and "litgpt" in r["status"]), r
        if r["status"] == "ok":
            assert r["flops_per_token"] > 0 and r["loss_first"] > 0
    text = out.read_text()
    assert "tiny-phi3-shaped models" in text
    assert "| Phi-3.5-mini LoRA 4×1024: phift fastest (at no more memory) ÷ best compiled peer |" in text
    assert "| T4 budget (15 GiB cap): Phi-3.5-mini LoRA fp16 1×2048 | ok |" in text


def test_the_build_step_compiles_phifts_ops_before_any_timed_run():
    """What the harness runs beside its first steps on a GPU builds phift's extensions (a check that only asked
    whether they were loaded would leave the build to the first timed run): here, the CPU AdamW op."""
    import subprocess

    from bench import harness
    from conftest import subprocess_env

    proc = subprocess.run([sys.executable, "-c", harness.BUILD_PHIFT_KERNEL], capture_output=True, text=True,
                          cwd=ROOT, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "phift CPU AdamW op: True" in proc.stdout, proc.stdout + proc.stderr[-2000:]
