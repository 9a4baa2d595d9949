"""Is the CPU optimizer step of recipe 3 (full fine-tuning, ZeRO-2 with the optimizer offloaded) bound by host memory?

    python bench/bench_cpu_adam.py --out $OUT/cpu_adam.md [--params 1.42e9] [--threads 16,8]
    python bench/bench_cpu_adam.py --params 2e6 --out /tmp/cpu_adam.md        # smoke test (any machine)
    python bench/record.py $OUT/cpu_adam.jsonl --name NAME                     # then into BENCHMARKS.md

Times, on the CPU the run is on: a large in-place host add (the memory bandwidth ceiling), one step of
DeepSpeed's CPU Adam (what ZeRO-Offload runs) and of torch's fused CPU AdamW over `--params` fp32 parameters with
fp32 gradients, at each thread count. An Adam step must read parameter, gradient and both moments and write back
parameter and moments: 28 bytes a parameter at the least. The table gives each step's effective bandwidth against the
stream's: near 1 means the step is at the memory wall, and recipe 3 (2026-11-28 d in bench/HISTORY.md: the step is the wall)
can only go faster by moving fewer bytes or fewer parameters through the CPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # phift from this checkout, installed or not

BYTES_PER_PARAM = 28  # read p, g, m, v (4 B each); write p, m, v
# phift's fused op (kernels/adamw_cpu.cpp): read a bf16 gradient (2 B) and p, m, v; write p, m, v and the bf16 weight
# (2 B): also 28 B, with the conversions that an fp32 optimizer leaves to separate passes done in the same pass
KIND_PHIFT = "phift fused, bf16 grad → bf16 weight"


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, thread pool start
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def stream_bandwidth(n_bytes: int, repeats: int) -> float:
    """GB/s of an in-place a += b over host tensors, counting the bytes read and written. In place, as Adam updates
    its tensors: a copy into fresh memory also reads each destination line before writing it, uncounted."""
    a, b = torch.ones(n_bytes // 8), torch.ones(n_bytes // 8)
    return 3 * a.nbytes / timed(lambda: a.add_(b), repeats) / 1e9


def adam_step_s(kind: str, n: int, repeats: int) -> float:
    if kind.startswith("phift"):  # bf16 weight and gradient, fp32 master and moments: 28 B, the bf16 copy included
        from phift import kernels
        w, g = torch.randn(n).to(torch.bfloat16), torch.randn(n).to(torch.bfloat16)
        master, m, v = w.float(), torch.zeros(n), torch.zeros(n)
        if not kernels.adamw_fused_applies([w], [g], [master], [m], [v], None):
            raise RuntimeError("phift's CPU extension could not be built here")
        steps = iter(range(1, 10 ** 6))
        return timed(lambda: kernels.adamw_master_([w], [g], [master], [m], [v], None, 1e-5, 0.9, 0.999, 1e-8, 0.0,
                                                   [next(steps)]), repeats)
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n) * 1e-3
    if kind.endswith("+ conversions"):  # what an offloaded half model needs around an fp32 optimizer
        g16, w16 = p.grad.to(torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
        opt = torch.optim.AdamW([p], lr=1e-5, weight_decay=0.0, fused=True)

        def step():
            p.grad.copy_(g16)
            opt.step()
            w16.copy_(p.detach())
        return timed(step, repeats)
    if kind == "deepspeed":
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        opt = DeepSpeedCPUAdam([p], lr=1e-5, weight_decay=0.0, adamw_mode=True)
    else:
        opt = torch.optim.AdamW([p], lr=1e-5, weight_decay=0.0, fused=True)
    return timed(opt.step, repeats)


def link_rows(n_bytes: int, repeats: int, data: list[dict]) -> list[str]:
    """GB/s of the copies an offloaded step makes between GPU and host, for fp16 data the size of the model."""
    if not torch.cuda.is_available():
        return []
    gpu = torch.empty(n_bytes // 2, dtype=torch.float16, device="cuda")
    rows = []
    for pinned in (True, False):
        host = torch.empty(n_bytes // 2, dtype=torch.float16, pin_memory=pinned)
        for name, fn in (("GPU → host", lambda host=host, pinned=pinned: host.copy_(gpu, non_blocking=pinned)),
                         ("host → GPU", lambda host=host, pinned=pinned: gpu.copy_(host, non_blocking=pinned))):
            def synced(fn=fn):
                fn()
                torch.cuda.synchronize()
            s = timed(synced, repeats)
            rows.append(f"| {name} | {'pinned' if pinned else 'pageable'} | {n_bytes / 2 ** 30:.2f} | {s * 1e3:.4g} | "
                        f"{n_bytes / s / 1e9:.1f} |")
            data.append({"copy": name, "host_memory": "pinned" if pinned else "pageable", "gib": n_bytes / 2 ** 30,
                         "ms": s * 1e3, "gbs": n_bytes / s / 1e9})
            print(rows[-1], flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--params", type=float, default=1.42e9, help="fp32 parameters in the step (phi-1_5: 1.42e9)")
    ap.add_argument("--threads", default=str(torch.get_num_threads()), help="comma-separated thread counts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stream-gib", type=float, default=4.0)
    a = ap.parse_args(argv)
    n = int(a.params)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    rows, links, data = [], [], []
    where = f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
    command = f"python bench/bench_cpu_adam.py --params {a.params:g} --threads {a.threads}"
    head = {"bench": "cpu_adam", "meta": {"device": where, "torch": torch.__version__,
                                          "date": datetime.date.today().isoformat(), "command": command}}

    def write(note: str = "") -> str:  # after every row: a run killed at its time limit keeps what it measured
        a.out.with_suffix(".jsonl").write_text("".join(json.dumps(x) + "\n" for x in [head, *data]))
        text = "\n".join([
            "### CPU optimizer step vs host memory bandwidth (recipe 3)", "",
            f"{where} · torch {torch.__version__} · {datetime.date.today()} · `{command}`",
            "",
            f"One Adam step over {n:,} fp32 parameters with fp32 gradients, median of {a.repeats}. \"+ conversions\": "
            "the bf16 gradient converted to fp32 before and the bf16 weight written after, as an offloaded half model "
            "needs; phift's fused op does both in its one pass. Effective GB/s = "
            f"{BYTES_PER_PARAM} B a parameter ÷ step time; stream = an in-place a += b over host tensors, bytes read + "
            "written.", "",
            "| threads | step | stream GB/s | step ms | effective GB/s | ÷ stream |", "|---|---|---|---|---|---|",
            *rows, *([note] if note else []),
            *(["", f"GPU ↔ host copies of fp16 data ({torch.cuda.get_device_name()}), median of {a.repeats}, "
               "synchronised:", "", "| copy | host memory | GiB | ms | GB/s |", "|---|---|---|---|---|", *links]
              if links else [])])
        a.out.write_text(text + "\n")
        return text

    links = link_rows(int(min(2 * n, a.stream_gib * 2 ** 30)), a.repeats, data)
    threads_list = [int(t) for t in a.threads.split(",")]
    for threads in threads_list:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        stream = stream_bandwidth(int(min(a.stream_gib * 2 ** 30, max(4 * n, 2 ** 26))), a.repeats)
        for kind in ("deepspeed", "torch fused AdamW", "torch fused AdamW + conversions", KIND_PHIFT):
            try:
                s = adam_step_s(kind, n, a.repeats)
                gbs = BYTES_PER_PARAM * n / s / 1e9
                rows.append(f"| {threads} | {kind} | {stream:.1f} | {s * 1e3:.4g} | {gbs:.1f} | {gbs / stream:.2f} |")
                data.append({"params": n, "threads": threads, "step": kind, "stream_gbs": stream, "step_ms": s * 1e3,
                             "effective_gbs": gbs, "ratio": gbs / stream})
            except Exception as error:  # deepspeed missing, or its CPU Adam cannot build here
                rows.append(f"| {threads} | {kind} | {stream:.1f} | — | — | {str(error).splitlines()[0][:80]} |")
                data.append({"params": n, "threads": threads, "step": kind, "stream_gbs": stream, "step_ms": None,
                             "error": str(error).splitlines()[0][:80]})
            print(rows[-1], flush=True)
            write(f"\n(still running: {len(rows)} of {4 * len(threads_list)} rows measured)")
    print("\n" + write())

if __name__ == "__main__":
    main()
