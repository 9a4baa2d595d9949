"""The one dispatch point for compiled kernels.

A LoRA layer calls `lora_linear`; it runs the fused CUDA op when it can, else the same math in PyTorch.

The fused op `torch.ops.phift.lora_linear_fused` (C++/CUDA in kernels/, built by kernels/build.py) folds the LoRA
term into the base matrix products instead of running its own: with u = dropout(x) Aᵀ, an [M, r] matrix,
    forward    y = [x | u] · [W | s·B]ᵀ + b              one GEMM over in + 64 (u and B zero-padded)
    backward   [dx_base | g] = dy · [W | s·B]             one GEMM; g = s · dy B comes out as extra columns
               dx = dx_base + mask ⊙ (g A),   dA = gᵀ (mask ⊙ x),   dB = dyᵀ (s · u)
(s = scaling / (1 - p)). Two CUDA passes do the rest: one reads x and writes [x | u]; the other reads dx_base and x
once for both the dx correction and dA. cuBLAS does the three big products. Neither the dropout mask nor mask ⊙ x
is stored: backward regenerates the mask from its Philox seed, and autograd keeps x itself. [W | s·B] is W's own
storage when W lives in the first columns of such a matrix (`home_lora_weights`, what `phift train` does without
DeepSpeed); for a weight elsewhere the op keeps one copy of it on the GPU.

The LM head's chunked loss calls `cross_entropy_grad_`; its fused op `phift::cross_entropy_grad_` reads a chunk's
fp16/bf16 logits once and writes softmax − onehot over them, where PyTorch makes about eight passes over an fp32 copy.

Attention calls `rotary_qkv` to split the Wqkv (phi3: qkv_proj) output into q, k, v and rotate q and k
(`apply_rotary`). Eagerly that is about ten elementwise passes over q and k each way; the fused ops
`phift::rotary_qkv_fused` and its backward (kernels/rotary_cuda.cu) read qkv once and write q, k, v once, and read
dq, dk, dv once and write dqkv once, with the same fp32 operations, so that they give the same bits as the PyTorch
math. They take as many key-value heads as query heads (phi, Phi-3, Phi-3.5); grouped-query attention (Phi-4-mini)
runs the PyTorch math. Partial rotary and LongRoPE's scaled cos and sin are only other inputs to either.

Full fine-tuning with --pure_bf16 steps through `adamw_master_`: the fused op `phift::adamw_master_`
(kernels/adamw_cuda.cu) updates fp32 master weights and moments from half gradients and writes the half weights in
one pass a tensor; on the CPU its C++ twin `phift_cpu::adamw_master_` (kernels/adamw_cpu.cpp, a separate
extension built with the host compiler) does the same.

Each `*_applies` check runs before its op is called, so the ops only ever see inputs they take: their own
TORCH_CHECKs are a last line of defence. (On the GPU machine's torch 2.11 + CUDA 13, an exception thrown from the
extension ended the process instead of raising a RuntimeError.)
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

# Above rank 32 the fused op's one-pass dx + dA loses to the PyTorch math (BENCHMARKS.md, lora_kernel: r 64)
MAX_KERNEL_RANK = 32
MAX_KERNEL_VOCAB = 65536  # kernels/ce_cuda.cu keeps a row in registers: 1024 threads × 64 elements


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


# The fused op keeps s·B in this many columns beside each adapted W (kernels/lora_op.cpp's kWidth)
FUSED_EXTRA_COLUMNS = 64


def fused_home_applies(weight: torch.Tensor, rank: int) -> bool:
    """Whether a frozen LoRA base weight goes into a padded matrix for the fused op (`home_for_fused_lora`): when
    the op will run on it (a half-precision CUDA weight, its rank taken, the op loaded)."""
    return (weight.is_cuda and weight.dtype in (torch.float16, torch.bfloat16) and weight.dim() == 2
            and weight.shape[1] % 8 == 0 and rank <= MAX_KERNEL_RANK and kernels_enabled("lora"))


def home_lora_weights(model: torch.nn.Module) -> int:
    """Move the base weight of each LoRA layer the fused op will serve into its [W | s·B] matrix
    (`home_for_fused_lora`); the number moved. For the plain and offload engines: DeepSpeed broadcasts, flattens and
    partitions weights as dense tensors, and ZeRO-3 gathers them afresh anyway."""
    moved = 0
    for module in model.modules():
        rank = getattr(module, "r", None)
        if isinstance(getattr(module, "lora_A", None), torch.Tensor) and fused_home_applies(module.weight, rank):
            home_for_fused_lora(module.weight)
            moved += 1
    return moved


def home_for_fused_lora(weight: torch.Tensor) -> None:
    """Move `weight` [N, K] into the first K columns of a zeroed [N, K + 64] matrix, in place (its .data becomes
    that view). The fused op writes s·B into the other columns and multiplies by the whole matrix, instead of
    keeping a [W | s·B] copy of W beside it: one adapted weight's worth of memory less. Plain products read the view
    as any weight (cuBLAS takes the row stride)."""
    n, k = weight.shape
    if weight.stride() == (k + FUSED_EXTRA_COLUMNS, 1):
        return  # already there
    matrix = weight.new_zeros(n, k + FUSED_EXTRA_COLUMNS)
    matrix[:, :k].copy_(weight.detach())
    weight.data = matrix[:, :k]


def fused_applies(x, weight, bias, lora_A, lora_B) -> bool:
    """Whether `lora_linear` runs the fused CUDA op for these arguments."""
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype)
            # the op returns no gradient for W or b: it is only right for a frozen base
            and not weight.requires_grad and not (bias is not None and bias.requires_grad)
            and x.shape[-1] % 8 == 0 and lora_A.shape[0] <= MAX_KERNEL_RANK and x.numel() > 0
            and kernels_enabled("lora"))


def cross_entropy_grad_(logits: torch.Tensor, labels: torch.Tensor, write_grad: bool,
                        ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The cross-entropy of each row of logits [rows, V] against labels [rows], in fp32, and when write_grad its
    gradient softmax − onehot (else None). Rows labelled ignore_index get loss 0 and a zero gradient.

    The fused op reads fp16/bf16 logits once, computes in fp32 and writes the gradient over them, so that it comes
    back in their dtype; the fallback computes on an fp32 copy and returns an fp32 gradient.
    """
    if cross_entropy_fused_applies(logits, labels):
        loss = torch.ops.phift.cross_entropy_grad_(logits, labels, ignore_index, write_grad)
        return loss, logits if write_grad else None
    logits = logits.float()
    keep = labels != ignore_index
    target = torch.where(keep, labels, 0)
    lse = torch.logsumexp(logits, dim=-1)
    loss = torch.where(keep, lse - logits.gather(1, target[:, None]).squeeze(1), 0.0)
    if not write_grad:
        return loss, None
    g = (logits - lse[:, None]).exp_()
    g[torch.arange(len(labels), device=g.device), target] -= 1.0
    return loss, g.masked_fill_(~keep[:, None], 0.0)  # as in the fused op, whatever an ignored row holds


def cross_entropy_fused_applies(logits, labels) -> bool:
    """Whether `cross_entropy_grad_` runs the fused CUDA op for these arguments."""
    return (logits.is_cuda and logits.dtype in (torch.float16, torch.bfloat16) and logits.dim() == 2
            and logits.is_contiguous() and 0 < logits.shape[1] <= MAX_KERNEL_VOCAB and labels.dtype == torch.int64
            and kernels_enabled("ce"))


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
               num_kv_heads: int | None = None):
    """q [B, H, T, head_dim] and k, v [B, H_kv, T, head_dim] from the fused projection's output qkv
    [B, T, (H + 2·H_kv)·head_dim] (rows q;k;v; H_kv = num_kv_heads, default H), q and k rotated by `apply_rotary`
    with cos, sin [B, T, rotary_dim] (fp32, from model.rotary_cos_sin or phi3.rope_cos_sin)."""
    kv_heads = num_kv_heads or num_heads
    if rotary_fused_applies(qkv, cos, sin, num_heads, kv_heads):
        return _FusedRotaryQKV.apply(qkv, cos, sin, num_heads)
    B, T, width = qkv.shape
    head_dim = width // (num_heads + 2 * kv_heads)
    if kv_heads == num_heads:
        q, k, v = qkv.view(B, T, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    else:  # grouped-query attention: q, then the smaller k and v
        q, k, v = (t.view(B, T, -1, head_dim).transpose(1, 2)
                   for t in qkv.split([num_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1))
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on the first cos.shape[-1] dims of x [B, H, T, head_dim]; the rest pass through."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd].float(), x[..., rd:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    rotated = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated.to(x.dtype), x_pass], dim=-1)


def rotary_fused_applies(qkv, cos, sin, num_heads, num_kv_heads: int | None = None) -> bool:
    """Whether `rotary_qkv` runs the fused CUDA ops for these arguments. They split qkv into three equal parts, so
    grouped-query attention (fewer key-value heads) runs the PyTorch math."""
    return ((num_kv_heads or num_heads) == num_heads
            and qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16) and qkv.dim() == 3
            and qkv.shape[-1] % (3 * num_heads * 8) == 0  # the kernels move 8-element vectors, never across heads
            and cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape == (*qkv.shape[:2], cos.shape[-1])
            and cos.shape[-1] % 2 == 0 and cos.shape[-1] <= qkv.shape[-1] // (3 * num_heads)  # rotary_dim
            and cos.device == qkv.device
            and not (cos.requires_grad or sin.requires_grad)  # the ops give no gradient for them
            and qkv.numel() > 0 and kernels_enabled("rotary"))


class _FusedRotaryQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, num_heads):
        ctx.save_for_backward(cos, sin)
        out = torch.ops.phift.rotary_qkv_fused(qkv, cos, sin, num_heads)  # [3, B, T, H, head_dim]
        # [B, H, T, head_dim] views with head_dim contiguous, as SDPA's flash kernel reads them: no copy
        q, k, v = out.transpose(2, 3).unbind(0)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        return torch.ops.phift.rotary_qkv_fused_backward(dq, dk, dv, cos, sin), None, None, None


def adamw_master_(weights, grads, masters, exp_avgs, exp_avg_sqs, clip_coef, lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float, steps: list[float]) -> None:
    """One AdamW step (torch's math, adamw mode) of fp32 master weights from fp16/bf16 gradients, each multiplied
    first by clip_coef (a 0-dim fp32 tensor on the weights' device, or None); the updated masters are written back,
    rounded, into the half weights. steps[i] is tensor i's step count, this step included (bias correction).
    A clip_coef that is not finite leaves every tensor as it was (the step is skipped)."""
    if adamw_fused_applies(weights, grads, masters, exp_avgs, exp_avg_sqs, clip_coef):
        op = torch.ops.phift.adamw_master_ if weights[0].is_cuda else torch.ops.phift_cpu.adamw_master_
        op(weights, grads, masters, exp_avgs, exp_avg_sqs, clip_coef, lr, beta1, beta2, eps, weight_decay,
           [float(s) for s in steps])
        return
    if clip_coef is not None and not torch.isfinite(clip_coef):  # (the reference path reads it on the host)
        return
    for w, g, p, m, v, step in zip(weights, grads, masters, exp_avgs, exp_avg_sqs, steps, strict=True):
        g = g.float()
        if clip_coef is not None:
            g.mul_(clip_coef)
        p.sub_(p * (lr * weight_decay))
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))
        w.copy_(p)


def adamw_fused_applies(weights, grads, masters, exp_avgs, exp_avg_sqs, clip_coef) -> bool:
    """Whether `adamw_master_` runs a fused op for these arguments: the CUDA op, or on the CPU its C++ twin."""
    if not weights:
        return False
    if weights[0].is_cuda:
        if not kernels_enabled("adamw"):
            return False
    elif weights[0].device.type != "cpu" or not cpu_kernels_enabled("adamw"):
        return False
    device = weights[0].device
    if clip_coef is not None and not (clip_coef.device == device and clip_coef.dtype == torch.float32
                                      and clip_coef.numel() == 1):
        return False
    for w, g, p, m, v in zip(weights, grads, masters, exp_avgs, exp_avg_sqs, strict=True):
        if not (w.dtype in (torch.float16, torch.bfloat16) and g.dtype == w.dtype
                and p.dtype == m.dtype == v.dtype == torch.float32
                and w.device == g.device == p.device == m.device == v.device == device
                and w.numel() == g.numel() == p.numel() == m.numel() == v.numel()
                and all(t.is_contiguous() for t in (w, g, p, m, v))):
            return False
    return True


def parse_disabled(setting: str) -> frozenset[str]:
    """PHIFT_DISABLE_KERNELS: 1 turns every op off; a comma-separated list of lora, ce, rotary, adamw turns those off
    (to measure what each op gives)."""
    setting = setting.replace(" ", "")
    return frozenset({"all"} if setting == "1" else {op for op in setting.split(",") if op and op != "0"})


DISABLED = parse_disabled(os.environ.get("PHIFT_DISABLE_KERNELS", ""))  # read once, when phift is imported


def load(device: torch.device | str) -> bool:
    """Make the CUDA ops ready for a run on `device`, before any forward: imported if setup.py built them, else
    compiled now (once, cached in TORCH_EXTENSIONS_DIR). Returns whether they are there; without them every op runs
    its PyTorch fallback."""
    if torch.device(device).type != "cuda" or "all" in DISABLED:
        return False
    return _extension() is not None


@torch.compiler.assume_constant_result  # torch.compile evaluates it once while tracing: no graph break
def kernels_enabled(op: str = "") -> bool:
    """Whether the CUDA op `op` runs: the extension is loaded (phift.kernels.load) and the op is not disabled."""
    return not _disabled(op) and _extension_module not in (_NOT_LOADED, None)


def cpu_kernels_enabled(op: str = "") -> bool:
    """As kernels_enabled, for the CPU extension (kernels/adamw_cpu.cpp, built with the host's C++ compiler on its
    first use, by the optimizer step: never inside a forward)."""
    return not _disabled(op) and _cpu_extension() is not None


def _disabled(op: str) -> bool:
    return "all" in DISABLED or op in DISABLED


_NOT_LOADED = object()
_extension_module = _NOT_LOADED
_cpu_extension_module = _NOT_LOADED


def _cpu_extension():
    """The CPU extension, compiled on first use (cached); None where it cannot be built (no compiler, ...)."""
    global _cpu_extension_module
    if _cpu_extension_module is _NOT_LOADED:
        try:
            log.info("compiling phift's CPU kernels (first use only; cached in TORCH_EXTENSIONS_DIR)")
            _cpu_extension_module = _build_script().load_cpu()
        except Exception as error:  # the PyTorch math still runs
            warnings.warn(f"phift: CPU kernels unavailable, using the PyTorch fallbacks ({error})", stacklevel=3)
            _cpu_extension_module = None
    return _cpu_extension_module


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
    try:
        build = _build_script()
        log.info("compiling phift's CUDA kernels (first use only; cached in TORCH_EXTENSIONS_DIR)")
        return build.load()
    except Exception as error:  # no toolkit, a compiler error, ...: the PyTorch math still runs
        warnings.warn(f"phift: CUDA kernels unavailable, using the PyTorch fallbacks ({error})", stacklevel=3)
        return None


def _build_script():
    """kernels/build.py, imported from the source tree (it is not part of the installed package)."""
    build = Path(__file__).resolve().parent.parent / "kernels" / "build.py"
    if not build.exists():
        raise FileNotFoundError(f"phift's kernels were not built and their sources are not at {build.parent}")
    spec = importlib.util.spec_from_file_location("phift_kernels_build", build)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _padded_rank(rank: int) -> int:
    return next(padded for padded in (8, 16, 32, 64) if padded >= rank)


def _register_fakes():
    """Shape-only versions of the C++ ops, which torch.compile traces with."""

    @torch.library.register_fake("phift::lora_linear_fused")
    def _(x, weight, bias, lora_A, lora_B, scaling, dropout):
        rows = x.numel() // x.shape[-1]
        return (x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(rows, _padded_rank(lora_A.shape[0])),
                x.new_empty(2, dtype=torch.int64))

    @torch.library.register_fake("phift::lora_linear_fused_backward")
    def _(dy, x, su, rng, weight, lora_A, lora_B, scaling, dropout, need_dx):
        dx = dy.new_empty(*dy.shape[:-1], lora_A.shape[1]) if need_dx else dy.new_empty(0)
        return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)

    @torch.library.register_fake("phift::cross_entropy_grad_")
    def _(logits, labels, ignore_index, write_grad):
        return logits.new_empty(logits.shape[0], dtype=torch.float32)

    @torch.library.register_fake("phift::rotary_qkv_fused")
    def _(qkv, cos, sin, num_heads):
        B, T, width = qkv.shape
        return qkv.new_empty(3, B, T, num_heads, width // (3 * num_heads))

    @torch.library.register_fake("phift::rotary_qkv_fused_backward")
    def _(dq, dk, dv, cos, sin):
        B, H, T, head_dim = dq.shape
        return dq.new_empty(B, T, 3 * H * head_dim)
