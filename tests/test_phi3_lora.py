"""LoRA on Phi-3 shapes: its fused projections as targets, merge, adapter files, and PEFT on transformers'
Phi3ForCausalLM, whose modules are phift's own (no splitting)."""
import copy
import json
import math

import pytest
import torch

from phift import kernels, lora
from phift.recompute import recompute
from phift.weights import load_model
from test_phi3 import hf_config

transformers = pytest.importorskip("transformers")
FOUR = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.fixture(params=["phi-3.5-mini", "phi-4-mini"])
def base_dir(request, tmp_path):
    """A Phi-3.5-mini or Phi-4-mini shape (grouped-query, tied) written by transformers."""
    torch.manual_seed(0)
    transformers.Phi3ForCausalLM(hf_config(request.param)).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in lora.lora_modules(model).values():
        m.lora_A.data = torch.randn(m.lora_A.shape, generator=g) * 0.1
        m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.1


def test_the_default_target_is_the_fused_qkv_projection_and_all_is_four(base_dir, caplog):
    model = load_model(base_dir)
    with caplog.at_level("INFO", logger="phift"):
        paths = lora.inject(model, "Wqkv", verbose=True)  # the --lora_target default, a phi recipe's
    assert paths == ["layers.0.attn.qkv_proj", "layers.1.attn.qkv_proj"]
    assert "lora_target Wqkv → qkv_proj (q/k/v are one fused qkv_proj projection)" in caplog.text
    everything = lora.inject(load_model(base_dir), "all", verbose=False)
    assert sorted({p.rsplit(".", 1)[-1] for p in everything}) == sorted(FOUR)
    assert "lm_head" not in " ".join(everything) and len(everything) == 8


def test_a_fresh_adapter_leaves_outputs_unchanged_and_a_merge_keeps_them(base_dir):
    model = load_model(base_dir).eval()
    x = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        before = model(x)
        lora.inject(model, "all", verbose=False)
        assert torch.equal(model(x), before)
        randomise(model)
        adapted = model(x)
        lora.set_merged(model, True)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)


def test_only_adapters_train_and_the_tied_embedding_stays(base_dir):
    model = load_model(base_dir)
    lora.inject(model, "all", verbose=False)
    randomise(model)
    x = torch.randint(0, 128, (2, 20))
    model(x, labels=x).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in name), name


def test_a_peft_export_gives_the_same_logits_in_peft(base_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model = load_model(base_dir).eval()
    lora.inject(model, "all", r=4, alpha=8, verbose=False)
    randomise(model)
    lora.export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(FOUR) and cfg["base_model_name_or_path"] == str(base_dir.resolve())
    hf = transformers.Phi3ForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    x = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() <= 1e-4


PEFT_CASES = {
    "qkv": dict(target_modules=["qkv_proj"]),
    "all_four": dict(target_modules=FOUR),
    "rslora": dict(target_modules=FOUR, use_rslora=True),
    "patterns": dict(target_modules=FOUR, rank_pattern={"qkv_proj": 2, "model.layers.1.mlp.gate_up_proj": 6},
                     alpha_pattern={"down_proj": 3, "o_proj": 5}),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_a_peft_adapter_gives_the_logits_it_gives_in_peft(base_dir, tmp_path, make_peft_adapter, case):
    peft_model = make_peft_adapter(base_dir, tmp_path / "peft", r=4, lora_alpha=8, **PEFT_CASES[case])
    ours = load_model(base_dir).eval()
    lora.load_adapter(ours, tmp_path / "peft", trainable=False)
    assert all(len(m.parts) == 1 for m in lora.lora_modules(ours).values())  # one module each: nothing to stack
    x = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert (peft_model(x).logits - ours(x)).abs().max() <= 1e-5


def test_an_adapter_round_trips_through_phift_and_peft_files(base_dir, tmp_path):
    model = load_model(base_dir).eval()
    lora.inject(model, "qkv_proj,down_proj", r=4, alpha=8, use_rslora=True, verbose=False)
    randomise(model)
    x = torch.randint(0, 128, (1, 20))
    for write in (lora.save_adapter, lora.export_peft):
        write(model, tmp_path / write.__name__)
        fresh = load_model(base_dir).eval()
        lora.load_adapter(fresh, tmp_path / write.__name__)
        with torch.no_grad():
            assert torch.equal(fresh(x), model(x)), write.__name__


@pytest.mark.parametrize("reentrant", [True, False])
def test_recomputation_under_lora_gives_the_adapters_the_same_gradients(base_dir, reentrant):
    model = load_model(base_dir).train()
    lora.inject(model, "all", r=4, alpha=8, dropout=0.1, verbose=False)
    randomise(model)
    x = torch.randint(0, 128, (2, 20))

    def grads(m):
        torch.manual_seed(7)
        m(x, labels=x).backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    plain, recomputed = grads(model), grads(recompute(copy.deepcopy(model), reentrant=reentrant))
    assert plain.keys() == recomputed.keys() and all(g.abs().sum() > 0 for g in plain.values())
    for name, g in plain.items():
        torch.testing.assert_close(recomputed[name], g, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name, in_features, out_features", [("qkv_proj", 3072, 9216), ("o_proj", 3072, 3072),
                                                             ("gate_up_proj", 3072, 16384),
                                                             ("down_proj", 8192, 3072)])
def test_the_fused_lora_op_serves_phi3_5_minis_projections(phift_extension, name, in_features, out_features):
    """Phi-3.5-mini's bias-free projections in bf16, rank 8: the fused op runs and equals the PyTorch math."""
    torch.manual_seed(0)
    base = torch.nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = lora.LoRALinear(base, r=8, alpha=16, dropout=0.0)
    torch.nn.init.normal_(layer.lora_B, std=0.02)
    x = torch.randn(2, 64, in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert kernels.fused_applies(x, layer.weight, None, layer.lora_A, layer.lora_B)
    y = layer(x)
    ref = kernels.lora_linear_reference(x, layer.weight, None, layer.lora_A, layer.lora_B, layer.scaling, 0.0, True)
    scale = ref.abs().max().item()
    assert (y - ref).abs().max().item() <= 2e-2 * scale + 1e-3
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), dy)
    ref_grads = torch.autograd.grad(ref, (x, layer.lora_A, layer.lora_B), dy)
    for got, want in zip(grads, ref_grads):
        assert (got.float() - want.float()).abs().max() <= 3e-2 * want.float().abs().max() + 1e-3
    assert math.isfinite(y.float().sum().item())
