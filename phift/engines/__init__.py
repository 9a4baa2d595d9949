"""Training engines: what sits between the loop and the optimizer, behind one interface.

    loss = engine.forward_backward(batch, boundary)   forward, loss ÷ accumulation (× loss scale), backward
    info = engine.step(boundary)                       at a boundary: clip, optimizer step, schedule, zero gradients;
                                                       None between boundaries, else {"grad_norm", "skipped",
                                                       "loss_scale"} (grad_norm a float or a 0-dim tensor)
    engine.forward(batch)                              a forward alone (evaluation), under the engine's precision
    engine.weights_state_dict()                        the full weights to save (None: the module's own are whole)
    engine.save(dir) / engine.load(dir, restore)       optimizer, schedule and loss-scale state (load first restores
                                                       the trainable weights, through `restore` where it must)

plain.py: PyTorch's AdamW (fused on CUDA), or MasterAdamW's fp32 masters for a bf16 model, under autocast and a
GradScaler as the precision says. deepspeed.py: DeepSpeed's engine (ZeRO, its CPU Adam). offload.py: phift's AdamW
with the optimizer on the CPU. graphs.py: a wrapper that replays the plain engine's forward and backward as CUDA
graphs. An fp16 step whose gradients overflowed is skipped: the weights and the schedule stay as they were.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn


@dataclass(frozen=True)
class OptimSpec:
    """AdamW, clipping and the learning-rate schedule: what every engine's optimizer needs, and nothing else."""
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    max_grad_norm: float  # 0: no clipping
    schedule: str  # linear | cosine | constant | constant_with_warmup
    warmup_steps: int
    total_steps: int
    accumulation: int  # micro-batches an optimizer step

    @classmethod
    def from_training(cls, training, total_steps: int) -> OptimSpec:
        """From a phift.args.TrainingArgs: --warmup_steps wins over --warmup_ratio, as in transformers."""
        t = training
        return cls(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                   weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, schedule=t.lr_scheduler_type,
                   warmup_steps=t.warmup_steps or math.ceil(t.warmup_ratio * total_steps), total_steps=total_steps,
                   accumulation=t.gradient_accumulation_steps)

    @property
    def clip(self) -> float:
        return self.max_grad_norm if self.max_grad_norm > 0 else math.inf


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


def scheduler(optimizer, spec: OptimSpec) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec.schedule, spec.warmup_steps, spec.total_steps))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and LayerNorm weights are left alone (as transformers' Trainer does)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Engine:
    """The interface the loop calls; see the module docstring."""

    module: nn.Module

    @property
    def params(self) -> list[nn.Parameter]:
        """What trains."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def forward(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        raise NotImplementedError

    def forward_backward(self, batch: dict, boundary: bool = True) -> torch.Tensor:
        loss = self.forward(batch)
        self.backward(loss, boundary)
        return loss

    def update(self) -> dict:
        """At a boundary: clip, step the optimizer and the schedule (not the gradients' zeroing)."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self, boundary: bool) -> dict | None:
        if not boundary:
            return None
        info = self.update()
        self.zero_grad()
        return info

    def lr(self) -> float:
        raise NotImplementedError

    def weights_state_dict(self) -> dict | None:
        return None

    def save(self, directory: Path) -> None:
        raise NotImplementedError

    def load(self, directory: Path, restore: Callable[[nn.Module, Path], None]) -> None:
        raise NotImplementedError


def build_engine(model: nn.Module, run, precision, total_steps: int, device: torch.device) -> Engine:
    """The engine a phift.args.RunConfig asks for; --cuda_graphs wraps the plain one."""
    from .deepspeed import DeepSpeedEngine
    from .graphs import GraphedEngine
    from .offload import OffloadEngine
    from .plain import TorchEngine

    spec = OptimSpec.from_training(run.training, total_steps)
    if run.training.deepspeed:
        engine = DeepSpeedEngine(model, spec, run.training.deepspeed, precision,
                                 run.training.per_device_train_batch_size)
    elif run.training.offload_optimizer == "cpu":
        engine = OffloadEngine(model, spec, device)
    else:
        engine = TorchEngine(model, spec, precision, device)
    return GraphedEngine(engine) if run.model.cuda_graphs else engine
