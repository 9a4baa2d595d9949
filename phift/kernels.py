"""The one dispatch point for compiled kernels.

A LoRA layer calls `lora_linear`; it runs the fused CUDA op when it can, else the same math in PyTorch.

The fused op (`torch.ops.phift.lora_linear_fused`, CUDA sources in kernels/) folds the LoRA term into the base
matrix products instead of running its own: with su = s · dropout(x) Aᵀ (an [M, r] matrix),
    forward    y  = [x | su] · [W | B]ᵀ + b      one GEMM over in + r
    backward   [dx_base | g] = dy · [W | B]      one GEMM; g = dy B comes out as r extra columns
               dx = dx_base + s · mask ⊙ (g A) / (1-p),   dA = s · gᵀ (mask ⊙ x) / (1-p),   dB = dyᵀ su
Two small CUDA passes build [x | su] and apply the dx correction; cuBLAS does every product. The dropout mask is
regenerated from its Philox seed in backward, never stored.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_KERNEL_RANKS = (8, 16, 32, 64)  # ranks the kernels are compiled for; a smaller rank is padded with zeros


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
            and x.shape[-1] % 8 == 0 and lora_A.shape[0] <= _KERNEL_RANKS[-1] and x.numel() > 0
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


def _padded_rank(rank: int) -> int:
    return next(r for r in _KERNEL_RANKS if r >= rank)


def _dropout_threshold(p: float) -> int:
    """The fused op draws 16 random bits per element and drops it when they are below this: p rounded to 2⁻¹⁶."""
    return min(round(p * 65536), 65535)


def _coef(scaling: float, threshold: int) -> float:
    return scaling / (1.0 - threshold / 65536)


def _padded_A(lora_A, rank, dtype):
    return F.pad(lora_A.to(dtype), (0, 0, 0, rank - lora_A.shape[0])).contiguous()


_augmented_weights: dict[tuple, tuple[weakref.ref, int, torch.Tensor]] = {}


def _augmented_weight(weight, lora_B, rank):
    """[W | B] as one [out, in + rank] matrix (B padded with zero columns), kept for each frozen W.

    Copying W into it on every call would cost about as much as all the LoRA math, so W's part is copied once
    (the price: one more copy of every adapted weight in GPU memory) and only B's columns are rewritten per call.
    A W changed in place (merge, unmerge) has a new version and is copied again.
    """
    out_features, in_features = weight.shape
    version = 0 if weight.is_inference() else weight._version
    key = (weight.data_ptr(), weight.device, weight.dtype, out_features, in_features, rank)
    entry = _augmented_weights.get(key)
    if entry is None or entry[0]() is None or entry[1] != version:
        for stale in [k for k, (ref, _, _) in _augmented_weights.items() if ref() is None]:
            del _augmented_weights[stale]
        with torch.inference_mode(False):  # a cache made under inference_mode must still serve training
            augmented = weight.new_zeros(out_features, in_features + rank)
            augmented[:, :in_features] = weight
        entry = _augmented_weights[key] = (weakref.ref(weight), version, augmented)
    augmented = entry[2]
    augmented[:, in_features:in_features + lora_B.shape[1]].copy_(lora_B)
    return augmented


@torch.library.custom_op(
    "phift::lora_linear_fused", mutates_args=(), device_types="cuda",
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, float dropout)"
           " -> (Tensor, Tensor, Tensor, Tensor)")
def _fused(x, weight, bias, lora_A, lora_B, scaling, dropout):
    """Returns y and what backward needs: xm = mask ⊙ x (empty without dropout), su, and the Philox state."""
    in_features, rank = x.shape[-1], _padded_rank(lora_A.shape[0])
    x2 = x.reshape(-1, in_features)
    if not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.clone(memory_format=torch.contiguous_format)
    threshold = _dropout_threshold(dropout)
    with torch.autocast("cuda", enabled=False):
        x_aug, xm, su, rng = _extension().prep(x2, _padded_A(lora_A, rank, x.dtype), _coef(scaling, threshold),
                                               threshold)
        w_aug = _augmented_weight(weight, lora_B, rank)
        y = torch.mm(x_aug, w_aug.t()) if bias is None else torch.addmm(bias, x_aug, w_aug.t())
    return y.view(*x.shape[:-1], weight.shape[0]), xm, su, rng


@_fused.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout):
    rows = x.numel() // x.shape[-1]
    xm_rows = rows if _dropout_threshold(dropout) else 0
    return (x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(xm_rows, x.shape[-1]),
            x.new_empty(rows, _padded_rank(lora_A.shape[0])), x.new_empty(2, dtype=torch.int64))


@torch.library.custom_op(
    "phift::lora_linear_fused_backward", mutates_args=(), device_types="cuda",
    schema="(Tensor dy, Tensor saved_x, Tensor su, Tensor rng, Tensor weight, Tensor lora_A, Tensor lora_B,"
           " float scaling, float dropout, bool need_dx) -> (Tensor, Tensor, Tensor)")
def _fused_backward(dy, saved_x, su, rng, weight, lora_A, lora_B, scaling, dropout, need_dx):
    """dx (empty unless need_dx), dA, dB. saved_x is mask ⊙ x with dropout, else x."""
    r, in_features = lora_A.shape
    rank = _padded_rank(r)
    dy2 = dy.reshape(-1, dy.shape[-1])
    threshold = _dropout_threshold(dropout)
    coef = _coef(scaling, threshold)
    with torch.autocast("cuda", enabled=False):
        w_aug = _augmented_weight(weight, lora_B, rank)
        if need_dx:
            dx_aug = torch.mm(dy2, w_aug)  # [M, in + rank]: dy W, then g = dy B
            g = dx_aug[:, in_features:in_features + r]
            dx = _extension().fix(dx_aug, _padded_A(lora_A, rank, dy.dtype), coef, threshold, rng)
            dx = dx.view(*dy.shape[:-1], in_features)
        else:
            g = torch.mm(dy2, w_aug[:, in_features:in_features + r])
            dx = dy.new_empty(0)
        d_A = torch.mm(g.t(), saved_x.reshape(-1, in_features)).to(lora_A.dtype).mul_(coef)
        d_B = torch.mm(dy2.t(), su[:, :r]).to(lora_B.dtype)
    return dx, d_A, d_B


@_fused_backward.register_fake
def _(dy, saved_x, su, rng, weight, lora_A, lora_B, scaling, dropout, need_dx):
    dx = dy.new_empty(*dy.shape[:-1], lora_A.shape[1]) if need_dx else dy.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout = inputs
    _, xm, su, rng = output
    ctx.save_for_backward(xm if _dropout_threshold(dropout) else x, su, rng, weight, lora_A, lora_B)
    ctx.scaling, ctx.dropout = scaling, dropout
    ctx.mark_non_differentiable(xm, su, rng)


def _backward(ctx, dy, *_):
    saved_x, su, rng, weight, lora_A, lora_B = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, d_A, d_B = torch.ops.phift.lora_linear_fused_backward(dy, saved_x, su, rng, weight, lora_A, lora_B,
                                                              ctx.scaling, ctx.dropout, need_dx)
    return dx if need_dx else None, None, None, d_A, d_B, None, None


_fused.register_autograd(_backward, setup_context=_setup_context)
