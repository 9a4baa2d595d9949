"""Phi-3, Phi-3.5 and Phi-4-mini (phift.phi3): transformers' Phi3ForCausalLM's logits, losses, generation and
checkpoints, on random weights written by its own save_pretrained, at each published shape scaled down."""
import copy
import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from phift import families
from phift.config import PRESETS, LongRoPE, Phi3Config
from phift.generate import generate
from phift.phi3 import Phi3, rope_cos_sin
from phift.recompute import recompute
from phift.weights import load_model, save_model

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=96, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
ORIGINAL = 16  # original_max_position_embeddings: LongRoPE's long factors from 17 positions on


def longrope(pairs: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"type": "longrope", "short_factor": (1 + torch.rand(pairs, generator=g)).tolist(),
            "long_factor": (1 + 63 * torch.rand(pairs, generator=g)).sort().values.tolist()}


# The published shapes scaled down, keeping what changes the math: head_dim 16 (Phi-3's 96 and Phi-4-mini's 128 are
# as many multiples of the 8-element vectors the kernels move), full rotary or 0.75 of it, 1 or 3 query heads per
# key-value head, tied embeddings, the 4k model's sliding window (2047 of 4096 positions), the others' LongRoPE with
# max_position_embeddings 32 × the original length and a window beyond it.
SHAPES = {
    "phi-3-mini-4k": dict(num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=24,
                          original_max_position_embeddings=24, sliding_window=11),
    "phi-3-mini-128k": dict(num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32 * ORIGINAL,
                            original_max_position_embeddings=ORIGINAL, rope_scaling=longrope(8, 1),
                            sliding_window=64 * ORIGINAL),
    "phi-3.5-mini": dict(num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32 * ORIGINAL,
                         original_max_position_embeddings=ORIGINAL, rope_scaling=longrope(8, 2),
                         sliding_window=64 * ORIGINAL),
    "phi-4-mini": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, partial_rotary_factor=0.75,
                       max_position_embeddings=32 * ORIGINAL, original_max_position_embeddings=ORIGINAL,
                       rope_scaling=longrope(6, 3), sliding_window=64 * ORIGINAL, tie_word_embeddings=True),
}
# A shape with everything at once: LongRoPE, a window shorter than the original length, GQA, partial rotary, tying
SHAPES["all-at-once"] = {**SHAPES["phi-4-mini"], "sliding_window": 11}


def hf_config(shape: str, **over):
    return transformers.Phi3Config(**{**BASE, **SHAPES[shape], **over})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """shape → (checkpoint dir, transformers' model, phift's model read from the checkpoint), made once a shape."""
    made = {}

    def get(shape):
        if shape not in made:
            torch.manual_seed(0)
            hf = transformers.Phi3ForCausalLM(hf_config(shape)).eval()
            d = tmp_path_factory.mktemp(shape)
            hf.save_pretrained(d)
            made[shape] = d, hf, load_model(d).eval()
        return made[shape]
    return get


@pytest.fixture(params=sorted(SHAPES))
def pair(request, checkpoint):
    """(shape, checkpoint dir, transformers' model, phift's model) for every shape."""
    return request.param, *checkpoint(request.param)


def max_diff(hf, model, x, **kw):
    with torch.no_grad():
        return (hf(x, **kw).logits - model(x, **kw)).abs().max().item()


@pytest.mark.parametrize("length", [ORIGINAL - 1, ORIGINAL, ORIGINAL + 1, 40])
def test_logits_equal_transformers_within_and_past_the_original_length_and_the_window(pair, length):
    """Up to 16 positions LongRoPE's short factors, from 17 on its long ones; past 11 the 4k shape's window."""
    _, _, hf, model = pair
    x = torch.randint(0, 128, (2, length))
    assert max_diff(hf, model, x) <= 1e-4


def test_padding_masks_give_transformers_logits(pair):
    _, _, hf, model = pair
    x = torch.randint(3, 128, (3, 30))
    mask = torch.ones_like(x)
    mask[0, :7] = 0  # left padding
    mask[1, -5:] = 0  # right padding
    with torch.no_grad():
        ref, out = hf(x, attention_mask=mask).logits, model(x, attention_mask=mask)
    # phift counts a left-padded row's positions from its first token, transformers from the first column: the
    # same relative positions, so the same logits (row 2, unpadded, makes both pick the same LongRoPE factors)
    assert (ref - out)[mask.bool()].abs().max() <= 1e-4


def test_a_masked_grouped_query_call_gives_sdpa_repeated_heads(monkeypatch):
    """With a mask, PyTorch's flash kernel is out and its memory-efficient one takes no grouped heads: a grouped call
    would run the math kernel. So a masked call gets the key-value heads repeated; an unmasked one keeps them grouped
    (flash takes those)."""
    import torch.nn.functional as F

    calls = []
    sdpa = F.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, enable_gqa=False, **kw):
        calls.append((attn_mask is not None, k.shape[1], enable_gqa))
        return sdpa(q, k, v, attn_mask=attn_mask, enable_gqa=enable_gqa, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    model = Phi3(Phi3Config.from_name("tiny-phi4")).eval()  # 6 query heads, 2 key-value heads
    x = torch.randint(3, 128, (2, 12))
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    with torch.no_grad():
        masked = model(x, attention_mask=mask)
        calls_masked, calls[:] = list(calls), []
        model(x)
    assert calls_masked == [(True, 6, False)] * 2 and calls == [(False, 2, True)] * 2
    # the same logits as the grouped call, whichever kernel runs it
    monkeypatch.setattr("phift.phi3.attend", lambda q, k, v, m, p: sdpa(q, k, v, attn_mask=m, dropout_p=p,
                                                                         enable_gqa=True))
    with torch.no_grad():
        torch.testing.assert_close(model(x, attention_mask=mask), masked, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_masked_grouped_query_forward_runs_on_the_memory_efficient_kernel_alone():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = Phi3(Phi3Config.from_name("tiny-phi4")).to("cuda", torch.bfloat16).eval()
    x = torch.randint(3, 128, (2, 40), device="cuda")
    mask = torch.ones_like(x)
    mask[0, :9] = 0
    with torch.no_grad():
        expected = model(x, attention_mask=mask)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):  # no other kernel: a grouped call would find none
            torch.testing.assert_close(model(x, attention_mask=mask), expected, rtol=2e-2, atol=2e-2)


def test_packed_samples_equal_separate_sequences_in_and_past_the_window():
    torch.manual_seed(0)
    model = Phi3(Phi3Config.from_hf_dict(hf_config("all-at-once").to_dict())).eval()
    a, b = torch.randint(3, 128, (1, 13)), torch.randint(3, 128, (1, 20))
    packed = torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    seg = torch.tensor([[1] * 13 + [2] * 20 + [0] * 3])
    pos = torch.tensor([list(range(13)) + list(range(20)) + [0] * 3])
    with torch.no_grad():
        out = model(packed, attention_mask=seg, position_ids=pos)
        # each sample alone picks its own LongRoPE factors; packed, the longest one's (20 > 16: long) apply to both
        torch.testing.assert_close(out[:, 13:33], model(b), atol=1e-5, rtol=1e-5)


def test_the_loss_and_its_gradients_equal_transformers(pair):
    shape, d, _, _ = pair
    hf = transformers.Phi3ForCausalLM.from_pretrained(d, dtype=torch.float32).train()
    model = load_model(d).train()
    x = torch.randint(3, 128, (2, 24))
    labels = x.clone()
    labels[:, :5] = -100
    ref = hf(x, labels=labels).loss
    ref.backward()
    loss = model(x, labels=labels)
    loss.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5
    grads = {"wte": (model.wte.weight.grad, hf.model.embed_tokens.weight.grad),
             "qkv_proj": (model.layers[1].attn.qkv_proj.weight.grad, hf.model.layers[1].self_attn.qkv_proj.weight.grad),
             "gate_up_proj": (model.layers[0].mlp.gate_up_proj.weight.grad,
                              hf.model.layers[0].mlp.gate_up_proj.weight.grad)}
    for name, (ours, theirs) in grads.items():
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4, msg=name)


def test_training_dropout_draws_the_masks_transformers_draws(tmp_path):
    """resid_pdrop on the attention and MLP outputs, attention_dropout on the probabilities; embd_pdrop is read and
    never applied, by transformers and by phift."""
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(hf_config("phi-4-mini", resid_pdrop=0.1, attention_dropout=0.1,
                                                embd_pdrop=0.1)).train()
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path).train()
    x = torch.randint(0, 128, (2, 17))
    torch.manual_seed(7)
    ref = hf(x).logits
    torch.manual_seed(7)
    out = model(x)
    assert (ref - out).abs().max() <= 1e-4
    torch.manual_seed(8)
    assert (model(x) - out).abs().max() > 1e-2  # the masks are really drawn


def test_longrope_switches_factors_for_the_whole_forward_at_the_original_length():
    config = Phi3Config.from_hf_dict(hf_config("phi-3.5-mini").to_dict())
    within = torch.arange(ORIGINAL)[None]
    past = torch.arange(ORIGINAL + 1)[None]
    cos_within, _ = rope_cos_sin(within, config)
    cos_past, _ = rope_cos_sin(past, config)
    assert not torch.allclose(cos_past[:, :ORIGINAL], cos_within)  # every position changes, not only the last
    scaling = math.sqrt(1 + math.log(32) / math.log(ORIGINAL))  # factor = max_position_embeddings / original
    assert config.rope_attention_scaling == pytest.approx(scaling)
    assert cos_within[0, 0, 0].item() == pytest.approx(scaling)  # cos(0) = 1, scaled


@pytest.mark.parametrize("shape", ["phi-3-mini-4k", "phi-3.5-mini", "all-at-once"])
def test_cached_generation_equals_uncached_across_the_original_length_and_the_window(shape):
    """The prompt ends just before LongRoPE's switch and the window's length, generation runs past both: the cache
    restarts from the whole sequence once the long factors apply."""
    torch.manual_seed(0)
    model = Phi3(Phi3Config.from_hf_dict(hf_config(shape).to_dict())).eval()
    prompts = [torch.randint(3, 128, (n,)).tolist() for n in (ORIGINAL - 4, ORIGINAL - 7)]
    for batch in ([prompts[0]], prompts):  # one row, and left-padded rows
        cached = generate(model, batch, max_new_tokens=12, use_cache=True)
        assert cached == generate(model, batch, max_new_tokens=12, use_cache=False)
        assert all(len(c) == 12 for c in cached)


@pytest.mark.parametrize("shape", ["phi-3-mini-4k", "phi-3.5-mini", "phi-4-mini"])
def test_greedy_generation_equals_transformers_generate(checkpoint, shape):
    _, hf, model = checkpoint(shape)
    prompt = torch.randint(3, 128, (1, ORIGINAL - 3))
    # The prompt ends 3 tokens short of the original length, so generation crosses LongRoPE's switch. The reference
    # decodes without a cache: transformers 5.17 dropped its cache at the switch but still fed only the newest
    # token, so its cached greedy path is wrong there (5.25 feeds the whole sequence).
    ref = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=False)
    assert generate(model, prompt.tolist(), max_new_tokens=10) == [ref[0, prompt.shape[1]:].tolist()]


def test_tied_embeddings_are_one_parameter_read_and_written_once(checkpoint, tmp_path):
    _, hf, model = checkpoint("phi-4-mini")
    assert model.lm_head.weight is model.wte.weight
    assert model.num_params() == sum(p.numel() for p in hf.parameters())  # counted once, as transformers does
    save_model(model, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    reloaded = load_model(tmp_path)
    assert reloaded.lm_head.weight is reloaded.wte.weight


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_phift_save_loads_in_transformers(shape, tmp_path):
    torch.manual_seed(0)
    model = Phi3(Phi3Config.from_hf_dict(hf_config(shape).to_dict())).eval()
    save_model(model, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "Phi3ForCausalLM"
    assert reloaded.model.rotary_emb.attention_scaling == pytest.approx(model.config.rope_attention_scaling)
    assert reloaded.config.sliding_window == model.config.sliding_window
    assert max_diff(reloaded, model, torch.randint(0, 128, (2, 40))) <= 1e-4


def test_sharded_save_round_trips(tmp_path):
    torch.manual_seed(0)
    model = Phi3(Phi3Config.from_hf_dict(hf_config("phi-4-mini").to_dict())).eval()
    save_model(model, tmp_path, max_shard_bytes=40_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    x = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(x), load_model(tmp_path).eval()(x))


def test_a_tied_checkpoint_that_also_stores_lm_head_loads(checkpoint, tmp_path):
    d, hf, _ = checkpoint("phi-4-mini")

    state = load_file(d / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    assert max_diff(hf, load_model(tmp_path).eval(), torch.randint(0, 128, (1, 9))) <= 1e-4


def test_missing_tensor_is_named(checkpoint, tmp_path):
    d, _, _ = checkpoint("phi-3.5-mini")
    state = load_file(d / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(ValueError, match=r"layout phi3.*missing \['model\.layers\.1\.mlp\.down_proj\.weight'\]"):
        load_model(tmp_path)


def test_configs_in_transformers_4_and_5_forms_read_alike():
    v5 = hf_config("phi-4-mini").to_dict()  # rope_parameters, as transformers 5 writes it
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_scaling={**SHAPES["phi-4-mini"]["rope_scaling"], "type": "su"}, rope_theta=10000.0)
    assert Phi3Config.from_hf_dict(v5) == Phi3Config.from_hf_dict(v4)
    config = Phi3Config.from_hf_dict(v5)
    assert (config.num_kv_heads, config.rotary_dim, config.tie_word_embeddings) == (2, 12, True)


@pytest.mark.parametrize("field, value, message", [
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "RoPE scaling 'linear'"),
    ("rope_scaling", {"type": "longrope", "short_factor": [1.0] * 8}, "LongRoPE parameters"),
    ("hidden_act", "gelu", "hidden_act 'gelu'"),
    ("attention_bias", True, "attention_bias=True"),
    ("head_dim", 32, "head_dim 32"),
    ("full_attn_mod", 2, "full_attn_mod=2"),
    ("model_type", "llama", "model_type 'llama'"),
])
def test_config_fields_phift_does_not_implement_are_errors_naming_them(tmp_path, field, value, message):
    d = {**hf_config("phi-3-mini-4k").to_dict(), field: value}
    d.pop("rope_parameters") if field == "rope_scaling" else None
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        families.config_from_json(tmp_path / "config.json")
    assert str(tmp_path / "config.json") in str(e.value)


# parameter counts as published: Phi-3-mini 3,821,079,552; Phi-4-mini 3,836,021,760 (its lm_head is its embedding)
@pytest.mark.parametrize("name, count", [("phi-3-mini-4k", 3_821_079_552), ("phi-3-mini-128k", 3_821_079_552),
                                         ("phi-3.5-mini", 3_821_079_552), ("phi-4-mini", 3_836_021_760)])
def test_presets_have_the_published_parameter_counts_in_phift_and_transformers(name, count):
    config = PRESETS[name]
    assert families.num_params(config) == count
    with torch.device("meta"):
        hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**config.to_hf_dict()))
    assert sum(p.numel() for p in hf.parameters()) == count
    assert hf.model.rotary_emb.attention_scaling == pytest.approx(config.rope_attention_scaling)


@pytest.mark.parametrize("name", ["phi-3-mini-4k", "phi-3-mini-128k", "phi-3.5-mini", "phi-4-mini"])
def test_presets_round_trip_through_config_json_with_the_published_configs_other_fields(name):
    """config.json as written by transformers 4.x with the fields the published configs carry besides (Phi-4-mini's
    remote-code ones among them): the preset comes back."""
    published = {**PRESETS[name].to_hf_dict(), "attention_bias": False, "embd_pdrop": 0.0, "torch_dtype": "bfloat16",
                 "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config"}, "transformers_version": "4.45.0",
                 **({"full_attn_mod": 1, "interpolate_factor": 1, "lm_head_bias": False, "mlp_bias": False}
                    if name == "phi-4-mini" else {})}
    assert Phi3Config.from_hf_dict(published, name=name) == PRESETS[name]
    assert Phi3Config.from_hf_dict(transformers.Phi3Config(**published).to_dict(), name=name) == PRESETS[name]


def test_presets_are_read_by_name_and_build_their_family():
    for name in ("tiny", "tiny-phi3", "tiny-phi4"):
        config = families.preset(name)
        assert type(families.build(config)) is families.family_of(config).model_class
    assert families.preset("tiny-phi4", num_layers=1).num_layers == 1
    with pytest.raises(ValueError, match="unknown PhiConfig preset 'phi-3.5-mini'"):
        from phift.config import PhiConfig
        PhiConfig.from_name("phi-3.5-mini")


def test_longrope_factors_must_fit_the_rotary_dims():
    with pytest.raises(ValueError, match="short_factor has 3 values; rotary_dim 16 needs 8"):
        Phi3Config(hidden_size=64, num_heads=4, num_kv_heads=4, rotary_dim=16,
                   rope_scaling=LongRoPE((1.0,) * 3, (1.0,) * 8), vocab_size=128, pad_token_id=0)


# ------------------------------------------------------------------------ what training applies from outside

def grads_of_one_step(model, x, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)
    model(x, labels=x).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("policy, reentrant, lean", [("full", True, True), ("full", False, True),
                                                     ("full", True, False), ("mlp", False, True)])
def test_recomputation_gives_the_same_gradients(policy, reentrant, lean):
    """Lean recomputation may skip down_proj (its output only joins the residual sum), never o_proj: the MLP's
    RMSNorm reads x + o_proj(...) in backward."""
    torch.manual_seed(0)
    model = Phi3(Phi3Config.from_hf_dict(hf_config("all-at-once", resid_pdrop=0.1).to_dict())).train()
    x = torch.randint(0, 128, (2, 24))
    plain = grads_of_one_step(model, x)
    recomputed = grads_of_one_step(recompute(copy.deepcopy(model), policy, reentrant=reentrant, lean=lean), x)
    assert plain.keys() == recomputed.keys() and len(plain) == len(list(model.parameters()))
    for name, g in plain.items():
        torch.testing.assert_close(recomputed[name], g, msg=name)


def test_upcast_norms_keep_activations_in_half():
    torch.manual_seed(0)
    model = Phi3(PRESETS["tiny-phi4"]).to(torch.bfloat16)
    for m in model.modules():
        if isinstance(m, torch.nn.RMSNorm):
            m.float()
    with torch.no_grad():
        assert model(torch.randint(0, 128, (1, 5))).dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", ["phi-3.5-mini", "phi-4-mini"])
def test_presets_build_in_bf16_on_the_gpu_and_take_a_lora_step(preset, phift_extension):
    """Two of the preset's layers in bf16, recomputed, LoRA on the default target, past the original length: the
    step a benchmark of it times (the fused ops where they apply)."""
    from phift import lora

    config = families.preset(preset, num_layers=2)
    with torch.device("cuda"):
        model = families.build(config).to(torch.bfloat16)
    lora.inject(model, "Wqkv", verbose=False)
    recompute(model.train())
    x = torch.randint(0, config.vocab_size, (2, 4100), device="cuda")
    loss = model(x, labels=x)
    loss.backward()
    assert torch.isfinite(loss) and all(m.lora_B.grad.abs().sum() > 0 for m in lora.lora_modules(model).values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_fused_rotary_op_takes_phi3_heads_with_longrope_and_declines_grouped_query(phift_extension,
                                                                                       monkeypatch):
    from phift import kernels

    positions = torch.arange(5000, 5064, device="cuda").expand(2, 64)  # past 4096: long factors, scaled
    cos4, sin4 = rope_cos_sin(positions, PRESETS["phi-4-mini"])
    gqa = torch.randn(2, 64, (24 + 2 * 8) * 128, device="cuda", dtype=torch.bfloat16)
    assert not kernels.rotary_fused_applies(gqa, cos4, sin4, 24, 8)
    cos, sin = rope_cos_sin(positions, PRESETS["phi-3.5-mini"])  # 32 heads of 96, all of them rotated
    qkv = torch.randn(2, 64, 3 * 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert kernels.rotary_fused_applies(qkv, cos, sin, 32, 32)
    dout = [torch.randn(2, 32, 64, 96, device="cuda", dtype=torch.bfloat16) for _ in range(3)]

    def run():
        out = kernels.rotary_qkv(qkv, cos, sin, 32, 32)
        return out, torch.autograd.grad(out, qkv, dout)[0]

    fused, fused_grad = run()
    monkeypatch.setattr(kernels, "DISABLED", kernels.parse_disabled("1"))
    ref, ref_grad = run()
    assert all(torch.equal(a, b) for a, b in zip(fused, ref)) and torch.equal(fused_grad, ref_grad)
