"""Training throughput of phift against its peers on one GPU, and the self-cognition recipe end to end.

    python bench/bench_train.py --out $OUT/train_bench.md [--quick] [--only REGEX] [--budget-s 400]
    python bench/bench_train.py --device cpu --tiny --out /tmp/train_bench.md    # smoke test of the harness
    python bench/record.py $OUT/train_bench.jsonl --name NAME                    # then into BENCHMARKS.md

Every model is phi-1_5-shaped (the phi3.5-* shapes: Phi-3.5-mini-shaped) with random weights, trained on random tokens
of a fixed length with every position labelled, under the same precision policy, optimizer (AdamW, lr 2e-4, clip
1.0) and batch. The cases, each a set of explicit fields (model, family, mode, precision, compile, graphs, engine,
kernels, lean, shape), are bench/cases.py's
CASES, in run order; an id reads `shape/impl`, the impl naming what is switched on:
  phift            phift.train.prepare_model + phift.engine.TorchEngine, as `phift train` runs them
  phift+compile    the same with --compile True (per-block torch.compile)
  ... (pure bf16)  full fine-tuning with --pure_bf16: bf16 weights, no autocast, fp32 masters in the optimizer
  phift+graphs     the same with --cuda_graphs True (each micro-batch's forward + backward a replayed CUDA graph)
  ... full recompute  checkpointed blocks recompute out_proj and fc2 too (phift.recompute's lean lever off)
  ... (no X kernel)   one of phift's fused ops off (PHIFT_DISABLE_KERNELS), or all of them ("no fused kernel")
  phift+ds         phift.engine.DeepSpeedEngine with examples/ds_config.json (ZeRO-2, optimizer offloaded to the CPU)
  phift+offload    phift.offload.OffloadEngine (--offload_optimizer cpu): phift's own optimizer offload, no DeepSpeed
  phift train[+ds] `phift train` end to end on the self-cognition recipe
  hf, hf+compile, litgpt[+compile], seed: the peers (bench/peers.py)
How a run is timed and its memory counted: bench/harness.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cases, harness  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="train_bench.md", help="markdown table (raw rows go to .jsonl, logs to .log)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="the 2-layer 'tiny' shape, short batches: a smoke test")
    p.add_argument("--quick", action="store_true", help="only the cases marked quick")
    p.add_argument("--only", default=None, help="regex over 'shape/impl' ids")
    p.add_argument("--budget-s", type=float, default=380.0, help="stop starting runs when this runs out")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prepass-s", type=float, default=150.0, help="time limit of the concurrent compile pre-pass")
    p.add_argument("--prepass-jobs", type=int, default=4)
    p.add_argument("--prepass-gib", type=float, default=68.0, help="estimated GPU memory of concurrent pre-passes")
    p.add_argument("--prepass-only", default=None, help="regex: pre-pass only these compiled runs")
    p.add_argument("--no-prepass", action="store_true")
    p.add_argument("--list", action="store_true", help="print the selected run ids and exit")
    p.add_argument("--render", type=Path, help="rebuild --out from a run's .jsonl (rows filtered by --only)")
    a = p.parse_args(argv)
    if a.render:
        harness.render(a.render, a.only, Path(a.out))
        return
    selected = cases.select(a.quick, a.only)
    if a.list:
        print("\n".join(c.id for c in selected))
        return
    command = " ".join(["python", "bench/bench_train.py", *(argv if argv is not None else sys.argv[1:])])
    harness.run_all(a, selected, command)


if __name__ == "__main__":
    main()
