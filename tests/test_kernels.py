"""phift.kernels: the fused LoRA op against float64 math, its dropout, and the dispatch rule.

GPU tests need CUDA and build the extension on first use (about a minute); on CPU they skip.
"""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import phift.kernels as kernels
from conftest import subprocess_env
from phift.kernels import fused_applies, kernels_enabled, lora_linear

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused LoRA op needs a CUDA GPU")


def make_inputs(lead, d_in, d_out, rank, dtype, device, bias=True, x_grad=True):
    """Fresh random LoRA inputs, scaled so that the LoRA term is as large as the base term."""
    x = torch.randn(*lead, d_in, device=device).to(dtype)
    x[x == 0] = 1  # so that mask ⊙ x == 0 exactly where the mask dropped
    weight = (torch.randn(d_out, d_in, device=device) / math.sqrt(d_in)).to(dtype)
    b = torch.randn(d_out, device=device).to(dtype) if bias else None
    lora_A = (torch.randn(rank, d_in, device=device) / math.sqrt(d_in)).requires_grad_()
    lora_B = (torch.randn(d_out, rank, device=device) / math.sqrt(rank)).requires_grad_()
    return x.requires_grad_(x_grad), weight, b, lora_A, lora_B


def float64_lora(x, weight, bias, lora_A, lora_B, scaling, dy, keep=None, p=0.0):
    """y and (dx, dA, dB) in float64; `keep` is the dropout mask to apply (None: no dropout)."""
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, lora_A, lora_B))
    h = x64 if keep is None else x64 * keep / (1 - p)
    y = F.linear(x64, weight.double(), None if bias is None else bias.double())
    y = y + scaling * F.linear(F.linear(h, A64), B64)
    return y.detach(), torch.autograd.grad(y, (x64, A64, B64), dy.double())


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def assert_close(name, out, ref, tol=1e-2):
    assert not out.isnan().any(), f"{name} has NaN (an element left unwritten?)"
    err = rel_err(out, ref)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"


# ---------------------------------------------------------------- the PyTorch fallback (CPU, runs in CI)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_fallback_matches_float64_math(dtype, bias):
    x, w, b, A, B = make_inputs((3, 7), 64, 48, 4, dtype, "cpu", bias=bias)
    dy = torch.randn(3, 7, 48).to(dtype)
    y = lora_linear(x, w, b, A, B, 0.5, 0.1, training=False)
    grads = torch.autograd.grad(y, (x, A, B), dy)
    y_ref, grads_ref = float64_lora(x, w, b, A, B, 0.5, dy)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, out, ref in zip(("y", "dx", "dA", "dB"), (y, *grads), (y_ref, *grads_ref)):
        assert_close(name, out, ref, tol)
    assert grads[1].dtype == grads[2].dtype == torch.float32


def test_fallback_applies_dropout_only_in_training():
    x, w, b, A, B = make_inputs((5,), 32, 16, 4, torch.float32, "cpu")
    no_dropout = lora_linear(x, w, b, A, B, 0.5, 0.0, training=True)
    assert torch.equal(lora_linear(x, w, b, A, B, 0.5, 0.5, training=False), no_dropout)
    assert not torch.allclose(lora_linear(x, w, b, A, B, 0.5, 0.5, training=True), no_dropout)


def test_cpu_tensors_take_the_fallback_without_loading_the_extension(monkeypatch):
    monkeypatch.setattr(kernels, "_extension", lambda: pytest.fail("CPU tensors must not load the extension"))
    x, w, b, A, B = make_inputs((2, 3), 16, 8, 4, torch.bfloat16, "cpu")
    assert not fused_applies(x, w, b, A, B)
    assert lora_linear(x, w, b, A, B, 1.0, 0.0, training=True).shape == (2, 3, 8)


def test_the_switch_turns_every_op_or_single_ops_off(monkeypatch):
    monkeypatch.setattr(kernels, "_extension_module", object())  # as if the extension were loaded
    monkeypatch.setattr(kernels, "DISABLED", kernels.parse_disabled(""))
    assert kernels_enabled() and kernels_enabled("lora")
    monkeypatch.setattr(kernels, "DISABLED", kernels.parse_disabled("1"))
    assert not kernels_enabled() and not kernels_enabled("lora")
    monkeypatch.setattr(kernels, "DISABLED", kernels.parse_disabled("rotary, ce"))
    assert not kernels_enabled("rotary") and not kernels_enabled("ce")
    assert kernels_enabled("lora") and kernels_enabled()


def test_the_switch_is_read_from_the_environment_once_at_import(tmp_path):
    code = ("import os; import phift.kernels as k; os.environ['PHIFT_DISABLE_KERNELS'] = '0'; "
            "print(sorted(k.DISABLED))")
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(PHIFT_DISABLE_KERNELS="lora,ce"),
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "['ce', 'lora']", proc.stderr


def test_kernels_are_never_built_inside_a_forward(monkeypatch):
    """Until phift.kernels.load runs (at the start of a run), an op asks nothing of the extension."""
    monkeypatch.setattr(kernels, "_extension_module", kernels._NOT_LOADED)
    monkeypatch.setattr(kernels, "_extension", lambda: pytest.fail("the extension was loaded inside an op"))
    assert not kernels_enabled("lora")
    assert not kernels.load("cpu")


def test_per_op_switch_is_a_constant_under_torch_compile(monkeypatch):
    monkeypatch.setattr(kernels, "_extension_module", object())
    monkeypatch.setattr(kernels, "DISABLED", kernels.parse_disabled("rotary"))

    def f(x):
        return (x * 2 if kernels_enabled("lora") else x) + (x * 10 if kernels_enabled("rotary") else x)

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True)(torch.ones(3)), torch.full((3,), 3.0))


# ---------------------------------------------------------------- the fused op (CUDA)

@pytest.fixture(scope="module")
def fused_op(phift_extension):
    return torch.ops.phift.lora_linear_fused


def keep_mask(rng, shape, p):
    """The dropout mask (1 kept, 0 dropped) that the op draws from Philox state `rng` for an input of `shape`, read
    back through its backward: with W = 0 and A, B, dy all ones, dx = mask ⊙ (g A) is nonzero exactly where kept."""
    rows, d_in = math.prod(shape[:-1]), shape[-1]
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    dy, x, su, w = (torch.ones(rows, 8, **bf16), torch.ones(rows, d_in, **bf16), torch.zeros(rows, 8, **bf16),
                    torch.zeros(8, d_in, **bf16))
    A, B = torch.ones(1, d_in, device="cuda"), torch.ones(8, 1, device="cuda")
    dx, _, _ = torch.ops.phift.lora_linear_fused_backward(dy, x, su, rng, w, A, B, 1.0, p, True)
    return (dx != 0).double().view(shape)


def run_fused(op, x, weight, bias, lora_A, lora_B, scaling, p, dy):
    """The op's y and gradients, and the dropout mask it used."""
    y, _, rng = op(x, weight, bias, lora_A, lora_B, scaling, p)
    wrt = (x, lora_A, lora_B) if x.requires_grad else (lora_A, lora_B)
    grads = torch.autograd.grad(y, wrt, dy)
    keep = keep_mask(rng, x.shape, p) if p > 0 else None
    return y, grads, keep


SHAPES = [  # (leading shape, in, out, rank): Phi-1.5's Wqkv, fc1 and fc2, odd token counts, a batch shape
    ((6144,), 2048, 6144, 8),
    ((1,), 2048, 6144, 8),
    ((7,), 2048, 6144, 4),
    ((1001,), 2048, 8192, 16),
    ((3, 341), 8192, 2048, 8),
    ((257,), 2048, 6144, 64),
    ((64,), 8192, 2048, 32),
]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead,d_in,d_out,rank", SHAPES)
def test_fused_op_matches_float64_with_the_mask_it_used(lead, d_in, d_out, rank, bias, p, dtype, fused_op,
                                                        poisoned_memory):
    # the gradients come from a mask regenerated in backward: matching the forward's mask is part of the check
    x, w, b, A, B = make_inputs(lead, d_in, d_out, rank, dtype, "cuda", bias=bias)
    dy = torch.randn(*lead, d_out, device="cuda").to(dtype)
    y, grads, keep = run_fused(fused_op, x, w, b, A, B, 0.5, p, dy)
    y_ref, grads_ref = float64_lora(x, w, b, A, B, 0.5, dy, keep, p)
    for name, out, ref in zip(("y", "dx", "dA", "dB"), (y, *grads), (y_ref, *grads_ref)):
        assert_close(name, out, ref)
    assert grads[1].dtype == grads[2].dtype == torch.float32


@needs_cuda
def test_fused_op_without_input_grad_still_gives_adapter_grads(fused_op, poisoned_memory):
    x, w, b, A, B = make_inputs((513,), 2048, 6144, 8, torch.bfloat16, "cuda", x_grad=False)
    dy = torch.randn(513, 6144, device="cuda").to(torch.bfloat16)
    _, grads, keep = run_fused(fused_op, x, w, b, A, B, 2.0, 0.1, dy)
    _, (_, dA_ref, dB_ref) = float64_lora(x, w, b, A, B, 2.0, dy, keep, 0.1)
    assert_close("dA", grads[0], dA_ref)
    assert_close("dB", grads[1], dB_ref)


@needs_cuda
def test_fused_backward_is_reproducible_bit_for_bit(fused_op):
    # dA sums per-block partials in a fixed order (no float atomics)
    x, w, b, A, B = (t.detach() for t in make_inputs((6144,), 2048, 6144, 8, torch.bfloat16, "cuda"))
    dy = torch.randn(6144, 6144, device="cuda").to(torch.bfloat16)
    _, su, rng = fused_op(x, w, b, A, B, 0.5, 0.1)
    first, second = (torch.ops.phift.lora_linear_fused_backward(dy, x, su, rng, w, A, B, 0.5, 0.1, True)
                     for _ in range(2))
    for name, out, again in zip(("dx", "dA", "dB"), first, second):
        assert torch.equal(out, again), f"{name} differs between two runs on the same inputs"


@needs_cuda
def test_training_forward_keeps_no_masked_copy_of_x(fused_op):
    # backward regenerates mask ⊙ x from x itself: the forward leaves behind only y, s·u and the Philox state
    x, w, b, A, B = make_inputs((2048,), 2048, 256, 8, torch.bfloat16, "cuda")
    lora_linear(x, w, b, A, B, 0.5, 0.1, training=True)  # builds the cached [W | s·B] outside the measurement
    before = torch.cuda.memory_allocated()
    y = lora_linear(x, w, b, A, B, 0.5, 0.1, training=True)
    kept = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
    assert kept < x.numel() * x.element_size() / 8, f"the forward keeps {kept} bytes beyond y"


@needs_cuda
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fused_dropout_keeps_one_minus_p(p, fused_op):
    x, w, b, A, B = make_inputs((6144,), 2048, 64, 8, torch.bfloat16, "cuda", x_grad=False)
    keep = keep_mask(fused_op(x, w, b, A, B, 1.0, p)[2], x.shape, p)
    kept = keep.mean().item()
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    assert abs(kept - (1 - p)) < 6 * sigma + 2 ** -16


@needs_cuda
def test_fused_dropout_mask_is_fresh_per_call_and_follows_the_seed(fused_op):
    x, w, b, A, B = make_inputs((64,), 256, 64, 8, torch.bfloat16, "cuda", x_grad=False)

    def mask():
        return keep_mask(fused_op(x, w, b, A, B, 1.0, 0.5)[2], x.shape, 0.5)

    torch.manual_seed(0)
    first, second = mask(), mask()
    torch.manual_seed(0)
    assert not torch.equal(first, second)
    assert torch.equal(mask(), first)


@needs_cuda
def test_dispatch_takes_the_fused_op_for_supported_cuda_inputs(monkeypatch):
    x, w, b, A, B = make_inputs((5,), 64, 32, 8, torch.bfloat16, "cuda")
    assert fused_applies(x, w, b, A, B)
    monkeypatch.setattr(kernels, "lora_linear_reference", lambda *a: pytest.fail("took the fallback"))
    lora_linear(x, w, b, A, B, 1.0, 0.1, training=True)


@needs_cuda
def test_dispatch_falls_back_for_what_the_kernels_do_not_cover():
    x, w, b, A, B = make_inputs((5,), 64, 32, 8, torch.bfloat16, "cuda")
    assert not fused_applies(x.float(), w.float(), b.float(), A, B)  # fp32
    assert not fused_applies(x, w.clone().requires_grad_(), b, A, B)  # a trainable base
    x_odd, w_odd, b_odd, A_odd, B_odd = make_inputs((5,), 60, 32, 8, torch.bfloat16, "cuda")
    assert not fused_applies(x_odd, w_odd, b_odd, A_odd, B_odd)  # in_features not a multiple of 8
    x_r, w_r, b_r, A_r, B_r = make_inputs((5,), 64, 32, kernels.MAX_KERNEL_RANK + 1, torch.bfloat16, "cuda")
    assert not fused_applies(x_r, w_r, b_r, A_r, B_r)  # rank above MAX_KERNEL_RANK


@needs_cuda
def test_env_var_forces_the_fallback_on_cuda(monkeypatch):
    monkeypatch.setattr(kernels, "DISABLED", kernels.parse_disabled("1"))
    x, w, b, A, B = make_inputs((5,), 64, 32, 8, torch.bfloat16, "cuda")
    assert not fused_applies(x, w, b, A, B)


@needs_cuda
def test_eval_mode_is_deterministic_on_the_fused_path():
    x, w, b, A, B = make_inputs((9,), 256, 64, 8, torch.bfloat16, "cuda")
    first = lora_linear(x, w, b, A, B, 1.0, 0.5, training=False)
    assert torch.equal(first, lora_linear(x, w, b, A, B, 1.0, 0.0, training=True))


@needs_cuda
def test_torch_compile_traces_the_op_without_graph_breaks():
    x, w, b, A, B = make_inputs((4, 33), 256, 192, 8, torch.bfloat16, "cuda")
    dy = torch.randn(4, 33, 192, device="cuda").to(torch.bfloat16)

    def forward(x, lora_A, lora_B):
        return lora_linear(x, w, b, lora_A, lora_B, 0.5, 0.0, training=True)

    y = torch.compile(forward, fullgraph=True)(x, A, B)
    y_eager = forward(x, A, B)
    assert torch.equal(y, y_eager)
    grads = torch.autograd.grad(y, (x, A, B), dy)
    for out, ref in zip(grads, torch.autograd.grad(y_eager, (x, A, B), dy)):
        assert torch.equal(out, ref)


@needs_cuda
def test_op_registration_passes_opcheck(fused_op):
    x, w, b, A, B = make_inputs((3, 5), 64, 48, 8, torch.bfloat16, "cuda")
    torch.library.opcheck(fused_op.default, (x, w, b, A, B, 0.5, 0.0))


@needs_cuda
def test_a_lora_base_weight_lives_in_the_ops_matrix_and_is_never_copied(phift_extension):
    """On CUDA a LoRALinear's half W moves into a [W | s·B] matrix of its own (kernels.home_lora_weights): the op
    multiplies by that matrix, where a weight elsewhere costs it a kept copy. Same outputs and gradients either way,
    merged, unmerged and with the adapter off."""
    from phift import lora

    torch.manual_seed(0)
    base = torch.nn.Linear(2048, 6144, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    homed = lora.LoRALinear(base, r=8, alpha=16)
    assert kernels.home_lora_weights(homed) == 1  # as phift train does without DeepSpeed
    assert homed.weight.stride() == (2048 + kernels.FUSED_EXTRA_COLUMNS, 1)
    elsewhere = lora.LoRALinear(torch.nn.Linear(2048, 6144, device="cuda", dtype=torch.bfloat16), r=8, alpha=16)
    elsewhere.weight.data = homed.weight.detach().clone(memory_format=torch.contiguous_format)  # a plain weight
    elsewhere.bias.data.copy_(homed.bias)
    with torch.no_grad():
        torch.nn.init.normal_(homed.lora_B)
        elsewhere.lora_A.copy_(homed.lora_A)
        elsewhere.lora_B.copy_(homed.lora_B)
    x = torch.randn(512, 2048, device="cuda", dtype=torch.bfloat16)
    grown = {}
    for name, module in (("homed", homed), ("elsewhere", elsewhere)):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = module(x)
        del y
        torch.cuda.synchronize()
        grown[name] = torch.cuda.memory_allocated() - before
    w_bytes = 6144 * 2048 * 2
    assert grown["homed"] < w_bytes / 8 <= w_bytes <= grown["elsewhere"], grown
    dy = torch.randn(512, 6144, device="cuda", dtype=torch.bfloat16)
    outs = []
    for module in (homed, elsewhere):
        xi = x.clone().requires_grad_()
        y = module(xi)
        outs.append((y, *torch.autograd.grad(y, (xi, module.lora_A, module.lora_B), dy)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    for module in (homed, elsewhere):
        module.merge()
    assert torch.equal(homed(x), elsewhere(x))
    for module in (homed, elsewhere):
        module.unmerge()
    with lora.disabled(homed), lora.disabled(elsewhere):
        assert torch.equal(homed(x), elsewhere(x))
