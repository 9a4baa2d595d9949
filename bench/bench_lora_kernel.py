"""Time the fused LoRA linear (forward + backward) against the frozen base linear and the PyTorch composite.

    python bench/bench_lora_kernel.py --out $OUT/lora_kernel.md
    python bench/record.py $OUT/lora_kernel.jsonl --name NAME          # then into BENCHMARKS.md

Each variant runs forward and the backward that training needs (base: dx; LoRA: dx, dA, dB), timed with CUDA
events, median of --repeats, cycling through --sets independent input sets (weights too) so that no run finds
its operands in L2. `--details` adds a per-kernel profile and the matrix products the fused op is made of.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from phift.kernels import fused_applies, lora_linear, lora_linear_reference  # noqa: E402

SCALING = 2.0
# (layer, tokens, in, out, rank, dtype, dropout); the first row is the one the goals are stated for
CONFIGS = [
    ("Wqkv", 6144, 2048, 6144, 8, torch.bfloat16, 0.1),
    ("Wqkv", 6144, 2048, 6144, 8, torch.bfloat16, 0.0),
    ("Wqkv", 6144, 2048, 6144, 8, torch.float16, 0.1),
    ("fc1", 6144, 2048, 8192, 8, torch.bfloat16, 0.1),
    ("fc2", 6144, 8192, 2048, 8, torch.bfloat16, 0.1),
    ("Wqkv", 6144, 2048, 6144, 16, torch.bfloat16, 0.1),
    ("Wqkv", 6144, 2048, 6144, 64, torch.bfloat16, 0.1),
]
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def input_sets(n, tokens, d_in, d_out, rank, dtype):
    sets = []
    for _ in range(n):
        x = torch.randn(tokens, d_in, device="cuda").to(dtype).requires_grad_()
        weight = (torch.randn(d_out, d_in, device="cuda") / math.sqrt(d_in)).to(dtype)
        bias = torch.randn(d_out, device="cuda").to(dtype)
        lora_A = (torch.randn(rank, d_in, device="cuda") / math.sqrt(d_in)).requires_grad_()
        lora_B = (torch.randn(d_out, rank, device="cuda") / math.sqrt(rank)).requires_grad_()
        dy = torch.randn(tokens, d_out, device="cuda").to(dtype)
        sets.append((x, weight, bias, lora_A, lora_B, dy))
    return sets


def variants(sets, dropout):
    def base(i):
        x, weight, bias, _, _, dy = sets[i]
        torch.autograd.grad(F.linear(x, weight, bias), x, dy)

    def composite(i):
        x, weight, bias, lora_A, lora_B, dy = sets[i]
        y = lora_linear_reference(x, weight, bias, lora_A, lora_B, SCALING, dropout, True)
        torch.autograd.grad(y, (x, lora_A, lora_B), dy)

    def fused(i):
        x, weight, bias, lora_A, lora_B, dy = sets[i]
        y = lora_linear(x, weight, bias, lora_A, lora_B, SCALING, dropout, True)
        torch.autograd.grad(y, (x, lora_A, lora_B), dy)

    return {"base": base, "composite": composite, "fused": fused}


def median_ms(fns, n_sets, repeats, warmup=5):
    """Median CUDA-event time of each function; the functions take turns so they share the card's state."""
    for fn in fns.values():
        for i in range(warmup):
            fn(i % n_sets)
    torch.cuda.synchronize()
    events = {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i % n_sets)
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: statistics.median(s.elapsed_time(e) for s, e in pairs) for name, pairs in events.items()}


def kernel_profile(fn, n_sets, iters=10):
    """Per-kernel GPU time (µs per call of fn), largest first."""
    from torch.profiler import ProfilerActivity, profile
    for i in range(3):
        fn(i % n_sets)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(iters):
            fn(i % n_sets)
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if us > 0:
            rows.append((us / iters, event.count // iters, event.key))
    return sorted(rows, reverse=True)


def product_timings(sets, rank, n_sets, repeats):
    """The fused op's matrix products alone, next to the base's, with [x | u] / [W | B] padded to several widths,
    and the elementwise ops that move as many bytes as its two passes."""
    mm_f32 = torch.ops.aten.mm.dtype
    fns = {
        "fwd  x·Wᵀ + b (base)": lambda i: torch.addmm(sets[i][2], sets[i][0].detach(), sets[i][1].t()),
        "dgrad dy·W (base)": lambda i: torch.mm(sets[i][5], sets[i][1]),
    }
    d_in = sets[0][0].shape[1]
    for width in (8, 16, 64, 128):
        aug = [(F.pad(x.detach(), (0, width)), F.pad(w, (0, width))) for x, w, _, _, _, _ in sets]
        fns[f"fwd  [x|u]·[W|B]ᵀ + b, width {width}"] = (
            lambda i, aug=aug: torch.addmm(sets[i][2], aug[i][0], aug[i][1].t()))
        fns[f"dgrad dy·[W|B], width {width}"] = lambda i, aug=aug: torch.mm(sets[i][5], aug[i][1])
    u = [torch.randn(x.shape[0], d_in + 8, device="cuda").to(x.dtype)[:, d_in:d_in + rank]  # strided, as in the op
         for x, *_ in sets]
    fns["dB = dyᵀ·su (fp32 out)"] = lambda i: mm_f32(sets[i][5].t(), u[i], torch.float32)
    fns["dBᵀ = suᵀ·dy (fp32 out)"] = lambda i: mm_f32(u[i].t(), sets[i][5], torch.float32)
    # the floors of the two passes: prep reads x and writes [x | u]; fix reads dy W and x and writes dx
    dx_base = [torch.randn_like(x.detach()) for x, *_ in sets]
    fns["copy x (prep's floor)"] = lambda i: sets[i][0].detach().clone()
    fns["dy W + x (fix's floor)"] = lambda i: torch.add(dx_base[i], sets[i][0].detach())
    fns["copy dy"] = lambda i: sets[i][5].clone()
    return median_ms(fns, n_sets, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="markdown table goes here")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--sets", type=int, default=6, help="input sets cycled through to defeat L2")
    parser.add_argument("--details", action="store_true", help="print kernel profiles and product timings")
    args = parser.parse_args()

    torch.manual_seed(0)
    rows = []
    for layer, tokens, d_in, d_out, rank, dtype, dropout in CONFIGS:
        sets = input_sets(args.sets, tokens, d_in, d_out, rank, dtype)
        x, weight, bias, lora_A, lora_B, _ = sets[0]
        assert fused_applies(x, weight, bias, lora_A, lora_B), "the fused path does not apply: nothing to time"
        fns = variants(sets, dropout)
        ms = median_ms(fns, args.sets, args.repeats)
        rows.append((layer, tokens, d_in, d_out, rank, DTYPE_NAMES[dtype], dropout, ms))
        print(f"{layer} {tokens}x{d_in}->{d_out} r={rank} {DTYPE_NAMES[dtype]} p={dropout}: "
              + "  ".join(f"{k} {v:.3f} ms" for k, v in ms.items()), flush=True)
        if args.details and (rank, dtype, d_in) == (8, torch.bfloat16, 2048) and d_out == 6144:
            for name in ("base", "composite", "fused"):
                print(f"  kernels of {name} (p={dropout}), µs per fwd+bwd:")
                for us, count, key in kernel_profile(fns[name], args.sets)[:14]:
                    print(f"    {us:8.1f}  x{count}  {key[:110]}")
            if dropout:
                print("  matrix products alone, ms:")
                for name, t in product_timings(sets, rank, args.sets, args.repeats).items():
                    print(f"    {t:7.4f}  {name}")
        del sets, fns
        torch.cuda.empty_cache()

    table = markdown(rows, args)
    args.out.write_text(table)
    args.out.with_suffix(".jsonl").write_text("".join(json.dumps(x) + "\n" for x in jsonl(rows, args)))
    print(table)


def jsonl(rows, args) -> list[dict]:
    """The header (bench, meta) and one dict a row, for bench/record.py."""
    props = torch.cuda.get_device_properties(0)
    meta = {"device": f"{torch.cuda.get_device_name(0)} ({props.multi_processor_count} SMs)",
            "torch": torch.__version__, "cuda": torch.version.cuda, "date": datetime.date.today().isoformat(),
            "command": f"python bench/bench_lora_kernel.py --out FILE --repeats {args.repeats} --sets {args.sets}"}
    return [{"bench": "lora_kernel", "meta": meta}] + [
        {"layer": layer, "tokens": tokens, "in": d_in, "out": d_out, "r": rank, "dtype": dtype, "p": p,
         "base_ms": ms["base"], "composite_ms": ms["composite"], "fused_ms": ms["fused"],
         "fused_over_base": ms["fused"] / ms["base"], "composite_over_fused": ms["composite"] / ms["fused"]}
        for layer, tokens, d_in, d_out, rank, dtype, p, ms in rows]


def markdown(rows, args):
    props = torch.cuda.get_device_properties(0)
    lines = [
        "### Fused LoRA linear: forward + backward",
        "",
        f"{torch.cuda.get_device_name(0)} ({props.multi_processor_count} SMs) · torch {torch.__version__} · "
        f"CUDA {torch.version.cuda} · {datetime.date.today().isoformat()} · "
        f"`python bench/bench_lora_kernel.py --out FILE --repeats {args.repeats} --sets {args.sets}`",
        "",
        f"Median of {args.repeats} CUDA-event timings, {args.sets} input sets cycled (no operand left in L2), "
        f"scaling {SCALING}. *base*: the frozen `F.linear` forward + input gradient; *composite*: "
        "`lora_linear_reference` (PyTorch ops) forward + dx, dA, dB; *fused*: `lora_linear` on the CUDA op, "
        "which keeps one cached [W | B] copy per adapted weight.",
        "",
        "| layer | tokens | in→out | r | dtype | p | base ms | composite ms | fused ms | fused / base "
        "| composite / fused |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layer, tokens, d_in, d_out, rank, dtype, p, ms in rows:
        lines.append(f"| {layer} | {tokens} | {d_in}→{d_out} | {rank} | {dtype} | {p} | {ms['base']:.3f} | "
                     f"{ms['composite']:.3f} | {ms['fused']:.3f} | {ms['fused'] / ms['base']:.3f} | "
                     f"{ms['composite'] / ms['fused']:.2f} |")
    ms = rows[0][-1]
    overhead, speedup = ms["fused"] / ms["base"], ms["composite"] / ms["fused"]
    lines += [
        "",
        f"Goals, first row: fused ≤ 1.10 × base: **{'met' if overhead <= 1.10 else 'not met'}** "
        f"({overhead:.3f}×); fused ≥ 1.3 × faster than the composite: "
        f"**{'met' if speedup >= 1.3 else 'not met'}** ({speedup:.2f}×).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
