"""The law LoRA recipe end to end: wall time of examples/law_lora_zero2.sh's training run (LoRA r 8 α 16
dropout 0.1 on Wqkv, fp16, batch 1, cutoff_len 1792, lr 2e-4 cosine, 5 epochs, 1000 samples, prompt unlabelled)
with phift and with the HF stacks, on synthetic samples whose lengths follow the DISC-Law-SFT triplet sample.

    python bench/bench_law.py --make-lengths          # here, once: ../shared's law sample → .device/law_lengths.json
    python bench/bench_law.py --out $OUT/law.md [--epochs 1] [--only REGEX] [--timeout-s 300] [--budget-s 540]
    python bench/bench_law.py --render A.jsonl B.jsonl --out law.md          # one report from several runs' rows
    python bench/bench_law.py --device cpu --tiny --out /tmp/law.md          # smoke test of the harness
    python bench/record.py $OUT/law.jsonl --name NAME                        # then into BENCHMARKS.md

The samples are token-level: random ids, the prompt labelled -100, lengths drawn (seeded) from the (prompt,
response) token counts of the law sample under the vanilla template and cut by phift's own encode_supervised
(v0.3.3's cutoff policy); every implementation trains on the same samples in the same shuffled order:
  seed                   HF PhiForCausalLM + PEFT under deepspeed.initialize with examples/ds_config.json (ZeRO-2,
                         optimizer offloaded to DeepSpeed's CPU Adam), activation checkpointing on (LLaMA-Factory's
                         default), LLaMA-Factory's collator (right-pad to a multiple of 4, attention_mask)
  hf, hf+compile         HF + PEFT, a plain loop (AdamW, autocast, GradScaler), whole-model torch.compile as the HF
                         Trainer's --torch_compile does; the same collator; no activation checkpointing
  phift[+compile]        phift.train.prepare_model + TorchEngine, phift.train's epoch_batches/to_batch, batch 1
  phift+packing[+compile] the same with --packing True: samples packed into rows of up to cutoff_len
Each impl is a bench.cases.Case (family, compile, packing, checkpointing) built by the training benchmark's
builders (bench/peers.py, bench/phift_case.py). Each run is a subprocess; its wall time covers every step of every
epoch, compilation included (the user pays it); the model build is timed apart. A run that reaches --timeout-s stops
after its current step and says so.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness, phift_case  # noqa: E402
from bench.cases import VOCAB_USED, Case, model_shape  # noqa: E402

ROOT = harness.ROOT

SHARED = Path(os.environ.get("PHIFT_SHARED", ROOT.parent / "shared"))
LAW_SAMPLE = SHARED / "data" / "disc_law_sft_triplet_reconstructed_sample.jsonl"
PHI_TOKENIZER = SHARED / "data" / "phi-1_5"
LENGTHS = ROOT / ".device" / "law_lengths.json"
RECIPE_EPOCHS, RECIPE_SAMPLES, CUTOFF, TINY_CUTOFF = 5, 1000, 1792, 64
# the smoke test's (prompt, response) lengths: short ones that pack, long ones that the cutoff splits
TINY_PAIRS = [[12, 6], [20, 14], [8, 30], [40, 36], [6, 4], [30, 10], [16, 16], [90, 20]]
DATA_SEED = 1234

# The recipe's cases but for their shape and precision (law_case), in the order the runs go: the targets' rows first
IMPLS = [dict(family="phift"), dict(family="seed", engine="deepspeed", ckpt="full"), dict(family="hf", compile=True),
         dict(family="phift", packing=True), dict(family="phift", compile=True),
         dict(family="phift", packing=True, compile=True), dict(family="hf")]


def law_case(fields: dict, cutoff: int, device_type: str) -> Case:
    """LoRA, batch 1, cut to `cutoff`; fp16 as the recipe (the CPU has no fp16 training: phift and the seed's stack
    fall back too)."""
    return Case(shape="law", mode="lora", batch=1, seq=cutoff, precision="fp16" if device_type == "cuda" else "bf16",
                **fields)


IMPL_NAMES = [law_case(f, CUTOFF, "cuda").impl for f in IMPLS]


def family(row: dict) -> str:
    """A row's family: from its case, or (rows written before rows carried it) from the table by its impl."""
    return (row.get("case") or IMPLS[IMPL_NAMES.index(row["impl"])])["family"]
MARK_EVERY = 20  # steps between synchronised time marks (tiny: 2); the first mark times the warm-up
MIN_START_S = 40   # a run is not started with less of the budget left


# ============================================================================================ the lengths
def make_lengths(law_file: Path, tokenizer_dir: Path, out: Path) -> dict:
    """(prompt, response) token counts of the law sample's rows, as phift encodes them for the law recipe: the
    law_sft_triplet entry of data/dataset_info.json (statutes before the prompt), the vanilla template; prompt
    counts bos, response counts eos; before the cutoff. Only the counts are written, never the text."""
    from phift import data
    from phift.tokenizer import load_tokenizer

    entry = {k: v for k, v in data.load_dataset_info(ROOT / "data")["law_sft_triplet"].items() if k != "hf_hub_url"}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "dataset_info.json").write_text(json.dumps({"law": {**entry, "file_name": str(law_file)}}))
        rows = data.load_rows("law", d)
    tokenizer, template = load_tokenizer(tokenizer_dir), data.get_template("vanilla")
    pairs = []
    for row in rows:
        (source, target), = data.encode_turns(template, tokenizer, row["prompt"], row["response"])
        pairs.append([len(source), len(target)])
    doc = {"what": "(prompt, response) token counts per row: phi-1_5 tokenizer, vanilla template, prompt incl. bos "
                   "and the statutes, response incl. eos, before the cutoff",
           "source": law_file.name, "sha256": hashlib.sha256(law_file.read_bytes()).hexdigest(),
           "dataset_entry": "law_sft_triplet", "pairs": pairs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc) + "\n")
    return doc


class LengthTokenizer:
    """Stands in for the tokenizer so that phift's own encode_supervised cuts the synthetic samples: a text of n
    characters encodes to n random ids."""

    def __init__(self, rng: random.Random, vocab: int):
        self.rng, self.vocab = rng, vocab
        self.bos_token_id = self.eos_token_id = self.pad_token_id = min(50256, vocab - 1)

    def encode(self, text: str) -> list[int]:
        return self.rng.choices(range(self.vocab), k=len(text))


def make_samples(pairs, n: int, cutoff: int, vocab: int, seed: int = DATA_SEED) -> list[dict]:
    """n token-level samples: lengths drawn from `pairs`, random ids, cut as `phift train` cuts the law data."""
    from phift import data

    rng = random.Random(seed)
    tokenizer, template = LengthTokenizer(rng, vocab), data.get_template("vanilla")
    samples = []
    for _ in range(n):
        prompt, response = rng.choice(pairs)
        row = {"prompt": "x" * (prompt - 1), "response": "x" * (response - 1)}  # bos and eos come from the template
        samples.append(data.encode_supervised(template, tokenizer, row, cutoff, train_on_prompt=False))
    return samples


def checksum(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s["input_ids"], s["labels"]]).encode())
    return h.hexdigest()[:12]


def length_stats(pairs, samples, cutoff: int) -> dict:
    from phift import data

    raw = [p + r for p, r in pairs]
    cut = [len(s["input_ids"]) for s in samples]
    rows = data.pack(samples, cutoff)
    return {"rows_in_source": len(pairs), "raw_mean": statistics.mean(raw), "raw_median": statistics.median(raw),
            "raw_max": max(raw), "raw_over_cutoff": sum(x > cutoff for x in raw) / len(raw),
            "mean": statistics.mean(cut), "median": statistics.median(cut), "max": max(cut), "min": min(cut),
            "at_cutoff": sum(x == cutoff for x in cut) / len(cut),
            "response_share": sum(sum(t != -100 for t in s["labels"]) for s in samples) / sum(cut),
            "tokens_per_epoch": sum(cut), "steps_unpacked": len(samples), "steps_packed": len(rows),
            "packed_fill": sum(cut) / (len(rows) * cutoff)}


# ============================================================================================ the worker process
def worker(spec: dict) -> dict:
    """Build one impl, train it for spec["epochs"] epochs (or until spec["limit_s"] since start), report."""
    import torch

    from phift import data

    t_proc = time.perf_counter()
    c = Case.from_dict(spec["case"])
    device = torch.device(spec["device"])
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    vocab = min(c.vocab_used, model_shape(c.model, spec["tiny"]).vocab_size)
    samples = make_samples(spec["pairs"], spec["samples"], spec["cutoff"], vocab)
    pad_id = min(50256, vocab - 1)
    # phift.train's batching for every impl: the same seeded shuffle per epoch, batch 1, packed or not
    epochs = phift_case.epoch_batches(c, spec, samples, spec["epochs"])
    total_steps = sum(map(len, epochs))

    def batch_of(micro):
        if c.family == "phift":
            return phift_case.to_batch(micro, c.packing, pad_id, device)
        # LLaMA-Factory's DataCollatorForSeq2Seq: right padding to a multiple of 4, attention_mask kept
        return {k: v.to(device) for k, v in data.collate(micro, pad_id, pad_to_multiple_of=4).items()}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.manual_seed(0)
    t0 = time.perf_counter()
    step, info = harness.build(c, {**spec, "total_steps": total_steps}, device)
    sync()
    build_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    steps = tokens = 0
    marks = []  # (steps, tokens, seconds) every mark_every steps, synchronised
    epoch_rows, stopped = [], False
    t_run = time.perf_counter()
    for e, batches in enumerate(epochs):
        t_epoch, loss_sum, n = time.perf_counter(), torch.zeros((), device=device), 0
        for micro in batches:
            loss_sum += step(batch_of(micro)).detach().float()
            n += 1
            steps += 1
            tokens += phift_case.tokens(micro)
            if steps % spec["mark_every"] == 0:
                sync()
                marks.append((steps, tokens, time.perf_counter() - t_run))
                print(f"MARK {steps} {tokens} {marks[-1][2]:.2f}", flush=True)  # what a killed run still tells
            if time.perf_counter() - t_proc > spec["limit_s"]:
                stopped = True
                break
        sync()
        epoch_rows.append({"epoch": e + 1, "wall_s": time.perf_counter() - t_epoch, "steps": n,
                           "complete": n == len(batches), "loss": (loss_sum / max(n, 1)).item()})
        if stopped:
            break
    wall = time.perf_counter() - t_run
    losses = [r["loss"] for r in epoch_rows]
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"non-finite loss: {losses}")
    # the steady rate over the run's second half: every compilation, however late its new shape came, is
    # normally behind it
    mid = next((m for m in marks if m[0] >= steps / 2), None)
    steady = (tokens - mid[1]) / (wall - mid[2]) if mid and mid[0] < steps else None
    result = {"build_s": build_s, "wall_s": wall, "steps": steps, "planned_steps": total_steps,
              "steps_per_epoch": len(epochs[0]), "tokens": tokens,
              "epoch_tokens": sum(len(s["input_ids"]) for s in samples), "epochs_planned": spec["epochs"],
              "epochs_done": sum(r["complete"] for r in epoch_rows), "stopped_at_limit": stopped,
              "tokens_per_s": tokens / wall, "mark_every": spec["mark_every"],
              "first_mark_s": marks[0][2] if marks else None, "steady_tokens_per_s": steady, "marks": marks,
              "epochs": epoch_rows,
              "loss_first_epoch": losses[0], "loss_last_epoch": losses[-1], "checkpointing": c.ckpt != "off",
              "packing": c.packing, "data_checksum": checksum(samples),
              "peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
              **info}
    if c.compile:
        from torch._dynamo.utils import counters
        result["graphs_compiled"] = counters["stats"]["unique_graphs"]
    return result


def recipe_wall(r: dict) -> tuple[float | None, bool]:
    """(wall of the recipe's 5 epochs, measured?). Not measured: the run's wall (compilation included) plus the
    tokens left to train at the steady rate."""
    if r["epochs_done"] == RECIPE_EPOCHS and not r["stopped_at_limit"]:
        return r["wall_s"], True
    if not r.get("steady_tokens_per_s"):
        return None, False
    return r["wall_s"] + (RECIPE_EPOCHS * r["epoch_tokens"] - r["tokens"]) / r["steady_tokens_per_s"], False


def steady_epoch_s(r: dict) -> float | None:
    """An epoch's wall without the compilations: the mean of the complete epochs after the first, else estimated
    from the steady rate."""
    later = [e["wall_s"] for e in r["epochs"][1:] if e["complete"]]
    if later:
        return statistics.mean(later)
    return r["epoch_tokens"] / r["steady_tokens_per_s"] if r.get("steady_tokens_per_s") else None


# ============================================================================================ the parent process
def launch(spec: dict, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def prebuild(cases: list[Case], env) -> list[str]:
    """phift's ops and DeepSpeed's CPU Adam are built once per machine, not inside a timed run."""
    notes = []
    codes = []
    if any(c.family == "phift" for c in cases):
        codes.append(("phift kernels", harness.BUILD_PHIFT_KERNEL))
    if any(c.engine == "deepspeed" for c in cases):
        codes.append(("DeepSpeed CPU Adam", harness.BUILD_CPU_ADAM))
    for name, code in codes:
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                              check=False)
        last = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        notes.append(f"{name}: rc {proc.returncode}, {time.time() - t0:.0f} s, {last[0][:120]}")
    return notes


def run_all(a, cases: list[Case], pairs, meta) -> tuple[list[dict], list[str]]:
    t_start = time.time()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl, logfile = out.with_suffix(".jsonl"), out.with_suffix(".log")
    env = harness.child_env(a.device)
    if a.device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
    jsonl.write_text(json.dumps({"bench": "law", "meta": meta}) + "\n")
    logfile.write_text("")
    notes = prebuild(cases, env) if a.device == "cuda" else []
    print(*notes, sep="\n", flush=True)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="phift_law_"))
    for c in cases:
        impl = c.impl
        left = a.budget_s - (time.time() - t_start)
        row = {"id": impl, "impl": impl, "case": c.to_dict()}
        if left < (MIN_START_S if not a.tiny else 5):
            row["status"] = f"skipped: time budget ({left:.0f} s left)"
        else:
            limit = min(a.timeout_s, left)
            spec = {"case": c.to_dict(), "device": a.device, "tiny": a.tiny, "epochs": meta["epochs"],
                    "samples": meta["samples"], "cutoff": meta["cutoff"], "mark_every": meta["mark_every"],
                    "pairs": pairs,
                    "limit_s": max(5.0, limit - 30), "tmp": str(tmp / re.sub(r"\W+", "_", impl))}
            print(f"[{time.time() - t_start:5.0f} s] {impl} (limit {limit:.0f} s)", flush=True)
            t0 = time.time()
            proc = launch(spec, env)
            try:
                text, rc = proc.communicate(timeout=limit)[0], proc.returncode
            except subprocess.TimeoutExpired:
                text, rc = harness.stop(proc), None
            row["process_s"] = round(time.time() - t0, 1)
            with logfile.open("a") as f:
                f.write(f"\n===== {impl} (rc {rc}, {row['process_s']} s)\n{text[-6000:]}")
            found = [line for line in text.splitlines() if line.startswith("RESULT ")]
            if rc == 0 and found:
                row.update(json.loads(found[-1][len("RESULT "):]), status="ok")
            else:
                row["status"] = harness.classify_failure(text, rc)
                last = [line.split() for line in text.splitlines() if line.startswith("MARK ")][-1:]
                row["status"] += (f" after {last[0][1]} steps ({last[0][2]} tokens) in {float(last[0][3]):.0f} s of "
                                  "training" if last else " before its first time mark (the first "
                                  f"{meta['mark_every']} steps, compilation included)")
        rows.append(row)
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print("  ", json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()
                                if k not in ("epochs", "case")}), flush=True)
    wall = f"Harness wall time {time.time() - t_start:.0f} s of a {a.budget_s:.0f} s budget; raw rows in {jsonl.name}."
    footer = [f"Builds before the runs: {'; '.join(notes)}." if notes else "", wall]
    rows_text = jsonl.read_text().splitlines()
    rows_text[0] = json.dumps({"bench": "law", "meta": meta, "footer": footer})
    jsonl.write_text("\n".join(rows_text) + "\n")
    return rows, footer


# ============================================================================================ the report
def report(rows: list[dict], meta: dict, footer: list[str]) -> str:
    s, epochs, first, cutoff = meta["stats"], meta["epochs"], meta["mark_every"], meta["cutoff"]
    title = "## The law LoRA recipe end to end"
    if meta["tiny"]:
        title += " — TINY SMOKE TEST, not a measurement"
    versions = (f"{meta['device']} · torch {meta['torch']} (CUDA {meta['cuda']}) · transformers "
                f"{meta['transformers']} · peft {meta['peft']} · deepspeed {meta['deepspeed']} · {meta['date']}")
    if epochs == RECIPE_EPOCHS:
        ran = "all 5 of the recipe's epochs"
    else:
        ran = f"**{epochs} of the recipe's {RECIPE_EPOCHS}**; every 5-epoch figure below is an extrapolation"
    half = "bf16 base and fp32 adapters (the CPU has no fp16 training)" if meta["device"] == "CPU" else \
        "fp16 base and fp32 adapters"
    recipe = (f"Epochs run: {ran}. The training of `examples/law_lora_zero2.sh` on a random-weight "
              f"{meta['model']}: LoRA r 8 α 16 dropout 0.1 on Wqkv (q/k/v_proj under PEFT), {half}, batch 1, "
              f"lr 2e-4 cosine, clipping 1.0, cutoff_len {cutoff}, prompt tokens unlabelled.")
    lengths = (f"Data: {meta['samples']} synthetic samples (random ids, seed {DATA_SEED}) whose (prompt, response) "
               f"lengths are drawn from {meta['lengths_source']}: {s['rows_in_source']} rows, before the cut mean "
               f"{s['raw_mean']:.0f}, median {s['raw_median']:.0f}, max {s['raw_max']} tokens, "
               f"{100 * s['raw_over_cutoff']:.0f} % over {cutoff}. Cut by phift's encode_supervised: mean "
               f"{s['mean']:.0f}, median {s['median']:.0f}, max {s['max']}, min {s['min']} tokens a sample, "
               f"{100 * s['at_cutoff']:.0f} % exactly at the cutoff, {100 * s['response_share']:.0f} % of the tokens "
               f"labelled; {s['tokens_per_epoch']:,} tokens an epoch. Steps an epoch: {s['steps_unpacked']} "
               f"unpacked, {s['steps_packed']} packed (rows {100 * s['packed_fill']:.0f} % full).")
    method = ("Wall = every step of the epochs run, compilation included (the model build apart); tokens/s = the "
              "samples' tokens (prompt + response, no padding) ÷ wall; first steps = the first "
              f"{first} steps' time (the first compilation; the dynamic-shape recompile comes with the first new "
              "length); steady = the rate over the second half of the steps run; 5-epoch wall = measured when 5 "
              "epochs ran, else the wall + the tokens left to 5 epochs at the steady rate (*extrapolated*); epoch "
              "s (steady) = the mean of the epochs after the first, else the epoch's tokens at the steady rate; "
              "peak = torch.cuda.max_memory_allocated over the training. Every impl takes the samples in "
              "phift.train.epoch_batches' order (one seeded shuffle per epoch).")
    header = (f"| impl | ckpt | steps | wall s ({epochs} ep) | tokens/s | first {first} steps s | steady tokens/s "
              "| epoch s (steady) | 5-epoch wall s | build s | peak GiB | loss ep 1 → last | notes |")
    lines = [title, "", versions, "", f"Command: `{meta['command']}`.", "", recipe, "", lengths, "", method, "",
             header, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    fmt = harness.fmt
    for r in rows:
        if r["status"] != "ok":
            lines.append("| " + " | ".join([r["impl"], *["—"] * 11, r["status"]]) + " |")
            continue
        five, measured = recipe_wall(r)
        notes = []
        if r["stopped_at_limit"]:
            notes.append(f"stopped at the time limit after {r['steps']} of {r['planned_steps']} steps")
        if r.get("fused_kernel") is not None:
            notes.append("fused LoRA kernel" if r["fused_kernel"] else "PyTorch LoRA fallback")
        if "graphs_compiled" in r:
            notes.append(f"{r['graphs_compiled']} graphs compiled")
        notes.append("packed" if r["packing"] else "unpacked")
        five_text = fmt(five) + ("" if measured or five is None else " (extrapolated)")
        cells = [r["impl"], "on" if r["checkpointing"] else "off", f"{r['steps']:,}", fmt(r["wall_s"], 1),
                 fmt(r["tokens_per_s"]), fmt(r["first_mark_s"], 1), fmt(r["steady_tokens_per_s"]),
                 fmt(steady_epoch_s(r), 1), five_text, fmt(r["build_s"], 1), fmt(r["peak_gib"], 2),
                 f"{r['loss_first_epoch']:.3f} → {r['loss_last_epoch']:.3f}", ", ".join(notes)]
        lines.append("| " + " | ".join(cells) + " |")
    sums = {meta["data_checksum"]} | {r["data_checksum"] for r in rows if r["status"] == "ok"}
    if len(sums) > 1:
        lines += ["", f"**Warning: the runs trained on different samples** (checksums {', '.join(sorted(sums))})."]
    lines += ["", "### Targets: the law recipe, phift (its fastest mode) ÷ the peers", "",
              "| target | measured | goal | |", "| --- | --- | --- | --- |", *targets(rows, epochs)]
    return "\n".join([*lines, "", *(f for f in footer if f)]) + "\n"


def targets(rows, epochs) -> list[str]:
    ok = {r["impl"]: r for r in rows if r["status"] == "ok"}
    phift = [r for r in ok.values() if family(r) == "phift" and recipe_wall(r)[0]]
    best = min(phift, key=lambda r: recipe_wall(r)[0]) if phift else None
    out = []
    for peer, goal in (("seed", 3.0), ("hf+compile", 1.5)):
        p = ok.get(peer)
        if not best or not p or not recipe_wall(p)[0]:
            out.append(f"| law recipe: phift ÷ {peer} (5-epoch wall) | — | ≥ {goal}× | not measured |")
            continue
        (wb, mb), (wp, mp) = recipe_wall(best), recipe_wall(p)
        q = wp / wb
        same = not best["stopped_at_limit"] and not p["stopped_at_limit"]
        direct = f"; measured over the {epochs} epoch{'s' * (epochs > 1)} run: {p['wall_s'] / best['wall_s']:.2f}×" \
            if same and epochs != RECIPE_EPOCHS else ""
        how = "measured" if mb and mp else "**extrapolated** to 5 epochs"
        out.append(f"| law recipe: phift ÷ {peer} (5-epoch wall) | {q:.2f}× ({best['impl']} {wb:,.0f} s vs "
                   f"{wp:,.0f} s, {how}{direct}) | ≥ {goal}× | {'**met**' if q >= goal else '**missed**'}"
                   f"{'' if mb and mp else ' (extrapolated)'} |")
    return out


def render(files: list[Path], out: Path):
    """One report from the rows of one or more runs' .jsonl (same data and epochs), the first file's header."""
    heads, rows = [], []
    for f in files:
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        heads += [x for x in lines if "meta" in x]
        rows += [x for x in lines if "id" in x]
    meta = heads[0]["meta"]
    for h in heads[1:]:
        if (h["meta"]["epochs"], h["meta"]["samples"], h["meta"]["stats"]) != (meta["epochs"], meta["samples"],
                                                                              meta["stats"]):
            raise SystemExit("the runs used different epochs, samples or lengths: one report cannot compare them")
    footer = [f for h in heads for f in h.get("footer", [])]
    if len(files) > 1:
        meta = {**meta, "command": "; ".join(h["meta"]["command"] for h in heads)}
        footer.append(f"Rendered from {', '.join(f.name for f in files)}.")
    text = report(rows, meta, footer)
    out.write_text(text)
    print(text)


def load_pairs(a) -> tuple[list, str]:
    if a.lengths:
        return json.loads(Path(a.lengths).read_text())["pairs"], Path(a.lengths).name
    if a.tiny:  # the real lengths cut to a tiny cutoff would all be full rows: nothing to pack
        return TINY_PAIRS, "a built-in toy distribution (tiny mode)"
    if not LENGTHS.is_file():
        raise SystemExit(f"{LENGTHS} is missing: run `python bench/bench_law.py --make-lengths` where ../shared "
                         "exists, and carry .device/ to the GPU machine")
    doc = json.loads(LENGTHS.read_text())
    return doc["pairs"], f"the token lengths of {doc['source']} (sha256 {doc['sha256'][:12]}, vanilla template)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="law_bench.md", help="markdown report (raw rows go to .jsonl, logs to .log)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="the 'tiny' model, 16 samples, 1 epoch: a smoke test")
    p.add_argument("--epochs", type=int, default=None, help=f"default {RECIPE_EPOCHS} (tiny: 1)")
    p.add_argument("--samples", type=int, default=None, help=f"default {RECIPE_SAMPLES} (tiny: 16)")
    p.add_argument("--only", default=None, help=f"regex over impl names: {', '.join(IMPL_NAMES)}")
    p.add_argument("--timeout-s", type=float, default=540.0, help="a run stops after the step that passes this")
    p.add_argument("--budget-s", type=float, default=560.0, help="no run starts after this much harness time")
    p.add_argument("--lengths", default=None, help=f"a lengths file (default {LENGTHS.relative_to(ROOT)}; tiny: "
                                                   "a built-in toy distribution)")
    p.add_argument("--make-lengths", action="store_true", help=f"write {LENGTHS.relative_to(ROOT)} from "
                                                               f"{LAW_SAMPLE} and exit")
    p.add_argument("--render", type=Path, nargs="+", help="rebuild --out from runs' .jsonl files")
    p.add_argument("--list", action="store_true", help="print the selected impls and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(json.loads(a.worker))), flush=True)
        os._exit(0)  # skip DeepSpeed's / inductor's teardown: the result is out
    if a.make_lengths:
        doc = make_lengths(LAW_SAMPLE, PHI_TOKENIZER, LENGTHS)
        total = [x + y for x, y in doc["pairs"]]
        print(f"wrote {LENGTHS}: {len(total)} rows, total tokens mean {statistics.mean(total):.0f}, median "
              f"{statistics.median(total):.0f}, max {max(total)}, {sum(t > CUTOFF for t in total)} over {CUTOFF}")
        return
    if a.render:
        render(a.render, Path(a.out))
        return
    cutoff = TINY_CUTOFF if a.tiny else CUTOFF
    cases = [c for c in (law_case(f, cutoff, a.device) for f in IMPLS) if a.only is None or re.search(a.only, c.impl)]
    impls = [c.impl for c in cases]
    if a.list:
        print("\n".join(impls))
        return
    epochs = a.epochs or (1 if a.tiny else RECIPE_EPOCHS)
    samples = a.samples or (16 if a.tiny else RECIPE_SAMPLES)
    pairs, source = load_pairs(a)
    vocab = min(VOCAB_USED["phi-1_5"], model_shape("phi-1_5", a.tiny).vocab_size)
    drawn = make_samples(pairs, samples, cutoff, vocab)
    stats = length_stats(pairs, drawn, cutoff)
    meta = {**harness.versions(a.device), "date": datetime.date.today().isoformat(), "tiny": a.tiny, "epochs": epochs,
            "samples": samples, "cutoff": cutoff, "mark_every": 2 if a.tiny else MARK_EVERY,
            "model": f"{model_shape('phi-1_5', a.tiny).name}-shaped model",
            "lengths_source": source, "stats": stats, "data_checksum": checksum(drawn),
            "command": " ".join(["python", "bench/bench_law.py", *(argv if argv is not None else sys.argv[1:])])}
    print(f"{len(impls)} runs: {', '.join(impls)}; {epochs} epoch(s) of {samples} samples\nlengths: "
          + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()}), flush=True)
    rows, footer = run_all(a, cases, pairs, meta)
    text = report(rows, meta, footer)
    Path(a.out).write_text(text)
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
