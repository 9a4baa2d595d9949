"""AdamW for a model held in bf16: fp32 master weights and moments live in the optimizer (`--pure_bf16`).

Full fine-tuning under autocast keeps the model in fp32, so every forward casts each weight to bf16 (twice with
activation checkpointing) and every bf16 weight gradient is cast back to fp32: on a phi-1_5 step of 1×1024 tokens
that was 9.9 ms of copy kernels and ~780 of the 2,233 launches (bench/HISTORY.md, profile-full). With --pure_bf16 the
model itself is bf16 and runs without autocast; MasterAdamW keeps the fp32 copy of each weight, and one pass per
tensor (`phift.kernels.adamw_master_`) updates it from the bf16 gradient, clipping coefficient included, and writes
the rounded weight back. Memory is the same 16 bytes a parameter as fp32 weights + fp32 gradients + moments:
bf16 weight 2 + bf16 gradient 2 + master 4 + moments 8. This is the mixed precision of DeepSpeed's bf16 mode and
Megatron, and, unlike LLaMA-Factory's --pure_bf16 (which steps the bf16 weights themselves), small updates are not
lost to bf16 rounding.

What differs from autocast over fp32 weights: activations between layers (the residual stream) are bf16 rather than
fp32, and gradients accumulated over several micro-batches (--gradient_accumulation_steps > 1) add up in bf16.
"""
from __future__ import annotations

import torch

from phift import kernels


class MasterAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay), on fp32 masters of half-precision parameters.

    The state of each parameter holds `master` (fp32), `exp_avg`, `exp_avg_sq` (fp32) and `step`, so that
    state_dict() / load_state_dict() resume exactly. step(clip_coef) scales every gradient by clip_coef first: a
    0-dim fp32 tensor on the parameters' device, e.g. from `clip_coefficient`, which needs no host sync. A clip_coef
    that is not finite (the gradients were not) skips the step: weights, masters and moments stay as they were. On
    a GPU the kernel decides that on the device, and the step count still advances (knowing the skip on the host
    would cost the sync the coefficient avoids), so the bias correction of the next steps counts the skipped one.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype not in (torch.float16, torch.bfloat16):
                    raise ValueError(f"MasterAdamW keeps fp32 masters of half-precision parameters; got {p.dtype} "
                                     f"for a parameter of shape {tuple(p.shape)}")

    def load_state_dict(self, state_dict):
        """As torch's, except that the fp32 masters and moments stay fp32: torch casts a loaded state tensor to its
        parameter's dtype, which here would round the masters to bf16."""
        saved = state_dict["state"]
        fp32 = {k: {name: t for name, t in s.items() if name != "step"} for k, s in saved.items()}
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params, strict=True):
            for name, t in fp32.get(i, {}).items():
                self.state[p][name] = t.to(device=p.device, dtype=torch.float32, copy=True)

    def _state(self, p):
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["master"] = p.detach().float()
            state["exp_avg"] = torch.zeros_like(state["master"])
            state["exp_avg_sq"] = torch.zeros_like(state["master"])
        return state

    @torch.no_grad()
    def step(self, closure=None, clip_coef: torch.Tensor | None = None, after_each=None):
        """One AdamW step of every parameter with a gradient. after_each(p), if given, runs after each parameter's
        update (one op call per tensor then, so that the caller can overlap work with the next tensor's)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if clip_coef is not None and clip_coef.device.type == "cpu" and not torch.isfinite(clip_coef):
            return loss  # non-finite gradients (see clip_coefficient), known here without a device sync: skipped
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1.0)  # two host ops for the group, not two a tensor: the step is host-bound
            beta1, beta2 = group["betas"]
            hyper = (clip_coef, group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            counts = torch.stack(steps).tolist()
            if after_each is None:
                kernels.adamw_master_([p.data for p in params], [p.grad for p in params],
                                      [s["master"] for s in states], [s["exp_avg"] for s in states],
                                      [s["exp_avg_sq"] for s in states], *hyper, counts)
                continue
            for p, s, count in zip(params, states, counts, strict=True):
                kernels.adamw_master_([p.data], [p.grad], [s["master"]], [s["exp_avg"]], [s["exp_avg_sq"]], *hyper,
                                      [count])
                after_each(p)
        return loss


def clip_coefficient(params, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total gradient 2-norm in fp32, min(1, max_norm / (norm + 1e-6))), both 0-dim tensors on the gradients'
    device; the gradients themselves are left as they are (MasterAdamW applies the coefficient as it reads them).
    A norm that is not finite gives a NaN coefficient, which makes MasterAdamW skip the step."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        zero = torch.zeros(())
        return zero, torch.ones(())
    norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = (max_norm / (total + 1e-6)).clamp_(max=1.0)
    return total, coef.masked_fill_(~torch.isfinite(total), float("nan"))  # NaN: MasterAdamW skips the step
