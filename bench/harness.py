"""The training benchmark's harness: one subprocess a case, a concurrent compile pre-pass, a time budget, the timed
steps and their peak memory, failures as rows, the rows as jsonl and the run's markdown report.

Each case runs in its own subprocess (`python -m bench.harness --worker SPEC`): warm-up steps, then timed steps
between CUDA events. Peak memory is torch.cuda.max_memory_allocated over the timed steps: the bytes live at the worst
moment. A CUDA-graphed run's replays allocate nothing, their live bytes at each moment being those of the capture at
that moment, so its peak is taken over the warm-up (capture included) and the timed steps. Every row's notes also
give the peak the caching allocator reserved over the timed steps (its blocks, free ones included; for a graphed run
the whole graph pool), the memory the GPU had to hold. Compiled runs are first compiled once in a concurrent, untimed
pre-pass that fills inductor's on-disk caches, so the timed pass only re-traces; no timed step ever shares the GPU.
A run that fails (OOM, a missing package, a timeout) is a row saying so; runs the time budget leaves out are listed
as skipped.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.cases import LR, MAX_GRAD_NORM, T4_GIB, Case, case_of, model_shape

ROOT = Path(__file__).resolve().parent.parent

# Seconds a run needs at least (to start it; "compile" when the pre-pass left its caches warm) and at most (its
# timeout), on an H100.
MIN_S = {"eager": 20, "compile": 35, "cold compile": 100, "ds": 45, "train": 45}
MAX_S = {"eager": 120, "compile": 240, "ds": 180, "train": 180}
# load() compiles phift's CUDA ops and cpu_kernels_enabled() its CPU AdamW (the offload engine's), each once and
# cached: here, before the clock, not in the first timed run that needs them
BUILD_PHIFT_KERNEL = ("import phift.kernels as k; print('phift CUDA ops:', k.load('cuda')); "
                      "print('phift CPU AdamW op:', k.cpu_kernels_enabled('adamw'))")
BUILD_CPU_ADAM = ("from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load(); "
                  "print('DeepSpeed CPU Adam built')")


def kind(c: Case) -> str:
    """What a run's time limits depend on."""
    return "train" if c.recipe else "ds" if c.engine != "plain" else "compile" if c.compile else "eager"


def flops_per_token(cfg, mode: str, seq: int) -> tuple[float, float]:
    """(FLOPs per trained token, N): 2N forward, 2N backward to activations, 2N more for weight gradients (full);
    attention 2·L·T·d forward (QKᵀ and AV, 4·T·d per token and layer, halved for the causal mask), ×3 with
    backward.
    N = matmul parameters incl. lm_head (the weights of the model's linear layers, counted on a meta-device build);
    recompute under activation checkpointing is not counted."""
    import torch

    from phift import families

    with torch.device("meta"):
        model = families.build(cfg)
    d, L = cfg.hidden_size, cfg.num_layers
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 3 * 2 * L * seq * d
    return (4 if mode == "lora" else 6) * n + attention, n


# ============================================================================================ the worker process
def build(c: Case, spec: dict, device):
    """(step, info) for a case: step(batch) → loss is one optimizer step of its family's stack."""
    if c.family == "phift":
        from bench import phift_case
        return phift_case.build(c, spec, device)
    from bench import peers
    return peers.BUILDERS[c.family](c, spec, device)


def random_batch(c: Case, vocab: int, device) -> dict:
    """Random tokens, every position labelled (phift's batches carry their label rows too)."""
    import torch

    ids = torch.randint(0, vocab, (c.batch, c.seq), device=device)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if c.family == "phift":
        from bench import phift_case
        batch["label_rows"] = phift_case.label_rows(ids).to(device)
    return batch


def worker(spec: dict) -> dict:
    """Build one case, warm it up, time it; the result dict. spec["prepass"]: compile and stop."""
    import torch

    case = Case.from_dict(spec["case"])
    if case.recipe:
        from bench import phift_case
        return phift_case.recipe_worker(case, spec)
    c = case.tiny() if spec["tiny"] else case
    device = torch.device(spec["device"])
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # set_device and DeepSpeed want an index
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if c.mem_cap_gib:
            total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
            torch.cuda.set_per_process_memory_fraction(min(1.0, c.mem_cap_gib / total), device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    step, info = build(c, spec, device)
    vocab = min(c.vocab_used, model_shape(c.model, spec["tiny"]).vocab_size)
    batches = [random_batch(c, vocab, device) for _ in range(3)]  # fresh tokens every step

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda" and c.graphs:  # a replay's live bytes are the capture's: count from before it
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    for i in range(spec["warmup"]):
        losses.append(step(batches[i % len(batches)]).detach().float())
    sync()
    warm_s = time.perf_counter() - t0
    if spec["prepass"]:
        return {"prepass_s": round(warm_s, 1)}
    if device.type == "cuda":
        # every row's peak is over the steps compared, not over model construction (an fp32 materialisation of
        # phi-1_5 alone is 5.3 GiB); a graphed run's replays allocate nothing, so its warm-up and capture count too
        live = torch.cuda.max_memory_allocated(device) if c.graphs else 0
        torch.cuda.reset_peak_memory_stats(device)
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(spec["steps"] + 1)]
        marks[0].record()
        for i in range(spec["steps"]):
            losses.append(step(batches[i % len(batches)]).detach().float())
            marks[i + 1].record()
        sync()
        times = [marks[i].elapsed_time(marks[i + 1]) / 1e3 for i in range(spec["steps"])]
        peak = max(torch.cuda.max_memory_allocated(device), live) / 2 ** 30
        reserved = torch.cuda.max_memory_reserved(device) / 2 ** 30
    else:
        times = []
        for i in range(spec["steps"]):
            s = time.perf_counter()
            losses.append(step(batches[i % len(batches)]).detach().float())
            times.append(time.perf_counter() - s)
        peak = reserved = None
    losses = [x.item() for x in losses]
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"non-finite loss: {losses}")
    mean = sum(times) / len(times)
    fpt, _ = flops_per_token(model_shape(c.model, spec["tiny"]), c.mode, c.seq)
    return {"tokens_per_s": c.batch * c.seq / mean, "step_ms": 1e3 * mean,
            "step_ms_median": 1e3 * statistics.median(times), "step_ms_min": 1e3 * min(times),
            "peak_gib": peak, "reserved_gib": reserved, "flops_per_token": fpt, "warmup_s": round(warm_s, 1),
            "loss_first": losses[0], "loss_last": losses[-1], **info}


# ============================================================================================ the parent process
def classify_failure(text: str, rc: int | None) -> str:
    if rc is None:
        return "timeout"
    if "out of memory" in text or "OutOfMemoryError" in text:
        return "OOM"
    m = re.findall(r"(?:ModuleNotFoundError|ImportError): (.*)", text)
    if m:
        return f"missing package: {m[-1][:100]}"
    lines = [line for line in text.strip().splitlines() if re.match(r"^\w*(Error|Exception|Exit)\b", line)]
    last = lines[-1] if lines else (text.strip().splitlines() or [f"exit code {rc}"])[-1]
    return f"failed: {last[:160]}"


def stop(proc: subprocess.Popen) -> str:
    """Kill a worker started in its own session (its compile workers go with it); its output so far."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.communicate()[0] or ""


def child_env(device: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


class Harness:
    def __init__(self, a):
        self.a = a
        self.t_start = time.time()
        self.deadline = self.t_start + a.budget_s
        self.tmp = Path(tempfile.mkdtemp(prefix="phift_bench_"))
        self.out = Path(a.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out.with_suffix(".jsonl")
        self.logfile = self.out.with_suffix(".log")
        self.jsonl.write_text("")
        self.logfile.write_text("")
        self.env = child_env(a.device)
        self.results: list[dict] = []
        self.warm_caches: set[str] = set()  # ids whose compile pre-pass finished

    def remaining(self) -> float:
        return self.deadline - time.time()

    def log(self, text: str):
        with self.logfile.open("a") as f:
            f.write(text)

    def spec(self, c: Case, prepass=False) -> dict:
        k = kind(c)
        warmup = 2 if prepass or k == "ds" else self.a.warmup + (1 if k == "compile" else 0)
        steps = max(2, self.a.steps // 2) if k == "ds" else self.a.steps  # DeepSpeed's offloaded steps are slow
        return {"case": c.to_dict(), "device": self.a.device, "tiny": self.a.tiny, "prepass": prepass,
                "warmup": warmup, "steps": steps,
                "total_steps": 1000, "tmp": str(self.tmp / re.sub(r"\W+", "_", f"{c.shape}_{c.impl}_{prepass}"))}

    def launch(self, spec: dict) -> subprocess.Popen:
        Path(spec["tmp"]).mkdir(parents=True, exist_ok=True)
        return subprocess.Popen([sys.executable, "-m", "bench.harness", "--worker", json.dumps(spec)], env=self.env,
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    # ---------------------------------------------------------------------------------------- background work
    def start_builds(self, cases: list[Case]):
        """phift's ops and DeepSpeed's CPU Adam compile once here (CPU only), not inside a timed run."""
        self.builds = []
        if self.a.device != "cuda":
            return
        if any(c.family == "phift" for c in cases):
            self.builds.append(("phift kernel", self._popen_code(BUILD_PHIFT_KERNEL)))
        if any(kind(c) in ("ds", "train") for c in cases):
            self.builds.append(("DeepSpeed CPU Adam", self._popen_code(BUILD_CPU_ADAM)))

    def _popen_code(self, code):
        return subprocess.Popen([sys.executable, "-c", code], env=self.env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def prepass(self, cases: list[Case]):
        """Compile every selected compiled run once, several at a time (nothing is timed meanwhile), so that the
        timed runs find inductor's FX-graph and AOT-autograd caches warm; also waits for the builds."""
        todo = [c for c in cases if kind(c) == "compile"
                and (self.a.prepass_only is None or re.search(self.a.prepass_only, c.id))]
        limit_s = min(self.a.prepass_s, max(0.0, self.remaining() - 60))
        t_end = time.time() + limit_s
        running: list[tuple[str, float, float, subprocess.Popen]] = []
        done = []
        while (todo or running) and time.time() < t_end:
            for item in list(running):
                rid, gib, t0, proc = item
                if proc.poll() is not None:
                    out = proc.communicate()[0] or ""
                    self.log(f"\n===== prepass {rid} (rc {proc.returncode}, {time.time() - t0:.0f} s)\n{out[-4000:]}")
                    done.append(f"{rid}: {'ok' if proc.returncode == 0 else 'failed'} {time.time() - t0:.0f} s")
                    if proc.returncode == 0:
                        self.warm_caches.add(rid)
                    running.remove(item)
            while todo and len(running) < self.a.prepass_jobs:
                c = todo[0]
                gib = est_gib(c)
                if running and sum(r[1] for r in running) + gib > self.a.prepass_gib:
                    break
                todo.pop(0)
                running.append((c.id, gib, time.time(), self.launch(self.spec(c, True))))
            time.sleep(1)
        for rid, _, t0, proc in running:
            out = stop(proc)
            self.log(f"\n===== prepass {rid} stopped at the pre-pass limit\n{out[-2000:]}")
            done.append(f"{rid}: stopped at the {limit_s:.0f} s limit")
        done += [f"{c.id}: not started (pre-pass limit)" for c in todo]
        for name, proc in self.builds:
            try:
                out = proc.communicate(timeout=max(1.0, min(120.0, self.remaining() - 60)))[0]
            except subprocess.TimeoutExpired:
                out = stop(proc) + "\n(stopped: too slow)"
            self.log(f"\n===== build {name} (rc {proc.returncode})\n{out[-3000:]}")
            done.append(f"build {name}: rc {proc.returncode}, {out.strip().splitlines()[-1] if out.strip() else ''}")
        return done

    # ---------------------------------------------------------------------------------------- the timed pass
    def run(self, c: Case) -> dict:
        k = kind(c)
        row = {"id": c.id, "config": c.shape, "impl": c.impl, "case": c.to_dict()}
        cold = k == "compile" and c.id not in self.warm_caches and self.a.device == "cuda"
        need = MIN_S["cold compile" if cold else k] if not self.a.tiny else 5
        if self.remaining() < need:
            row["status"] = f"skipped: time budget ({self.remaining():.0f} s left, needs ~{need} s)"
            return self.record(row)
        spec = self.spec(c)
        t0 = time.time()
        proc = self.launch(spec)
        try:
            out = proc.communicate(timeout=max(1.0, min(MAX_S[k], self.remaining())))[0]
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            out, rc = stop(proc), None
        row["wall_s"] = round(time.time() - t0, 1)
        self.log(f"\n===== {c.id} (rc {rc}, {row['wall_s']} s)\n{out[-6000:]}")
        found = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if rc == 0 and found:
            row.update(json.loads(found[-1][len("RESULT "):]), status="ok")
        else:
            row["status"] = classify_failure(out, rc)
        return self.record(row)

    def record(self, row: dict) -> dict:
        self.results.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        short = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items() if k not in ("log", "case")}
        print("  ", json.dumps(short), flush=True)
        return row


def est_gib(c: Case) -> float:
    """A rough peak (GiB) of a compiled run, for scheduling the concurrent pre-pass on an 80 GB card (from HF
    compiled LoRA 6×1024 on phi-1_5 at 13 GiB; other models scaled by their parameters and their hidden size ×
    layers); a wrong guess only costs an OOM in an untimed pre-pass."""
    from phift import families

    shape, phi_1_5 = model_shape(c.model), model_shape()
    scale = families.num_params(shape) / families.num_params(phi_1_5)
    width = shape.hidden_size * shape.num_layers / (phi_1_5.hidden_size * phi_1_5.num_layers)
    tokens = c.batch * c.seq
    base = (3.0 if c.mode == "lora" else 22.0) * scale
    per_token = (0.4e-3 if c.ckpt != "off" else (1.7e-3 if c.family == "hf" else 1.4e-3)) * width
    return base + tokens * per_token + 2.0


def matmul_ceiling(device: str) -> dict:
    """bf16 8192³ matmul, CUDA events, median of 20 (fresh random operands, two sets alternating)."""
    import torch
    if device != "cuda":
        return {"tflops": None}
    n = 8192
    sets = [(torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda",
                                                                                  dtype=torch.bfloat16))
            for _ in range(2)]
    for i in range(5):
        torch.mm(*sets[i % 2])
    times = []
    for i in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        torch.mm(*sets[i % 2])
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    t = statistics.median(times)
    del sets
    torch.cuda.empty_cache()
    return {"tflops": 2 * n ** 3 / t / 1e12, "ms": t * 1e3}


def versions(device: str) -> dict:
    import importlib.metadata as md

    import torch
    v = {"torch": torch.__version__, "cuda": torch.version.cuda,
         "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU"}
    for pkg in ("transformers", "peft", "litgpt", "deepspeed"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = "not installed"
    return v


def run_all(a, cases: list[Case], command: str):
    """The whole harness: builds, ceiling, pre-pass, the timed runs; OUT.jsonl (first line: versions, date,
    ceiling, footer), OUT.log and the markdown report at OUT."""
    h = Harness(a)
    meta = {**versions(a.device), "date": datetime.date.today().isoformat(), "tiny": a.tiny, "warmup": a.warmup,
            "steps": a.steps, "command": command}
    print(f"{meta}\n{len(cases)} runs, budget {a.budget_s:.0f} s", flush=True)
    h.start_builds(cases)
    ceiling = matmul_ceiling(a.device)
    print(f"bf16 matmul ceiling: {ceiling}", flush=True)
    h.jsonl.write_text(json.dumps({"bench": "train", "meta": meta, "ceiling": ceiling}) + "\n")
    notes = []
    if not a.no_prepass:
        notes = h.prepass(cases)
        print("pre-pass:", *notes, sep="\n  ", flush=True)
    elif a.device == "cuda":
        for name, proc in h.builds:
            proc.communicate()
    for c in cases:
        print(f"[{time.time() - h.t_start:5.0f} s] {c.id}", flush=True)
        h.run(c)
    footer = [("Pre-pass and builds: " + "; ".join(notes)) if notes else "",
              f"Harness wall time {time.time() - h.t_start:.0f} s of a {a.budget_s:.0f} s budget."]
    with h.jsonl.open("r+") as f:  # the header line now holds the footer too
        rows = f.read().splitlines()
        rows[0] = json.dumps({"bench": "train", "meta": meta, "ceiling": ceiling, "footer": footer})
        f.seek(0)
        f.write("\n".join(rows) + "\n")
        f.truncate()
    text = report(h.results, meta, ceiling, footer)
    h.out.write_text(text)
    shutil.rmtree(h.tmp, ignore_errors=True)
    print("\n" + text, flush=True)


# ============================================================================================ the report
def fmt(x, nd=0):
    return "—" if x is None else f"{x:,.{nd}f}"


def found(rows, config, want):
    """The ok rows of a shape whose case passes want(case)."""
    return [r for r in rows if r["config"] == config and r.get("status") == "ok" and want(case_of(r))]


def ok(rows, config, want):
    f = found(rows, config, want)
    return f[0] if f else None


def best(rows, config, want):
    return max(found(rows, config, want), key=lambda r: r["tokens_per_s"], default=None)


def phift_plain(c: Case) -> bool:
    """phift's own modes (eager, compiled, graphed, pure bf16), every lever on."""
    return c.family == "phift" and c.engine == "plain" and not (c.kernels_off or c.recipe) and c.lean


def compiled_peer(c: Case) -> bool:
    return c.family in ("hf", "litgpt") and c.compile


def hf_eager(c: Case) -> bool:
    return c.family == "hf" and not c.compile


def hf_compiled(c: Case) -> bool:
    return c.family == "hf" and c.compile


def phift_eager(c: Case) -> bool:
    return phift_plain(c) and not (c.compile or c.graphs) and c.precision != "pure_bf16"


PHI3_LORA_SHAPES = ("phi3.5-lora-4x1024", "phi3.5-lora-1x2048")  # each beside its "-ckpt" twin


def phi3_question(rows, shape: str):
    """Phi-3.5-mini's question at one batch × seq, from the rows of one run: (phift's fastest row, with
    recomputation or without, among those that need no more memory than the best compiled peer; that peer's row;
    the ratio of their tokens/s; whether the phift row stays within the peer's memory, None where unmeasured). Where
    every phift row needs more memory than the peer: phift's fastest row, and False."""
    ok = [r for r in rows if r.get("status") == "ok"]
    peer = max((r for r in ok if r["config"] == shape and compiled_peer(case_of(r))),
               key=lambda r: r["tokens_per_s"], default=None)
    ours = [r for r in ok if r["config"] in (shape, shape + "-ckpt") and phift_plain(case_of(r))]
    within = None
    if peer is not None and peer["peak_gib"] is not None:
        cheaper = [r for r in ours if r["peak_gib"] is not None and r["peak_gib"] <= peer["peak_gib"]]
        within, ours = bool(cheaper), cheaper or ours
    fast = max(ours, key=lambda r: r["tokens_per_s"], default=None)
    ratio = fast["tokens_per_s"] / peer["tokens_per_s"] if fast and peer else None
    return fast, peer, ratio, within


def targets(rows, ceiling) -> list[str]:
    """The performance targets, each judged from this run's rows; 'not measured' where a row is missing."""
    out = []

    def line(name, value, goal, met):
        mark = "not measured" if met is None else ("**met**" if met else "**missed**")
        out.append(f"| {name} | {value} | {goal} | {mark} |")

    def ratio(a, b):
        return a["tokens_per_s"] / b["tokens_per_s"] if a and b else None

    def mfu(r):
        return r["tokens_per_s"] * r["flops_per_token"] / (ceiling * 1e12) if r and ceiling else None

    fast = best(rows, "lora-6x1024", phift_plain)
    peer = best(rows, "lora-6x1024", compiled_peer)
    hf_e = ok(rows, "lora-6x1024", hf_eager)
    q = ratio(fast, peer)
    line("LoRA 6×1024: phift fastest ÷ best compiled peer",
         f"{fmt(q, 2)}× ({fast['impl'] if fast else '—'} vs {peer['impl'] if peer else '—'})", "≥ 1.2×",
         None if q is None else q >= 1.2)
    m = mfu(fast)
    line("LoRA 6×1024: phift fastest MFU", "—" if m is None else f"{100 * m:.1f} %", "≥ 55 %",
         None if m is None else m >= 0.55)
    line("LoRA 6×1024: phift fastest peak memory", f"{fmt(fast and fast['peak_gib'], 1)} GiB", "≤ 12 GiB",
         None if not fast or fast["peak_gib"] is None else fast["peak_gib"] <= 12)
    q = ratio(ok(rows, "lora-6x1024", phift_eager), hf_e)
    line("LoRA 6×1024: phift eager ÷ HF eager", f"{fmt(q, 2)}×", "≥ 2×", None if q is None else q >= 2)
    ck = max((r for r in (best(rows, cfg, phift_plain) for cfg in ("lora-6x1024-ckpt", "lora-6x1024-ckpt-mlp"))
              if r and r["peak_gib"] is not None and r["peak_gib"] <= 7.5),
             key=lambda r: r["tokens_per_s"], default=best(rows, "lora-6x1024-ckpt", phift_plain))
    q = ratio(ck, hf_e)
    line("LoRA 6×1024 with checkpointing: phift ÷ HF eager (no checkpointing)",
         f"{fmt(q, 2)}× at {fmt(ck and ck['peak_gib'], 1)} GiB ({ck['id'] if ck else '—'})",
         "≥ 2.5× at ≤ 7.5 GiB",
         None if q is None or ck["peak_gib"] is None else (q >= 2.5 and ck["peak_gib"] <= 7.5))
    fast, peer = best(rows, "lora-1x1792", phift_plain), best(rows, "lora-1x1792", compiled_peer)
    q = ratio(fast, peer)
    line("LoRA 1×1792: phift fastest ÷ best compiled peer",
         f"{fmt(q, 2)}× ({fast['impl'] if fast else '—'} vs {peer['impl'] if peer else '—'})", "≥ 1.2×",
         None if q is None else q >= 1.2)
    for cfg in ("full-1x1024-ckpt", "full-4x2048-ckpt"):
        fast, he, hc = best(rows, cfg, phift_plain), ok(rows, cfg, hf_eager), ok(rows, cfg, hf_compiled)
        qe, qc = ratio(fast, he), ratio(fast, hc)
        mem_ok = None
        if fast and (he or hc) and all(r["peak_gib"] is not None for r in (fast, he, hc) if r):
            mem_ok = all(fast["peak_gib"] <= r["peak_gib"] for r in (he, hc) if r)
        line(f"{cfg}: phift fastest ÷ HF eager / ÷ HF compiled, memory ≤ HF's",
             f"{fmt(qe, 2)}× / {fmt(qc, 2)}×, {fmt(fast and fast['peak_gib'], 1)} GiB vs "
             f"{fmt(he and he['peak_gib'], 1)} / {fmt(hc and hc['peak_gib'], 1)} GiB",
             "≥ 2× / ≥ 1.2×, ≤",
             None if qe is None or qc is None or mem_ok is None else (qe >= 2 and qc >= 1.2 and mem_ok))
    ph = best(rows, "recipe3-full-1x1024-zero2", lambda c: c.family == "phift")
    sd = ok(rows, "recipe3-full-1x1024-zero2", lambda c: c.family == "seed")
    q = ratio(ph, sd)
    line("Recipe 3 (full, ZeRO-2 CPU offload, fp16 1×1024): phift ÷ seed's stack, memory",
         f"{fmt(q, 2)}× ({ph['impl'] if ph else '—'}), {fmt(ph and ph['peak_gib'], 1)} vs "
         f"{fmt(sd and sd['peak_gib'], 1)} GiB", "≥ 2×, ≤",
         None if q is None or None in (ph["peak_gib"], sd["peak_gib"])
         else (q >= 2 and ph["peak_gib"] <= sd["peak_gib"]))
    line("Law recipe end to end vs the seed's HF stack / HF compiled", "measured by bench/bench_law.py",
         "≥ 3× / ≥ 1.5×", None)
    for shape in PHI3_LORA_SHAPES:
        fast, peer, q, within = phi3_question(rows, shape)
        line(f"Phi-3.5-mini LoRA {shape.rsplit('-', 1)[1].replace('x', '×')}: phift fastest (at no more memory) ÷ "
             "best compiled peer",
             f"{fmt(q, 2)}× ({fast['id'] if fast else '—'} vs {peer['impl'] if peer else '—'}), "
             f"{fmt(fast and fast['peak_gib'], 1)} vs {fmt(peer and peer['peak_gib'], 1)} GiB", "≥ 1.2×, ≤",
             None if q is None or within is None else (q >= 1.2 and within))
    for r, what in ((next((r for r in rows if r["config"] == "t4-lora-1x2048-fp16"), None),
                     "LoRA fp16 1×2048, no offload"),
                    (next((r for r in rows if r["config"] == "phi3.5-t4-lora-1x2048-fp16"), None),
                     "Phi-3.5-mini LoRA fp16 1×2048"),
                    (next((r for r in rows if r["config"] == "recipe3-full-1x1024-zero2"
                           and case_of(r).mem_cap_gib), None), "full fp16 1×1024, ZeRO-2 CPU offload")):
        status = r["status"] if r else "not run"
        line(f"T4 budget ({T4_GIB:.0f} GiB cap): {what}",
             f"{status}" + (f", peak {fmt(r['peak_gib'], 1)} GiB" if r and r.get('peak_gib') is not None else ""),
             "runs", None if not r or status.startswith("skipped") else status == "ok")
    return out


def report(results: list[dict], meta: dict, ceiling: dict, footer: list[str]) -> str:
    """The run's markdown: the throughput table and its targets (when it has rows), the self-cognition recipe's
    table (when it has rows). meta: versions, date, command, tiny, warmup, steps."""
    rows = [r for r in results if not case_of(r).recipe]
    tf = ceiling.get("tflops")
    shapes = [model_shape(m, meta["tiny"]) for m in dict.fromkeys(case_of(r).model for r in rows) or ["phi-1_5"]]
    counts = ", ".join(f"{flops_per_token(s, 'lora', 1)[1] / 1e9:.3f} B ({s.name})" for s in shapes)
    warmup, steps = meta["warmup"], meta["steps"]
    lines = [
        "## Training throughput" + (" — TINY SMOKE TEST, not a measurement" if meta["tiny"] else ""), "",
        f"{meta['device']} · torch {meta['torch']} (CUDA {meta['cuda']}) · transformers {meta['transformers']} · "
        f"peft {meta['peft']} · litgpt {meta['litgpt']} · deepspeed {meta['deepspeed']} · {meta['date']}", "",
        f"Command: `{meta['command']}`. Random-weight {' and '.join(s.name for s in shapes)}-shaped models, random "
        f"tokens, every position labelled; AdamW (fused on CUDA) lr {LR}, clipping {MAX_GRAD_NORM}; LoRA r 8 α 16 "
        "dropout 0.1 (phift on Wqkv or Phi-3's qkv_proj, PEFT on q/k/v_proj or qkv_proj, litgpt on query/key/value), "
        "half base + fp32 adapters + autocast; full: fp32 "
        f"master weights + autocast (\"(pure bf16)\": bf16 weights, fp32 masters in the optimizer), or DeepSpeed fp16 "
        f"(ZeRO-2, CPU Adam). {warmup} warm-up steps (+1 when "
        f"compiled; 2 under DeepSpeed), then {steps} steps ({max(2, steps // 2)} under DeepSpeed) timed "
        "with CUDA events; compiled runs were compiled first in an untimed pre-pass (their warm-up shows the "
        "re-trace with warm inductor caches); tokens/s = batch × seq ÷ mean step time; peak = "
        "torch.cuda.max_memory_allocated over the timed steps (a graphed run: over its warm-up, capture "
        "included, and the timed steps, since replays allocate nothing); reserved = "
        "torch.cuda.max_memory_reserved over the timed steps.", "",
        f"MFU = tokens/s × FLOPs/token ÷ the bf16 matmul ceiling measured in this run "
        f"({fmt(tf, 0)} TFLOP/s, 8192³ torch.mm, median of 20). FLOPs/token = 4N (LoRA: no weight gradients) or "
        f"6N (full), N = {counts} matmul parameters incl. lm_head, plus attention 6·L·T·d (QKᵀ and AV: "
        "4·T·d per token and layer forward, halved for the causal mask, ×3 for forward + backward); recompute "
        "under activation checkpointing is not counted.", "",
        "| config | impl | tokens/s | step ms | peak GiB | MFU | × HF eager | × best compiled peer | notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        c = case_of(r)
        if r["status"] != "ok":
            lines.append(f"| {r['config']} | {r['impl']} | — | — | — | — | — | — | {r['status']} |")
            continue
        mfu = r["tokens_per_s"] * r["flops_per_token"] / (tf * 1e12) if tf else None
        hf = ok(results, r["config"], hf_eager)
        peer = best(results, r["config"], compiled_peer)
        x_hf = r["tokens_per_s"] / hf["tokens_per_s"] if hf and r is not hf else None
        x_peer = r["tokens_per_s"] / peer["tokens_per_s"] if peer and c.family == "phift" else None
        note = [f"{c.half}{', ckpt' if c.ckpt == 'full' else ', ckpt mlp' if c.ckpt == 'mlp' else ''}"]
        if c.mem_cap_gib:
            note.append(f"{c.mem_cap_gib:.0f} GiB cap")
        if r.get("fused_kernel") is not None:
            note.append("fused LoRA kernel" if r["fused_kernel"] else "PyTorch LoRA fallback")
        if r.get("reserved_gib") is not None:
            note.append(f"reserved {r['reserved_gib']:.2f} GiB")
        note.append(f"warm-up {r['warmup_s']:.0f} s")
        lines.append(f"| {r['config']} | {r['impl']} | {fmt(r['tokens_per_s'])} | {fmt(r['step_ms'], 1)} | "
                     f"{fmt(r['peak_gib'], 2)} | {'—' if mfu is None else f'{100 * mfu:.1f} %'} | "
                     f"{fmt(x_hf, 2)} | {fmt(x_peer, 2)} | {', '.join(note)} |")
    lines += ["", "### Targets, judged from the rows above", "",
              "| target | measured | goal | |", "| --- | --- | --- | --- |", *targets(results, tf)]
    if not rows:  # a self-cognition-only report: its own title, the versions line
        lines = ["## The self-cognition recipe end to end", "", lines[2], "", f"Command: `{meta['command']}`."]
    recipe = [r for r in results if case_of(r).recipe]
    if recipe:
        lines += ["", "### The self-cognition recipe end to end (`phift train`, phi-1_5-shaped random model, real "
                  "tokenizer, LoRA Wqkv, cutoff 1024, batch 6, fp16, 20 steps, checkpointing on)", "",
                  "Step time = (elapsed at the last log − elapsed at the first log, step 5) ÷ steps between, from "
                  "trainer_log.jsonl; tokens/s = trainer_log's tokens_per_second (phift counts the samples' "
                  "tokens, not padding) averaged over those intervals; peak = torch.cuda.max_memory_allocated over "
                  "the whole process.", "",
                  "| run | step ms | tokens/s | peak GiB | first 5 steps s | train.main wall s | status |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in recipe:
            lines.append(f"| {r['impl']} | {fmt(r.get('step_ms'), 1)} | {fmt(r.get('tokens_per_s'))} | "
                         f"{fmt(r.get('peak_gib'), 2)} | {fmt(r.get('first_interval_s'), 1)} | "
                         f"{fmt(r.get('wall_s'), 1)} | {r['status']} |")
    return "\n".join(lines + [""] + footer) + "\n"


def header_from_stdout(path: Path) -> dict:
    """For a .jsonl written before it carried its header: meta, ceiling and pre-pass notes from the harness's
    printed output (its first line, 'bf16 matmul ceiling: ...' and the 'pre-pass:' block)."""
    import ast
    text = path.read_text().splitlines()
    meta = ast.literal_eval(text[0])
    cmd = meta["command"].split()
    meta.setdefault("tiny", "--tiny" in cmd)
    for key, default in (("warmup", 3), ("steps", 8)):
        meta.setdefault(key, int(cmd[cmd.index(f"--{key}") + 1]) if f"--{key}" in cmd else default)
    ceiling = ast.literal_eval(next(t for t in text if t.startswith("bf16 matmul ceiling:")).split(":", 1)[1])
    notes = []
    if "pre-pass:" in text:
        for t in text[text.index("pre-pass:") + 1:]:
            if not t.startswith("  "):
                break
            notes.append(t.strip())
    return {"meta": meta, "ceiling": ceiling, "footer": ["Pre-pass and builds: " + "; ".join(notes)] if notes else []}


def render(jsonl: Path, only: str | None, out: Path):
    """Rebuild the markdown from a run's raw rows (its .jsonl, whose first line holds meta and the ceiling),
    keeping the rows whose id matches `only`; the rows left out are counted in the footer."""
    lines = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    head = next((x for x in lines if "meta" in x), None) or header_from_stdout(jsonl.parent / "stdout.txt")
    rows = [x for x in lines if "id" in x]
    kept = [r for r in rows if only is None or re.search(only, r["id"])]
    footer = head.get("footer", [])
    if len(kept) < len(rows):
        left: dict[str, int] = {}
        for r in rows:
            if r not in kept:
                left[r["status"]] = left.get(r["status"], 0) + 1
        footer = footer + [f"Rendered from the run's {jsonl.name}, keeping the rows matching `{only}`; left out "
                           + "; ".join(f"{n} row{'s' * (n > 1)} with status '{st}'" for st, n in left.items()) + "."]
    text = report(kept, head["meta"], head["ceiling"], footer)
    out.write_text(text)
    print(text)


if __name__ == "__main__":  # a worker: python -m bench.harness --worker SPEC
    if sys.argv[1:2] != ["--worker"] or len(sys.argv) != 3:
        raise SystemExit("usage: python -m bench.harness --worker SPEC (the harness starts its workers so)")
    print("RESULT " + json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
    os._exit(0)  # skip DeepSpeed's / inductor's teardown: the result is out
