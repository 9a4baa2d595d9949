"""Activation recomputation applied from outside the model: the same gradients, less memory, fewer FLOPs."""
import copy
import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from phift import lora
from phift.model import Phi
from phift.recompute import recompute


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    return Phi(tiny_config).train()


def grads_of_one_step(model, x, seed=None, dtype=None):
    """(FLOPs of one forward + backward, the trainable parameters' gradients), seeded when given (dropout draws the
    same masks), under CPU autocast to `dtype` when given."""
    model.zero_grad()
    if seed is not None:
        torch.manual_seed(seed)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        model(x, labels=x).backward()
    return counter.get_total_flops(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a, b):
    assert a and a.keys() == b.keys()
    for name, g in a.items():
        assert b[name].dtype == g.dtype
        torch.testing.assert_close(b[name], g, msg=name)


@pytest.mark.parametrize("policy, reentrant", [("full", True), ("full", False), ("mlp", False)])
def test_recomputation_gives_the_same_gradients(model, policy, reentrant):
    x = torch.randint(0, 128, (2, 12))
    recomputed = recompute(copy.deepcopy(model), policy, reentrant=reentrant)
    assert_same_grads(grads_of_one_step(model, x)[1], grads_of_one_step(recomputed, x)[1])


def test_recomputation_leaves_names_state_and_eval_untouched(model):
    x = torch.randint(0, 128, (2, 12))
    recomputed = recompute(copy.deepcopy(model), "full")
    assert [n for n, _ in recomputed.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert recomputed.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(recomputed.eval()(x), model.eval()(x))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("reentrant", [True, False])
def test_recomputed_blocks_skip_the_unread_gemms_with_the_same_gradients(model, tiny_config, reentrant, dtype):
    """A recomputed block skips out_proj's and fc2's forward GEMMs (nothing in backward reads their outputs): the
    step does exactly those FLOPs fewer than a plain recomputation, and every gradient is the same. (The plain
    non-reentrant recomputation already stops before fc2: torch ends it once the last saved tensor, fc2's input,
    is rebuilt. So there only out_proj's GEMM is saved.)"""
    x = torch.randint(0, 128, (2, 12))
    flops_full, grads_full = grads_of_one_step(recompute(copy.deepcopy(model), reentrant=reentrant, lean=False),
                                               x, dtype=dtype)
    flops_lean, grads_lean = grads_of_one_step(recompute(copy.deepcopy(model), reentrant=reentrant, lean=True),
                                               x, dtype=dtype)
    c = tiny_config
    per_token = 2 * c.hidden_size * c.hidden_size + (2 * c.intermediate_size * c.hidden_size if reentrant else 0)
    assert flops_full - flops_lean == per_token * x.numel() * c.num_layers
    assert len(grads_full) == len(list(model.parameters()))
    assert_same_grads(grads_full, grads_lean)


@pytest.mark.parametrize("reentrant", [True, False])
def test_recomputation_under_lora_gives_the_adapters_the_same_gradients(model, reentrant):
    """The frozen embedding's output needs no gradient; a reentrant checkpoint would then pass none on to the
    adapters. Dropout masks must come out the same in the recomputation."""
    lora.inject(model, "all", r=4, alpha=8, dropout=0.1, verbose=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # B starts at zero: A would get no gradient at all
    x = torch.randint(0, 128, (2, 12))
    plain = grads_of_one_step(model, x, seed=7)[1]
    assert all(g.abs().sum() > 0 for g in plain.values())
    assert_same_grads(plain, grads_of_one_step(recompute(copy.deepcopy(model), reentrant=reentrant), x, seed=7)[1])


def test_recomputation_replays_the_residual_dropout_masks(tiny_config):
    torch.manual_seed(0)
    model = Phi(dataclasses.replace(tiny_config, resid_pdrop=0.2, embd_pdrop=0.1)).train()
    x = torch.randint(0, 128, (2, 12))
    assert_same_grads(grads_of_one_step(model, x, seed=3)[1],
                      grads_of_one_step(recompute(copy.deepcopy(model), "full"), x, seed=3)[1])


def saved_activation_bytes(model, x) -> int:
    """Bytes of the tensors autograd keeps for backward outside checkpointed regions (parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, labels=x)
    return sum(seen.values())


def test_mlp_recomputation_keeps_less_than_none_and_more_than_full(model):
    x = torch.randint(0, 128, (2, 12))
    sizes = {"none": saved_activation_bytes(model, x)}
    for policy in ("mlp", "full"):
        sizes[policy] = saved_activation_bytes(recompute(copy.deepcopy(model), policy, reentrant=False), x)
    assert sizes["full"] < sizes["mlp"] < sizes["none"], sizes


def test_an_unknown_policy_is_an_error(model):
    with pytest.raises(ValueError, match="'full', 'mlp'"):
        recompute(model, "attention")
