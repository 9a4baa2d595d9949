"""phift.kernels.rotary_qkv: q, k, v out of the Wqkv output with q and k rotated, fused op and fallback, against
float64 rotation by each token's position.

GPU tests need CUDA and build the extension on first use (about a minute); on CPU they skip.
"""

import pytest
import torch

from phift import kernels
from phift.config import PhiConfig
from phift.kernels import apply_rotary, rotary_fused_applies, rotary_qkv
from phift.model import Attention, KVCache, Phi, rotary_cos_sin

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused rotary op needs a CUDA GPU")

THETA = 10000.0

POSITIONS = {  # [2, 7] position ids
    "arange": torch.arange(7).expand(2, 7),
    "left_padding": torch.tensor([[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]]),  # as Phi counts them under a mask
    "packed": torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4]]),  # each sample restarts at 0
}


def make_inputs(B, T, H, D, rd, dtype, device, positions=None):
    """A random Wqkv output [B, T, 3·H·D] that requires grad, and cos, sin for the positions (random by default)."""
    qkv = torch.randn(B, T, 3 * H * D, device=device).to(dtype).requires_grad_()
    if positions is None:
        positions = torch.randint(0, 2048, (B, T))
    cos, sin = rotary_cos_sin(positions.to(device), rd, THETA)
    return qkv, cos, sin, positions


def float64_rotary_qkv(qkv, positions, num_heads, rd):
    """q, k, v [B, H, T, D] in float64: in each q and k head, the pair (i, i + rd/2) of the first rd dims turned by
    the angle position · THETA^(−2i/rd); the other dims and v untouched."""
    B, T, width = qkv.shape
    q, k, v = qkv.view(B, T, 3, num_heads, width // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    half = rd // 2
    exponent = -2 * torch.arange(half, dtype=torch.float64, device=qkv.device) / rd
    angle = positions.to(qkv.device, torch.float64)[:, None, :, None] * THETA ** exponent  # [B, 1, T, rd/2]

    def turn(x):
        a, b = x[..., :half], x[..., half:rd]
        return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin(), x[..., rd:]], -1)

    return turn(q), turn(k), v


def values_and_grads(qkv, cos, sin, num_heads, dqkv_out):
    out = rotary_qkv(qkv, cos, sin, num_heads)
    return out, torch.autograd.grad(out, qkv, dqkv_out)[0]


def float64_values_and_grads(qkv, positions, num_heads, rd, dqkv_out):
    qkv64 = qkv.detach().double().requires_grad_()
    out = float64_rotary_qkv(qkv64, positions, num_heads, rd)
    grad = torch.autograd.grad(out, qkv64, [g.double() for g in dqkv_out])[0]
    return [t.detach() for t in out], grad


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def assert_close(name, out, ref, tol):
    assert not out.isnan().any(), f"{name} has NaN (an element left unwritten?)"
    err = rel_err(out, ref)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"


def assert_matches_float64(qkv, cos, sin, positions, num_heads, rd, tol):
    dout = [torch.randn(qkv.shape[0], num_heads, qkv.shape[1], qkv.shape[2] // (3 * num_heads),
                        device=qkv.device).to(qkv.dtype) for _ in range(3)]
    out, grad = values_and_grads(qkv, cos, sin, num_heads, dout)
    out_ref, grad_ref = float64_values_and_grads(qkv, positions, num_heads, rd, dout)
    for name, o, r in zip("qkv", out, out_ref):
        assert o.dtype == qkv.dtype and o.shape == r.shape
        assert_close(name, o, r, tol)
    assert grad.dtype == qkv.dtype
    assert_close("dqkv", grad, grad_ref, tol)


# ---------------------------------------------------------------- the PyTorch fallback (CPU, runs in CI)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions", POSITIONS.keys())
@pytest.mark.parametrize("D,rd", [(16, 8), (16, 16)], ids=["rd<D", "rd==D"])
def test_fallback_matches_float64_rotation(D, rd, positions, dtype):
    qkv, cos, sin, pos = make_inputs(2, 7, 3, D, rd, dtype, "cpu", POSITIONS[positions])
    assert_matches_float64(qkv, cos, sin, pos, 3, rd, 1e-5 if dtype == torch.float32 else 1e-2)


def test_fallback_is_apply_rotary_on_views_of_qkv():
    qkv, cos, sin, _ = make_inputs(2, 7, 3, 16, 8, torch.bfloat16, "cpu", POSITIONS["packed"])
    q, k, v = qkv.view(2, 7, 3, 3, 16).permute(2, 0, 3, 1, 4).unbind(0)
    for out, ref in zip(rotary_qkv(qkv, cos, sin, 3), (apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)):
        assert torch.equal(out, ref)


def test_cpu_tensors_take_the_fallback_without_loading_the_extension(monkeypatch):
    monkeypatch.setattr(kernels, "_extension", lambda: pytest.fail("CPU tensors must not load the extension"))
    qkv, cos, sin, _ = make_inputs(2, 7, 3, 16, 8, torch.bfloat16, "cpu")
    assert not rotary_fused_applies(qkv, cos, sin, 3)
    assert [t.shape for t in rotary_qkv(qkv, cos, sin, 3)] == [(2, 3, 7, 16)] * 3


# ---------------------------------------------------------------- the fused op (CUDA)

@pytest.fixture(scope="module")
def fused_ops(phift_extension):
    return torch.ops.phift.rotary_qkv_fused, torch.ops.phift.rotary_qkv_fused_backward


SHAPES = [  # (B, T, H, D, rd)
    (2, 7, 4, 64, 32),
    (6, 1024, 32, 64, 32),  # phi-1_5 training batch
    (1, 5, 2, 80, 32),  # phi-2's head_dim
    (2, 7, 4, 64, 64),  # rd == D
    (3, 9, 4, 16, 8),  # the tiny preset: rd/2 not a whole 8-element vector
    (1, 5, 2, 64, 24),  # a vector straddling the two halves
    (2, 3, 2, 16, 6),  # cos rows off the 16-byte grid
    (1, 1, 2, 64, 32),  # one token, as when generating
]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,T,H,D,rd", SHAPES)
def test_fused_op_matches_float64(B, T, H, D, rd, dtype, fused_ops, poisoned_memory):
    qkv, cos, sin, pos = make_inputs(B, T, H, D, rd, dtype, "cuda")
    assert rotary_fused_applies(qkv, cos, sin, H)
    assert_matches_float64(qkv, cos, sin, pos, H, rd, 1e-2)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,T,H,D,rd", SHAPES)
def test_fused_op_gives_the_bits_of_the_pytorch_path(B, T, H, D, rd, dtype, fused_ops, monkeypatch):
    # the kernels round each product and sum to fp32 as PyTorch's eager ops do, then once to the input dtype
    qkv, cos, sin, _ = make_inputs(B, T, H, D, rd, dtype, "cuda")
    dout = [torch.randn(B, H, T, D, device="cuda").to(dtype) for _ in range(3)]
    out, grad = values_and_grads(qkv, cos, sin, H, dout)
    monkeypatch.setattr(kernels, "DISABLED", kernels.parse_disabled("1"))
    assert not rotary_fused_applies(qkv, cos, sin, H)
    out_ref, grad_ref = values_and_grads(qkv, cos, sin, H, dout)
    for name, o, r in zip("qkv", out, out_ref):
        assert torch.equal(o, r), f"{name} differs from the PyTorch path"
    assert torch.equal(grad, grad_ref), "dqkv differs from the PyTorch path"


@needs_cuda
def test_fused_outputs_are_views_of_one_buffer_with_head_dim_contiguous(fused_ops):
    qkv, cos, sin, _ = make_inputs(2, 7, 4, 64, 32, torch.bfloat16, "cuda")
    q, k, v = rotary_qkv(qkv, cos, sin, 4)
    base = q._base
    assert base is not None and base.shape == (3, 2, 7, 4, 64) and k._base is base and v._base is base
    assert q.stride() == k.stride() == v.stride() == (7 * 4 * 64, 64, 4 * 64, 1)


GRAD_LAYOUTS = {  # dq, dk, dv of shape [B, H, T, D] in the layouts SDPA or a caller may hand back
    "bhtd": lambda B, H, T, D, **kw: torch.randn(B, H, T, D, **kw),
    "bthd": lambda B, H, T, D, **kw: torch.randn(B, T, H, D, **kw).transpose(1, 2),
    "strided_d": lambda B, H, T, D, **kw: torch.randn(B, H, D, T, **kw).transpose(2, 3),  # D not contiguous
    "misaligned": lambda B, H, T, D, **kw: torch.randn(B * H * T * D + 1, **kw)[1:].view(B, H, T, D),
    "expanded": lambda B, H, T, D, **kw: torch.randn(1, H, T, D, **kw).expand(B, H, T, D),  # batch stride 0
}


@needs_cuda
@pytest.mark.parametrize("layout", GRAD_LAYOUTS.keys())
def test_fused_backward_reads_any_gradient_layout(layout, fused_ops, poisoned_memory):
    _, backward = fused_ops
    B, T, H, D, rd = 2, 7, 4, 64, 32
    _, cos, sin, _ = make_inputs(B, T, H, D, rd, torch.bfloat16, "cuda")
    grads = [GRAD_LAYOUTS[layout](B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    dqkv = backward(*grads, cos, sin)
    assert not dqkv.isnan().any()
    assert torch.equal(dqkv, backward(*[g.contiguous() for g in grads], cos, sin))


@needs_cuda
def test_op_registrations_pass_opcheck(fused_ops):
    forward, backward = fused_ops
    qkv, cos, sin, _ = make_inputs(2, 7, 4, 64, 32, torch.bfloat16, "cuda")
    torch.library.opcheck(forward.default, (qkv.detach(), cos, sin, 4))
    grads = [torch.randn(2, 7, 4, 64, device="cuda").to(torch.bfloat16).transpose(1, 2) for _ in range(3)]
    torch.library.opcheck(backward.default, (*grads, cos, sin))


@needs_cuda
def test_dispatch_falls_back_for_what_the_kernels_do_not_cover(fused_ops, monkeypatch):
    qkv, cos, sin, _ = make_inputs(2, 7, 4, 64, 32, torch.bfloat16, "cuda")
    assert rotary_fused_applies(qkv, cos, sin, 4)
    assert not rotary_fused_applies(qkv.float(), cos, sin, 4)  # fp32
    qkv_12, cos_12, sin_12, _ = make_inputs(2, 7, 4, 12, 8, torch.bfloat16, "cuda")
    assert not rotary_fused_applies(qkv_12, cos_12, sin_12, 4)  # head_dim not a multiple of 8
    assert not rotary_fused_applies(qkv, cos.clone().requires_grad_(), sin, 4)  # no gradient for cos
    assert not rotary_fused_applies(qkv, cos[..., :31], sin[..., :31], 4)  # odd rotary_dim
    wide_cos, wide_sin = torch.cat([cos, cos, cos], -1), torch.cat([sin, sin, sin], -1)  # 96 > head_dim 64
    assert not rotary_fused_applies(qkv, wide_cos, wide_sin, 4)
    monkeypatch.setattr(kernels, "DISABLED", kernels.parse_disabled("1"))
    assert not rotary_fused_applies(qkv, cos, sin, 4)


def phi_like(**overrides):
    return PhiConfig.from_name("tiny", vocab_size=128, max_position_embeddings=256, **overrides)


MODEL_CONFIGS = {"tiny": {}, "phi_heads": {"hidden_size": 128, "num_heads": 2, "rotary_dim": 32}}  # D=16 / D=64


@needs_cuda
@pytest.mark.parametrize("config", MODEL_CONFIGS.keys())
def test_phi_loss_and_grads_with_the_fused_rotary_match_the_fallback(config, fused_ops, monkeypatch):
    torch.manual_seed(0)
    model = Phi(phi_like(**MODEL_CONFIGS[config])).to("cuda", torch.bfloat16).train()
    x = torch.randint(0, 128, (3, 40), device="cuda")
    mask = torch.ones_like(x)
    mask[0, :9] = 0  # left padding: positions that are not an arange
    mask[2, 20:] = 2  # a second packed sample

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(x, labels=x, attention_mask=mask)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    monkeypatch.setattr(kernels, "apply_rotary", lambda *a: pytest.fail("took the PyTorch rotary"))
    loss, grads = loss_and_grads()
    monkeypatch.undo()
    monkeypatch.setattr(kernels, "DISABLED", kernels.parse_disabled("1"))
    loss_ref, grads_ref = loss_and_grads()

    assert abs(loss.item() - loss_ref.item()) < 1e-3 * loss_ref.item()
    for (name, _), g, ref in zip(model.named_parameters(), grads, grads_ref):
        assert_close(name, g, ref.double(), 1e-2)


@needs_cuda
def test_cached_decoding_with_the_fused_rotary_matches_the_fallback(fused_ops, monkeypatch):
    torch.manual_seed(0)
    config = phi_like(**MODEL_CONFIGS["phi_heads"])
    model = Phi(config).to("cuda", torch.bfloat16).eval()
    x = torch.randint(0, 128, (2, 12), device="cuda")

    @torch.no_grad()
    def decode():
        cache = KVCache(config, 2, 12, device="cuda", dtype=torch.bfloat16)
        logits = [model(x[:, :5], kv_cache=cache)] + [model(x[:, i:i + 1], kv_cache=cache) for i in range(5, 12)]
        return torch.cat(logits, dim=1).float()

    fused = decode()
    monkeypatch.setattr(kernels, "DISABLED", kernels.parse_disabled("1"))
    assert_close("logits", fused, decode().double(), 1e-2)


@needs_cuda
def test_torch_compile_traces_attention_without_graph_breaks(fused_ops, monkeypatch):
    torch.manual_seed(0)
    attn = Attention(phi_like(**MODEL_CONFIGS["phi_heads"]), layer=0).to("cuda", torch.bfloat16)
    x = torch.randn(2, 33, 128, device="cuda").to(torch.bfloat16).requires_grad_()
    cos, sin = rotary_cos_sin(torch.randint(0, 2048, (2, 33), device="cuda"), 32, THETA)
    dy = torch.randn(2, 33, 128, device="cuda").to(torch.bfloat16)
    monkeypatch.setattr(kernels, "apply_rotary", lambda *a: pytest.fail("traced the PyTorch rotary"))
    y = torch.compile(attn, fullgraph=True)(x, cos, sin)
    grad = torch.autograd.grad(y, x, dy)[0]
    y_eager = attn(x, cos, sin)
    assert_close("y", y, y_eager.double(), 1e-2)
    assert_close("dx", grad, torch.autograd.grad(y_eager, x, dy)[0].double(), 1e-2)
