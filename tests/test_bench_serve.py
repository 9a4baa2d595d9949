"""bench/bench_serve.py's smoke mode: a tiny model on the CPU, a row per client count with tokens that came back."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytest.importorskip("openai")
pytest.importorskip("fastapi")
from bench import bench_serve  # noqa: E402

pytestmark = pytest.mark.integration  # the bench harness's smoke runs


@pytest.mark.parametrize("server,where", [("process", "phift api, its own process"),
                                          ("thread", "in the clients' process")])
def test_serve_bench_smoke_run_writes_a_row_per_client_count(tmp_path, server, where):
    out = tmp_path / "serve.md"
    bench_serve.main(["--device", "cpu", "--tiny", "--clients", "1,4", "--requests_per_client", "1",
                      "--prompt_tokens", "16", "--max_tokens", "8", "--max_batch_size", "4", "--server", server,
                      "--out", str(out)])
    header, *rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert header["bench"] == "serve" and header["meta"]["command"].startswith("python bench/bench_serve.py --device")
    assert header["meta"]["server"] == where
    assert header["meta"]["model"] == "tiny"
    # the engine alone first, then the same client counts through the HTTP API
    assert [(r["via"], r["clients"]) for r in rows] == [("engine", 1), ("engine", 4), ("http", 1), ("http", 4)]
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert "| engine alone | 4 | 4 |" in out.read_text() and "| HTTP API | 4 | 4 |" in out.read_text()
