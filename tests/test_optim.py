"""phift.optim.MasterAdamW (--pure_bf16): fp32 master weights of bf16 parameters, against torch's AdamW on fp32
copies, through the fused ops (C++ on the CPU, CUDA on a GPU) and the PyTorch fallback; the fused ops against
float64 (the CUDA ones skip without a GPU).
"""
import io

import pytest
import torch

from phift import kernels
from phift.optim import MasterAdamW, clip_coefficient

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused AdamW op needs a CUDA GPU")
HYPER = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-6}


def half_params(dtype=torch.bfloat16, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 8), (8,), (5, 3), (1,)]  # a matrix, a bias, odd sizes (the kernel's scalar tail)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype)) for s in shapes]


def groups(params, weight_decay=0.1):
    return [{"params": [p for p in params if p.ndim == 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def fill_grads(params, step, scale=3.0):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = (scale * torch.randn(p.shape, generator=g)).to(device=p.device, dtype=p.dtype)


@pytest.fixture(params=[pytest.param("fused", marks=pytest.mark.integration), "fallback"])
def path(request, monkeypatch):
    """Each test of MasterAdamW runs through the fused op (the CPU extension here) and through the fallback."""
    if request.param == "fallback":
        monkeypatch.setattr(kernels, "DISABLED", kernels.parse_disabled("adamw"))
    elif not kernels.cpu_kernels_enabled("adamw"):
        pytest.skip("phift's CPU extension could not be built here (no C++ compiler?)")
    return request.param


def test_matches_torch_adamw_on_fp32_copies_with_clipping_and_decay(path):
    params = half_params()
    ref = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt = MasterAdamW(groups(params), **HYPER)
    ref_opt = torch.optim.AdamW(groups(ref), foreach=False, **HYPER)
    for step in range(6):
        fill_grads(params, step)
        for r, p in zip(ref, params):
            r.grad = p.grad.float()  # the same bf16 gradient, as fp32 weights under autocast would get it
        norm, coef = clip_coefficient(params, max_norm=1.0)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
        assert coef.item() < 1.0  # the gradients were large: clipping is exercised
        opt.step(clip_coef=coef)
        ref_opt.step()
    for p, r in zip(params, ref):
        master = opt.state[p]["master"]
        assert master.dtype == torch.float32
        torch.testing.assert_close(master, r.detach(), rtol=2e-6, atol=2e-7)
        assert torch.equal(p.detach(), master.to(p.dtype))  # the model holds the rounded master
        assert not torch.equal(p.detach().float(), master)  # ...which bf16 alone could not hold


def test_no_clip_coefficient_means_unclipped_and_infinite_max_norm_gives_one(path):
    params = half_params()
    fill_grads(params, 0)
    _, coef = clip_coefficient(params, float("inf"))
    assert coef.item() == 1.0
    a, b = MasterAdamW(groups(params), **HYPER), None
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for t, p in zip(twins, params):
        t.grad = p.grad.clone()
    b = MasterAdamW(groups(twins), **HYPER)
    a.step()
    b.step(clip_coef=coef)
    assert all(torch.equal(p, t) for p, t in zip(params, twins))


def test_state_dict_round_trip_keeps_fp32_masters_and_continues_identically(path):
    params = half_params()
    opt = MasterAdamW(groups(params), **HYPER)
    for step in range(3):
        fill_grads(params, step)
        opt.step(clip_coef=clip_coefficient(params, 1.0)[1])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]  # as reloaded from a bf16 checkpoint
    resumed = MasterAdamW(groups(clones), **HYPER)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for p, c in zip(params, clones):
        for name in ("master", "exp_avg", "exp_avg_sq"):
            assert resumed.state[c][name].dtype == torch.float32, name
            assert torch.equal(resumed.state[c][name], opt.state[p][name]), name
    for step in range(3, 5):
        fill_grads(params, step)
        fill_grads(clones, step)
        opt.step(clip_coef=clip_coefficient(params, 1.0)[1])
        resumed.step(clip_coef=clip_coefficient(clones, 1.0)[1])
    assert all(torch.equal(p, c) for p, c in zip(params, clones))


def test_a_non_finite_gradient_norm_skips_the_step(path):
    params = half_params()
    opt = MasterAdamW(groups(params), **HYPER)
    fill_grads(params, 0)
    opt.step(clip_coef=clip_coefficient(params, 1.0)[1])
    before = [p.detach().clone() for p in params], {k: {n: t.clone() for n, t in s.items()} for k, s in
                                                      opt.state.items()}
    for bad in (float("nan"), float("inf")):
        fill_grads(params, 1)
        params[1].grad[0] = bad
        norm, coef = clip_coefficient(params, 1.0)
        assert not torch.isfinite(norm) and torch.isnan(coef)
        opt.step(clip_coef=coef)
        assert all(torch.equal(a, p) for a, p in zip(before[0], params))
        for p, saved in before[1].items():  # on the CPU the host knows it for free: not even the count moves
            assert all(torch.equal(t, opt.state[p][n]) for n, t in saved.items())


def step_with_coefficient(device, coef) -> bool:
    """One adamw_master_ call over fresh tensors with clip_coef `coef`: did it leave every tensor as it was?"""
    tensors = [[t.to(device) for t in (w.detach(), torch.randn(w.shape).to(w.dtype), w.detach().float(),
                                       torch.zeros(w.shape), torch.ones(w.shape))] for w in half_params()]
    before = [[t.clone() for t in ts] for ts in tensors]
    kernels.adamw_master_(*map(list, zip(*tensors)), torch.tensor(coef, device=device), 1e-3, 0.9, 0.999, 1e-8, 0.1,
                          [2.0] * len(tensors))
    return all(torch.equal(a, b) for ts, bs in zip(tensors, before) for a, b in zip(ts, bs))


@pytest.mark.parametrize("coef", [float("nan"), float("inf")])
def test_the_update_leaves_every_tensor_as_it_was_for_a_non_finite_coefficient(path, coef):
    assert step_with_coefficient("cpu", coef) and not step_with_coefficient("cpu", 0.5)


@pytest.mark.parametrize("coef", [float("nan"), float("inf")])
def test_the_fused_ops_leave_every_tensor_as_they_were_for_a_non_finite_coefficient(fused_device, coef, monkeypatch):
    monkeypatch.setattr(kernels, "DISABLED", kernels.parse_disabled(""))
    assert step_with_coefficient(fused_device, coef) and not step_with_coefficient(fused_device, 0.5)


def test_refuses_fp32_parameters():
    with pytest.raises(ValueError, match="half-precision parameters; got torch.float32 for a parameter of shape"):
        MasterAdamW([torch.nn.Parameter(torch.zeros(2, 2))])


def float64_reference(w, g, p, m, v, coef, lr, beta1, beta2, eps, wd, step):
    g = g.double() * (1.0 if coef is None else coef.double())
    p, m, v = p.double(), m.double(), v.double()
    p = p - lr * wd * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p - lr / (1 - beta1 ** step) * m / (v.sqrt() / (1 - beta2 ** step) ** 0.5 + eps)
    return p, m, v


@pytest.fixture(params=[pytest.param("cpu", marks=pytest.mark.integration), pytest.param("cuda", marks=needs_cuda)])
def fused_device(request):
    """A device whose fused AdamW op is built: the CPU extension, or the CUDA one."""
    if request.param == "cuda":
        request.getfixturevalue("phift_extension")
    elif not kernels.cpu_kernels_enabled("adamw"):
        pytest.skip("phift's CPU extension could not be built here (no C++ compiler?)")
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("clip", [None, 0.37])
def test_fused_op_against_float64(fused_device, dtype, clip, monkeypatch):
    monkeypatch.setattr(kernels, "DISABLED", kernels.parse_disabled(""))
    device = fused_device
    torch.manual_seed(0)
    sizes = [1, 3, 4, 1027, 8192 * 3 + 5]
    weights, grads, masters, ms, vs = [], [], [], [], []
    for i, n in enumerate(sizes):
        offset = i % 2  # odd tensors start one element into their storage: the unaligned (scalar) kernel
        w = torch.empty(n + offset, device=device, dtype=dtype)[offset:]
        g = torch.empty(n + offset, device=device, dtype=dtype)[offset:]
        g.copy_(torch.randn(n, device=device))
        p = torch.randn(n + offset, device=device)[offset:]
        w.copy_(p)
        weights.append(w), grads.append(g), masters.append(p)
        ms.append(0.1 * torch.randn(n, device=device)), vs.append(torch.rand(n, device=device))
    coef = None if clip is None else torch.tensor(clip, device=device)
    steps = [float(3 + i) for i in range(len(sizes))]
    expected = [float64_reference(*t, coef, 1e-3, 0.9, 0.999, 1e-8, 0.1, s)
                for *t, s in zip(weights, grads, masters, ms, vs, steps)]
    assert kernels.adamw_fused_applies(weights, grads, masters, ms, vs, coef)
    kernels.adamw_master_(weights, grads, masters, ms, vs, coef, 1e-3, 0.9, 0.999, 1e-8, 0.1, steps)
    # fp32 against float64: β·m + (1 − β)·g can cancel to near 0, leaving the rounding of its terms (a few ulps of
    # values up to ~0.5, 3e-8 each: the H200 run saw up to 6e-8), and v lies in [0, 1), an ulp of 6e-8 to 1.2e-7
    # (a CPU emulation of the kernel's operation order reached 1.7e-7). Hence absolute tolerances of 2e-7 (m) and
    # 4e-7 (v); a wrong formula or a wrong element errs by orders of magnitude more.
    for w, p, m, v, (ep, em, ev) in zip(weights, masters, ms, vs, expected):
        torch.testing.assert_close(p.double(), ep, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m.double(), em, rtol=1e-6, atol=2e-7)
        torch.testing.assert_close(v.double(), ev, rtol=1e-6, atol=4e-7)
        assert torch.equal(w, p.to(dtype))


@needs_cuda
def test_fused_and_fallback_steps_agree_on_a_model(phift_extension, monkeypatch):
    def run(disable):
        monkeypatch.setattr(kernels, "DISABLED", kernels.parse_disabled("adamw" if disable else "0"))
        params = half_params(device="cuda")
        opt = MasterAdamW(groups(params), **HYPER)
        assert kernels.adamw_fused_applies([p.data for p in params], [torch.empty_like(p) for p in params],
                                           [p.float() for p in params], [p.float() for p in params],
                                           [p.float() for p in params], None) != disable
        for step in range(4):
            fill_grads(params, step)
            opt.step(clip_coef=clip_coefficient(params, 1.0)[1])
        return [opt.state[p]["master"] for p in params]

    for fused, fallback in zip(run(False), run(True)):
        torch.testing.assert_close(fused, fallback, rtol=1e-6, atol=1e-7)
