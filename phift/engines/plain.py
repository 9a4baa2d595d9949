"""The plain PyTorch engine: AdamW (fused on CUDA), autocast for fp16/bf16, a GradScaler for fp16; with --pure_bf16 no
autocast, and trainable bf16 weights step through MasterAdamW's fp32 masters."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..optim import MasterAdamW, clip_coefficient
from ..tensorfile import load_state
from . import Engine, OptimSpec, param_groups, scheduler


class TorchEngine(Engine):
    def __init__(self, model, spec: OptimSpec, precision, device: torch.device):
        self.module, self.spec, self.device = model, spec, device
        groups = param_groups(model, spec.weight_decay)
        if precision.master_weights and any(p.dtype != torch.float32 for p in self.params):
            self.optimizer = MasterAdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps)
        else:  # fused on the CPU too: only the fused AdamW takes the found_inf flag update() skips steps with
            self.optimizer = torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps, fused=True)
        self.scheduler = scheduler(self.optimizer, spec)
        # autocast's cache of cast weights is off: each weight is cast once a forward anyway (the recomputation runs
        # outside the forward's autocast region), and a CUDA graph must not replay casts cached by another capture
        self.autocast = (torch.autocast(device.type, dtype=precision.autocast, cache_enabled=False)
                         if precision.autocast else contextlib.nullcontext())
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16) if precision.loss_scaling else None

    def forward(self, batch):
        with self.autocast:
            return self.module(**batch)

    def backward(self, loss, boundary: bool):
        loss = loss / self.spec.accumulation
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def update(self):
        """A step whose gradients are not finite is skipped. Without a loss scaler that is decided on the device, from
        the clipping norm: the flag stays a device tensor, as grad_norm does, because reading either on the host
        makes it wait for the backward to finish before it can queue the next step; the loop reads them when it
        logs. The schedule advances over such a skip (it is not known here), not over an fp16 overflow."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        overflow = False
        if isinstance(self.optimizer, MasterAdamW):  # bf16: no loss scaler; clipped as the gradients are read
            grad_norm, coef = clip_coefficient(self.params, self.spec.clip)
            self.optimizer.step(clip_coef=coef)  # a non-finite norm makes coef NaN, which skips the update
            skipped = ~torch.isfinite(grad_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.spec.clip)
            if self.scaler:
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)  # skips the update when a gradient is inf/nan
                self.scaler.update()
                skipped = overflow = self.scaler.get_scale() < scale
            else:
                skipped = ~torch.isfinite(grad_norm)
                self.optimizer.found_inf = skipped.float()  # leaves weights, moments and step count as they were
                self.optimizer.step()
                del self.optimizer.found_inf
        if not overflow:
            self.scheduler.step()
        return {"grad_norm": grad_norm.detach(), "skipped": skipped,
                "loss_scale": self.scaler.get_scale() if self.scaler else None}

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path):
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        torch.save(state, directory / "optimizer.pt")

    def load(self, directory: Path, restore):
        restore(self.module, directory)
        state = load_state(directory / "optimizer.pt", map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
