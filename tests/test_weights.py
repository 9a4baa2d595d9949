"""Checkpoint loading/saving: parity with transformers' PhiForCausalLM on every published key layout."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from phift.weights import WeightsError, load_model, save_model
from phift.config import PhiConfig

transformers = pytest.importorskip("transformers")

TINY_HF = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
               partial_rotary_factor=0.5, max_position_embeddings=256)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.PhiForCausalLM(transformers.PhiConfig(**TINY_HF)).eval()
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.PhiForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def _logits_both(hf_model, model, x, mask=None):
    with torch.no_grad():
        return hf_model(x, attention_mask=mask).logits, model(x, attention_mask=mask)


def test_hf_checkpoint_gives_transformers_logits(hf_dir, hf_model):
    model = load_model(hf_dir).eval()
    x = torch.randint(0, 128, (2, 19))
    ref, out = _logits_both(hf_model, model, x)
    assert (ref - out).abs().max() <= 1e-4


def test_padding_mask_gives_transformers_logits(hf_dir, hf_model):
    model = load_model(hf_dir).eval()
    x = torch.randint(0, 128, (2, 19))
    mask = torch.ones_like(x)
    mask[0, :6] = 0  # left padding
    mask[1, -3:] = 0  # right padding
    ref, out = _logits_both(hf_model, model, x, mask)
    assert (ref - out)[mask.bool()].abs().max() <= 1e-4


def test_phift_save_loads_in_transformers(hf_dir, tmp_path):
    model = load_model(hf_dir).eval()
    save_model(model, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.randint(0, 128, (1, 23))
    ref, out = _logits_both(reloaded, model, x)
    assert (ref - out).abs().max() <= 1e-4


# The old layouts are written here by hand-made renaming rules (not phift's table), so a wrong row in the table
# cannot hide behind the same wrong row in the fixture.
def _to_phi_msft(sd):
    out = {}
    for k, v in sd.items():
        k = k.replace("model.embed_tokens.", "transformer.embd.wte.").replace("model.final_layernorm.", "lm_head.ln.")
        k = re.sub(r"^lm_head\.(weight|bias)$", r"lm_head.linear.\1", k)
        k = re.sub(r"^model\.layers\.(\d+)\.", r"transformer.h.\1.", k)
        k = k.replace("input_layernorm.", "ln.").replace("self_attn.dense.", "mixer.out_proj.")
        out[k] = v
    return _fuse_qkv(out, "transformer.h.{}.self_attn.{}_proj.{}", "transformer.h.{}.mixer.Wqkv.{}")


def _to_mixformer(sd, n_layers):
    out = {}
    for k, v in sd.items():
        k = k.replace("model.embed_tokens.", "layers.0.wte.")
        k = k.replace("model.final_layernorm.", f"layers.{n_layers + 1}.ln.")
        k = re.sub(r"^lm_head\.", f"layers.{n_layers + 1}.linear.", k)
        k = re.sub(r"^model\.layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + 1}.", k)
        k = k.replace("input_layernorm.", "ln.").replace("self_attn.dense.", "mixer.out_proj.")
        out[k] = v
    fused = {}
    for k, v in out.items():
        m = re.match(r"layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", k)
        if m:
            i, p = m.groups()
            parts = [out[f"layers.{i}.self_attn.{n}_proj.{p}"] for n in "qkv"]
            fused[f"layers.{i}.mixer.Wqkv.{p}"] = torch.cat(parts)
        elif "self_attn" not in k:
            fused[k] = v
    return fused


def _fuse_qkv(sd, src, dst):
    out = {k: v for k, v in sd.items() if "self_attn" not in k}
    layers = {int(m.group(1)) for k in sd for m in [re.search(r"\.h\.(\d+)\.", k)] if m}
    for i in layers:
        for p in ("weight", "bias"):
            out[dst.format(i, p)] = torch.cat([sd[src.format(i, n, p)] for n in "qkv"])
    return out


def _write_old(tmp_path, hf_dir, layout):
    sd = load_file(hf_dir / "model.safetensors")
    if layout == "phi-msft":
        sd = _to_phi_msft(sd)
        config = dict(model_type="phi-msft", n_embd=64, n_layer=2, n_head=4, n_inner=None, rotary_dim=8,
                      n_positions=256, vocab_size=128, layer_norm_epsilon=1e-5)
    else:
        sd = _to_mixformer(sd, 2)
        config = dict(model_type="mixformer-sequential", n_embd=64, n_layer=2, n_head=4, n_inner=None,
                      rotary_dim=8, n_positions=256, vocab_size=128, layer_norm_epsilon=1e-5,
                      activation_function="gelu_new", architectures=["MixFormerSequentialForCausalLM"])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("layout", ["phi-msft", "mixformer-sequential"])
def test_old_remote_code_layouts_give_transformers_logits(layout, hf_dir, hf_model, tmp_path):
    model = load_model(_write_old(tmp_path, hf_dir, layout)).eval()
    assert model.checkpoint_layout == layout
    x = torch.randint(0, 128, (2, 15))
    ref, out = _logits_both(hf_model, model, x)
    assert (ref - out).abs().max() <= 1e-4


def test_real_phi_1_5_configs_both_forms_give_the_preset(shared_data):
    preset = PhiConfig.from_name("phi-1_5")
    for name in ("config.json", "config_mixformer_sequential.json"):
        cfg = PhiConfig.from_json(shared_data / "phi-1_5" / name)
        assert {**vars(cfg), "name": ""} == {**vars(preset), "name": ""}, name


def test_loads_in_bf16_without_fp32_copy(hf_dir):
    model = load_model(hf_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.requires_grad for p in model.parameters())


def test_sharded_save_round_trips(hf_dir, tmp_path):
    model = load_model(hf_dir).eval()
    save_model(model, tmp_path, max_shard_bytes=40_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert (tmp_path / "model.safetensors.index.json").is_file()
    reloaded = load_model(tmp_path).eval()
    x = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))


def test_missing_tensor_is_named(hf_dir, tmp_path):
    sd = load_file(hf_dir / "model.safetensors")
    del sd["model.layers.1.mlp.fc2.bias"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(WeightsError, match=r"layout hf.*missing \['model\.layers\.1\.mlp\.fc2\.bias'\]"):
        load_model(tmp_path)


def test_unexpected_tensor_is_named(hf_dir, tmp_path):
    sd = load_file(hf_dir / "model.safetensors")
    sd["model.layers.0.self_attn.q_layernorm.weight"] = torch.ones(16)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(WeightsError, match=r"unexpected \['model\.layers\.0\.self_attn\.q_layernorm\.weight'\]"):
        load_model(tmp_path)


def test_wrong_shape_names_key_and_both_shapes(hf_dir, tmp_path):
    sd = load_file(hf_dir / "model.safetensors")
    sd["model.layers.0.mlp.fc1.weight"] = torch.zeros(255, 64)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(WeightsError, match=r"layout hf.*layers\.0\.mlp\.fc1\.weight expects \(256, 64\), "
                                              r"found model\.layers\.0\.mlp\.fc1\.weight \(255, 64\)"):
        load_model(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.9999, 0.001])
def test_a_truncated_weights_file_is_named_as_truncated_or_corrupt(hf_dir, tmp_path, keep):
    data = (hf_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:int(len(data) * keep)])
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(WeightsError, match=re.escape(f"{tmp_path / 'model.safetensors'} is truncated or corrupt")):
        load_model(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_an_error_naming_the_tensor(hf_dir, tmp_path, bad):
    sd = load_file(hf_dir / "model.safetensors")
    sd["model.layers.1.mlp.fc1.weight"][3, 5] = bad
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(WeightsError, match=r"model\.safetensors: model\.layers\.1\.mlp\.fc1\.weight holds 1 "
                                           r"value that is not finite \(NaN or inf\)"):
        load_model(tmp_path)


def test_pickle_only_checkpoint_is_refused(tmp_path, hf_dir):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(WeightsError, match="safetensors only"):
        load_model(tmp_path)


def test_hub_id_downloads_safetensors_and_json_only(hf_dir, monkeypatch):
    import huggingface_hub

    calls = {}

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(hf_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_model("someone/tiny-phi", revision="main")
    assert calls["repo_id"] == "someone/tiny-phi" and calls["revision"] == "main"
    assert "*.safetensors" in calls["allow_patterns"]
    assert not any(p.endswith(".bin") or p == "*" for p in calls["allow_patterns"])
    assert model.config.num_layers == 2


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    import huggingface_hub

    def offline(*a, **kw):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(WeightsError, match=r"microsoft/phi-1_5 is not a local directory and could not be "
                                              r"fetched from the hub \(OSError: no network\)"):
        load_model("microsoft/phi-1_5")


# The three published shapes scaled down: head_dim and the rotary fraction as in phi-1 / phi-1_5 (32 of 64) and
# phi-2 (32 of 80, factor 0.4), written by the installed transformers' own save_pretrained.
PUBLISHED_SHAPES = {
    "phi-1": dict(hidden_size=128, num_attention_heads=2, partial_rotary_factor=0.5),
    "phi-1_5": dict(hidden_size=128, num_attention_heads=2, partial_rotary_factor=0.5),
    "phi-2": dict(hidden_size=160, num_attention_heads=2, partial_rotary_factor=0.4, resid_pdrop=0.1),
}


@pytest.mark.parametrize("shape", sorted(PUBLISHED_SHAPES))
def test_configs_saved_by_the_installed_transformers_give_its_logits(shape, tmp_path):
    kw = {**TINY_HF, **PUBLISHED_SHAPES[shape], "intermediate_size": 4 * PUBLISHED_SHAPES[shape]["hidden_size"]}
    torch.manual_seed(0)
    hf = transformers.PhiForCausalLM(transformers.PhiConfig(**kw)).eval()
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path).eval()
    head_dim = kw["hidden_size"] // kw["num_attention_heads"]
    assert model.config.rotary_dim == int(kw["partial_rotary_factor"] * head_dim)
    assert model.config.resid_pdrop == kw.get("resid_pdrop", 0.0)
    x = torch.randint(0, 128, (2, 17))
    ref, out = _logits_both(hf, model, x)
    assert (ref - out).abs().max() <= 1e-4


def test_training_dropout_draws_the_masks_transformers_draws(tmp_path):
    kw = {**TINY_HF, "resid_pdrop": 0.1, "embd_pdrop": 0.1}
    torch.manual_seed(0)
    hf = transformers.PhiForCausalLM(transformers.PhiConfig(**kw)).train()
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


@pytest.mark.parametrize("field, value, message", [
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "RoPE scaling"),
    ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, "RoPE scaling"),
    ("rope_scaling", {"factor": 2.0}, "RoPE scaling"),
    ("qk_layernorm", True, "qk_layernorm"),
    ("hidden_act", "relu", "hidden_act 'relu'"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("num_key_value_heads", 2, "grouped-query"),
    ("model_type", "phi3", "model_type 'phi3'"),
])
def test_config_fields_phift_does_not_implement_are_errors_naming_them(tmp_path, field, value, message):
    d = {**transformers.PhiConfig(**TINY_HF).to_dict(), field: value}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        PhiConfig.from_json(tmp_path / "config.json")
    assert str(tmp_path / "config.json") in str(e.value)


def test_config_without_a_required_field_names_it(tmp_path):
    d = transformers.PhiConfig(**TINY_HF).to_dict()
    del d["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="no 'vocab_size'"):
        PhiConfig.from_json(tmp_path / "config.json")
