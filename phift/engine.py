"""The one seam between the training loop and the optimizer machinery: DeepSpeed's engine or plain PyTorch.

Both engines answer the same four calls, made by the loop on every micro-batch:
    loss = engine.forward(batch); engine.backward(loss, boundary); info = engine.step(boundary)
and `save(dir)` / `load(dir)` for the optimizer, scheduler and loss-scaler state.
`step` returns None between accumulation boundaries and {"grad_norm" (a float or a 0-dim tensor: float() it),
"skipped"} at one; a step skipped for an
fp16 overflow leaves the weights and the schedule untouched.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import socket
from pathlib import Path

import torch

from phift.optim import MasterAdamW, clip_coefficient


def lr_lambda(kind: str, warmup: int, total: int):
    """The multiplier of the peak learning rate at optimizer step `s`, as transformers' schedules."""
    def f(s: int) -> float:
        if s < warmup:
            return s / max(1, warmup)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine
    return f


def param_groups(model, weight_decay: float):
    """Decay matrices only: biases and LayerNorm weights are left alone (as transformers' Trainer does)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TorchEngine:
    """AdamW (fused on CUDA), autocast for fp16/bf16, a GradScaler for fp16. With --pure_bf16 no autocast, and
    trainable bf16 weights (full fine-tuning) step through MasterAdamW's fp32 master weights."""

    def __init__(self, model, args, total_steps: int, device: torch.device):
        self.model, self.args, self.device = model, args, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        groups = param_groups(model, args.weight_decay)
        betas = (args.adam_beta1, args.adam_beta2)
        pure = args.pure_bf16
        if pure and any(p.dtype != torch.float32 for p in self.params):
            self.optimizer = MasterAdamW(groups, lr=args.learning_rate, betas=betas, eps=args.adam_epsilon)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=betas, eps=args.adam_epsilon,
                                               fused=device.type == "cuda")
        warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(args.lr_scheduler_type, warmup, total_steps))
        dtype = None if pure else torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None
        # autocast's cache of cast weights must be off under CUDA graphs (torch.cuda.graphs' own advice): a graph
        # replays the casts it captured, and a cache would hand out tensors from another capture or eager pass
        self.autocast = (torch.autocast(device.type, dtype=dtype, cache_enabled=not args.cuda_graphs) if dtype
                         else contextlib.nullcontext())
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16) if args.fp16 else None

    @property
    def module(self):
        return self.model

    def forward(self, batch):
        with self.autocast:
            return self.model(**batch)

    def backward(self, loss, boundary: bool):
        loss = loss / self.args.gradient_accumulation_steps
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, boundary: bool):
        if not boundary:
            return None
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        skipped = False
        if isinstance(self.optimizer, MasterAdamW):  # bf16: no loss scaler; clipped as the gradients are read
            norm, coef = clip_coefficient(self.params, max_norm)
            self.optimizer.step(clip_coef=coef)
            grad_norm = norm
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            if self.scaler:
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)  # skips the update when a gradient is inf/nan
                self.scaler.update()
                skipped = self.scaler.get_scale() < scale
            else:
                self.optimizer.step()
        if not self.args.cuda_graphs:  # CUDA graphs keep gradients at fixed addresses, and zero them themselves
            self.optimizer.zero_grad(set_to_none=True)
        if not skipped:
            self.scheduler.step()
        # grad_norm stays a device tensor: reading it waits for the GPU, so the loop does so only when it logs
        return {"grad_norm": grad_norm.detach(), "skipped": skipped,
                "loss_scale": self.scaler.get_scale() if self.scaler else None}

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path):
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        torch.save(state, directory / "optimizer.pt")

    def load(self, directory: Path):
        state = torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def fill_deepspeed_config(config: dict, args, world_size: int, hidden_size: int) -> dict:
    """Replace the config's "auto" values from the flags, as transformers' Trainer does for the seed's ds config."""
    cfg = copy.deepcopy(config)
    accum, micro = args.gradient_accumulation_steps, args.per_device_train_batch_size
    fill = {
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size, "gradient_clipping": args.max_grad_norm,
    }
    for k, v in fill.items():
        if cfg.get(k, "auto") == "auto":
            cfg[k] = v
        elif cfg[k] != v:
            raise ValueError(f"DeepSpeed config has {k}={cfg[k]} but the flags give {v}; set it to \"auto\"")
    for section, enabled in (("fp16", args.fp16), ("bf16", args.bf16)):
        sec = cfg.setdefault(section, {})
        if sec.get("enabled", "auto") == "auto":
            sec["enabled"] = enabled
        elif sec["enabled"] != enabled:
            raise ValueError(f"DeepSpeed config has {section}.enabled={sec['enabled']}, but --{section} is {enabled}")
    zero = cfg.get("zero_optimization", {})
    zero_auto = {"reduce_bucket_size": hidden_size * hidden_size,
                 "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                 "stage3_param_persistence_threshold": 10 * hidden_size}
    for k, v in list(zero.items()):
        if v == "auto":
            if k not in zero_auto:
                raise ValueError(f"DeepSpeed config: don't know how to fill zero_optimization.{k}=\"auto\"")
            zero[k] = zero_auto[k]
    adamw = {"lr": args.learning_rate, "betas": [args.adam_beta1, args.adam_beta2], "eps": args.adam_epsilon,
             "weight_decay": args.weight_decay}
    if "optimizer" not in cfg:
        cfg["optimizer"] = {"type": "AdamW", "params": dict(adamw)}
        if zero.get("offload_optimizer", {}).get("device", "none") == "none":
            # DeepSpeed's CPU Adam serves an offloaded optimizer; otherwise torch's AdamW (fused on CUDA) needs no
            # JIT-built op, unlike DeepSpeed's FusedAdam
            cfg["optimizer"]["params"].update(torch_adam=True, fused=torch.cuda.is_available())
    opt_params = cfg["optimizer"].setdefault("params", {})
    for k, v in list(opt_params.items()):
        if v == "auto" and k in adamw:
            opt_params[k] = adamw[k]
    bad = [k for k, v in _walk(cfg) if v == "auto"]
    if bad:
        raise ValueError(f"DeepSpeed config: cannot fill \"auto\" for {', '.join(bad)}")
    return cfg


def _walk(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def init_distributed_env():
    """Single-process runs without the launcher still need the env vars torch.distributed reads."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


class DeepSpeedEngine:
    """deepspeed.initialize with the trainable parameters only; DeepSpeed owns precision, clipping, accumulation."""

    def __init__(self, model, args, total_steps: int, device: torch.device):
        import deepspeed

        self.args = args
        config = json.loads(Path(args.deepspeed).read_text()) if isinstance(args.deepspeed, str) else args.deepspeed
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.config = fill_deepspeed_config(config, args, world, model.config.hidden_size)
        warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
        schedule = lr_lambda(args.lr_scheduler_type, warmup, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, args.weight_decay), config=self.config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))

    @property
    def module(self):
        return self.engine.module

    def forward(self, batch):
        return self.engine(**batch)

    def backward(self, loss, boundary: bool):
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps and applies the loss scale

    def step(self, boundary: bool):
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        if not boundary:
            return None
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        scale = self.engine.optimizer.cur_scale if self.args.fp16 and hasattr(self.engine.optimizer,
                                                                               "cur_scale") else None
        return {"grad_norm": norm, "skipped": self.engine.skipped_steps > skipped_before, "loss_scale": scale}

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path):
        # frozen base weights are not state: a LoRA checkpoint stays adapter-sized
        self.engine.save_checkpoint(str(directory), tag="deepspeed", save_latest=False,
                                    exclude_frozen_parameters=True)

    def load(self, directory: Path):
        tag = "deepspeed"
        saved_world = json.loads((directory / "trainer_state.json").read_text()).get("world_size", 1)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if saved_world != world:
            # ZeRO partitions the optimizer state by rank; DeepSpeed's universal checkpoint re-partitions it
            tag = "deepspeed_universal"
            if int(os.environ.get("RANK", "0")) == 0 and not (directory / tag).is_dir():
                _to_universal(directory / "deepspeed", directory / tag)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
            self.engine._config.load_universal_checkpoint = True  # read by load_checkpoint at call time
        self.engine.load_checkpoint(str(directory), tag=tag, load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=True)


def _to_universal(src: Path, dst: Path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(dst), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {src} to a universal checkpoint failed:\n{proc.stderr[-2000:]}")
