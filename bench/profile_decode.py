"""Where a decode step of phift's generation goes: a random phi-1_5-shaped model, bare (no engine, no HTTP).

    python bench/profile_decode.py --out $OUT/decode.md [--batch 1,8] [--steps 48] [--prompt 64]
    python bench/profile_decode.py --device cpu --tiny --out /tmp/decode.md   # CPU smoke test

For each batch size: ms per decode step over a KV cache that grows one column a step with a padding mask, as
phift.serve's engine and phift.generate decode, under PyTorch's own choice of attention kernel and with each kernel
forced; the same with the key length held fixed (a kernel that plans per shape is slow only when the shape moves);
which kernel PyTorch picks for the decode, a padded prefill and the training step's shapes; and the top ops of the
default decode under torch.profiler. The timings also go to OUT.jsonl (first line: versions, device, date), which
bench/record.py records.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from phift.config import PhiConfig  # noqa: E402
from phift.model import KVCache, Phi  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


RUNS = iter(range(1, 1 << 20))


def decode_ms(model, batch: int, prompt: int, steps: int, backend: str | None, grow: bool) -> float:
    """ms per decode step after a prompt of `prompt` tokens; grow=False rewinds the cache every step. Each call's cache
    has a width of its own (spare columns): a kernel that plans per shape and strides finds no plan of an earlier call."""
    device, config = model.wte.weight.device, model.config
    cache = KVCache(config, batch, prompt + steps + 1 + next(RUNS), device, model.wte.weight.dtype)
    mask = torch.ones(batch, prompt + steps + 1, dtype=torch.long, device=device)
    mask[0, :prompt // 2] = 0  # one left-padded row, as a server's batch has: an explicit mask, as the engine passes
    ids = torch.randint(0, config.vocab_size, (batch, prompt), device=device)
    chosen = [BACKENDS[backend]] if backend else list(BACKENDS.values())
    with torch.inference_mode(), (sdpa_kernel(chosen) if backend else contextlib.nullcontext()):
        last = model(ids, attention_mask=mask[:, :prompt], kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            end = cache.length
            last = model(last, attention_mask=mask[:, :end + 1], kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
            last.tolist()  # the engine reads every step's tokens on the host
            if not grow:
                cache.length = end
        sync(device)
    return (time.perf_counter() - start) / steps * 1e3


def choice(q, k, v, mask, causal) -> str:
    try:
        return SDPBackend(torch._fused_sdp_choice(q, k, v, mask, 0.0, causal)).name
    except Exception as e:  # noqa: BLE001 - a diagnostic: say what failed
        return f"? ({type(e).__name__}: {e})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (CPU smoke test)")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=48)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    config = PhiConfig.from_name("tiny" if a.tiny else "phi-1_5")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Phi(config).to(dtype).eval()
    lines = [f"# decode steps, {'tiny' if a.tiny else 'phi-1_5'}-shaped, {dtype}, {device}, torch {torch.__version__}",
             f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}", ""]

    H, D = config.num_heads, config.head_dim
    q1 = torch.randn(8, H, 1, D, device=device, dtype=dtype)
    kv = torch.randn(8, H, 300, D, device=device, dtype=dtype)
    pad = torch.ones(8, 1, 1, 300, dtype=torch.bool, device=device)
    sq = torch.randn(4, H, 1024, D, device=device, dtype=dtype)
    square = torch.ones(4, 1, 1024, 1024, dtype=torch.bool, device=device).tril()
    lines += ["PyTorch's pick:",
              f"- decode, 1 query over 300 keys, padding mask: {choice(q1, kv, kv, pad, False)}",
              f"- decode, no mask: {choice(q1, kv, kv, None, False)}",
              f"- prefill/packed training, 1024 × 1024 with a mask: {choice(sq, sq, sq, square, False)}",
              f"- training, 1024 causal, no mask: {choice(sq, sq, sq, None, True)}", ""]

    lines += ["| batch | kernel | growing cache ms/step | fixed length ms/step |", "| ---: | --- | ---: | ---: |"]
    rows = []
    usable = [None] + [b for b in BACKENDS if device.type == "cuda" or b == "math"]
    for batch in (int(b) for b in a.batch.split(",")):
        for backend in usable:
            try:
                decode_ms(model, batch, a.prompt, 4, backend, True)  # warm up
                grow = decode_ms(model, batch, a.prompt, a.steps, backend, True)
                fixed = decode_ms(model, batch, a.prompt, a.steps, backend, False)
                row = f"{grow:.2f} | {fixed:.2f}"
                rows.append({"batch": batch, "kernel": backend or "default", "grow_ms": grow, "fixed_ms": fixed})
            except RuntimeError as e:
                row = f"unavailable: {str(e).splitlines()[0][:80]} |"
                rows.append({"batch": batch, "kernel": backend, "grow_ms": None, "fixed_ms": None,
                             "error": str(e).splitlines()[0][:80]})
            lines.append(f"| {batch} | {backend or 'PyTorch default'} | {row} |")
            print(lines[-1], flush=True)

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        decode_ms(model, 8, a.prompt, 8, None, True)
    for key in ("cpu_time_total",) + (("cuda_time_total",) if device.type == "cuda" else ()):
        lines += ["", f"## 8 decode steps at batch 8 (and their prefill), by {key}", "```",
                  prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60), "```"]
    Path(a.out).write_text("\n".join(lines) + "\n")
    picks = [line[2:] for line in lines if line.startswith("- ")]
    meta = {"date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "command": "python bench/profile_decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "tiny": a.tiny, "model": "tiny" if a.tiny else "phi-1_5", "dtype": str(dtype).removeprefix("torch."),
            "prompt": a.prompt, "steps": a.steps, "picks": picks, "versions": {"torch": torch.__version__}}
    Path(a.out).with_suffix(".jsonl").write_text("".join(json.dumps(x) + "\n" for x in [{"bench": "decode",
                                                                                         "meta": meta}, *rows]))
    print("\n".join(lines[:12]))


if __name__ == "__main__":
    main()
