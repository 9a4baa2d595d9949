"""phift.kernels.cross_entropy_grad_: the per-row loss and softmax − onehot, fused op and fallback, against float64.

GPU tests need CUDA and build the extension on first use (about a minute); on CPU they skip.
"""

import pytest
import torch
import torch.nn.functional as F

from phift import kernels
from phift.config import PhiConfig
from phift.kernels import cross_entropy_fused_applies, cross_entropy_grad_
from phift.model import IGNORE_INDEX, LMHead, Phi

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused cross-entropy op needs a CUDA GPU")


def make_inputs(rows, vocab, dtype, device, offset=0):
    """Random logits and labels: every 7th row has a dominant label logit, every 5th row is ignored and holds NaN
    (nothing may read it). `offset` elements of storage before the logits move their rows off the 16-byte grid."""
    logits = torch.empty(offset + rows * vocab, dtype=dtype, device=device)[offset:].view(rows, vocab)
    logits.copy_(3 * torch.randn(rows, vocab, device=device))
    labels = torch.randint(0, vocab, (rows,), device=device)
    confident = torch.arange(0, rows, 7, device=device)
    logits[confident, labels[confident]] += 20
    labels[::5] = IGNORE_INDEX
    logits[::5] = float("nan")
    return logits, labels


def float64_cross_entropy(logits, labels):
    """F.cross_entropy per row in float64, and the gradient of their sum w.r.t. the logits."""
    x = logits.double().masked_fill((labels == IGNORE_INDEX)[:, None], 0).requires_grad_()
    loss = F.cross_entropy(x, labels, ignore_index=IGNORE_INDEX, reduction="none")
    return loss.detach(), torch.autograd.grad(loss.sum(), x)[0]


def assert_close(name, out, ref, rtol, atol):
    """Element by element, so that a single element left unwritten (still holding its logit) fails.

    atol covers fp32's own error: exp(x − lse) with lse (about 35 here) rounded to fp32 is off by about 2e-6."""
    assert not out.isnan().any(), f"{name} has NaN (unwritten, or an ignored row was read)"
    excess = ((out.double() - ref).abs() - rtol * ref.abs()).max().item()
    assert excess <= atol, f"{name}: an element is off by {excess:.2e} beyond rtol {rtol}"


# ---------------------------------------------------------------- the PyTorch fallback (CPU, runs in CI)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fallback_matches_float64_cross_entropy(dtype):
    logits, labels = make_inputs(13, 101, dtype, "cpu")
    loss, g = cross_entropy_grad_(logits, labels, write_grad=True)
    loss_ref, g_ref = float64_cross_entropy(logits, labels)
    assert loss.dtype == g.dtype == torch.float32  # computed on an fp32 copy whatever the logits' dtype
    assert_close("loss", loss, loss_ref, 1e-5, 1e-5)
    assert_close("gradient", g, g_ref, 1e-5, 1e-5)


def test_fallback_gives_ignored_rows_zero_loss_and_zero_gradient():
    logits, labels = make_inputs(10, 32, torch.float32, "cpu")
    loss, g = cross_entropy_grad_(logits, labels, write_grad=True)
    ignored = labels == IGNORE_INDEX
    assert torch.equal(loss[ignored], torch.zeros(2)) and torch.equal(g[ignored], torch.zeros(2, 32))


def test_fallback_without_write_grad_gives_the_loss_only_and_keeps_the_logits():
    logits, labels = make_inputs(10, 32, torch.bfloat16, "cpu")
    before = logits.clone()
    loss, g = cross_entropy_grad_(logits, labels, write_grad=False)
    assert g is None and torch.equal(loss, cross_entropy_grad_(logits, labels, write_grad=True)[0])
    assert torch.equal(logits.nan_to_num(), before.nan_to_num())


def test_cpu_logits_take_the_fallback_without_loading_the_extension(monkeypatch):
    monkeypatch.setattr(kernels, "_extension", lambda: pytest.fail("CPU tensors must not load the extension"))
    logits, labels = make_inputs(4, 16, torch.bfloat16, "cpu")
    assert not cross_entropy_fused_applies(logits, labels)
    assert cross_entropy_grad_(logits, labels, write_grad=True)[1].shape == (4, 16)


# ---------------------------------------------------------------- the fused op (CUDA)

@pytest.fixture(scope="module")
def fused_op(phift_extension):
    return torch.ops.phift.cross_entropy_grad_


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("vocab", [51200, 50295, 100, 8])  # phi's, odd, a tiny model's, fewer than a warp
def test_fused_op_matches_float64(vocab, offset, dtype, fused_op, poisoned_memory):
    logits, labels = make_inputs(513, vocab, dtype, "cuda", offset)
    loss_ref, g_ref = float64_cross_entropy(logits, labels)
    loss = fused_op(logits, labels, IGNORE_INDEX, True)
    assert loss.dtype == torch.float32 and logits.dtype == dtype
    assert_close("loss", loss, loss_ref, 1e-5, 1e-4)
    assert_close("gradient", logits, g_ref, 1e-2, 1e-5)  # one rounding to fp16/bf16
    ignored = labels == IGNORE_INDEX
    assert (loss[ignored] == 0).all() and (logits[ignored] == 0).all()


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_op_without_write_grad_leaves_the_logits_alone(dtype, fused_op, poisoned_memory):
    logits, labels = make_inputs(101, 50295, dtype, "cuda")
    before = logits.clone()
    loss = fused_op(logits, labels, IGNORE_INDEX, False)
    assert torch.equal(logits.nan_to_num(), before.nan_to_num())
    assert_close("loss", loss, float64_cross_entropy(logits, labels)[0], 1e-5, 1e-4)


@needs_cuda
def test_dispatch_runs_the_fused_op_in_place_on_half_cuda_logits(fused_op):
    logits, labels = make_inputs(9, 100, torch.bfloat16, "cuda")
    assert cross_entropy_fused_applies(logits, labels)
    _, g = cross_entropy_grad_(logits, labels, write_grad=True)
    assert g.data_ptr() == logits.data_ptr() and g.dtype == torch.bfloat16


@needs_cuda
def test_dispatch_falls_back_for_what_the_kernel_does_not_cover(fused_op, monkeypatch):
    logits, labels = make_inputs(9, 100, torch.bfloat16, "cuda")
    assert not cross_entropy_fused_applies(logits.float(), labels)
    assert not cross_entropy_fused_applies(*make_inputs(2, kernels.MAX_KERNEL_VOCAB + 1, torch.bfloat16, "cuda"))
    monkeypatch.setattr(kernels, "DISABLED", kernels.parse_disabled("1"))
    assert not cross_entropy_fused_applies(logits, labels)


@needs_cuda
@pytest.mark.parametrize("chunk", [32, 128], ids=["chunks", "one-chunk"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_phi_loss_and_grads_with_the_fused_kernel_match_the_fallback(dtype, chunk, fused_op, monkeypatch):
    """32 rows a chunk: several, a ragged last one. 128: one chunk, whose half-precision logits' gradient (90 rows)
    is smaller than an fp32 lm_head gradient at hidden 64, so it is kept and gᵀh computed in backward; the fallback's
    fp32 gradient is not, so the two paths check each other."""
    monkeypatch.setattr(LMHead, "chunk_bytes", 4 * 1001 * chunk)
    torch.manual_seed(0)
    model = Phi(PhiConfig.from_name("tiny", vocab_size=1001)).to("cuda", dtype)  # an odd vocabulary
    x = torch.randint(0, 1001, (3, 40), device="cuda")
    labels = x.clone()
    labels[:, :10] = IGNORE_INDEX

    kept = []

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(x, labels=labels)
        kept.append(loss.grad_fn.keep_g)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    fused_calls, applies = [], kernels.cross_entropy_fused_applies

    def recording_applies(*args):
        fused_calls.append(applies(*args))
        return fused_calls[-1]

    monkeypatch.setattr(kernels, "cross_entropy_fused_applies", recording_applies)
    loss, grads = loss_and_grads()
    assert fused_calls == [True] * (3 if chunk == 32 else 1)  # the fused op ran for each chunk of the 90 rows
    monkeypatch.setattr(kernels, "cross_entropy_fused_applies", applies)
    monkeypatch.setattr(kernels, "DISABLED", kernels.parse_disabled("1"))
    loss_ref, grads_ref = loss_and_grads()
    assert kept == [chunk == 128, False]

    assert abs(loss.item() - loss_ref.item()) < 1e-4 * loss_ref.item()
    for (name, _), g, ref in zip(model.named_parameters(), grads, grads_ref):
        assert not g.isnan().any(), name
        err = ((g.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < 1e-2, f"{name}: relative error {err:.2e}"
