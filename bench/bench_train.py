"""Training throughput of phift against its peers on one GPU (issue 7), and the self-cognition recipe end to end
(issue 5).

    python bench/bench_train.py --out $OUT/train_bench.md [--quick] [--only REGEX] [--budget-s 400]
    python bench/bench_train.py --device cpu --tiny --out /tmp/train_bench.md    # smoke test of the harness
    python bench/record.py $OUT/train_bench.md --name train                      # then into BENCHMARKS.md

Every model is phi-1_5-shaped with random weights, trained on random tokens of a fixed length with every position
labelled, under the same precision policy, optimizer (AdamW, lr 2e-4, clip 1.0) and batch:
  phift            phift.train.prepare_model + phift.engine.TorchEngine, as `phift train` runs them
  phift+compile    the same with --compile True (per-block torch.compile)
  ... (pure bf16)  full fine-tuning with --pure_bf16: bf16 weights, no autocast, fp32 masters in the optimizer
  phift+graphs     the same with --cuda_graphs True (each micro-batch's forward + backward a replayed CUDA graph)
  ... full recompute  checkpointed blocks recompute out_proj and fc2 too (phift.recompute's lean lever off)
  phift+ds         phift.engine.DeepSpeedEngine with examples/ds_config.json (ZeRO-2, optimizer offloaded to the CPU)
  phift+offload    phift.offload.OffloadEngine (--offload_optimizer cpu): phift's own optimizer offload, no DeepSpeed
  hf, hf+compile   transformers' PhiForCausalLM (+ PEFT LoRA on q_proj/k_proj/v_proj), a plain loop; whole-model
                   torch.compile as the HF Trainer's --torch_compile does
  litgpt[+compile] litgpt.lora.GPT (phi-1_5 preset, LoRA on query/key/value), litgpt's chunked lm_head + loss
  seed             HF (+ PEFT) + DeepSpeed (the same filled ds_config) through deepspeed.initialize and a plain loop
LoRA: r 8, alpha 16, dropout 0.1; base weights in the half dtype, fp32 adapters, autocast. Full: fp32 master
weights + autocast (plain) or DeepSpeed's own fp16/bf16 with fp32 master weights (DeepSpeed).

Each (config, impl) runs in its own subprocess: warm-up steps, then timed steps between CUDA events. Peak memory is
torch.cuda.max_memory_allocated over the timed steps: the bytes live at the worst moment. A CUDA-graphed run's
replays allocate nothing, their live bytes at each moment being those of the capture at that moment, so its peak is
taken over the warm-up (capture included) and the timed steps. Every row's notes also give the peak the caching
allocator reserved over the timed steps (its blocks, free ones included; for a graphed run the whole graph pool),
the memory the GPU had to hold. Compiled runs are first compiled once in
a concurrent, untimed pre-pass that fills inductor's on-disk caches, so the timed pass only re-traces; no timed step ever shares
the GPU. A run that fails (OOM, a missing package, a timeout) is a row saying so; runs the time budget leaves out
are listed as skipped.
"""
from __future__ import annotations

import argparse
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKENIZER_DIR = ROOT / ".device" / "phi-1_5-tokenizer"
VOCAB_USED = 50295  # tokens of the real phi-1_5 tokenizer; the embedding is padded to 51200
LR, MAX_GRAD_NORM = 2e-4, 1.0
T4_GIB = 15.0


@dataclass(frozen=True)
class Config:
    mode: str  # "lora" or "full"
    batch: int
    seq: int
    dtype: str = "bf16"
    ckpt: bool | str = False  # activation checkpointing: True (each impl's full recompute) or "mlp" (phift only)
    mem_cap_gib: float | None = None  # torch.cuda.set_per_process_memory_fraction (a T4-sized budget)


CONFIGS = {
    "lora-6x1024": Config("lora", 6, 1024),
    "lora-6x1024-ckpt": Config("lora", 6, 1024, ckpt=True),
    "lora-6x1024-ckpt-mlp": Config("lora", 6, 1024, ckpt="mlp"),
    "lora-1x1792": Config("lora", 1, 1792),
    "lora-8x2048": Config("lora", 8, 2048),
    "full-1x1024-ckpt": Config("full", 1, 1024, ckpt=True),
    "full-4x2048-ckpt": Config("full", 4, 2048, ckpt=True),
    "lora-6x1024-fp16": Config("lora", 6, 1024, dtype="fp16"),
    # recipe 3 (checkpointing on, as LLaMA-Factory's and phift's default); phift's run under the T4 budget
    "recipe3-full-1x1024-zero2": Config("full", 1, 1024, dtype="fp16", ckpt=True),
    "t4-lora-1x2048-fp16": Config("lora", 1, 2048, dtype="fp16", ckpt=True, mem_cap_gib=T4_GIB),
    # issue 5: `phift train` on the self-cognition data, plain and with examples/ds_config.json
    "issue5-self-cognition": Config("lora", 6, 1024, dtype="fp16", ckpt=True),
}

# (config, impl, in --quick), in the order they run: what the targets need most comes first
RUNS = [
    ("lora-6x1024", "hf", True), ("lora-6x1024", "hf+compile", True), ("lora-6x1024", "litgpt+compile", True),
    ("lora-6x1024", "phift", True), ("lora-6x1024", "phift+compile", True),
    ("lora-6x1024-ckpt", "phift", True), ("lora-6x1024-ckpt", "phift+compile", True),
    ("lora-6x1024-ckpt-mlp", "phift", True), ("lora-6x1024-ckpt-mlp", "phift+compile", True),
    ("recipe3-full-1x1024-zero2", "phift+ds", True), ("recipe3-full-1x1024-zero2", "seed", True),
    ("recipe3-full-1x1024-zero2", "phift+offload", True),
    ("issue5-self-cognition", "phift train", True), ("issue5-self-cognition", "phift train+ds", True),
    ("lora-6x1024", "litgpt", True),
    ("full-1x1024-ckpt", "hf", True), ("full-1x1024-ckpt", "phift", True),
    ("full-1x1024-ckpt", "hf+compile", True), ("full-1x1024-ckpt", "phift+compile", True),
    ("lora-1x1792", "hf+compile", True), ("lora-1x1792", "litgpt+compile", True),
    ("lora-1x1792", "phift+compile", True),
    ("t4-lora-1x2048-fp16", "phift", True),
    ("lora-6x1024-fp16", "hf", True), ("lora-6x1024-fp16", "phift", True),
    ("lora-6x1024-ckpt", "hf", True),
    ("lora-6x1024", "phift (no fused kernel)", True),
    ("lora-6x1024", "phift (no LoRA kernel)", False), ("lora-6x1024", "phift (no rotary kernel)", False),
    ("lora-6x1024", "phift (no CE kernel)", False),
    ("full-1x1024-ckpt", "phift (pure bf16)", False), ("full-1x1024-ckpt", "phift+compile (pure bf16)", False),
    ("full-1x1024-ckpt", "phift+graphs (pure bf16)", False),
    ("full-4x2048-ckpt", "hf", False), ("full-4x2048-ckpt", "phift", False),
    ("full-4x2048-ckpt", "hf+compile", False), ("full-4x2048-ckpt", "phift+compile", False),
    ("full-4x2048-ckpt", "phift (pure bf16)", False), ("full-4x2048-ckpt", "phift+compile (pure bf16)", False),
    ("full-4x2048-ckpt", "phift+graphs (pure bf16)", False),
    ("full-4x2048-ckpt", "phift (pure bf16, full recompute)", False), ("lora-6x1024-ckpt", "phift (full recompute)", False),
    ("lora-1x1792", "hf", False), ("lora-1x1792", "litgpt", False), ("lora-1x1792", "phift", False),
    ("lora-8x2048", "hf", False), ("lora-8x2048", "hf+compile", False), ("lora-8x2048", "litgpt", False),
    ("lora-8x2048", "litgpt+compile", False), ("lora-8x2048", "phift", False), ("lora-8x2048", "phift+compile", False),
    ("lora-6x1024-fp16", "hf+compile", False), ("lora-6x1024-fp16", "phift+compile", False),
    ("lora-6x1024-ckpt", "hf+compile", False),
]

# phift eager with its CUDA ops off, all or one at a time (PHIFT_DISABLE_KERNELS): what each op gives
NO_KERNEL = {"phift (no fused kernel)": "1", "phift (no LoRA kernel)": "lora", "phift (no rotary kernel)": "rotary",
             "phift (no CE kernel)": "ce"}

# phift's recipe-3 run also stands for the T4 budget's "full fine-tuning with ZeRO-2 CPU offload runs"
T4_CAPPED = {("recipe3-full-1x1024-zero2", "phift+ds")}

# Seconds a run needs at least (to start it; "compile" when the pre-pass left its caches warm) and at most (its
# timeout), on an H100.
MIN_S = {"eager": 20, "compile": 35, "cold compile": 100, "ds": 45, "train": 45}
MAX_S = {"eager": 120, "compile": 240, "ds": 180, "train": 180}


def kind(impl: str) -> str:
    return "train" if impl.startswith("phift train") else "ds" if impl in ("phift+ds", "phift+offload", "seed") else \
        "compile" if "+compile" in impl else "eager"


def run_id(config: str, impl: str) -> str:
    return f"{config}/{impl}"


# ============================================================================================ the worker process
def model_shape(tiny: bool):
    from phift.config import PhiConfig
    return PhiConfig.from_name("tiny" if tiny else "phi-1_5")


def flops_per_token(cfg, mode: str, seq: int) -> tuple[float, float]:
    """(FLOPs per trained token, N): 2N forward, 2N backward to activations, 2N more for weight gradients (full);
    attention 2·L·T·d forward (QKᵀ and AV, 4·T·d per token and layer, halved for the causal mask), ×3 with
    backward.
    N = matmul parameters incl. lm_head; recompute under activation checkpointing is not counted."""
    d, L = cfg.hidden_size, cfg.num_layers
    n = L * (4 * d * d + 2 * d * cfg.intermediate_size) + d * cfg.vocab_size
    attention = 3 * 2 * L * seq * d
    return (4 if mode == "lora" else 6) * n + attention, n


def phift_args(c: Config, impl: str, spec: dict) -> list[str]:
    half = ["--fp16", "True"] if c.dtype == "fp16" else ["--bf16", "True"]
    if impl == "phift+offload" and spec.get("device") == "cpu":
        half = ["--bf16", "True"]  # fp16 needs CUDA (phift trains in fp32 without it), and the offload needs a half model
    argv = ["--model_name_or_path", "phi-1_5", "--dataset", "self_cognition", "--output_dir", spec["tmp"],
            "--finetuning_type", c.mode, "--lora_target", "Wqkv", "--lora_rank", "8", "--lora_alpha", "16",
            "--lora_dropout", "0.1", "--per_device_train_batch_size", str(c.batch), "--cutoff_len", str(c.seq),
            "--learning_rate", str(LR), "--max_grad_norm", str(MAX_GRAD_NORM), "--lr_scheduler_type", "cosine",
            "--max_steps", str(spec["total_steps"]), "--disable_gradient_checkpointing", str(not c.ckpt),
            "--compile", str("+compile" in impl), *half]
    if "(pure bf16" in impl:
        argv += ["--pure_bf16", "True"]
    if "+graphs" in impl:
        argv += ["--cuda_graphs", "True"]
    if c.ckpt == "mlp":
        argv += ["--gradient_checkpointing_policy", "mlp"]
    if impl == "phift+ds":
        argv += ["--deepspeed", str(ROOT / "examples" / "ds_config.json")]
    if impl == "phift+offload":
        argv += ["--offload_optimizer", "cpu"]
    return argv


def random_batch(family: str, c: Config, vocab: int, device) -> dict:
    """Random tokens, every position labelled; phift's batches carry their label rows, found on the CPU as
    phift.train.to_batch does (no host sync in the step)."""
    import torch

    ids = torch.randint(0, vocab, (c.batch, c.seq), device=device)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if family == "phift":
        from phift.model import LMHead
        batch["label_rows"] = LMHead.label_rows(ids.cpu()).to(device)
    return batch


def build_phift(c: Config, impl: str, spec: dict, device):
    import torch

    from phift import kernels
    from phift.args import parse_train_args
    from phift.engine import DeepSpeedEngine, TorchEngine, init_distributed_env
    from phift.model import Phi
    from phift.offload import OffloadEngine
    from phift.recompute import recompute
    from phift.train import micro_step, precision, prepare_model

    full_recompute = "full recompute" in impl  # the lean-recomputation lever off (phift.recompute), to measure it
    args = parse_train_args(phift_args(c, impl, spec) + ["--disable_gradient_checkpointing", "True"] * full_recompute)
    if impl == "phift+ds":  # as phift.train.train sets DeepSpeed up
        if device.type != "cuda":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        init_distributed_env()
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    dtype = precision(args, device)
    with torch.device(device):  # phift.train.load_base builds on the CPU and moves: same weights, faster here
        model = Phi(model_shape(spec["tiny"])).to(dtype)
    model = prepare_model(args, model, dtype)
    if full_recompute:  # what prepare_model applies (eager), without the lean lever
        recompute(model, "full", reentrant=not args.cuda_graphs, preserve_rng_state=not args.cuda_graphs, lean=False)
    Engine = DeepSpeedEngine if impl == "phift+ds" else OffloadEngine if impl == "phift+offload" else TorchEngine
    engine = Engine(model, args, spec["total_steps"], device)
    model.train()

    forward_backward = micro_step(engine, model, args, device)

    def step(batch):
        loss = forward_backward(batch, True)
        engine.step(True)
        return loss

    wqkv = model.layers[0].attn.Wqkv
    fused = None
    if c.mode == "lora":
        x = torch.empty(1, 1, wqkv.in_features, device=device, dtype=wqkv.weight.dtype)
        fused = bool(kernels.fused_applies(x, wqkv.weight, wqkv.bias, wqkv.lora_A, wqkv.lora_B))
    return step, {"fused_kernel": fused}


def hf_model(c: Config, spec: dict, device, dtype):
    import torch
    from transformers import PhiConfig as HFPhiConfig
    from transformers import PhiForCausalLM

    hf_cfg = HFPhiConfig(**model_shape(spec["tiny"]).to_hf_dict())
    hf_cfg.use_cache = False
    with torch.device(device):
        model = PhiForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    return model


def peft_lora(model):
    from peft import LoraConfig, get_peft_model
    # PEFT casts the adapters to fp32 on a half base (autocast_adapter_dtype), as LLaMA-Factory trains them
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, bias="none", task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj"]))


def plain_loop(model, params, c: Config, device, loss_fn):
    """AdamW (fused on CUDA) + clipping + autocast (+ GradScaler for fp16): what phift's TorchEngine and the HF
    Trainer both do."""
    import torch

    half = torch.float16 if c.dtype == "fp16" else torch.bfloat16
    if device.type != "cuda" and half == torch.float16:
        half = torch.bfloat16
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if half == torch.float16 else None

    def step(batch):
        with torch.autocast(device.type, dtype=half):
            loss = loss_fn(batch)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def build_hf(c: Config, impl: str, spec: dict, device):
    import torch

    half = torch.float16 if c.dtype == "fp16" else torch.bfloat16
    model = hf_model(c, spec, device, half if c.mode == "lora" else torch.float32)
    if c.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if c.mode == "lora":
        model = peft_lora(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fwd = torch.compile(model) if impl.endswith("+compile") else model
    return plain_loop(model, params, c, device, lambda b: fwd(**b).loss), {}


def build_litgpt(c: Config, impl: str, spec: dict, device):
    import torch
    from litgpt.lora import GPT, Config as LitConfig, mark_only_lora_as_trainable
    from litgpt.utils import chunked_cross_entropy

    if c.mode != "lora":
        raise ValueError("litgpt runs LoRA only here")
    over = dict(lora_r=8, lora_alpha=16, lora_dropout=0.1, lora_query=True, lora_key=True, lora_value=True)
    if spec["tiny"]:
        s = model_shape(True)
        over.update(n_layer=s.num_layers, n_embd=s.hidden_size, n_head=s.num_heads, n_query_groups=s.num_heads,
                    head_size=s.head_dim, intermediate_size=s.intermediate_size, vocab_size=s.vocab_size,
                    padded_vocab_size=s.vocab_size, block_size=s.max_position_embeddings,
                    rotary_percentage=s.rotary_dim / s.head_dim)
    cfg = LitConfig.from_name("phi-1_5", **over)
    half = torch.float16 if c.dtype == "fp16" else torch.bfloat16
    with torch.device(device):
        model = GPT(cfg)
    model.max_seq_length = c.seq
    mark_only_lora_as_trainable(model)
    model.to(half)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fwd = torch.compile(model) if impl.endswith("+compile") else model

    def loss_fn(b):  # litgpt/finetune/lora.py's step
        logits = fwd(b["input_ids"], lm_head_chunk_size=128)
        logits[-1] = logits[-1][..., :-1, :]
        return chunked_cross_entropy(logits, b["labels"][..., 1:])
    return plain_loop(model, params, c, device, loss_fn), {}


def build_seed(c: Config, impl: str, spec: dict, device):
    """HF (+ PEFT) under deepspeed.initialize with phift's filled ds_config (so the same optimizer: DeepSpeed's CPU
    Adam), activation checkpointing as LLaMA-Factory enables it (transformers' defaults)."""
    import torch

    from phift.args import parse_train_args
    from phift.engine import fill_deepspeed_config, init_distributed_env

    if device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_distributed_env()
    import deepspeed
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    args = parse_train_args(phift_args(c, "phift+ds", spec))
    if device.type != "cuda":
        args.fp16 = False
    half = torch.float16 if args.fp16 else torch.bfloat16
    model = hf_model(c, spec, device, half)
    if c.ckpt:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if c.mode == "lora":
        model = peft_lora(model)
    model.train()
    cfg = fill_deepspeed_config(json.loads(Path(args.deepspeed).read_text()), args, 1, model.config.hidden_size)
    engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])

    def step(batch):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        return loss
    return step, {}


BUILDERS = {"phift": build_phift, "hf": build_hf, "litgpt": build_litgpt, "seed": build_seed}


def worker(spec: dict) -> dict:
    """Build one (config, impl), warm it up, time it; the result dict. spec["prepass"]: compile and stop."""
    import torch

    c = CONFIGS[spec["config"]] if not spec["tiny"] else tiny_config(CONFIGS[spec["config"]])
    impl = spec["impl"]
    device = torch.device(spec["device"])
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # set_device and DeepSpeed want an index
    if impl in NO_KERNEL:
        os.environ["PHIFT_DISABLE_KERNELS"] = NO_KERNEL[impl]
    cap = mem_cap(spec["config"], impl)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if cap:
            total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    family = "phift" if impl.startswith("phift") else impl.split("+")[0]
    step, info = BUILDERS[family](c, impl, spec, device)
    vocab = min(VOCAB_USED, model_shape(spec["tiny"]).vocab_size)
    batches = [random_batch(family, c, vocab, device) for _ in range(3)]  # fresh tokens every step

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    graphed = "+graphs" in impl
    if device.type == "cuda" and graphed:  # a replay's live bytes are the capture's: count from before it
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
        live = torch.cuda.max_memory_allocated(device) if graphed else 0
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
    fpt, _ = flops_per_token(model_shape(spec["tiny"]), c.mode, c.seq)
    return {"tokens_per_s": c.batch * c.seq / mean, "step_ms": 1e3 * mean,
            "step_ms_median": 1e3 * statistics.median(times), "step_ms_min": 1e3 * min(times),
            "peak_gib": peak, "reserved_gib": reserved, "flops_per_token": fpt, "warmup_s": round(warm_s, 1),
            "loss_first": losses[0], "loss_last": losses[-1], **info}


def train_worker(spec: dict) -> dict:
    """Issue 5: `phift train` on the self-cognition recipe in this process; peak GPU memory of the whole run."""
    import torch

    from phift import train

    c = CONFIGS[spec["config"]]
    out = Path(spec["tmp"]) / "run"
    if spec["tiny"]:
        argv = ["--model_name_or_path", "tiny", "--cutoff_len", "64", "--per_device_train_batch_size", "2",
                "--max_steps", "4", "--logging_steps", "1"]
    else:
        argv = ["--model_name_or_path", "phi-1_5", "--tokenizer_name_or_path", str(TOKENIZER_DIR),
                "--cutoff_len", str(c.seq), "--per_device_train_batch_size", str(c.batch), "--max_steps", "20",
                "--logging_steps", "5"]
    argv += ["--dataset", "self_cognition", "--dataset_dir", str(ROOT / "data"), "--template", "vanilla",
             "--finetuning_type", "lora", "--lora_target", "Wqkv", "--fp16", "True", "--output_dir", str(out),
             "--overwrite_output_dir", "True"]
    if spec["impl"].endswith("+ds"):
        argv += ["--deepspeed", str(ROOT / "examples" / "ds_config.json")]
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


def mem_cap(config: str, impl: str) -> float | None:
    return T4_GIB if (config, impl) in T4_CAPPED else CONFIGS[config].mem_cap_gib


def tiny_config(c: Config) -> Config:
    return Config(c.mode, min(c.batch, 2), min(c.seq, 64), c.dtype, c.ckpt, None)


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
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        if a.device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        self.results: list[dict] = []
        self.warm_caches: set[str] = set()  # ids whose compile pre-pass finished

    def remaining(self) -> float:
        return self.deadline - time.time()

    def log(self, text: str):
        with self.logfile.open("a") as f:
            f.write(text)

    def spec(self, config, impl, prepass=False) -> dict:
        k = kind(impl)
        warmup = 2 if prepass or k == "ds" else self.a.warmup + (1 if k == "compile" else 0)
        steps = max(2, self.a.steps // 2) if k == "ds" else self.a.steps  # DeepSpeed's offloaded steps are slow
        return {"config": config, "impl": impl, "device": self.a.device, "tiny": self.a.tiny, "prepass": prepass,
                "warmup": warmup, "steps": steps,
                "total_steps": 1000, "tmp": str(self.tmp / re.sub(r"\W+", "_", f"{config}_{impl}_{prepass}"))}

    def launch(self, spec: dict) -> subprocess.Popen:
        Path(spec["tmp"]).mkdir(parents=True, exist_ok=True)
        mode = "--train-worker" if kind(spec["impl"]) == "train" else "--worker"
        return subprocess.Popen([sys.executable, __file__, mode, json.dumps(spec)], env=self.env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    @staticmethod
    def stop(proc: subprocess.Popen):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the compile workers go with it
            except ProcessLookupError:
                pass
        return proc.communicate()[0] or ""

    # ---------------------------------------------------------------------------------------- background work
    def start_builds(self, runs):
        """The fused LoRA kernel and DeepSpeed's CPU Adam compile once here (CPU only), not inside a timed run."""
        self.builds = []
        if self.a.device != "cuda":
            return
        if any(impl.startswith("phift") for _, impl in runs):
            code = "import phift.kernels as k; print('fused LoRA kernel available:', k.kernels_enabled())"
            self.builds.append(("phift kernel", self._popen_code(code)))
        if any(kind(impl) in ("ds", "train") for _, impl in runs):
            code = ("from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load(); "
                    "print('DeepSpeed CPU Adam built')")
            self.builds.append(("DeepSpeed CPU Adam", self._popen_code(code)))

    def _popen_code(self, code):
        return subprocess.Popen([sys.executable, "-c", code], env=self.env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def prepass(self, runs):
        """Compile every selected compiled run once, several at a time (nothing is timed meanwhile), so that the
        timed runs find inductor's FX-graph and AOT-autograd caches warm; also waits for the builds."""
        todo = [(cfg, impl) for cfg, impl in runs if kind(impl) == "compile"
                and (self.a.prepass_only is None or re.search(self.a.prepass_only, run_id(cfg, impl)))]
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
                cfg, impl = todo[0]
                gib = est_gib(CONFIGS[cfg], impl)
                if running and sum(r[1] for r in running) + gib > self.a.prepass_gib:
                    break
                todo.pop(0)
                running.append((run_id(cfg, impl), gib, time.time(), self.launch(self.spec(cfg, impl, True))))
            time.sleep(1)
        for rid, _, t0, proc in running:
            out = self.stop(proc)
            self.log(f"\n===== prepass {rid} stopped at the pre-pass limit\n{out[-2000:]}")
            done.append(f"{rid}: stopped at the {limit_s:.0f} s limit")
        done += [f"{run_id(*r)}: not started (pre-pass limit)" for r in todo]
        for name, proc in self.builds:
            try:
                out = proc.communicate(timeout=max(1.0, min(120.0, self.remaining() - 60)))[0]
            except subprocess.TimeoutExpired:
                out = self.stop(proc) + "\n(stopped: too slow)"
            self.log(f"\n===== build {name} (rc {proc.returncode})\n{out[-3000:]}")
            done.append(f"build {name}: rc {proc.returncode}, {out.strip().splitlines()[-1] if out.strip() else ''}")
        return done

    # ---------------------------------------------------------------------------------------- the timed pass
    def run(self, config, impl) -> dict:
        rid = run_id(config, impl)
        k = kind(impl)
        row = {"id": rid, "config": config, "impl": impl}
        cold = k == "compile" and rid not in self.warm_caches and self.a.device == "cuda"
        need = MIN_S["cold compile" if cold else k] if not self.a.tiny else 5
        if self.remaining() < need:
            row["status"] = f"skipped: time budget ({self.remaining():.0f} s left, needs ~{need} s)"
            return self.record(row)
        spec = self.spec(config, impl)
        t0 = time.time()
        proc = self.launch(spec)
        try:
            out = proc.communicate(timeout=max(1.0, min(MAX_S[k], self.remaining())))[0]
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            out, rc = self.stop(proc), None
        row["wall_s"] = round(time.time() - t0, 1)
        self.log(f"\n===== {rid} (rc {rc}, {row['wall_s']} s)\n{out[-6000:]}")
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
        short = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items() if k != "log"}
        print("  ", json.dumps(short), flush=True)
        return row


def est_gib(c: Config, impl: str) -> float:
    """A rough peak (GiB) of a compiled run, for scheduling the concurrent pre-pass on an 80 GB card (from HF
    compiled LoRA 6×1024 at 13 GiB); a wrong guess only costs an OOM in an untimed pre-pass."""
    tokens = c.batch * c.seq
    base = 3.0 if c.mode == "lora" else 22.0
    per_token = 0.4e-3 if c.ckpt else (1.7e-3 if impl.startswith("hf") else 1.4e-3)
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


# ============================================================================================ the report
def fmt(x, nd=0):
    return "—" if x is None else f"{x:,.{nd}f}"


def ok(rows, config, impl):
    r = next((r for r in rows if r["config"] == config and r["impl"] == impl), None)
    return r if r and r.get("status") == "ok" else None


def best(rows, config, impls):
    found = [r for r in (ok(rows, config, i) for i in impls) if r]
    return max(found, key=lambda r: r["tokens_per_s"]) if found else None


PHIFT_PLAIN = ("phift", "phift+compile", "phift (pure bf16)", "phift+compile (pure bf16)", "phift+graphs (pure bf16)")
COMPILED_PEERS = ("hf+compile", "litgpt+compile")


def targets(rows, ceiling) -> list[str]:
    """Issue 7's targets, each judged from this run's rows; 'not measured' where a row is missing."""
    out = []

    def line(name, value, goal, met):
        mark = "not measured" if met is None else ("**met**" if met else "**missed**")
        out.append(f"| {name} | {value} | {goal} | {mark} |")

    def ratio(a, b):
        return a["tokens_per_s"] / b["tokens_per_s"] if a and b else None

    def mfu(r):
        return r["tokens_per_s"] * r["flops_per_token"] / (ceiling * 1e12) if r and ceiling else None

    fast = best(rows, "lora-6x1024", PHIFT_PLAIN)
    peer = best(rows, "lora-6x1024", COMPILED_PEERS)
    hf_eager = ok(rows, "lora-6x1024", "hf")
    q = ratio(fast, peer)
    line("LoRA 6×1024: phift fastest ÷ best compiled peer",
         f"{fmt(q, 2)}× ({fast['impl'] if fast else '—'} vs {peer['impl'] if peer else '—'})", "≥ 1.2×",
         None if q is None else q >= 1.2)
    m = mfu(fast)
    line("LoRA 6×1024: phift fastest MFU", "—" if m is None else f"{100 * m:.1f} %", "≥ 55 %",
         None if m is None else m >= 0.55)
    line("LoRA 6×1024: phift fastest peak memory", f"{fmt(fast and fast['peak_gib'], 1)} GiB", "≤ 12 GiB",
         None if not fast or fast["peak_gib"] is None else fast["peak_gib"] <= 12)
    q = ratio(ok(rows, "lora-6x1024", "phift"), hf_eager)
    line("LoRA 6×1024: phift eager ÷ HF eager", f"{fmt(q, 2)}×", "≥ 2×", None if q is None else q >= 2)
    ck = max((r for r in (best(rows, cfg, PHIFT_PLAIN) for cfg in ("lora-6x1024-ckpt", "lora-6x1024-ckpt-mlp"))
              if r and r["peak_gib"] is not None and r["peak_gib"] <= 7.5),
             key=lambda r: r["tokens_per_s"], default=best(rows, "lora-6x1024-ckpt", PHIFT_PLAIN))
    q = ratio(ck, hf_eager)
    line("LoRA 6×1024 with checkpointing: phift ÷ HF eager (no checkpointing)",
         f"{fmt(q, 2)}× at {fmt(ck and ck['peak_gib'], 1)} GiB ({ck['id'] if ck else '—'})",
         "≥ 2.5× at ≤ 7.5 GiB",
         None if q is None or ck["peak_gib"] is None else (q >= 2.5 and ck["peak_gib"] <= 7.5))
    fast, peer = best(rows, "lora-1x1792", PHIFT_PLAIN), best(rows, "lora-1x1792", COMPILED_PEERS)
    q = ratio(fast, peer)
    line("LoRA 1×1792: phift fastest ÷ best compiled peer",
         f"{fmt(q, 2)}× ({fast['impl'] if fast else '—'} vs {peer['impl'] if peer else '—'})", "≥ 1.2×",
         None if q is None else q >= 1.2)
    for cfg in ("full-1x1024-ckpt", "full-4x2048-ckpt"):
        fast, he, hc = best(rows, cfg, PHIFT_PLAIN), ok(rows, cfg, "hf"), ok(rows, cfg, "hf+compile")
        qe, qc = ratio(fast, he), ratio(fast, hc)
        mem_ok = None
        if fast and (he or hc) and all(r["peak_gib"] is not None for r in (fast, he, hc) if r):
            mem_ok = all(fast["peak_gib"] <= r["peak_gib"] for r in (he, hc) if r)
        line(f"{cfg}: phift fastest ÷ HF eager / ÷ HF compiled, memory ≤ HF's",
             f"{fmt(qe, 2)}× / {fmt(qc, 2)}×, {fmt(fast and fast['peak_gib'], 1)} GiB vs "
             f"{fmt(he and he['peak_gib'], 1)} / {fmt(hc and hc['peak_gib'], 1)} GiB",
             "≥ 2× / ≥ 1.2×, ≤",
             None if qe is None or qc is None or mem_ok is None else (qe >= 2 and qc >= 1.2 and mem_ok))
    ph = best(rows, "recipe3-full-1x1024-zero2", ("phift+ds", "phift+offload"))
    sd = ok(rows, "recipe3-full-1x1024-zero2", "seed")
    q = ratio(ph, sd)
    line("Recipe 3 (full, ZeRO-2 CPU offload, fp16 1×1024): phift ÷ seed's stack, memory",
         f"{fmt(q, 2)}× ({ph['impl'] if ph else '—'}), {fmt(ph and ph['peak_gib'], 1)} vs "
         f"{fmt(sd and sd['peak_gib'], 1)} GiB", "≥ 2×, ≤",
         None if q is None or None in (ph["peak_gib"], sd["peak_gib"])
         else (q >= 2 and ph["peak_gib"] <= sd["peak_gib"]))
    line("Law recipe end to end vs the seed's HF stack / HF compiled", "measured by bench/bench_law.py",
         "≥ 3× / ≥ 1.5×", None)
    for cfg, impl, what in (("t4-lora-1x2048-fp16", "phift", "LoRA fp16 1×2048, no offload"),
                            ("recipe3-full-1x1024-zero2", "phift+ds", "full fp16 1×1024, ZeRO-2 CPU offload")):
        r = next((r for r in rows if r["config"] == cfg and r["impl"] == impl), None)
        status = r["status"] if r else "not run"
        line(f"T4 budget ({T4_GIB:.0f} GiB cap): {what}",
             f"{status}" + (f", peak {fmt(r['peak_gib'], 1)} GiB" if r and r.get('peak_gib') is not None else ""),
             "runs", None if not r or status.startswith("skipped") else status == "ok")
    return out


def report(results: list[dict], meta: dict, ceiling: dict, footer: list[str]) -> str:
    """The markdown: the issue-7 table and its targets (when it has rows), the issue-5 table (when it has rows).
    meta: versions, date, command, tiny, warmup, steps."""
    rows = [r for r in results if not r["config"].startswith("issue5")]
    tf = ceiling.get("tflops")
    shape = model_shape(meta["tiny"])
    _, n = flops_per_token(shape, "lora", 1)
    warmup, steps = meta["warmup"], meta["steps"]
    lines = [
        "## Training throughput (issue 7)" + (" — TINY SMOKE TEST, not a measurement" if meta["tiny"] else ""), "",
        f"{meta['device']} · torch {meta['torch']} (CUDA {meta['cuda']}) · transformers {meta['transformers']} · "
        f"peft {meta['peft']} · litgpt {meta['litgpt']} · deepspeed {meta['deepspeed']} · {meta['date']}", "",
        f"Command: `{meta['command']}`. Random-weight {shape.name}-shaped models, random tokens, every position "
        f"labelled; AdamW (fused on CUDA) lr {LR}, clipping {MAX_GRAD_NORM}; LoRA r 8 α 16 dropout 0.1 (phift on "
        "Wqkv, PEFT on q/k/v_proj, litgpt on query/key/value), half base + fp32 adapters + autocast; full: fp32 "
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
        f"6N (full), N = {n / 1e9:.3f} B matmul parameters incl. lm_head, plus attention 6·L·T·d (QKᵀ and AV: "
        "4·T·d per token and layer forward, halved for the causal mask, ×3 for forward + backward); recompute "
        "under activation checkpointing is not counted.", "",
        "| config | impl | tokens/s | step ms | peak GiB | MFU | × HF eager | × best compiled peer | notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        c = CONFIGS[r["config"]]
        if r["status"] != "ok":
            lines.append(f"| {r['config']} | {r['impl']} | — | — | — | — | — | — | {r['status']} |")
            continue
        mfu = r["tokens_per_s"] * r["flops_per_token"] / (tf * 1e12) if tf else None
        hf = ok(results, r["config"], "hf")
        peer = best(results, r["config"], COMPILED_PEERS)
        x_hf = r["tokens_per_s"] / hf["tokens_per_s"] if hf and r is not hf else None
        x_peer = r["tokens_per_s"] / peer["tokens_per_s"] if peer and r["impl"].startswith("phift") else None
        note = [f"{c.dtype}{', ckpt' if c.ckpt is True else ', ckpt mlp' if c.ckpt else ''}"]
        if mem_cap(r["config"], r["impl"]):
            note.append(f"{mem_cap(r['config'], r['impl']):.0f} GiB cap")
        if r.get("fused_kernel") is not None:
            note.append("fused LoRA kernel" if r["fused_kernel"] else "PyTorch LoRA fallback")
        if r.get("reserved_gib") is not None:
            note.append(f"reserved {r['reserved_gib']:.2f} GiB")
        note.append(f"warm-up {r['warmup_s']:.0f} s")
        lines.append(f"| {r['config']} | {r['impl']} | {fmt(r['tokens_per_s'])} | {fmt(r['step_ms'], 1)} | "
                     f"{fmt(r['peak_gib'], 2)} | {'—' if mfu is None else f'{100 * mfu:.1f} %'} | "
                     f"{fmt(x_hf, 2)} | {fmt(x_peer, 2)} | {', '.join(note)} |")
    lines += ["", "### Issue 7 targets, judged from the rows above", "",
              "| target | measured | goal | |", "| --- | --- | --- | --- |", *targets(results, tf)]
    if not rows:  # an issue-5-only report: its own title, the versions line
        lines = ["## The self-cognition recipe end to end (issue 5)", "", lines[2], "",
                 f"Command: `{meta['command']}`."]
    i5 = [r for r in results if r["config"].startswith("issue5")]
    if i5:
        lines += ["", "### Issue 5: the self-cognition recipe end to end (`phift train`, phi-1_5-shaped random "
                  "model, real tokenizer, LoRA Wqkv, cutoff 1024, batch 6, fp16, 20 steps, checkpointing on)", "",
                  "Step time = (elapsed at the last log − elapsed at the first log, step 5) ÷ steps between, from "
                  "trainer_log.jsonl; tokens/s = trainer_log's tokens_per_second (phift counts the samples' "
                  "tokens, not padding) averaged over those intervals; peak = torch.cuda.max_memory_allocated over the whole process.", "",
                  "| run | step ms | tokens/s | peak GiB | first 5 steps s | train.main wall s | status |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in i5:
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="train_bench.md", help="markdown table (raw rows go to .jsonl, logs to .log)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="the 2-layer 'tiny' shape, short batches: a smoke test")
    p.add_argument("--quick", action="store_true", help="only the runs marked quick in RUNS")
    p.add_argument("--only", default=None, help="regex over 'config/impl' ids")
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
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--train-worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker or a.train_worker:
        spec = json.loads(a.worker or a.train_worker)
        result = (worker if a.worker else train_worker)(spec)
        print("RESULT " + json.dumps(result), flush=True)
        os._exit(0)  # skip DeepSpeed's / inductor's teardown: the result is out

    if a.render:
        render(a.render, a.only, Path(a.out))
        return
    runs = [(cfg, impl) for cfg, impl, quick in RUNS
            if (quick or not a.quick) and (a.only is None or re.search(a.only, run_id(cfg, impl)))]
    if a.list:
        print("\n".join(run_id(*r) for r in runs))
        return
    h = Harness(a)
    meta = {**versions(a.device), "date": datetime.date.today().isoformat(), "tiny": a.tiny, "warmup": a.warmup,
            "steps": a.steps,
            "command": " ".join(["python", "bench/bench_train.py", *(argv if argv is not None else sys.argv[1:])])}
    print(f"{meta}\n{len(runs)} runs, budget {a.budget_s:.0f} s", flush=True)
    h.start_builds(runs)
    ceiling = matmul_ceiling(a.device)
    print(f"bf16 matmul ceiling: {ceiling}", flush=True)
    h.jsonl.write_text(json.dumps({"meta": meta, "ceiling": ceiling}) + "\n")
    notes = []
    if not a.no_prepass:
        notes = h.prepass(runs)
        print("pre-pass:", *notes, sep="\n  ", flush=True)
    elif a.device == "cuda":
        for name, proc in h.builds:
            proc.communicate()
    for cfg, impl in runs:
        print(f"[{time.time() - h.t_start:5.0f} s] {run_id(cfg, impl)}", flush=True)
        h.run(cfg, impl)
    footer = [("Pre-pass and builds: " + "; ".join(notes)) if notes else "",
              f"Harness wall time {time.time() - h.t_start:.0f} s of a {a.budget_s:.0f} s budget."]
    with h.jsonl.open("r+") as f:  # the header line now holds the footer too
        rows = f.read().splitlines()
        rows[0] = json.dumps({"meta": meta, "ceiling": ceiling, "footer": footer})
        f.seek(0)
        f.write("\n".join(rows) + "\n")
        f.truncate()
    text = report(h.results, meta, ceiling, footer)
    h.out.write_text(text)
    shutil.rmtree(h.tmp, ignore_errors=True)
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
