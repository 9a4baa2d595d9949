"""Full fine-tuning with the optimizer in CPU memory, without DeepSpeed (`--offload_optimizer cpu`).

What ZeRO-Offload does for one GPU, in one pass per tensor where DeepSpeed makes several: the model stays on the
GPU in fp16/bf16 and no fp32 state ever lives there. During backward a hook sends each finished gradient to pinned
host memory on a side stream, keeps its norm (a GPU scalar), and frees it, so no full-size gradient buffer
exists on the GPU either. At the step, one host sync reads the norm (which also tells an fp16 overflow), and
`phift.optim.MasterAdamW` updates each tensor on the CPU (kernels/adamw_cpu.cpp: half gradient in, fp32 master and
moments, half weight out) while the previous tensor's new weights travel back to the GPU.

The update is the same AdamW as `--pure_bf16` (clipping and loss scale folded into one coefficient on the gradient);
fp16 runs under a dynamic loss scale (2^16 to start, halved and the step skipped on an overflow, doubled after 2000
clean steps: torch's GradScaler defaults, as the plain engine uses). One GPU only.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..optim import MasterAdamW
from ..tensorfile import load_state
from . import Engine, OptimSpec, param_groups, scheduler


class LossScale:
    """Dynamic loss scaling for fp16 (GradScaler's policy); a constant 1 for bf16."""

    def __init__(self, enabled: bool, init: float = 2.0 ** 16, growth_interval: int = 2000):
        self.enabled, self.scale, self.growth_interval, self.good_steps = enabled, init if enabled else 1.0, \
            growth_interval, 0

    def update(self, overflow: bool):
        if not self.enabled:
            return
        if overflow:
            self.scale, self.good_steps = self.scale * 0.5, 0
        else:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale, self.good_steps = self.scale * 2.0, 0

    def state_dict(self):
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state):
        self.scale, self.good_steps = state["scale"], state["good_steps"]


class OffloadEngine(Engine):
    """phift's engine interface with the optimizer on the CPU."""

    def __init__(self, model, spec: OptimSpec, device: torch.device):
        self.module, self.spec, self.device = model, spec, device
        self.trainable = self.params  # fixed for the run: the hooks and host copies are made for these
        bad = sorted({str(p.dtype) for p in self.trainable} - {"torch.float16", "torch.bfloat16"})
        if bad:
            raise ValueError(f"--offload_optimizer cpu trains a half-precision model; parameters are {bad}")
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        # the host side of each parameter: its half weight (written by the CPU step, copied to the GPU) and gradient,
        # views of one pinned buffer each per dtype (pinned blocks are rounded up to powers of two one by one)
        self.host = {}
        for dtype in {p.dtype for p in self.trainable}:
            group = [p for p in self.trainable if p.dtype == dtype]
            total = sum(p.numel() for p in group)
            weights, grads = (torch.empty(total, dtype=dtype, pin_memory=cuda) for _ in range(2))
            offset = 0
            for p in group:
                n = p.numel()
                h = weights[offset:offset + n].view(p.shape).copy_(p.detach())
                h.grad = grads[offset:offset + n].view(p.shape)
                self.host[p] = h
                offset += n
        self.on_device = {id(h): p for p, h in self.host.items()}
        groups = [{**g, "params": [self.host[p] for p in g["params"]]} for g in param_groups(model, spec.weight_decay)]
        self.optimizer = MasterAdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps)
        self.scheduler = scheduler(self.optimizer, spec)
        self.loss_scale = LossScale(enabled=any(p.dtype == torch.float16 for p in self.trainable))
        self.norms = []  # the fp32 norm of each gradient offloaded this step (an inf/nan anywhere stays in their norm)
        self.fresh = set()  # parameters whose gradient reached the host this step (the others' host copy is stale)
        self.boundary = True
        for p in self.trainable:
            p.register_post_accumulate_grad_hook(self._offload)

    def _offload(self, p):
        """Runs as each gradient is final: on an accumulation boundary it leaves for the host and the GPU frees it."""
        if not self.boundary:
            return
        g = p.grad
        self.norms.append(torch.linalg.vector_norm(g, dtype=torch.float32))
        host = self.host[p].grad
        if self.copy_stream is not None:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                host.copy_(g, non_blocking=True)
            g.record_stream(self.copy_stream)  # its memory is not reused before the copy is done
        else:
            host.copy_(g)
        self.fresh.add(p)
        p.grad = None

    def forward(self, batch):
        return self.module(**batch)

    def backward(self, loss, boundary: bool):
        self.boundary = boundary
        (loss * (self.loss_scale.scale / self.spec.accumulation)).backward()

    def zero_grad(self):
        pass  # backward's hooks already moved every gradient to the host and freed it

    def update(self):
        if self.copy_stream is not None:
            self.copy_stream.synchronize()  # every gradient is on the host (and the last step's weights on the GPU)
        scale = self.loss_scale.scale
        # the one host sync of a step (as phift.optim.clip_coefficient: per-tensor norms, then their norm)
        norm = torch.linalg.vector_norm(torch.stack(self.norms)).item() / scale if self.norms else 0.0
        self.norms = []
        fresh, self.fresh = self.fresh, set()
        overflow = not math.isfinite(norm)
        self.loss_scale.update(overflow)
        if overflow:  # nothing is applied and the schedule waits; in fp16 the scale was halved
            return {"grad_norm": norm, "skipped": True, "loss_scale": scale if self.loss_scale.enabled else None}
        stale = {h: h.grad for p, h in self.host.items() if p not in fresh}
        for h in stale:  # a parameter that got no gradient this step is not stepped (as torch's optimizers do)
            h.grad = None
        coef = torch.tensor(min(1.0, self.spec.clip / (norm + 1e-6)) / scale, dtype=torch.float32)
        def upload(h):  # while the CPU updates the next tensor, this one's weights go back to the GPU
            p = self.on_device[id(h)]
            if self.copy_stream is None:
                p.data.copy_(h)
                return
            with torch.cuda.stream(self.copy_stream):
                p.data.copy_(h, non_blocking=True)

        self.optimizer.step(clip_coef=coef, after_each=upload)
        for h, g in stale.items():
            h.grad = g
        if self.copy_stream is not None:  # the next forward reads the new weights
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        self.scheduler.step()
        return {"grad_norm": norm, "skipped": False,
                "loss_scale": scale if self.loss_scale.enabled else None}

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path):
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "loss_scale": self.loss_scale.state_dict()}, directory / "optimizer.pt")

    def load(self, directory: Path, restore):
        restore(self.module, directory)  # (the host weights need nothing: they are only ever the CPU step's output)
        state = load_state(directory / "optimizer.pt", map_location="cpu")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loss_scale.load_state_dict(state["loss_scale"])
