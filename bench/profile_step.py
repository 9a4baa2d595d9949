"""Where a training step's GPU time goes: one case of bench_train.py (bench/cases.py) under torch.profiler.

    python bench/profile_step.py lora-6x1024 phift [--steps 3] [--top 25] [--trace $OUT/trace.json]

Prints the step time (CUDA events), the GPU-busy share of it, the kernel time by category (GEMM, attention,
fused phift kernels, elementwise, reductions, copies, optimizer) and the top kernels. This informs the levers; it is
not a benchmark (profiling slows the host side).
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import cases, harness  # noqa: E402

CATEGORIES = [  # first match wins
    ("phift fused", r"phift|lora|prep_kernel|fix_kernel|ce_|rotary"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn"),
    ("gemm", r"gemm|sm90_xmma|cutlass|ampere_|sm80_|nvjet|cublas|matmul"),
    ("optimizer", r"adam|foreach|multi_tensor"),
    ("triton (inductor)", r"triton"),
    ("reduction", r"reduce|softmax|norm|logsumexp|sum"),
    ("copy/cast", r"copy|cat|gather|scatter|index|fill|memcpy|memset"),
    ("elementwise", r"elementwise|vectorized|unrolled|gelu|mul|add|exp"),
]


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, pat in CATEGORIES if re.search(pat, low)), "other")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", choices=sorted(cases.SHAPES), help="the case's shape")
    p.add_argument("impl", help="the case's impl, as `bench/bench_train.py --list` prints it after the shape")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace", help="write a chrome trace here")
    a = p.parse_args()
    c = cases.BY_ID.get(f"{a.config}/{a.impl}")
    if c is None:
        p.error(f"no case {a.config}/{a.impl}: `python bench/bench_train.py --list` prints them")

    import torch
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    spec = {"case": c.to_dict(), "device": "cuda", "tiny": False, "prepass": False,
            "warmup": a.warmup, "steps": a.steps, "total_steps": 1000, "tmp": "/tmp/phift_profile"}
    step, _ = harness.build(c, spec, device)
    batch = harness.random_batch(c, c.vocab_used, device)
    for _ in range(a.warmup):
        step(batch)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(a.steps):
        step(batch)
    end.record()
    torch.cuda.synchronize()
    step_ms = start.elapsed_time(end) / a.steps

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            step(batch)
        torch.cuda.synchronize()
    if a.trace:
        prof.export_chrome_trace(a.trace)
    _, lines = summarize(prof, a.steps, step_ms, a.top)
    tokens = c.batch * c.seq
    print(f"\n{a.config} / {a.impl}: step {step_ms:.2f} ms (unprofiled), {tokens / step_ms * 1e3:,.0f} tok/s")
    print("\n".join(lines))


def summarize(prof, steps: int, step_ms: float, top: int) -> tuple[float, list[str]]:
    """The kernel time a step by category and by kernel, and where the host waited: the CUDA runtime calls that
    took the host longest (a synchronisation or a copy from pageable memory stalls the queue behind it)."""
    import torch

    # CUDA-side events, less the profiler's own annotations of CPU ranges (e.g. "Optimizer.step#AdamW.step"), which
    # span kernels already counted
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False) and "#" not in e.name]
    by_name, by_cat, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for e in kernels:
        us = e.device_time / steps if hasattr(e, "device_time") else e.cuda_time / steps
        by_name[e.name] += us
        count[e.name] += 1
        by_cat[category(e.name)] += us
    busy_ms = sum(by_cat.values()) / 1e3
    lines = [(f"kernel time {busy_ms:.2f} ms/step ({busy_ms / step_ms:.0%} of the step), "
              f"{len(kernels) / steps:.0f} kernel launches/step"), "", "by category (ms/step):"]
    for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {cat:20s} {us / 1e3:8.2f}  {us / 1e3 / step_ms:6.1%}")
    lines += ["", f"top {top} kernels (µs/step, launches/step):"]
    for name, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {us:9.0f} {count[name] / steps:5.0f}  {category(name):12s} {name[:110]}")
    runtime, calls = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("cuda"):
            runtime[e.name] += e.cpu_time_total / steps
            calls[e.name] += 1
    lines += ["", "host time in CUDA runtime calls (µs/step, calls/step):"]
    for name, us in sorted(runtime.items(), key=lambda kv: -kv[1])[:8]:
        lines.append(f"  {us:9.0f} {calls[name] / steps:6.0f}  {name}")
    return busy_ms, lines


if __name__ == "__main__":
    main()
