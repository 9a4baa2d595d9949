"""BENCHMARKS.md, rendered from the results store: one table per question, each row from the latest run that
measured it and naming that run.

    python bench/report.py [--results bench/results] [--out BENCHMARKS.md]

The store holds one file per recorded run, `bench/results/<run>.jsonl` (bench/record.py writes them): a header line
    {"run": NAME, "bench": "train" | "law" | "host_overhead" | "cpu_adam" | "lora_kernel" | "estimate" | "dpo" |
     "serve" | "decode" | "multigpu", "sequence": N,
     "commit": SHA or null, "meta": {"device", "date", "command", ...}, ...}
then the harness's rows. `sequence` orders the runs (the order they were recorded in): a row of a later run replaces
the same row of an earlier one. A row is the same row when its key is: a training case's id, a law impl, a
host-overhead case on the same kind of device, a CPU Adam step kind at the same parameter and thread counts, a fused
LoRA shape, an estimate case, a DPO impl, a server client count, a decode batch and attention kernel, a multi-GPU case
at its GPU count. A row that was never measured shows its latest failure (timeout, OOM, ...), never a skip.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bench_dpo, bench_estimate, bench_law, bench_multigpu  # noqa: E402
from bench.cases import CASES, T4_GIB, Case, case_of  # noqa: E402
from bench.harness import PHI3_LORA_SHAPES, compiled_peer, fmt, hf_eager, phi3_question  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BENCHMARKS = ROOT / "BENCHMARKS.md"
PEAK_RULES = {  # rows measured under an earlier peak-memory rule say so in the memory column
    "incl. model build": "peak incl. model build and warm-up",
    "incl. graph pool's free memory": "peak incl. the graph pool's free memory",
}


@dataclass
class Run:
    name: str  # the store's key (its file name)
    bench: str
    sequence: int
    header: dict
    rows: list[dict]
    label: str = ""  # what the page calls it: its date and its place among that day's runs (a, b, ...)

    @property
    def device(self) -> str:
        return self.header["meta"]["device"]


def load(results: Path) -> list[Run]:
    runs = []
    for path in sorted(results.glob("*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        head = lines[0]
        runs.append(Run(head["run"], head["bench"], head["sequence"], head, lines[1:]))
    runs.sort(key=lambda r: r.sequence)
    for date in {r.header["meta"]["date"] for r in runs}:
        for i, run in enumerate(r for r in runs if r.header["meta"]["date"] == date):
            run.label = f"{date} {day_letters(i)}"
    return runs


def day_letters(i: int) -> str:
    """a, b, ..., z, aa, ab, ...: the i-th run of a day."""
    return (day_letters(i // 26 - 1) if i >= 26 else "") + "abcdefghijklmnopqrstuvwxyz"[i % 26]


def measured(bench: str, row: dict) -> bool:
    if bench in ("train", "law", "estimate", "dpo", "multigpu"):
        return row.get("status") == "ok"
    if bench == "serve":
        return row.get("tokens_per_s") is not None
    if bench == "lora_kernel":
        return row.get("fused_ms") is not None
    if bench == "decode":
        return row.get("grow_ms") is not None
    return row.get("ms" if "copy" in row else "step_ms") is not None


def key(bench: str, row: dict):
    if bench == "train":
        return case_of(row).id
    if bench in ("law", "dpo"):
        return row["impl"]
    if bench == "estimate":
        return row["case"]
    if bench == "multigpu":
        return row["case"], row["gpus"]
    if bench == "serve":  # rows recorded before the harness timed the engine alone all went through HTTP
        return row.get("via", "http"), row["clients"]
    if bench == "host_overhead":
        return row["device"], row["case"]
    if bench == "decode":
        return row["batch"], row["kernel"]
    if bench == "cpu_adam":
        return ("copy", row["copy"], row["host_memory"]) if "copy" in row else \
            ("step", row["params"], row["threads"], row["step"])
    return tuple(row[k] for k in ("layer", "tokens", "in", "out", "r", "dtype", "p"))


def latest(runs: list[Run], bench: str) -> list[tuple[dict, Run]]:
    """Each row key's row from the latest run that measured it; a key never measured keeps its latest failure
    (a skip says nothing and is left out). In the order of the keys' first appearance."""
    found: dict = {}
    for run in runs:
        if run.bench != bench:
            continue
        for row in run.rows:
            k = key(bench, row)
            if measured(bench, row) or not (row.get("status", "").startswith("skipped")
                                            or k in found and measured(bench, found[k][0])):
                found[k] = (row, run)
    return list(found.values())


def newest_first(rows: list[tuple[dict, Run]]) -> list[tuple[dict, Run]]:
    """The rows of the latest run first, each run's rows in the order it measured them."""
    return sorted(rows, key=lambda x: (-x[1].sequence, x[1].rows.index(x[0])))


def code(text: str) -> str:
    """A code span that a table cell can hold (GitHub splits cells at every unescaped |)."""
    return "`" + text.replace("|", "\\|") + "`"


# ============================================================================================ the training cases
def plain(c: Case) -> bool:
    return not (c.kernels_off or c.recipe) and c.lean


def questions() -> list[tuple[str, str, callable, list[str]]]:
    """(title, how it is measured, which cases, the same-run comparisons) of the training benchmark's tables."""
    method = ("Random-weight phi-1_5-shaped models on random tokens, every position labelled, AdamW; tokens/s = batch "
              "× seq ÷ the mean of the timed steps; MFU against the bf16 matmul ceiling measured in the same run. "
              "The × columns divide by a row of the same run, never across runs.")
    return [
        ("LoRA fine-tuning: phift against the peers",
         f"LoRA r 8 on the attention's q/k/v, half base + fp32 adapters + autocast. {method} Peers: transformers + "
         "PEFT (`hf`), litgpt; `+compile` compiles the whole model (phift: each block).",
         lambda c: c.model == "phi-1_5" and c.mode == "lora" and c.engine == "plain" and plain(c)
         and not c.mem_cap_gib, ["hf", "peer"]),
        ("Full fine-tuning: phift against the peers",
         f"fp32 master weights + autocast, or `(pure bf16)`: bf16 weights, fp32 masters in the optimizer; "
         f"`+graphs`: each step a replayed CUDA graph. {method}",
         lambda c: c.model == "phi-1_5" and c.mode == "full" and c.engine == "plain" and plain(c), ["hf", "peer"]),
        ("Recipe 3: full fine-tuning in fp16 with the optimizer on the CPU, against the seed's stack",
         "phi-1_5-shaped, 1×1024, checkpointing on. `phift+ds`: phift under DeepSpeed ZeRO-2 with CPU Adam "
         "(examples/ds_config.json); `phift+offload`: phift's own optimizer offload (`--offload_optimizer cpu`); "
         f"`seed`: transformers + DeepSpeed ZeRO-2 with CPU Adam, as the seed trained. {method}",
         lambda c: c.model == "phi-1_5" and c.mode == "full" and c.engine != "plain", ["seed"]),
        (f"A T4's budget: phift under a {T4_GIB:.0f} GiB cap",
         "torch.cuda.set_per_process_memory_fraction caps the process at a T4's 15 GiB: LoRA fp16 1×2048 without "
         "offload (phi-1_5, and Phi-3.5-mini with recomputation), and full fine-tuning of phi-1_5 fp16 1×1024 under "
         "ZeRO-2 with CPU offload. The question is whether it runs.",
         lambda c: c.mem_cap_gib is not None, []),
        ("Phi-3.5-mini: phift against the peers",
         "Random-weight Phi-3.5-mini (3.8 B parameters) on random tokens, bf16, every length within LongRoPE's "
         "original 4096. LoRA r 8 on the attention's q/k/v (phift and PEFT on the fused qkv_proj, litgpt on "
         "query/key/value), half base + fp32 adapters + autocast; the peers without recomputation, phift without "
         "and with it (`-ckpt`: phift's default, the lean full recomputation); `+compile`: the whole model (phift: "
         "each block). `phi3.5-full-1x2048-ckpt-offload`: full fine-tuning with phift's `--offload_optimizer cpu`. "
         "× best compiled peer: against the fastest compiled peer at the same batch × seq, in the same run. The "
         "question, below the table: phift's fastest at no more memory than that peer, ÷ the peer; goal ≥ 1.2×.",
         lambda c: c.model == "phi-3.5-mini" and not c.mem_cap_gib, ["phi3"]),
        ("What each lever gives a phift step",
         "phift with one lever switched off: a fused CUDA op (`PHIFT_DISABLE_KERNELS`; `no fused kernel`: all of "
         "them), or the lean recomputation (`full recompute`: checkpointed blocks recompute out_proj and fc2 too). "
         "Gain = tokens/s with the lever on ÷ off, both rows of the same run.",
         lambda c: bool(c.kernels_off) or not c.lean, ["lever"]),
    ]


def same_run(run: Run, shape: str, want) -> dict | None:
    found = [r for r in run.rows if r.get("status") == "ok" and r["config"] == shape and want(case_of(r))]
    return max(found, key=lambda r: r["tokens_per_s"], default=None)


def peak(row: dict) -> str:
    rule = PEAK_RULES.get(row.get("peak_rule"))
    return fmt(row.get("peak_gib"), 2) + (f" ({rule})" if rule and row.get("peak_gib") is not None else "")


def mfu(row: dict, run: Run) -> str:
    if "mfu_pct" in row:  # transcribed as the run printed it
        return f"{row['mfu_pct']:.1f} %"
    tf = run.header.get("ceiling", {}).get("tflops")
    return "—" if not tf else f"{100 * row['tokens_per_s'] * row['flops_per_token'] / (tf * 1e12):.1f} %"


def comparison(what: str, row: dict, c: Case, run: Run) -> str:
    def ratio(other, invert=False):
        if not other or other is row:
            return "—"
        q = other["tokens_per_s"] / row["tokens_per_s"] if invert else row["tokens_per_s"] / other["tokens_per_s"]
        return f"{q:.2f}"

    if what == "hf":
        return ratio(same_run(run, c.shape, hf_eager))
    if what == "peer":
        return ratio(same_run(run, c.shape, compiled_peer)) if c.family == "phift" else "—"
    if what == "seed":
        return ratio(same_run(run, c.shape, lambda o: o.family == "seed")) if c.family == "phift" else "—"
    if what == "phi3":  # the peers run each batch × seq without recomputation only
        peer = same_run(run, c.shape.removesuffix("-ckpt"), compiled_peer)
        return ratio(peer) if c.family == "phift" and c.mode == "lora" else "—"
    base = replace(c, kernels_off=(), lean=True)  # the same case with the lever on
    return ratio(same_run(run, c.shape, lambda o: o.id == base.id), invert=True) + f" ({base.impl})"


HEADINGS = {"hf": "× HF eager", "peer": "× best compiled peer", "seed": "× the seed's stack", "lever": "gain (against)",
            "phi3": "× best compiled peer"}


def train_rows(rows: list[tuple[dict, Run]], want) -> list[tuple[dict, Run]]:
    """The rows whose case passes want(case), in the case table's order."""
    order = {c.id: i for i, c in enumerate(CASES)}
    picked = [(r, run) for r, run in rows if want(case_of(r))]
    return sorted(picked, key=lambda x: order.get(case_of(x[0]).id, len(order)))


def train_table(rows: list[tuple[dict, Run]], compare: list[str]) -> list[str]:
    lines = ["| shape | impl | tokens/s | step ms | peak GiB | MFU | " + "".join(f"{HEADINGS[w]} | " for w in compare)
             + "run | device |", "| --- | --- | ---: | ---: | ---: | ---: | " + "---: | " * len(compare)
             + "--- | --- |"]
    for r, run in rows:
        c = case_of(r)
        if r["status"] != "ok":
            cells = ["—"] * (4 + len(compare))
            cells[0] = r["status"]
        else:
            cells = [fmt(r["tokens_per_s"]), fmt(r["step_ms"], 1), peak(r), mfu(r, run),
                     *(comparison(w, r, c, run) for w in compare)]
        lines.append(f"| {c.shape} | {c.impl} | " + " | ".join(cells) + f" | {run.label} | {run.device} |")
    return lines


def phi3_answer(rows: list[tuple[dict, Run]]) -> list[str]:
    """Phi-3.5-mini's question at each batch × seq, from the latest run that measured phift and a compiled peer
    there (harness.phi3_question)."""
    lines = ["", "| batch × seq | phift fastest at no more memory | peak GiB | best compiled peer | peak GiB | × "
                 "| goal | run |", "| --- | --- | ---: | --- | ---: | ---: | --- | --- |"]
    for shape in PHI3_LORA_SHAPES:
        for run in sorted({id(run): run for _, run in rows}.values(), key=lambda r: -r.sequence):
            fast, peer, q, within = phi3_question(run.rows, shape)
            if q is None:
                continue
            met = "—" if within is None else "**met**" if q >= 1.2 and within else "**missed**"
            lines.append(f"| {shape.rsplit('-', 1)[1].replace('x', ' × ')} | {fast['id']} | {fmt(fast['peak_gib'], 2)} "
                         f"| {peer['impl']} | {fmt(peer['peak_gib'], 2)} | {q:.2f} | ≥ 1.2× at ≤ memory: {met} | "
                         f"{run.label} |")
            break
        else:
            lines.append(f"| {shape.rsplit('-', 1)[1].replace('x', ' × ')} | not measured | — | — | — | — | — | — |")
    return lines


def recipe_table(rows: list[tuple[dict, Run]]) -> list[str]:
    lines = ["| impl | step ms | tokens/s | peak GiB (whole process) | first 5 steps s | train.main wall s | status "
             "| run | device |", "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for r, run in rows:
        lines.append(f"| {r['impl']} | {fmt(r.get('step_ms'), 1)} | {fmt(r.get('tokens_per_s'))} | "
                     f"{fmt(r.get('peak_gib'), 2)} | {fmt(r.get('first_interval_s'), 1)} | "
                     f"{fmt(r.get('wall_s'), 1)} | {r['status']} | {run.label} | {run.device} |")
    return lines


# ============================================================================================ the other benches
def law_table(rows: list[tuple[dict, Run]]) -> list[str]:
    lines = ["| impl | ckpt | epochs run | wall s | tokens/s | steady tokens/s | 5-epoch wall s | peak GiB | notes "
             "| run | device |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for r, run in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['impl']} | " + "— | " * 7 + f"{r['status']} | {run.label} | {run.device} |")
            continue
        if "recipe_wall_s" in r:  # transcribed as the run printed it
            five, was_measured = r["recipe_wall_s"], r["recipe_wall_measured"]
        else:
            five, was_measured = bench_law.recipe_wall(r)
        notes = ["packed" if r["packing"] else "unpacked"]
        if r["stopped_at_limit"]:
            notes.insert(0, f"stopped at the time limit after {r['steps']} of {r['planned_steps']} steps")
        lines.append(f"| {r['impl']} | {'on' if r['checkpointing'] else 'off'} | {run.header['meta']['epochs']} | "
                     f"{fmt(r['wall_s'], 1)} | {fmt(r['tokens_per_s'])} | {fmt(r['steady_tokens_per_s'])} | "
                     f"{fmt(five)}{'' if was_measured or five is None else ' (extrapolated)'} | "
                     f"{fmt(r['peak_gib'], 2)} | {', '.join(notes)} | {run.label} | {run.device} |")
    return lines


def decode_table(rows: list[tuple[dict, Run]]) -> list[str]:
    lines = ["| batch | attention kernel | ms a step, cache growing | ms a step, length fixed | run | device |",
             "| ---: | --- | ---: | ---: | --- | --- |"]
    for r, run in rows:
        kernel = "PyTorch's choice" if r["kernel"] == "default" else r["kernel"]
        times = (f"{r['grow_ms']:.2f} | {r['fixed_ms']:.2f}" if r["grow_ms"] is not None
                 else f"— | {r.get('error', 'not measured')}")
        lines.append(f"| {r['batch']} | {kernel} | {times} | {run.label} | {run.device} |")
    picks = {p for _, run in rows for p in run.header["meta"].get("picks", [])}
    return lines + (["", "PyTorch's choice on that device: " + "; ".join(sorted(picks)) + "."] if picks else [])


def host_table(rows: list[tuple[dict, Run]]) -> list[str]:
    lines = ["| case | step ms | run | device |", "| --- | ---: | --- | --- |"]
    lines += [f"| {r['case']} | {r['step_ms']:.2f} | {run.label} | {run.device} |" for r, run in rows]
    return lines


def adam_tables(rows: list[tuple[dict, Run]]) -> list[str]:
    lines = ["| parameters | threads | step | stream GB/s | step ms | effective GB/s | ÷ stream | run | device |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r, run in rows:
        if "copy" not in r:
            lines.append(f"| {r['params']:,} | {r['threads']} | {r['step']} | {r['stream_gbs']:.1f} | "
                         + (f"{r['step_ms']:.4g} | {r['effective_gbs']:.1f} | {r['ratio']:.2f} |"
                            if r["step_ms"] is not None else f"— | — | {r['error']} |")
                         + f" {run.label} | {run.device} |")
    copies = [(r, run) for r, run in rows if "copy" in r]
    if copies:
        lines += ["", "GPU ↔ host copies of fp16 data the size of the model, on the same hosts:", "",
                  "| copy | host memory | GiB | ms | GB/s | run | device |",
                  "| --- | --- | ---: | ---: | ---: | --- | --- |"]
        lines += [f"| {r['copy']} | {r['host_memory']} | {r['gib']:.2f} | {r['ms']:.4g} | {r['gbs']:.1f} | "
                  f"{run.label} | {run.device} |" for r, run in copies]
    return lines


def kernel_table(rows: list[tuple[dict, Run]]) -> list[str]:
    lines = ["| layer | tokens | in→out | r | dtype | p | base ms | composite ms | fused ms | fused / base | composite "
             "/ fused | run | device |", "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: "
             "| --- | --- |"]
    lines += [f"| {r['layer']} | {r['tokens']} | {r['in']}→{r['out']} | {r['r']} | {r['dtype']} | {r['p']} | "
              f"{r['base_ms']:.3f} | {r['composite_ms']:.3f} | {r['fused_ms']:.3f} | {r['fused_over_base']:.3f} | "
              f"{r['composite_over_fused']:.2f} | {run.label} | {run.device} |" for r, run in rows]
    return lines


def estimate_table(rows: list[tuple[dict, Run]]) -> list[str]:
    def gib(b):
        return "—" if b is None else f"{b / bench_estimate.GIB:.2f}"

    lines = ["| case | predicted GiB | measured GiB | error | within target | host predicted / peak RSS GiB | pinned "
             "predicted / measured GiB | peak phase | run | device |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | --- | --- | --- |"]
    for r, run in rows:
        p, m = r.get("predicted") or {}, r.get("measured") or {}
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | " + "— | " * 6 + f"{r['status']} | {run.label} | {run.device} |")
            continue
        err = p["allocated"] - m["allocated"]
        lines.append(f"| {r['case']} | {gib(p['allocated'])} | {gib(m['allocated'])} | {err / bench_estimate.GIB:+.2f} "
                     f"({100 * err / m['allocated']:+.1f} %) | {bench_estimate.judge(r)} | {gib(p.get('host'))} / "
                     f"{gib(m.get('host_peak'))} | {gib(p.get('pinned'))} / {gib(m.get('pinned'))} | "
                     f"{p.get('phase', '—')} | {run.label} | {run.device} |")
    ok = [r for r, _ in rows if r["status"] == "ok"]
    inside = sum(bench_estimate.judge(r) == "ok" for r in ok)
    missing = [c.name for c in bench_estimate.CASES if c.name not in {r["case"] for r in ok}]
    lines += ["", f"{inside} of {len(ok)} measured cases within ±10 % or ±0.5 GiB of the measured peak; "
                  f"{len(ok)} of {len(bench_estimate.CASES)} cases of the harness measured"
                  + (f" (not yet: {', '.join(missing)})." if missing else ".")]
    return lines


def dpo_table(rows: list[tuple[dict, Run]]) -> list[str]:
    lines = ["| impl | pairs/s | step ms | peak GiB | trainable parameters | × fastest TRL | run | device |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r, run in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['impl']} | " + "— | " * 5 + f"{r['status']} | {run.label} | {run.device} |")
            continue
        trl = bench_dpo.best_of(run.rows, "trl")  # in the same run only
        q = "—" if trl is None or r["impl"].startswith("trl") else f"{r['pairs_per_s'] / trl['pairs_per_s']:.2f}"
        lines.append(f"| {r['impl']} | {r['pairs_per_s']:.2f} | {r['step_ms']:.1f} | {fmt(r['peak_gib'], 2)} | "
                     f"{r['trainable']:,} | {q} | {run.label} | {run.device} |")
    for run in sorted({id(run): run for _, run in rows}.values(), key=lambda r: -r.sequence)[:1]:
        q = bench_dpo.question(run.rows)
        compiled = any(r["impl"] == "trl+compile" for r in run.rows if r.get("status") == "ok")
        trl, phift = bench_dpo.best_of(run.rows, "trl"), bench_dpo.best_of(run.rows, "phift")
        if q:
            verdict = "met" if q[2] >= 2 else "missed"
            answer = (f"{q[0]['impl']} ÷ {q[1]['impl']} = {q[2]:.2f}× (goal ≥ 2×: **{verdict}**)"
                      + ("" if compiled else "; TRL compiled was not measured in that run"))
        elif trl and phift:  # every phift row needs more memory than TRL's fastest
            answer = (f"none: {trl['impl']} peaks at {trl['peak_gib']:.2f} GiB and every phift row above it "
                      f"(goal ≥ 2× at no more memory: **missed**; {phift['impl']} is "
                      f"{phift['pairs_per_s'] / trl['pairs_per_s']:.2f}× at {phift['peak_gib']:.2f} GiB)")
        else:
            answer = "not measured"
        lines += ["", f"phift's fastest at no more memory than TRL's fastest, in the latest run: {answer}."]
    return lines


SERVE_VIA = {"http": "HTTP API", "engine": "engine alone"}  # bench_serve's VIA, without importing the server


def serve_table(rows: list[tuple[dict, Run]]) -> list[str]:
    lines = ["| through | clients | requests | generated tokens | wall s | tokens/s | tokens/s per stream | "
             "median TTFT ms | server | run | device |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for r, run in rows:
        # runs recorded before the harness could start `phift api` on its own served from the clients' process
        server = "—" if r.get("via") == "engine" else run.header["meta"].get("server", "in the clients' process")
        lines.append(f"| {SERVE_VIA[r.get('via', 'http')]} | {r['clients']} | {r['requests']} | {r['tokens']} | "
                     f"{r['wall_s']:.2f} | {r['tokens_per_s']:.1f} | {r['stream_tokens_per_s']:.1f} | "
                     f"{r['ttft_ms_median']:.1f} | {server} | {run.label} | {run.device} |")
    return lines


# ============================================================================================ the page
def page(runs: list[Run]) -> str:
    out = ["# Benchmarks", "",
           "Generated by `python bench/report.py` from the recorded runs in `bench/results/`; do not edit it by hand "
           "(`bench/README.md` says how to record a run). Each table answers one question; each row comes from the "
           "latest run that measured it and names that run, whose date, command and commit are listed under "
           "[Runs](#runs). Rows of different runs ran on different machines or days: compare within one run. "
           "The record of earlier runs, with each run's full report, is `bench/HISTORY.md`.", ""]
    named: set[str] = set()

    def section(title, text, rows, table):
        if rows:
            out.extend([f"## {title}", "", text, "", *table(rows), ""])
            named.update(run.name for _, run in rows)

    train = latest(runs, "train")
    asked = questions()
    for title, text, want, compare in asked[:4]:
        section(title, text, train_rows(train, want), lambda rows, compare=compare: train_table(rows, compare))
    title, text, want, compare = asked[4]
    section(title, text, train_rows(train, want), lambda rows: [*train_table(rows, compare), *phi3_answer(rows)])
    section("The law LoRA recipe end to end",
            "Wall time of `examples/law_lora_zero2.sh`'s training (LoRA r 8 on Wqkv, fp16, batch 1, cutoff 1792, 5 "
            "epochs of 1000 samples) on a random-weight phi-1_5, on synthetic samples whose lengths follow the "
            "DISC-Law-SFT triplet sample: `bench/bench_law.py`. The 5-epoch wall is extrapolated from the steady rate "
            "when fewer epochs ran; a run that reaches its time limit is stopped and says so.",
            latest(runs, "law"), law_table)
    section("`phift train` end to end: the self-cognition recipe",
            "`phift train` on the self-cognition data (phi-1_5-shaped random model, the real tokenizer, LoRA Wqkv, "
            "cutoff 1024, batch 6, fp16, 20 steps, checkpointing on), plain and with examples/ds_config.json. Step "
            "time and tokens/s from trainer_log.jsonl after the first logging interval.",
            train_rows(train, lambda c: c.recipe), recipe_table)
    title, text, want, compare = asked[5]
    section(title, text, train_rows(train, want), lambda rows: train_table(rows, compare))
    section("Will it fit? `phift estimate` against the measured peak",
            "`bench/bench_estimate.py`: each case of the harness (LoRA and full; fp16, bf16, pure bf16; recomputation "
            "off, full, mlp; plain, DeepSpeed ZeRO-2/3, CPU offload; phi-1 to Phi-4-mini) in a fresh process on "
            "random-weight presets and random tokens: `phift estimate`'s predicted peak allocated GPU memory against "
            "torch.cuda.max_memory_allocated over 2 optimizer steps after a warm-up step, and the predicted host "
            "memory against the process's peak RSS. Target: within ±10 % or ±0.5 GiB, whichever is larger.",
            latest(runs, "estimate"), estimate_table)
    section("DPO: phift against TRL",
            "`bench/bench_dpo.py`: a DPO LoRA step on a random-weight phi-1_5, 4 pairs a step, rows of 1024 tokens "
            "(prompt 512 + answer 512), bf16, AdamW, LoRA r 8 α 16 on the attention's q/k/v, activation "
            "checkpointing on both sides, 3 warm-up + 10 timed steps; the same pairs on both sides. TRL: its "
            "DPOTrainer with PEFT, the reference being the model with its adapter off, as in phift; `+compile`: "
            "phift's --compile, TRL's torch_compile. Goal: phift ≥ 2× TRL's pairs/s at no more memory, each side "
            "at its fastest.",
            latest(runs, "dpo"), dpo_table)
    section("Serving: `phift api` under concurrent clients",
            "`bench/bench_serve.py`: `phift api` on a random-weight phi-1_5 with the real tokenizer, streaming "
            "greedy completions to the official `openai` client; each client sends its requests one after another, "
            "all clients at once; tokens/s = every generated token over the row's wall time. Through: the HTTP API, "
            "or the same load handed straight to the batching engine in the harness's process (no HTTP: what "
            "decoding alone costs). Server: where `phift api` ran — its own process, as users "
            "run it, or inside the clients' process, where the clients' Python shares one interpreter lock with the "
            "server's. Runs up to 2026-12-04 r decoded with cuDNN's attention, which planned anew at every step "
            "(about 46 ms a step; the decoding table below); generation has left it out since.",
            latest(runs, "serve"), serve_table)
    section("Decoding: a step over the KV cache, per attention kernel",
            "`bench/profile_decode.py`: the bare model (no engine, no HTTP), random-weight phi-1_5 in bf16, a 64-token "
            "prompt with one row left-padded, then 48 greedy decode steps with the padding mask the engine passes; "
            "each step's tokens read on the host, as the engine does. Cache growing: a column more every step, as "
            "generation runs; length fixed: the same step again and again. A kernel that plans per shape is slow "
            "only when the cache grows: that is why generation (any forward over a KV cache) leaves cuDNN's attention "
            "out. In the run 2026-12-04 r the rows with a kernel forced ran after PyTorch's choice over the same "
            "shapes, so the forced cuDNN found its plans already made; later runs give each measurement's cache a "
            "width of its own.",
            latest(runs, "decode"), decode_table)
    section("Several GPUs: the DeepSpeed launcher against one GPU",
            "`bench/bench_multigpu.py`: `phift train` under `deepspeed --num_gpus N` against one GPU on the same "
            "global batch (accumulation N), bf16, random weights, synthetic rows cut to the cutoff; tokens/s over the "
            "last two thirds of the steps; max loss diff = the largest relative gap between the two loss curves.",
            latest(runs, "multigpu"), bench_multigpu.table)
    section("The fused LoRA linear: forward + backward",
            "`bench/bench_lora_kernel.py`: the fused op against the frozen base linear (forward + input gradient) and "
            "the PyTorch composite (forward + dx, dA, dB), median of CUDA-event timings over input sets cycled so "
            "that no operand stays in L2.",
            newest_first(latest(runs, "lora_kernel")), kernel_table)
    section("Host time of a training step",
            "`bench/bench_host_overhead.py`: a phi of 24 blocks, hidden 64, 32 tokens, batch 1, so that the math is "
            "negligible and the step time is the host's (Python, autograd, the dispatcher, kernel launches); median "
            "step after 3 warm-up steps, one issuing thread.",
            newest_first(latest(runs, "host_overhead")), host_table)
    section("The CPU optimizer step against host memory bandwidth",
            "`bench/bench_cpu_adam.py`: one Adam step over fp32 parameters on the CPU (what recipe 3's offload runs), "
            "against an in-place host `a += b`. Effective GB/s = 28 B a parameter ÷ step time; near the stream's "
            "rate, the step is at the memory wall. `+ conversions`: with the bf16 gradient and weight conversions an "
            "offloaded half model needs.",
            newest_first(latest(runs, "cpu_adam")), adam_tables)
    out += ["## Runs", "", "| run | device | command | commit | recorded from |", "| --- | --- | --- | --- | --- |"]
    for run in sorted((r for r in runs if r.name in named), key=lambda r: -r.sequence):
        meta = run.header["meta"]
        command = code(meta["command"]) + (f" {meta['command_note']}" if meta.get("command_note") else "")
        source = next((r for r in runs if meta.get("measured_by") and r.bench == run.bench
                       and r.header["meta"]["command"] == meta["measured_by"]), None)
        if source is not None:  # bench_estimate.py --repredict: an earlier run's measurements, predicted again
            command += f": the measurements of {source.label}, predicted again at this commit"
        out.append(f"| {run.label} | {run.device} | {command} | {run.header.get('commit') or '—'} | "
                   f"{run.header.get('source', 'its harness output')} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--out", type=Path, default=BENCHMARKS)
    a = p.parse_args(argv)
    a.out.write_text(page(load(a.results)))


if __name__ == "__main__":
    main()
