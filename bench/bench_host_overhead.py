"""Host time of a phift training step: a phi-1_5-deep (24 blocks) but narrow model, so that the math is negligible and
the step time is what the host spends issuing it (Python, autograd, the dispatcher, kernel launches). On a GPU that
time bounds small-batch steps, e.g. full fine-tuning 1×1024 (46 % kernel time: bench/HISTORY.md, profile-full).

    python bench/bench_host_overhead.py --out $OUT/host_overhead.md [--device cuda] [--steps 30]
    python bench/record.py $OUT/host_overhead.jsonl --name NAME          # then into BENCHMARKS.md

Rows: full fine-tuning (fp32 + AdamW, or --pure_bf16 on CUDA) and LoRA, each without activation checkpointing and
with full-block checkpointing in its reentrant (phift's default in eager) and non-reentrant forms; on CUDA also
both with --cuda_graphs (the batch padded to 64 tokens, as a graph pads it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phift.args import decide_precision, parse_train_args  # noqa: E402
from phift.config import PhiConfig  # noqa: E402
from phift.engines import build_engine  # noqa: E402
from phift.model import LMHead, Phi  # noqa: E402
from phift.recompute import recompute  # noqa: E402
from phift.train import prepare_model  # noqa: E402

CASES = [  # name, flags, checkpointing (None = off, else reentrant?)
    ("full, no checkpointing", ["--finetuning_type", "full"], None),
    ("full, checkpointing (non-reentrant)", ["--finetuning_type", "full"], False),
    ("full, checkpointing (reentrant)", ["--finetuning_type", "full"], True),
    # the lean recomputation off (phift.recompute): what skipping out_proj's and fc2's GEMMs costs the host
    ("full, checkpointing (reentrant), full recompute", ["--finetuning_type", "full"], True),
    ("LoRA Wqkv, checkpointing (non-reentrant)", ["--finetuning_type", "lora"], False),
    ("LoRA Wqkv, checkpointing (reentrant)", ["--finetuning_type", "lora"], True),
    # CUDA only: each micro-batch's forward + backward replayed as a CUDA graph (phift/graphs.py)
    ("full, checkpointing (reentrant), --cuda_graphs", ["--finetuning_type", "full", "--cuda_graphs", "True"], True),
    ("LoRA Wqkv, checkpointing (reentrant), --cuda_graphs", ["--finetuning_type", "lora", "--cuda_graphs", "True"],
     True),
]


def step_ms(name, flags, ckpt, device, layers: int, steps: int, seq: int) -> float:
    cuda = device.type == "cuda"
    precision = ["--pure_bf16", "True"] if cuda and "full" in flags else ["--bf16", "True"] if cuda else []
    run = parse_train_args(["--model_name_or_path", "tiny", "--dataset", "-", "--output_dir", "/tmp/phift_host",
                            "--lora_dropout", "0", *flags, *precision, "--disable_gradient_checkpointing", "True"])
    torch.manual_seed(0)
    config = PhiConfig.from_name("tiny", vocab_size=512, max_position_embeddings=max(256, seq), num_layers=layers)
    policy = decide_precision(run, device)
    with torch.device(device):
        model = Phi(config).to(policy.load)
    model = prepare_model(model, run, policy)
    if ckpt is not None:  # applied here rather than by prepare_model: the form and the lean lever are what is measured
        recompute(model, "full", reentrant=ckpt, preserve_rng_state=not run.model.cuda_graphs,
                  lean="full recompute" not in name)
    engine = build_engine(model, run, policy, 1000, device)
    model.train()
    ids = torch.randint(0, 512, (1, seq), device=device)
    batch = {"input_ids": ids, "labels": ids, "label_rows": LMHead.label_rows(ids.cpu()).to(device)}

    def step():
        engine.forward_backward(batch, True)
        engine.step(True)

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: the host time of one issuing thread)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    rows, data = [], []
    for name, flags, ckpt in CASES:
        if "--cuda_graphs" in flags and device.type != "cuda":
            continue
        ms = step_ms(name, flags, ckpt, device, a.layers, a.steps, a.seq)
        rows.append(f"| {name} | {ms:.2f} |")
        data.append({"case": name, "device": device.type, "step_ms": ms})
        print(rows[-1], flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    command = (f"python bench/bench_host_overhead.py --device {a.device} --layers {a.layers} --seq {a.seq} "
               f"--steps {a.steps} --threads {a.threads}")
    text = "\n".join([
        "### Host time of a training step (issuing, not math)", "",
        f"{where} · torch {torch.__version__} · {datetime.date.today()} · `{command}`", "",
        f"A phi of {a.layers} blocks, hidden 64, {a.seq} tokens, batch 1: the math is negligible, so the step time is "
        f"the host's. Median of {a.steps} steps after 3 warm-up steps (synchronised on CUDA); TorchEngine as `phift "
        "train` runs it (fp32 on the CPU; bf16, full fine-tuning with --pure_bf16, on CUDA).", "",
        "| case | step ms |", "|---|---|", *rows])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text + "\n")
    head = {"bench": "host_overhead", "meta": {"device": where, "torch": torch.__version__,
                                               "date": datetime.date.today().isoformat(), "command": command}}
    a.out.with_suffix(".jsonl").write_text("".join(json.dumps(x) + "\n" for x in [head, *data]))
    print("\n" + text)


if __name__ == "__main__":
    main()
