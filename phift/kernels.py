"""The one dispatch point for compiled kernels.

A LoRA layer calls `lora_linear`; it runs the fused CUDA op when it can, else the same math in PyTorch.

The fused op `torch.ops.phift.lora_linear_fused` (C++/CUDA in kernels/, built by kernels/build.py) folds the LoRA
term into the base matrix products instead of running its own: with u = dropout(x) Aᵀ, an [M, r] matrix,
    forward    y = [x | u] · [W | s·B]ᵀ + b              one GEMM over in + 64 (u and B zero-padded)
    backward   [dx_base | g] = dy · [W | s·B]             one GEMM; g = s · dy B comes out as extra columns
               dx = dx_base + mask ⊙ (g A),   dA = gᵀ (mask ⊙ x),   dB = dyᵀ (s · u)
(s = scaling / (1 - p)). Two small CUDA passes build [x | u] and add the dx correction; cuBLAS does every product.
The dropout mask is regenerated from its Philox seed in backward, never stored. The op keeps one [W | s·B] copy
of each adapted frozen weight on the GPU.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MAX_KERNEL_RANK = 64


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, dropout: float, training: bool) -> torch.Tensor:
    """y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ, with A:[r, in], B:[out, r] (kept fp32; cast to x's dtype)."""
    if fused_applies(x, weight, bias, lora_A, lora_B):
        p = float(dropout) if training else 0.0
        return torch.ops.phift.lora_linear_fused(x, weight, bias, lora_A, lora_B, float(scaling), p)[0]
    return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout, training)


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout, training):
    y = F.linear(x, weight, bias)
    h = F.dropout(x, dropout, training) if dropout > 0 else x
    return y + scaling * F.linear(F.linear(h, lora_A.to(x.dtype)), lora_B.to(x.dtype))


def fused_applies(x, weight, bias, lora_A, lora_B) -> bool:
    """Whether `lora_linear` runs the fused CUDA op for these arguments."""
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype)
            # the op returns no gradient for W or b: it is only right for a frozen base
            and not weight.requires_grad and not (bias is not None and bias.requires_grad)
            and x.shape[-1] % 8 == 0 and lora_A.shape[0] <= MAX_KERNEL_RANK and x.numel() > 0
            and kernels_enabled())


@torch.compiler.assume_constant_result  # torch.compile evaluates it once while tracing: no graph break
def kernels_enabled() -> bool:
    """False when PHIFT_DISABLE_KERNELS=1, or when the extension can be neither imported nor built."""
    return os.environ.get("PHIFT_DISABLE_KERNELS", "0") in ("", "0") and _extension() is not None


_NOT_LOADED = object()
_extension_module = _NOT_LOADED


def _extension():
    """The compiled module: built ahead of time by setup.py, else compiled now (once); None if neither works."""
    global _extension_module
    if _extension_module is _NOT_LOADED:
        _extension_module = _load_extension()
        if _extension_module is not None:
            _register_fakes()
    return _extension_module


def _load_extension():
    try:
        import phift_lora_cuda
        return phift_lora_cuda
    except ImportError:
        pass
    build = Path(__file__).resolve().parent.parent / "kernels" / "build.py"
    try:
        if not build.exists():
            raise FileNotFoundError(f"phift_lora_cuda was not built and its sources are not at {build.parent}")
        spec = importlib.util.spec_from_file_location("phift_kernels_build", build)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        log.info("compiling the fused LoRA kernel (first use only; cached in TORCH_EXTENSIONS_DIR)")
        return module.load()
    except Exception as error:  # no toolkit, a compiler error, ...: the PyTorch math still runs
        warnings.warn(f"phift: fused LoRA kernel unavailable, using the PyTorch fallback ({error})", stacklevel=3)
        return None


def _dropout_threshold(p: float) -> int:
    """As in kernels/lora_op.cpp: elements whose 16 random bits fall below this are dropped (p rounded to 2⁻¹⁶)."""
    return min(int(p * 65536.0 + 0.5), 65535)


def _padded_rank(rank: int) -> int:
    return next(padded for padded in (8, 16, 32, 64) if padded >= rank)


def _register_fakes():
    """Shape-only versions of the C++ ops, which torch.compile traces with."""

    @torch.library.register_fake("phift::lora_linear_fused")
    def _(x, weight, bias, lora_A, lora_B, scaling, dropout):
        rows = x.numel() // x.shape[-1]
        xm_rows = rows if _dropout_threshold(dropout) else 0
        return (x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(xm_rows, x.shape[-1]),
                x.new_empty(rows, _padded_rank(lora_A.shape[0])), x.new_empty(2, dtype=torch.int64))

    @torch.library.register_fake("phift::lora_linear_fused_backward")
    def _(dy, saved_x, su, rng, weight, lora_A, lora_B, scaling, dropout, need_dx):
        dx = dy.new_empty(*dy.shape[:-1], lora_A.shape[1]) if need_dx else dy.new_empty(0)
        return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)
