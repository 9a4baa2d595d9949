"""Activation recomputation (checkpointing), applied to a model from outside: its blocks stay plain modules.

    recompute(model, "full")   each block keeps only its input for backward and runs again there (least memory)
    recompute(model, "mlp")    only each MLP's hidden activation (fc1 + GELU, the largest a block keeps) is rebuilt

A model family opts in by shape: `model.layers` holds its blocks, `model.wte` its token embedding, each block's
`mlp.hidden(x)` its MLP activation; `UNREAD_OUTPUTS` below names, per block class, the linear layers whose outputs
backward never reads.

The switch is each module's own `forward`, replaced on the instance: parameter names, state dicts and adapters are
untouched, and a block compiled beforehand (`compile_blocks`) stays compiled inside its checkpoint.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

POLICIES = ("full", "mlp")

# Per block class: the linear layers whose outputs feed nothing but the residual sum, which backward does not read.
# A block's recomputation skips their GEMMs (the lean recomputation: 38 % of a phi-1_5 block's recomputed FLOPs at
# 2048 tokens), while their backward still reads what it needs (their input and weight). In a Phi-3 block the
# attention's sum x + o_proj(...) is the MLP's RMSNorm input, which its backward reads: only down_proj qualifies.
UNREAD_OUTPUTS = {"Block": ("attn.out_proj", "mlp.fc2"), "Phi3Block": ("mlp.down_proj",)}

_run = threading.local()  # .recomputing: None outside a checkpointed block, else whether this run is its recomputation


@contextlib.contextmanager
def _marked(recomputing: bool):
    before = getattr(_run, "recomputing", None)
    _run.recomputing = recomputing
    try:
        yield
    finally:
        _run.recomputing = before


def compile_blocks(model: nn.Module) -> nn.Module:
    """torch.compile each block's forward (one graph a block, reused by every layer): compiled before recompute()
    wraps it, so that a checkpoint holds a compiled block rather than a compiled region holding a checkpoint."""
    for block in model.layers:
        block.forward = torch.compile(block.forward)
    return model


def recompute(model: nn.Module, policy: str = "full", reentrant: bool = True, preserve_rng_state: bool = True,
              lean: bool = True) -> nn.Module:
    """Recompute activations in backward, for training runs (eval and no-grad runs are untouched).

    reentrant: the full policy's checkpoint form. The reentrant one is one autograd node a block, where the
      non-reentrant one runs a pack and an unpack hook for each of the ~23 tensors a block saves: host time that
      bounds small-batch eager steps. CUDA graphs and compiled blocks take the non-reentrant form.
    preserve_rng_state: replay the first run's random numbers (dropout) in the recomputation; off only where nothing
      draws any (a CUDA graph cannot save the RNG state mid-capture).
    lean: skip UNREAD_OUTPUTS' GEMMs in a recomputed block; not for compiled blocks, traced for one kind of run.
    """
    if policy not in POLICIES:
        raise ValueError(f"recompute policy must be one of {POLICIES}, got {policy!r}")
    if policy == "mlp":
        for block in model.layers:
            block.mlp.hidden = _checkpointed_hidden(block.mlp, preserve_rng_state)
        return model
    if reentrant:
        # a reentrant checkpoint passes gradients on only to blocks whose input requires grad: under LoRA the frozen
        # embedding's output does not (transformers' enable_input_require_grads does the same)
        model.wte.register_forward_hook(_input_requires_grad)
    for block in model.layers:
        block.forward = _checkpointed_block(block, reentrant, preserve_rng_state, lean)
        if lean:
            for name in UNREAD_OUTPUTS.get(type(block).__name__, ()):
                linear = block.get_submodule(name)
                if type(linear) is nn.Linear:  # LoRA-adapted layers always compute
                    linear.forward = _lean_linear(linear)
    return model


def _input_requires_grad(module, args, output):
    if module.training and torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_()


def _checkpointed_hidden(mlp: nn.Module, preserve_rng_state: bool):
    hidden = mlp.hidden

    def run(x):
        if not (mlp.training and torch.is_grad_enabled()):
            return hidden(x)
        # only the activation: the projection after it (fc2) stays outside, so it is never rerun
        return checkpoint(hidden, x, use_reentrant=False, preserve_rng_state=preserve_rng_state)
    return run


def _checkpointed_block(block: nn.Module, reentrant: bool, preserve_rng_state: bool, lean: bool):
    forward = fn = block.forward
    kwargs = dict(use_reentrant=reentrant, preserve_rng_state=preserve_rng_state)
    if lean and reentrant:  # the first run is under no_grad, the recomputation (in backward) with grad
        def fn(*args):
            with _marked(torch.is_grad_enabled()):
                return forward(*args)
    elif lean:  # the non-reentrant form tells its recomputation apart through context_fn's second context
        kwargs["context_fn"] = lambda: (_marked(False), _marked(True))

    def run(*args):
        if not (block.training and torch.is_grad_enabled()):
            return forward(*args)
        return checkpoint(fn, *args, **kwargs)
    return run


class _LinearForBackward(torch.autograd.Function):
    """F.linear(x, weight, bias) whose output a checkpoint's recomputation does not need.

    A linear layer's backward reads its input and weight, never its output. So when recomputing, this returns
    uninitialised memory in the output's place and skips the GEMM. The first run computes the output and saves the
    same tensors, as the non-reentrant checkpoint requires of its recomputation.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, compute):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if compute:
            return F.linear(x, weight, bias)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        gw = g2.t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def _lean_linear(linear: nn.Linear):
    def forward(x):
        recomputing = getattr(_run, "recomputing", None)
        if recomputing is None or not (recomputing or torch.is_grad_enabled()):
            return F.linear(x, linear.weight, linear.bias)  # not checkpointed, or a first run that saves nothing
        return _LinearForBackward.apply(x, linear.weight, linear.bias, not recomputing)
    return forward
