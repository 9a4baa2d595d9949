"""How close is `phift estimate` to the memory a run really takes? Predicted against measured, case by case.

    python bench/bench_estimate.py --out $OUT/estimate.md [--only REGEX] [--budget-s 560] [--steps 2]
    # on the GPU machine: DeepSpeed from .whl/ (bash /work/shared/tools/gpu-wheels.sh, carry .whl), then
    #   TORCH_CUDA_ARCH_LIST=9.0 python bench/bench_estimate.py --out $OUT/estimate.md   (about 9 minutes on an H200)
    python bench/bench_estimate.py --device cpu --tiny --out /tmp/estimate.md     # smoke test of the plumbing
    python bench/bench_estimate.py --list

Each case is a set of `phift train` flags on a random-weight phi-1, phi-1_5, phi-2, Phi-3.5-mini or Phi-4-mini (a
preset: no download). In a
fresh subprocess the case is estimated (phift.estimate.estimate), then built as `phift train` builds it
(phift.train.prepare_model, phift.engines.build_engine: the plain engine, phift's --offload_optimizer cpu, DeepSpeed
ZeRO-2/3 with or without its CPU offload) and trained for a warm-up step and --steps measured optimizer steps on
random tokens of the case's shape, every position labelled (the estimate's worst batch); for --stage rm, dpo and orpo
each pair a prompt of the case's length (by default one token) and two answers that fill the cutoff beside it,
batched as phift train batches them (a row per answer, or one row a pair sharing the prompt where that holds fewer
tokens), the objective and DPO's reference built as there. Measured:
- peak allocated: torch.cuda.max_memory_allocated over the measured steps (the counter reset after the warm-up),
  against the estimate's peak allocated;
- GPU needed: the device's used memory (total − free) at the end, the CUDA context included, against the
  estimate's total (allocated + allocator slack + context); the context alone is used − reserved;
- host: the process's peak resident memory (ru_maxrss) and PyTorch's pinned bytes, against the estimate's host
  total and pinned; the resident memory right after CUDA starts, against the estimate's process constant.
Target: every case within ±10 % or ±0.5 GiB of the measured peak allocated, whichever is larger.

The cases run in priority order (the seed's recipes first) until --budget-s is spent; the rest are listed as skipped.
Rows go to OUT.jsonl, the table to OUT (markdown). DeepSpeed cases need DeepSpeed (on the GPU machine: .whl/, see
bench/README.md); its CPU Adam builds on first use.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GIB = 1 << 30
DS_SEED = ROOT / "examples" / "ds_config.json"


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # a preset
    batch: int
    seq: int
    finetuning: str = "lora"  # lora | full
    precision: str = "bf16"  # fp32 | fp16 | bf16 | pure_bf16
    recompute: str = "full"  # none | full | mlp
    engine: str = "plain"  # plain | offload | zero2 | zero2-offload | zero3
    accumulation: int = 1
    stage: str = "sft"  # sft | rm | dpo | orpo: `batch` pairs, each answer at `seq` with its prompt
    prompt: int = 1  # a pair's prompt tokens (every other pair's 8 fewer, when longer than 8: padded, masked prompts)
    extra: tuple[str, ...] = field(default_factory=tuple)

    def flags(self, ds_dir: Path) -> list[str]:
        out = ["--model_name_or_path", self.model, "--dataset", "none", "--output_dir", str(ds_dir / "out"),
               "--stage", self.stage,
               "--finetuning_type", self.finetuning, "--per_device_train_batch_size", str(self.batch),
               "--cutoff_len", str(self.seq), "--gradient_accumulation_steps", str(self.accumulation)]
        if self.precision != "fp32":
            out += [f"--{self.precision}", "True"]
        if self.recompute == "none":
            out += ["--disable_gradient_checkpointing", "True"]
        else:
            out += ["--gradient_checkpointing_policy", self.recompute]
        if self.engine == "offload":
            out += ["--offload_optimizer", "cpu"]
        elif self.engine.startswith("zero"):
            out += ["--deepspeed", str(ds_dir / f"{self.engine}.json")]
        return out + list(self.extra)


def _c(name, model, batch, seq, **kw):
    return Case(name, model, batch, seq, **kw)


# Priority order: the seed's three recipes, then each lever alone on phi-1_5, then the other shapes, then engines.
CASES = [
    _c("recipe1-lora-fp16-6x1024", "phi-1_5", 6, 1024, precision="fp16"),
    _c("recipe2-lora-fp16-1x1792-zero2-offload", "phi-1_5", 1, 1792, precision="fp16", engine="zero2-offload"),
    _c("recipe3-full-fp16-1x1024-zero2-offload", "phi-1_5", 1, 1024, finetuning="full", precision="fp16",
       engine="zero2-offload"),
    _c("full-fp16-1x1024-offload", "phi-1_5", 1, 1024, finetuning="full", precision="fp16", engine="offload"),
    _c("lora-bf16-6x1024-none", "phi-1_5", 6, 1024, recompute="none"),
    _c("lora-bf16-6x1024-mlp", "phi-1_5", 6, 1024, recompute="mlp"),
    _c("full-bf16-1x1024", "phi-1_5", 1, 1024, finetuning="full"),
    _c("full-pure-4x2048", "phi-1_5", 4, 2048, finetuning="full", precision="pure_bf16"),
    _c("full-bf16-2x2048-none", "phi-1_5", 2, 2048, finetuning="full", recompute="none"),
    _c("full-pure-4x1024-mlp", "phi-1_5", 4, 1024, finetuning="full", precision="pure_bf16", recompute="mlp"),
    _c("lora-fp16-1x2048", "phi-1_5", 1, 2048, precision="fp16"),
    _c("lora-bf16-8x2048-none", "phi-1_5", 8, 2048, recompute="none"),
    _c("phi2-lora-bf16-4x2048-none", "phi-2", 4, 2048, recompute="none"),
    _c("phi2-lora-fp16-8x512", "phi-2", 8, 512, precision="fp16"),
    _c("phi2-full-pure-1x2048", "phi-2", 1, 2048, finetuning="full", precision="pure_bf16"),
    _c("phi1-lora-bf16-8x512-none", "phi-1", 8, 512, recompute="none"),
    _c("full-fp16-2x1024-zero2", "phi-1_5", 2, 1024, finetuning="full", precision="fp16", engine="zero2"),
    _c("full-bf16-1x1024-zero3", "phi-1_5", 1, 1024, finetuning="full", engine="zero3"),
    _c("lora-bf16-4x1024-zero2", "phi-1_5", 4, 1024, engine="zero2"),
    _c("full-bf16-2x2048-mlp-offload", "phi-1_5", 2, 2048, finetuning="full", recompute="mlp", engine="offload"),
    _c("lora-fp16-2x1024-accum4", "phi-1_5", 2, 1024, precision="fp16", accumulation=4),
    _c("full-pure-1x1024-accum2", "phi-1_5", 1, 1024, finetuning="full", precision="pure_bf16", accumulation=2),
    _c("lora-all-r16-bf16-4x1024-none", "phi-1_5", 4, 1024, recompute="none",
       extra=("--lora_target", "all", "--lora_rank", "16")),
    _c("phi2-full-bf16-1x1024-offload", "phi-2", 1, 1024, finetuning="full", engine="offload"),
    _c("full-fp32-1x512", "phi-1_5", 1, 512, finetuning="full", precision="fp32"),
    # the Phi-3 family: Phi-3.5-mini's sequential block; Phi-4-mini's grouped-query attention (the PyTorch rotary),
    # tied embedding and 200,064-token vocabulary (the PyTorch cross-entropy)
    _c("phi3.5-lora-bf16-1x2048", "phi-3.5-mini", 1, 2048),
    _c("phi3.5-lora-bf16-1x2048-none", "phi-3.5-mini", 1, 2048, recompute="none"),
    _c("phi3.5-full-pure-1x1024-offload", "phi-3.5-mini", 1, 1024, finetuning="full", precision="pure_bf16",
       engine="offload"),
    _c("phi4mini-lora-bf16-1x2048", "phi-4-mini", 1, 2048),
    _c("phi4mini-lora-bf16-1x2048-none", "phi-4-mini", 1, 2048, recompute="none"),
    _c("phi4mini-full-pure-1x1024-offload", "phi-4-mini", 1, 1024, finetuning="full", precision="pure_bf16",
       engine="offload"),
    # preference pairs: each answer as long as the cutoff allows beside a one-token prompt, so that a row per answer
    # is the estimate's worst batch (sharing would hold more tokens, so to_batch does not share); the shared case's
    # prompts of 512 and 504 tokens are padded, the layout masked, as the estimate assumes
    _c("dpo-lora-bf16-4x1024-rows", "phi-1_5", 4, 1024, stage="dpo", extra=("--dpo_share_prompt", "False")),
    _c("dpo-lora-bf16-4x1024-shared", "phi-1_5", 4, 1024, stage="dpo", prompt=512),
    _c("dpo-full-bf16-1x1024", "phi-1_5", 1, 1024, finetuning="full", stage="dpo"),
    _c("dpo-full-pure-2x1024-ref-offload", "phi-1_5", 2, 1024, finetuning="full", precision="pure_bf16",
       stage="dpo", extra=("--dpo_ref_offload", "True")),
    _c("rm-lora-bf16-4x1024", "phi-1_5", 4, 1024, stage="rm"),
    _c("orpo-lora-bf16-4x1024-none", "phi-1_5", 4, 1024, stage="orpo", recompute="none"),
    _c("phi3.5-dpo-lora-bf16-2x1024", "phi-3.5-mini", 2, 1024, stage="dpo"),
]
TINY = [
    _c("tiny-lora-fp32-2x64-none", "tiny", 2, 64, precision="fp32", recompute="none"),
    _c("tiny-full-pure-2x64", "tiny", 2, 64, finetuning="full", precision="pure_bf16"),
    _c("tiny-full-bf16-2x64-offload", "tiny", 2, 64, finetuning="full", engine="offload"),
    _c("tiny-full-fp32-2x64-zero2", "tiny", 2, 64, finetuning="full", precision="fp32", engine="zero2"),
    _c("tiny-phi3-lora-bf16-2x64", "tiny-phi3", 2, 64),
    _c("tiny-phi4-full-pure-2x64-offload", "tiny-phi4", 2, 64, finetuning="full", precision="pure_bf16",
       engine="offload"),
    _c("tiny-dpo-full-fp32-2x64", "tiny", 2, 64, finetuning="full", precision="fp32", stage="dpo"),
    _c("tiny-phi3-rm-lora-bf16-2x64", "tiny-phi3", 2, 64, stage="rm", prompt=32),
]


def write_ds_configs(directory: Path) -> None:
    """The seed's examples/ds_config.json (ZeRO-2, optimizer on the CPU) and its variants."""
    seed = json.loads(DS_SEED.read_text())
    variants = {"zero2-offload": seed}
    no_offload = json.loads(json.dumps(seed))
    del no_offload["zero_optimization"]["offload_optimizer"]
    variants["zero2"] = no_offload
    zero3 = json.loads(json.dumps(no_offload))
    zero3["zero_optimization"] = {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                  "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                  "stage3_param_persistence_threshold": "auto"}
    variants["zero3"] = zero3
    for name, cfg in variants.items():
        (directory / f"{name}.json").write_text(json.dumps(cfg, indent=2))


# ------------------------------------------------------------------------------------------------------ the worker
def device_name(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{os.uname().machine}, {os.cpu_count()} logical CPUs"


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def predict(case: Case, device: str, directory: Path) -> dict:
    """What `phift estimate` says of the case for `device` ("cuda" or "cpu"): CPU arithmetic, no weights."""
    from phift import estimate
    from phift.args import parse_train_args

    e = estimate.estimate(estimate.read_config(case.model), parse_train_args(case.flags(directory)), device=device)
    return {"allocated": e.gpu_allocated, "gpu_total": e.gpu_total, "host": e.host_total,
            "pinned": sum(e.pinned.values()), "phase": e.peak_phase, "phases": e.phases, "terms": e.gpu}


def repredict(source: Path, out: Path, command: str) -> None:
    """The measurements of an earlier run, each row's prediction made again by this checkout's estimate: how a change
    to the memory model fares on peaks already measured, without the GPU."""
    head, *rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    if head.get("bench") != "estimate":
        raise SystemExit(f"{source}: not a bench_estimate.py result (its header says {head.get('bench')!r})")
    by_name = {c.name: c for c in TINY + CASES}
    meta = {**head["meta"], "command": command, "measured_by": head["meta"]["command"]}
    device = "cpu" if "--device cpu" in head["meta"]["command"] else "cuda"  # what the measured run estimated for
    with tempfile.TemporaryDirectory() as tmp:
        write_ds_configs(Path(tmp))
        for row in rows:
            if row.get("status") == "ok":
                if row["case"] not in by_name:
                    raise SystemExit(f"{source}: case {row['case']!r} is no longer in the harness")
                row["predicted"] = predict(by_name[row["case"]], device, Path(tmp))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".jsonl").write_text("\n".join(json.dumps(r) for r in [{"bench": "estimate", "meta": meta}, *rows])
                                         + "\n")
    header = (f"### phift estimate against measured memory, predictions made again\n\nCommand: `{command}`. "
              f"Measured by `{head['meta']['command']}` on {head['meta']['device']}, {head['meta']['date']}.")
    out.write_text(render(rows, header))
    print(out.read_text())


def worker(case: Case, device_name: str, steps: int, directory: Path) -> dict:
    import torch

    from phift import distributed, estimate, families, kernels
    from phift.args import decide_precision, parse_train_args
    from phift.engines import build_engine
    from phift.model import LMHead
    from phift.train import build_objective, dpo_reference, prepare_model, shares_prompt, to_batch

    row = {"case": case.name, **{k: v for k, v in asdict(case).items() if k != "name"}}
    run = parse_train_args(case.flags(directory))
    config = estimate.read_config(case.model)
    row["predicted"] = predict(case, device_name, directory)
    t0 = time.time()
    rank, world, device = distributed.start(bool(run.training.deepspeed), run.training.ddp_timeout)
    if device_name == "cuda" and device.type != "cuda":
        raise RuntimeError("no CUDA GPU")
    if device.type == "cuda":
        torch.ones(1, device=device) @ torch.ones(1, device=device)  # CUDA and cuBLAS started
    row["measured"] = {"rss_after_start": _rss()}
    precision = decide_precision(run, device)
    kernels.load(device)
    with torch.device(device):
        model = families.build(config).to(dtype=precision.load)
    pairwise = case.stage != "sft"
    reference = dpo_reference(model, run, precision, device)  # before LoRA or training change the base, as phift train
    model = prepare_model(model, run, precision)
    trained = build_objective(model, run, precision, device, reference) if pairwise else model
    engine = build_engine(trained, run, precision, steps + 1, device)
    trained.train()
    del reference
    g = torch.Generator().manual_seed(0)
    vocab = min(config.vocab_size, 50295)
    layout = shares_prompt(run, config) if pairwise else {}

    def batch():
        if pairwise:  # each answer's row at the cutoff
            def ids(n):
                return torch.randint(0, vocab, (n,), generator=g).tolist()

            prompts = [case.prompt - (8 if case.prompt > 8 and i % 2 else 0) for i in range(case.batch)]
            pairs = [{"prompt_ids": ids(p), "chosen_ids": ids(case.seq - p), "rejected_ids": ids(case.seq - p)}
                     for p in prompts]
            return to_batch(pairs, False, pad_id=0, device=device, **layout)
        ids = torch.randint(0, vocab, (case.batch, case.seq), generator=g)
        b = {"input_ids": ids, "labels": ids.clone(), "label_rows": LMHead.label_rows(ids)}
        return {k: v.to(device, non_blocking=True) for k, v in b.items()}

    def step():
        for i in range(case.accumulation):
            boundary = i == case.accumulation - 1
            engine.forward_backward(batch(), boundary)
            engine.step(boundary)

    step()  # warm-up: optimizer states, kernels' weight copies, DeepSpeed's buffers
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        step()
    m = row["measured"]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        m.update(allocated=torch.cuda.max_memory_allocated(device), reserved=torch.cuda.max_memory_reserved(device),
                 gpu_used=total - free, context=total - free - torch.cuda.memory_reserved(device))
        try:
            m["pinned"] = torch.cuda.host_memory_stats().get("allocated_bytes.current")
        except (AttributeError, RuntimeError):
            m["pinned"] = None
    m["host_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    m["host_now"] = _rss()
    row["seconds"] = round(time.time() - t0, 1)
    return row


# ------------------------------------------------------------------------------------------------------ the runner
def judge(row: dict) -> str:
    m, p = row.get("measured") or {}, row.get("predicted") or {}
    if m.get("allocated") is None:
        return "n/a"
    err = p["allocated"] - m["allocated"]
    return "ok" if abs(err) <= max(0.10 * m["allocated"], 0.5 * GIB) else "off"


def render(rows: list[dict], header: str) -> str:
    def gib(b):
        return "—" if b is None else f"{b / GIB:.2f}"

    lines = [header, "", "| case | predicted GiB | measured GiB | error | within target | GPU needed pred / used | "
             "context GiB | host pred / peak RSS GiB | pinned pred / meas GiB | peak phase | status |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        m, p = r.get("measured") or {}, r.get("predicted") or {}
        if m.get("allocated"):
            err = p["allocated"] - m["allocated"]
            error = f"{err / GIB:+.2f} GiB ({100 * err / m['allocated']:+.1f} %)"
        else:
            error = "—"
        lines.append(f"| {r['case']} | {gib(p.get('allocated'))} | {gib(m.get('allocated'))} | {error} | "
                     f"{judge(r) if r.get('status') == 'ok' else '—'} | {gib(p.get('gpu_total'))} / "
                     f"{gib(m.get('gpu_used'))} | {gib(m.get('context'))} | {gib(p.get('host'))} / "
                     f"{gib(m.get('host_peak'))} | {gib(p.get('pinned'))} / {gib(m.get('pinned'))} | "
                     f"{p.get('phase', '—')} | {r.get('status')} |")
    judged = [r for r in rows if r.get("status") == "ok" and judge(r) != "n/a"]
    if judged:
        ok = sum(judge(r) == "ok" for r in judged)
        lines += ["", f"{ok} of {len(judged)} measured cases within ±10 % or ±0.5 GiB of the measured peak "
                      "allocated."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("estimate_bench.md"))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="tiny models and shapes (the CPU smoke test)")
    ap.add_argument("--only", default=None, help="a regular expression over case names")
    ap.add_argument("--steps", type=int, default=2, help="measured optimizer steps after the warm-up")
    ap.add_argument("--budget-s", type=float, default=560.0, help="stop starting cases after this many seconds")
    ap.add_argument("--timeout-s", type=float, default=150.0, help="one case's limit")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--repredict", type=Path, default=None, metavar="RUN.jsonl",
                    help="predict the measured rows of an earlier run again with this checkout (no GPU)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cases = [c for c in (TINY if args.tiny else CASES) if not args.only or re.search(args.only, c.name)]
    command = "python bench/bench_estimate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.repredict:
        repredict(args.repredict, args.out, command)
        return
    if args.worker:
        case = next(c for c in TINY + CASES if c.name == args.worker)
        print("ROW " + json.dumps(worker(case, args.device, args.steps, args.dir)), flush=True)
        return
    if args.list:
        print("\n".join(c.name for c in cases))
        return
    start, rows = time.time(), []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    jsonl, log = args.out.with_suffix(".jsonl"), args.out.with_suffix(".log")
    with tempfile.TemporaryDirectory() as tmp, jsonl.open("w") as jf, log.open("w") as lf:
        jf.write(json.dumps({"bench": "estimate", "meta": {
            "device": device_name(args.device), "date": datetime.date.today().isoformat(), "command": command,
            "tiny": args.tiny, "steps": args.steps}}) + "\n")
        directory = Path(tmp)
        write_ds_configs(directory)
        for case in cases:
            left = args.budget_s - (time.time() - start)
            if left < 20:
                rows.append({"case": case.name, "status": "skipped: time budget"})
                continue
            cmd = [sys.executable, __file__, "--worker", case.name, "--device", args.device, "--steps",
                   str(args.steps), "--dir", str(directory)]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT),
                                                                               os.environ.get("PYTHONPATH"))))}
            if args.device == "cpu":
                env["CUDA_VISIBLE_DEVICES"] = ""
            t0 = time.time()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=min(left, args.timeout_s))
                out = proc.stdout + proc.stderr
                found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
                row = json.loads(found[-1]) if found else {"case": case.name}
                row["status"] = "ok" if found and proc.returncode == 0 else \
                    "failed: " + (out.strip().splitlines() or ["no output"])[-1][:160]
            except subprocess.TimeoutExpired as ex:
                out = (ex.stdout or b"").decode(errors="replace") if isinstance(ex.stdout, bytes) else ex.stdout or ""
                row = {"case": case.name, "status": f"timeout after {time.time() - t0:.0f} s"}
            lf.write(f"===== {case.name}\n{out}\n")
            lf.flush()
            rows.append(row)
            jf.write(json.dumps(row) + "\n")
            jf.flush()
            print(f"{case.name}: {row['status']} {judge(row) if row['status'] == 'ok' else ''}", flush=True)
    header = (f"### phift estimate against measured memory ({args.device}{', tiny' if args.tiny else ''})\n\n"
              f"Command: `{command}`. "
              "Random-weight presets, random tokens, every position labelled (a preference pair: its case's prompt, "
              f"both answers filling the cutoff beside it); {args.steps} measured optimizer "
              "steps after a warm-up step; peak = torch.cuda.max_memory_allocated over the measured steps. "
              f"Harness wall {time.time() - start:.0f} s.")
    args.out.write_text(render(rows, header))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
