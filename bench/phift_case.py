"""phift under the benchmarks: every use of phift's training API (its arguments, `prepare_model`, the engines, the
micro-step, the recomputation, `phift train` itself) is in this file, so that a change of that API is absorbed here.

    build(case, spec, device)             a training step as `phift train` builds it: prepare_model + an engine
    label_rows(ids)                       what phift's batches carry besides ids and labels
    init_deepspeed / deepspeed_config     the DeepSpeed setup and filled ds_config the seed's stack shares
    recipe_worker(case, spec)             `phift train` end to end on the self-cognition recipe
    epoch_batches / to_batch / tokens     phift.train's batching, for the law recipe
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

from bench.cases import LR, MAX_GRAD_NORM, Case, model_shape

ROOT = Path(__file__).resolve().parent.parent
DS_CONFIG = ROOT / "examples" / "ds_config.json"
TOKENIZER_DIR = ROOT / ".device" / "phi-1_5-tokenizer"


def train_argv(c: Case, spec: dict) -> list[str]:
    """`phift train`'s flags for a case (the dataset is never read: batches come from the harness)."""
    half = ["--fp16", "True"] if c.precision == "fp16" else ["--bf16", "True"]
    if c.engine == "offload" and spec.get("device") == "cpu":
        # fp16 needs CUDA (phift trains in fp32 without it), and the offload needs a half model
        half = ["--bf16", "True"]
    # Wqkv is phi's name of the attention's fused q/k/v, and an alias of Phi-3's qkv_proj
    argv = ["--model_name_or_path", c.model, "--dataset", "self_cognition", "--output_dir", spec["tmp"],
            "--finetuning_type", c.mode, "--lora_target", "Wqkv", "--lora_rank", "8", "--lora_alpha", "16",
            "--lora_dropout", "0.1", "--per_device_train_batch_size", str(c.batch), "--cutoff_len", str(c.seq),
            "--learning_rate", str(LR), "--max_grad_norm", str(MAX_GRAD_NORM), "--lr_scheduler_type", "cosine",
            "--max_steps", str(spec["total_steps"]), "--disable_gradient_checkpointing", str(c.ckpt == "off"),
            "--compile", str(c.compile), *half]
    if c.precision == "pure_bf16":
        argv += ["--pure_bf16", "True"]
    if c.graphs:
        argv += ["--cuda_graphs", "True"]
    if c.ckpt == "mlp":
        argv += ["--gradient_checkpointing_policy", "mlp"]
    if c.engine == "deepspeed":
        argv += ["--deepspeed", str(DS_CONFIG)]
    if c.engine == "offload":
        argv += ["--offload_optimizer", "cpu"]
    if c.packing:
        argv += ["--packing", "True"]
    if not c.lean:  # checkpointing is applied by build() instead, without the lean lever
        argv += ["--disable_gradient_checkpointing", "True"]
    return argv


def init_deepspeed(device):
    """As phift.train.train sets DeepSpeed up (one process, gloo on the CPU)."""
    from phift import distributed

    distributed.start(deepspeed=True)


def deepspeed_config(c: Case, spec: dict, device, hidden_size: int) -> dict:
    """examples/ds_config.json with its "auto" values filled as `phift train --deepspeed` fills them for this shape,
    so that the seed's stack runs the same optimizer (DeepSpeed's CPU Adam) and precision."""
    import torch

    from phift.args import decide_precision, parse_train_args
    from phift.engines import OptimSpec
    from phift.engines.deepspeed import fill_deepspeed_config

    run = parse_train_args(train_argv(dataclasses.replace(c, family="phift"), spec))
    precision = decide_precision(run, device)
    return fill_deepspeed_config(json.loads(DS_CONFIG.read_text()), OptimSpec.from_training(run.training, 1000),
                                 run.training.per_device_train_batch_size, precision.compute == torch.float16,
                                 precision.compute == torch.bfloat16, 1, hidden_size)


def build(c: Case, spec: dict, device):
    """(step, info): step(batch) → loss is one optimizer step as `phift train` takes it."""
    import torch

    from phift import families, kernels, lora
    from phift.args import decide_precision, parse_train_args
    from phift.engines import build_engine
    from phift.recompute import recompute
    from phift.train import prepare_model

    if c.kernels_off:  # as PHIFT_DISABLE_KERNELS would, read at import
        kernels.DISABLED = kernels.parse_disabled("1" if "all" in c.kernels_off else ",".join(c.kernels_off))
    run = parse_train_args(train_argv(c, spec))
    if c.engine == "deepspeed":
        init_deepspeed(device)
    precision = decide_precision(run, device)
    kernels.load(device)
    default = torch.get_default_dtype()
    # built on the device in the dtype it trains in: Phi-3.5-mini's fp32 weights alone would overflow a T4's budget
    torch.set_default_dtype(precision.load)
    try:
        with torch.device(device):
            model = families.build(model_shape(c.model, spec["tiny"]))
    finally:
        torch.set_default_dtype(default)
    model = prepare_model(model, run, precision)
    if not c.lean:  # what prepare_model applies (eager), without the lean lever
        graphs = run.model.cuda_graphs
        recompute(model, "full", reentrant=not graphs, preserve_rng_state=not graphs, lean=False)
    engine = build_engine(model, run, precision, spec["total_steps"], device)
    model.train()

    def step(batch):
        loss = engine.forward_backward(batch, True)
        engine.step(True)
        return loss

    fused = None
    if c.mode == "lora":  # the first adapted linear: the attention's q/k/v
        qkv = next(iter(lora.lora_modules(model).values()))
        x = torch.empty(1, 1, qkv.in_features, device=device, dtype=qkv.weight.dtype)
        fused = bool(kernels.fused_applies(x, qkv.weight, qkv.bias, qkv.lora_A, qkv.lora_B))
    return step, {"fused_kernel": fused}


def label_rows(ids):
    """The labelled rows of a batch of ids (every position labelled), found on the CPU as phift.train.to_batch does
    (no host sync in the step)."""
    from phift.model import LMHead
    return LMHead.label_rows(ids.cpu())


def recipe_worker(c: Case, spec: dict) -> dict:
    """`phift train` on the self-cognition recipe in this process; peak GPU memory of the whole run."""
    import torch

    from phift import train

    out = Path(spec["tmp"]) / "run"
    if spec["tiny"]:
        argv = ["--model_name_or_path", "tiny", "--cutoff_len", "64", "--per_device_train_batch_size", "2",
                "--max_steps", "4", "--logging_steps", "1"]
    else:
        argv = ["--model_name_or_path", "phi-1_5", "--tokenizer_name_or_path", str(TOKENIZER_DIR),
                "--cutoff_len", str(c.seq), "--per_device_train_batch_size", str(c.batch), "--max_steps", "20",
                "--logging_steps", "5"]
    argv += ["--dataset", "self_cognition", "--dataset_dir", str(ROOT / "data"), "--template", "vanilla",
             "--finetuning_type", c.mode, "--lora_target", "Wqkv", "--fp16", "True", "--output_dir", str(out),
             "--overwrite_output_dir", "True"]
    if c.engine == "deepspeed":
        argv += ["--deepspeed", str(DS_CONFIG)]
    t0 = time.perf_counter()
    train.main(argv)
    wall = time.perf_counter() - t0
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    log = [e for e in log if "tokens_per_second" in e]
    # step time over the logging intervals after the first (which holds the kernel build and the first step)
    first, last = log[0], log[-1]
    steps = last["current_steps"] - first["current_steps"]
    step_s = (last["elapsed_time"] - first["elapsed_time"]) / steps if steps else None
    return {"step_ms": 1e3 * step_s if step_s else None, "first_interval_s": first["elapsed_time"],
            "tokens_per_s": statistics.mean(e["tokens_per_second"] for e in log[1:]) if len(log) > 1 else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None,
            "wall_s": round(wall, 1), "log": log}


def epoch_batches(c: Case, spec: dict, samples: list, epochs: int) -> list[list]:
    """phift.train's micro-batches for each epoch: one seeded shuffle per epoch, packed or not (c.packing)."""
    from phift.args import parse_train_args
    from phift.train import epoch_batches as batches

    run = parse_train_args(train_argv(c, {**spec, "total_steps": -1}))
    t, d = run.training, run.data
    return [batches(samples, e, t.seed, t.per_device_train_batch_size, d.packing, d.cutoff_len) for e in range(epochs)]


def to_batch(micro, packed: bool, pad_id: int, device) -> dict:
    from phift.train import to_batch as batch
    return batch(micro, packed, pad_id, device)


def tokens(micro) -> int:
    """The samples' tokens in a micro-batch, padding not counted."""
    from phift.train import count
    return count(micro)[1]
