"""bench/record.py and bench/report.py: runs recorded into the results store render as BENCHMARKS.md, one table per
question, each row from the latest run that measured it and naming that run."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import record, report  # noqa: E402
from bench.cases import BY_ID, case_of  # noqa: E402


def train_row(case_id, tokens_per_s, **extra):
    c = BY_ID[case_id]
    return {"id": c.id, "config": c.shape, "impl": c.impl, "case": c.to_dict(), "status": "ok",
            "tokens_per_s": tokens_per_s, "step_ms": 6144e3 / tokens_per_s, "peak_gib": 9.5,
            "flops_per_token": 8e9, **extra}


def write_run(path: Path, bench: str, meta: dict, rows: list[dict], **head) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in [{"bench": bench, "meta": meta, **head}, *rows]))
    return path


def meta(device, date, command):
    return {"device": device, "date": date, "command": command}


def recorded_store(tmp_path) -> Path:
    store = tmp_path / "results"
    first, second = (meta("H100", "2026-11-01", "python bench/bench_train.py --quick"),
                     meta("H200", "2026-11-02", "python bench/bench_train.py --only a|b"))
    older = write_run(tmp_path / "a.jsonl", "train", first, [
        train_row("lora-6x1024/hf", 30000),
        train_row("lora-6x1024/phift", 60000, peak_rule="incl. model build"),
        train_row("recipe3-full-1x1024-zero2/seed", 1100),
        {"id": "full-1x1024-ckpt/hf", "config": "full-1x1024-ckpt", "impl": "hf",  # a row without its case
         "status": "skipped: time budget (3 s left, needs ~20 s)"},
    ], ceiling={"tflops": 700.0})
    newer = write_run(tmp_path / "b.jsonl", "train", second, [
        train_row("lora-6x1024/phift", 80000),
        train_row("recipe3-full-1x1024-zero2/phift+offload", 2200),
        train_row("recipe3-full-1x1024-zero2/seed", 1000),
    ], ceiling={"tflops": 800.0})
    host = write_run(tmp_path / "h.jsonl", "host_overhead",
                     meta("CPU (x86_64)", "2026-11-03", "python bench/bench_host_overhead.py"),
                     [{"case": "full, no checkpointing", "device": "cpu", "step_ms": 40.0}])
    for name, path in (("first", older), ("second", newer), ("host", host)):
        record.record(path, name, "abc1234", store)
    return store


def test_recorded_runs_take_the_next_sequence_and_keep_their_rows(tmp_path):
    store = recorded_store(tmp_path)
    runs = report.load(store)
    assert [(r.name, r.sequence) for r in runs] == [("first", 1), ("second", 2), ("host", 3)]
    assert runs[0].header["commit"] == "abc1234" and runs[0].header["ceiling"] == {"tflops": 700.0}
    skipped = runs[0].rows[3]  # written without its case: the store gives it the table's
    assert len(runs[0].rows) == 4 and "case" in skipped and case_of(skipped) == BY_ID["full-1x1024-ckpt/hf"]


def test_page_has_a_table_per_question_and_every_row_names_its_run(tmp_path):
    text = report.page(report.load(recorded_store(tmp_path)))
    titles = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert titles == ["LoRA fine-tuning: phift against the peers",
                      "Recipe 3: full fine-tuning in fp16 with the optimizer on the CPU, against the seed's stack",
                      "Host time of a training step", "Runs"]
    sections = text.split("\n## ")
    lora, recipe3, host = sections[1], sections[2], sections[3]
    # the later run's phift row replaces the earlier one; hf is measured only in the earlier run
    assert "| lora-6x1024 | phift | 80,000 |" in lora and "60,000" not in lora
    assert "| lora-6x1024 | hf | 30,000 | 204.8 | 9.50 | " in lora and lora.count("| 2026-11-01 a | H100 |") == 1
    assert "| lora-6x1024 | phift | 80,000 | 76.8 | 9.50 | 80.0 % | — | — | 2026-11-02 a | H200 |" in lora
    # comparisons only within one run: phift+offload against the seed's row of its own run
    assert "| recipe3-full-1x1024-zero2 | phift+offload | 2,200 |" in recipe3 and "| 2.20 | 2026-11-02 a | H200 |" in recipe3
    assert "| full, no checkpointing | 40.00 | 2026-11-03 a | CPU (x86_64) |" in host
    assert "skipped" not in text and "full-1x1024-ckpt" not in text
    runs = sections[4]
    assert "| 2026-11-02 a | H200 | `python bench/bench_train.py --only a\\|b` | abc1234 |" in runs
    assert "| 2026-11-03 a | CPU (x86_64) | `python bench/bench_host_overhead.py` |" in runs


def test_a_row_measured_under_the_old_peak_rule_says_so(tmp_path):
    store = recorded_store(tmp_path)
    (store / "second.jsonl").unlink()
    text = report.page(report.load(store))
    assert "| lora-6x1024 | phift | 60,000 | 102.4 | 9.50 (peak incl. model build and warm-up) |" in text


def test_a_smoke_test_is_not_recorded(tmp_path):
    run = write_run(tmp_path / "t.jsonl", "train", {**meta("CPU", "2026-11-04", "python bench/bench_train.py --tiny"),
                                                    "tiny": True}, [train_row("lora-6x1024/phift", 100)])
    with pytest.raises(SystemExit):
        record.record(run, "smoke", None, tmp_path / "results")
    assert not (tmp_path / "results").exists()


def test_phi3_5_minis_question_compares_phifts_fastest_within_the_peers_memory(tmp_path):
    """phift's fastest row that needs no more memory than the best compiled peer (the recomputed one here: the
    faster one without recomputation needs more), against that peer, within one run."""
    rows = [train_row("phi3.5-lora-4x1024/hf+compile", 10000, peak_gib=30.0),
            train_row("phi3.5-lora-4x1024/litgpt+compile", 9000, peak_gib=28.0),
            train_row("phi3.5-lora-4x1024/phift+compile", 15000, peak_gib=34.0),
            train_row("phi3.5-lora-4x1024-ckpt/phift+compile", 12500, peak_gib=12.0)]
    store = tmp_path / "results"
    record.record(write_run(tmp_path / "p.jsonl", "train", meta("H200", "2026-12-01", "python bench/bench_train.py"),
                            rows, ceiling={"tflops": 800.0}), "phi3", "abc1234", store)
    text = report.page(report.load(store))
    section = text.split("\n## Phi-3.5-mini: phift against the peers\n")[1].split("\n## ")[0]
    assert "| phi3.5-lora-4x1024-ckpt | phift+compile | 12,500 |" in section and "| 1.25 | 2026-12-01 a | H200 |" in section
    assert ("| 4 × 1024 | phi3.5-lora-4x1024-ckpt/phift+compile | 12.00 | hf+compile | 30.00 | 1.25 | "
            "≥ 1.2× at ≤ memory: **met** | 2026-12-01 a |") in section
    assert "| 1 × 2048 | not measured |" in section
    assert "phi3.5" not in text.split("\n## Phi-3.5-mini")[0]  # phi-1_5's tables keep to phi-1_5


def test_runs_are_named_by_their_day_and_their_place_in_it():
    assert [report.day_letters(i) for i in (0, 1, 25, 26, 27, 52)] == ["a", "b", "z", "aa", "ab", "ba"]


def test_estimate_dpo_and_server_runs_get_their_own_tables(tmp_path):
    from bench import bench_estimate

    gib = bench_estimate.GIB
    store = tmp_path / "results"
    estimate = [{"case": "recipe1-lora-fp16-6x1024", "status": "ok", "predicted": {
                    "allocated": 4.4 * gib, "host": 2.5 * gib, "pinned": 0, "phase": "backward, first block"},
                 "measured": {"allocated": 4.0 * gib, "host_peak": 1.5 * gib, "pinned": 0}},
                {"case": "full-bf16-1x1024", "status": "ok", "predicted": {
                    "allocated": 30.0 * gib, "host": 2.5 * gib, "pinned": 0, "phase": "optimizer step"},
                 "measured": {"allocated": 20.0 * gib, "host_peak": 1.4 * gib, "pinned": 0}},
                {"case": "phi2-full-pure-1x2048", "status": "skipped: time budget"}]
    dpo = [{"impl": "phift", "status": "ok", "pairs_per_s": 20.0, "step_ms": 200.0, "peak_gib": 4.5,
            "trainable": 1572864},
           {"impl": "trl", "status": "ok", "pairs_per_s": 8.0, "step_ms": 500.0, "peak_gib": 5.5, "trainable": 2359296}]
    serve = [{"clients": 8, "requests": 16, "tokens": 2048, "wall_s": 4.0, "tokens_per_s": 512.0,
              "stream_tokens_per_s": 64.0, "ttft_ms_median": 30.0}]
    for name, bench, rows in (("e", "estimate", estimate), ("d", "dpo", dpo), ("s", "serve", serve)):
        record.record(write_run(tmp_path / f"{name}.jsonl", bench, meta("H200", "2026-12-04", f"python {name}"), rows),
                      name, "abc1234", store)
    text = report.page(report.load(store))
    fit = text.split("\n## Will it fit? `phift estimate` against the measured peak\n")[1].split("\n## ")[0]
    # +0.40 GiB is inside 0.5 GiB though +10 %; +10 GiB is outside both
    assert "| recipe1-lora-fp16-6x1024 | 4.40 | 4.00 | +0.40 (+10.0 %) | ok | 2.50 / 1.50 |" in fit
    assert "| full-bf16-1x1024 | 30.00 | 20.00 | +10.00 (+50.0 %) | off |" in fit
    assert f"1 of 2 measured cases within ±10 % or ±0.5 GiB of the measured peak; 2 of {len(bench_estimate.CASES)} " \
           "cases of the harness measured (not yet: " in fit and "phi2-full-pure-1x2048" in fit.split("not yet")[1]
    assert "| phi2-full-pure-1x2048 |" not in fit  # a skip is not a row
    dpo_section = text.split("\n## DPO: phift against TRL\n")[1].split("\n## ")[0]
    assert "| phift | 20.00 | 200.0 | 4.50 | 1,572,864 | 2.50 | 2026-12-04 b | H200 |" in dpo_section
    assert "| trl | 8.00 | 500.0 | 5.50 | 2,359,296 | — |" in dpo_section
    assert "phift ÷ trl = 2.50× (goal ≥ 2×: **met**); TRL compiled was not measured in that run." in dpo_section
    # a run whose header does not say where the server ran is from before the harness could start it on its own
    assert "| HTTP API | 8 | 16 | 2048 | 4.00 | 512.0 | 64.0 | 30.0 | in the clients' process | 2026-12-04 c | H200 |" \
        in text


def test_dpo_question_says_missed_when_every_phift_row_needs_more_memory_than_trls_fastest(tmp_path):
    store = tmp_path / "results"
    dpo = [{"impl": "phift", "status": "ok", "pairs_per_s": 23.0, "step_ms": 174.0, "peak_gib": 4.78,
            "trainable": 1572864},
           {"impl": "trl", "status": "ok", "pairs_per_s": 8.7, "step_ms": 458.0, "peak_gib": 5.42,
            "trainable": 2359296},
           {"impl": "trl+compile", "status": "ok", "pairs_per_s": 14.6, "step_ms": 273.0, "peak_gib": 4.44,
            "trainable": 2359296}]
    record.record(write_run(tmp_path / "d.jsonl", "dpo", meta("H200", "2026-12-04", "python d"), dpo), "d", "abc1234",
                  store)
    section = report.page(report.load(store)).split("\n## DPO: phift against TRL\n")[1].split("\n## ")[0]
    assert ("in the latest run: none: trl+compile peaks at 4.44 GiB and every phift row above it (goal ≥ 2× at no "
            "more memory: **missed**; phift is 1.58× at 4.78 GiB).") in section


def test_decode_runs_get_a_table_per_batch_and_kernel_with_the_kernels_pytorch_picked(tmp_path):
    store = tmp_path / "results"
    rows = [{"batch": 1, "kernel": "default", "grow_ms": 45.9, "fixed_ms": 10.4},
            {"batch": 1, "kernel": "flash", "grow_ms": None, "fixed_ms": None, "error": "No available kernel."},
            {"batch": 1, "kernel": "efficient", "grow_ms": 10.2, "fixed_ms": 10.16}]
    head = meta("H200", "2026-12-04", "python bench/profile_decode.py")
    head["picks"] = ["decode, no mask: CUDNN_ATTENTION"]
    record.record(write_run(tmp_path / "d.jsonl", "decode", head, rows), "decode-1", "abc1234", store)
    text = report.page(report.load(store))
    table = text.split("\n## Decoding: a step over the KV cache, per attention kernel\n")[1].split("\n## ")[0]
    assert "| 1 | PyTorch's choice | 45.90 | 10.40 | 2026-12-04 a | H200 |" in table
    assert "| 1 | flash | — | No available kernel. | 2026-12-04 a | H200 |" in table
    assert "| 1 | efficient | 10.20 | 10.16 |" in table
    assert "PyTorch's choice on that device: decode, no mask: CUDNN_ATTENTION." in table
