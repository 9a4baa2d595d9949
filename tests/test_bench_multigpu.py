"""bench/bench_multigpu.py's rows and report, with its launcher runs stood in for (they need several GPUs): the
speed-up and loss gap come from the two runs' own logs, the rows are recordable, and the page shows them."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_multigpu, record, report  # noqa: E402


def test_rows_carry_the_speed_up_and_the_loss_gap_and_render_on_the_page(tmp_path, monkeypatch):
    calls = []

    def fake_run(name, gpus, accum, case, args, data_dir, work, tokenizer):
        calls.append((name, gpus, accum, Path(tokenizer).name))
        if gpus == 1:
            return {"tok_s": 10000.0, "mem": 20.0, "losses": [2.0, 1.0], "wall": 1}
        return {"tok_s": 19000.0, "mem": 11.0, "losses": [2.02, 1.0], "wall": 1}

    monkeypatch.setattr(bench_multigpu, "run", fake_run)
    out = tmp_path / "multigpu.md"
    bench_multigpu.main(["--tokenizer", "phi15-tok", "--out", str(out), "--gpus", "2", "--only", "^Phi-3.5"])
    # the Phi-3 case tokenizes with the small BPE trained beside the data, never phi-1_5's ids
    assert calls == [("Phi-3.5-mini LoRA r8 4×1024-1", 1, 2, "tokenizer-small"),
                     ("Phi-3.5-mini LoRA r8 4×1024-2", 2, 1, "tokenizer-small")]
    head, row = [json.loads(x) for x in out.with_suffix(".jsonl").read_text().splitlines()]
    assert head["bench"] == "multigpu" and "--only ^Phi-3.5" in head["meta"]["command"]
    assert row["status"] == "ok" and row["speedup"] == 1.9 and abs(row["max_loss_diff"] - 0.01) < 1e-12
    assert "| Phi-3.5-mini LoRA r8 4×1024 | 2 | 10,000 | 19,000 | 1.90× | 20.0 / 11.0 | 1.00 % |" in out.read_text()

    store = tmp_path / "results"
    record.record(out.with_suffix(".jsonl"), "multigpu-1", "abc1234", store)
    page = report.page(report.load(store))
    assert "## Several GPUs: the DeepSpeed launcher against one GPU" in page
    assert "| Phi-3.5-mini LoRA r8 4×1024 | 2 | 10,000 | 19,000 | 1.90× | 20.0 / 11.0 | 1.00 % |" in page


def test_a_failed_case_says_which_side_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_multigpu, "run", lambda name, gpus, *a: {"error": "CUDA out of memory", "wall": 1}
                        if gpus == 2 else {"tok_s": 1.0, "mem": 1.0, "losses": [1.0], "wall": 1})
    out = tmp_path / "m.md"
    bench_multigpu.main(["--tokenizer", "t", "--out", str(out), "--gpus", "2", "--only", "^Phi-4"])
    row = json.loads(out.with_suffix(".jsonl").read_text().splitlines()[1])
    assert row["status"] == "failed: 1 GPU: ok; 2 GPUs: CUDA out of memory"
