"""LoRA: the math against float64, merge/unmerge, adapters on disk, and PEFT interop on transformers' Phi."""
import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from phift import lora
from phift.weights import load_model, save_model
from phift.model import Phi


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    return Phi(tiny_config)


def _randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in lora.lora_modules(model).values():
        m.lora_A.data = torch.randn(m.lora_A.shape, generator=g) * 0.1
        m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.1


def test_fresh_adapter_leaves_outputs_unchanged(model):
    x = torch.randint(0, 128, (2, 10))
    model.eval()
    with torch.no_grad():
        before = model(x)
        lora.inject(model, "all", verbose=False)
        assert torch.equal(model(x), before)


def test_only_adapters_get_gradients_and_move(model):
    lora.inject(model, "Wqkv", verbose=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randint(0, 128, (2, 10))
    for _ in range(2):  # the first step moves only B (A's gradient is B-weighted, and B starts at zero)
        model(x, labels=x).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    for n, p in model.named_parameters():
        if ".lora_" in n:
            assert p.requires_grad and not torch.equal(p, before[n]), n
        else:
            assert not p.requires_grad and p.grad is None and torch.equal(p, before[n]), n


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_equals_the_formula_in_float64(rslora):
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    layer = lora.LoRALinear(base, r=4, alpha=12, dropout=0.0, use_rslora=rslora)
    layer.lora_B.data.normal_()
    x = torch.randn(3, 5, 24)
    s = 12 / math.sqrt(4) if rslora else 12 / 4
    assert layer.scaling == s
    W, b, A, B = (t.double() for t in (base.weight, base.bias, layer.lora_A, layer.lora_B))
    expected = x.double() @ W.T + b + s * (x.double() @ A.T) @ B.T
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_merge_keeps_outputs_and_unmerge_restores_weights(model):
    lora.inject(model, "all", verbose=False)
    _randomise_adapters(model)
    model.eval()
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        unmerged = model(x)
        lora.set_merged(model, True)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        lora.set_merged(model, False)
    for n, p in model.named_parameters():
        if n in base_weights:
            torch.testing.assert_close(p, base_weights[n], atol=1e-6, rtol=0)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(32, 32), r=4, alpha=8, dropout=0.5)
    layer.lora_B.data.normal_()
    x = torch.randn(4, 32)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_adapter_weights_stay_fp32_on_a_half_base(model):
    model.half()
    lora.inject(model, "Wqkv", verbose=False)
    m = next(iter(lora.lora_modules(model).values()))
    assert m.weight.dtype == torch.float16 and m.lora_A.dtype == m.lora_B.dtype == torch.float32


def test_hf_names_map_to_fused_modules(model, caplog):
    with caplog.at_level("INFO", logger="phift"):
        paths = lora.inject(model, "q_proj,v_proj,dense", verbose=True)
    out = caplog.text
    assert "q_proj → Wqkv" in out and "dense → out_proj" in out
    assert sorted(paths) == sorted(f"layers.{i}.attn.{n}" for i in range(2) for n in ("Wqkv", "out_proj"))
    assert "trainable params: " in out and " || all params: " in out and " || trainable%: " in out


def test_target_that_matches_nothing_lists_the_modules(model):
    with pytest.raises(ValueError, match=r"query matches no module.*Wqkv, fc1, fc2, lm_head, out_proj"):
        lora.inject(model, "query", verbose=False)


def test_trainable_count_is_rank_times_in_plus_out(model):
    lora.inject(model, "Wqkv", r=8, verbose=False)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 8 * (64 + 192)


def test_adapter_save_load_round_trip(model, tmp_path, tiny_config):
    lora.inject(model, "Wqkv,fc2", r=4, verbose=False)
    _randomise_adapters(model)
    model.eval()
    lora.save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    torch.manual_seed(0)
    fresh = Phi(tiny_config).eval()
    cfg = lora.load_adapter(fresh, tmp_path)
    assert cfg["r"] == 4 and cfg["target_modules"] == ["Wqkv", "fc2"]
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_a_truncated_or_non_finite_adapter_is_an_error_naming_file_and_tensor(model, tmp_path, tiny_config):
    lora.inject(model, "Wqkv", r=4, verbose=False)
    lora.save_adapter(model, tmp_path)
    weights = tmp_path / lora.ADAPTER_WEIGHTS
    state = {k: v.clone() for k, v in load_file(weights).items()}  # not views of the file cut below
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=f"{weights} is truncated or corrupt"):
        lora.load_adapter(Phi(tiny_config), tmp_path)
    key = next(iter(state))
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=f"{weights}: {key} holds 1 value that is not finite"):
        lora.load_adapter(Phi(tiny_config), tmp_path)


def test_loading_an_adapter_of_another_rank_is_a_clear_error(model, tmp_path, tiny_config):
    lora.inject(model, "Wqkv", r=4, verbose=False)
    lora.save_adapter(model, tmp_path)
    other = Phi(tiny_config)
    lora.inject(other, "Wqkv", r=8, verbose=False)
    with pytest.raises(ValueError, match=r"r=4.*does not match.*r=8"):
        lora.load_adapter(other, tmp_path)


def test_loading_an_adapter_with_a_wrong_shape_names_the_key(model, tmp_path, tiny_config):
    lora.inject(model, "Wqkv", r=4, verbose=False)
    lora.save_adapter(model, tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / lora.ADAPTER_WEIGHTS))
    state["layers.1.attn.Wqkv.lora_B"] = torch.zeros(100, 4)
    save_file(state, str(tmp_path / lora.ADAPTER_WEIGHTS))
    with pytest.raises(ValueError, match=r"layers\.1\.attn\.Wqkv\.lora_B has shape \(100, 4\).*\(192, 4\)"):
        lora.load_adapter(Phi(tiny_config), tmp_path)


def test_merged_export_loads_as_a_plain_checkpoint(model, tmp_path):
    lora.inject(model, "all", verbose=False)
    _randomise_adapters(model)
    model.eval()
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        expected = model(x)
        lora.unload(model, merge=True)
        save_model(model, tmp_path)
        torch.testing.assert_close(load_model(tmp_path).eval()(x), expected, atol=1e-5, rtol=1e-5)


def test_peft_export_gives_the_same_logits_in_transformers(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    save_model(model, base_dir)
    lora.inject(model, "Wqkv,out_proj,fc1,fc2", r=4, alpha=8, verbose=False)
    _randomise_adapters(model)
    model.eval()
    lora.export_peft(model, adapter_dir, base_model_name_or_path=str(base_dir))
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["dense", "fc1", "fc2", "k_proj", "q_proj", "v_proj"]
    hf = transformers.PhiForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    x = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() <= 1e-4


SIX = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
PEFT_CASES = {
    "q_v": dict(target_modules=["q_proj", "v_proj"]),
    "q_k_v": dict(target_modules=["q_proj", "k_proj", "v_proj"]),
    "all_six": dict(target_modules=SIX),
    "rslora": dict(target_modules=SIX, use_rslora=True),
    "patterns": dict(target_modules=SIX, rank_pattern={"q_proj": 2, "model.layers.1.mlp.fc1": 6},
                     alpha_pattern={"v_proj": 3, "dense": 5}),
    "patterns_rslora": dict(target_modules=["q_proj", "v_proj", "fc2"], rank_pattern={"v_proj": 6},
                            use_rslora=True),
}


@pytest.fixture
def peft_adapter(model, tmp_path, make_peft_adapter):
    """(base dir, adapter dir, PEFT model) for a case of PEFT_CASES: r 4, alpha 8 unless a pattern says otherwise."""
    def make(case, **over):
        save_model(model, tmp_path / "base")
        peft_model = make_peft_adapter(tmp_path / "base", tmp_path / "peft", r=4, lora_alpha=8,
                                       **{**PEFT_CASES[case], **over})
        return tmp_path / "base", tmp_path / "peft", peft_model
    return make


@pytest.mark.parametrize("case", PEFT_CASES)
def test_a_peft_adapter_gives_the_logits_it_gives_in_peft(peft_adapter, case):
    base_dir, adapter_dir, peft_model = peft_adapter(case)
    ours = load_model(base_dir).eval()
    lora.load_adapter(ours, adapter_dir, trainable=False)
    x = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        assert (peft_model(x).logits - ours(x)).abs().max() <= 1e-5


def test_q_and_v_adapters_stack_into_wqkv_with_zero_k_rows_that_training_keeps_zero(peft_adapter):
    base_dir, adapter_dir, _ = peft_adapter("q_v")
    ours = load_model(base_dir)
    lora.load_adapter(ours, adapter_dir)
    wqkv = ours.layers[0].attn.Wqkv
    assert wqkv.parts == (lora.Part(4, 8, (0, 64)), lora.Part(4, 8, (128, 192)))
    assert wqkv.lora_A.shape == (8, 64) and wqkv.lora_B.shape == (192, 8)
    before = wqkv.lora_B.detach().clone()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    x = torch.randint(0, 128, (2, 10))
    for _ in range(2):
        ours(x, labels=x).backward()
        opt.step()
        opt.zero_grad()
    B = wqkv.lora_B.detach()
    assert not torch.equal(B[:64, :4], before[:64, :4]) and not torch.equal(B[128:, 4:], before[128:, 4:])
    off_blocks = torch.ones_like(B, dtype=torch.bool)
    off_blocks[:64, :4] = off_blocks[128:, 4:] = False
    assert not B[off_blocks].any()  # no k adapter appears, and q and v stay apart


def test_q_k_v_adapters_sharing_a_and_rank_fuse_into_one_wqkv_adapter(model, tmp_path, tiny_config):
    lora.inject(model, "Wqkv", r=4, alpha=8, verbose=False)
    _randomise_adapters(model)
    lora.export_peft(model, tmp_path, base_model_name_or_path="base")
    fresh = Phi(tiny_config)
    lora.load_adapter(fresh, tmp_path)
    assert all(m.parts == (lora.Part(4, 8),) and m.r == 4 for m in lora.lora_modules(fresh).values())


def test_phift_adapter_round_trips_exactly_through_peft(model, tmp_path, tiny_config):
    lora.inject(model, "all", r=4, alpha=8, use_rslora=True, verbose=False)
    _randomise_adapters(model)
    lora.export_peft(model, tmp_path, base_model_name_or_path="base")
    fresh = Phi(tiny_config)
    lora.load_adapter(fresh, tmp_path)
    ours, back = lora.adapter_state_dict(model), lora.adapter_state_dict(fresh)
    assert ours.keys() == back.keys() and all(torch.equal(ours[k], back[k]) for k in ours)
    assert lora.adapter_config(fresh, "x") == lora.adapter_config(model, "x")


@pytest.mark.parametrize("case", ["q_v", "patterns", "patterns_rslora"])
def test_peft_adapter_round_trips_exactly_through_phift(peft_adapter, tmp_path, case):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    base_dir, adapter_dir, peft_model = peft_adapter(case)
    ours = load_model(base_dir)
    lora.load_adapter(ours, adapter_dir)
    lora.export_peft(ours, tmp_path / "again")
    original, again = (load_file(str(d / lora.ADAPTER_WEIGHTS)) for d in (adapter_dir, tmp_path / "again"))
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "again")
    scalings = [{n: m.scaling["default"] for n, m in p.named_modules()
                 if isinstance(m, peft.tuners.lora.LoraLayer)} for p in (peft_model, reloaded)]
    assert scalings[0] == scalings[1]  # the same per-module rank and alpha, through rank/alpha_pattern


def test_stacked_adapter_round_trips_through_phift_adapter_files(peft_adapter, tmp_path, tiny_config):
    base_dir, adapter_dir, _ = peft_adapter("patterns_rslora")
    ours = load_model(base_dir)
    lora.load_adapter(ours, adapter_dir)
    lora.save_adapter(ours, tmp_path / "phift")
    cfg = json.loads((tmp_path / "phift" / lora.ADAPTER_CONFIG).read_text())
    assert cfg["modules"]["layers.0.attn.Wqkv"] == [{"r": 4, "lora_alpha": 8, "rows": [0, 64]},
                                                    {"r": 6, "lora_alpha": 8, "rows": [128, 192]}]
    fresh = Phi(tiny_config)
    lora.load_adapter(fresh, tmp_path / "phift")
    assert {n: m.parts for n, m in lora.lora_modules(fresh).items()} == \
           {n: m.parts for n, m in lora.lora_modules(ours).items()}
    a, b = lora.adapter_state_dict(ours), lora.adapter_state_dict(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _edit_config(**fields):
    def edit(d):
        cfg = json.loads((d / lora.ADAPTER_CONFIG).read_text())
        (d / lora.ADAPTER_CONFIG).write_text(json.dumps({**cfg, **fields}))
    return edit


def _edit_weights(edit_state):
    def edit(d):
        from safetensors.torch import load_file, save_file

        state = load_file(str(d / lora.ADAPTER_WEIGHTS))
        edit_state(state)
        save_file(state, str(d / lora.ADAPTER_WEIGHTS))
    return edit


def _pickle_only(d):
    (d / lora.ADAPTER_WEIGHTS).rename(d / "adapter_model.bin")


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
REFUSED = {
    "dora": (_edit_config(use_dora=True), r"adapter_config\.json: use_dora = True"),
    "bias": (_edit_config(bias="lora_only"), r"adapter_config\.json: bias = 'lora_only'"),
    "fan_in_fan_out": (_edit_config(fan_in_fan_out=True), r"adapter_config\.json: fan_in_fan_out = True"),
    "modules_to_save": (_edit_config(modules_to_save=["lm_head"]), r"adapter_config\.json: modules_to_save"),
    "layers_to_transform": (_edit_config(layers_to_transform=[0]), r"adapter_config\.json: layers_to_transform"),
    "other_target": (_edit_config(target_modules=["q_proj", "lm_head"]), r"adapter_config\.json: target_modules"),
    "regex_target": (_edit_config(target_modules=r".*\.q_proj"), r"adapter_config\.json: target_modules"),
    "pickle": (_pickle_only, r"adapter_model\.bin is a pickle"),
    "rank_mismatch": (_edit_weights(lambda s: s.update({f"{Q0}.lora_B.weight": torch.zeros(64, 3)})),
                      rf"{Q0}\.lora_A\.weight has shape \(4, 64\) and {Q0}\.lora_B\.weight \(64, 3\)"),
    "layer_missing": (_edit_weights(lambda s: [s.pop(k) for k in list(s) if ".layers.1.self_attn.v_proj" in k]),
                      r"no base_model\.model\.model\.layers\.1\.self_attn\.v_proj\.lora_A\.weight.*every layer"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_a_peft_adapter_cannot_map_exactly_is_refused_naming_file_and_field(peft_adapter, tiny_config, case):
    _, adapter_dir, _ = peft_adapter("q_v")
    edit, message = REFUSED[case]
    edit(adapter_dir)
    with pytest.raises(ValueError, match=message):
        lora.load_adapter(Phi(tiny_config), adapter_dir)


def test_export_peft_names_the_checkpoint_the_model_was_loaded_from(model, tmp_path):
    peft = pytest.importorskip("peft")
    save_model(model, tmp_path / "base")
    ours = load_model(tmp_path / "base")
    lora.inject(ours, "all", r=4, alpha=8, verbose=False)
    _randomise_adapters(ours)
    ours.eval()
    lora.export_peft(ours, tmp_path / "adapter")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    x = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        assert (theirs(x).logits - ours(x)).abs().max() <= 1e-5


def test_export_peft_of_a_model_built_in_memory_asks_for_the_base(model, tmp_path):
    lora.inject(model, "Wqkv", verbose=False)
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        lora.export_peft(model, tmp_path)


def test_merging_adapters_into_a_loaded_model_forgets_its_checkpoint_as_the_base(model, tmp_path):
    save_model(model, tmp_path / "base")
    ours = load_model(tmp_path / "base")
    lora.inject(ours, "Wqkv", verbose=False)
    lora.unload(ours, merge=True)
    lora.inject(ours, "fc1", verbose=False)
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        lora.export_peft(ours, tmp_path / "adapter")


# ------------------------------------------------- a LoRA base weight inside the fused op's [W | s·B] matrix
def test_a_weight_moved_into_a_padded_matrix_keeps_its_values_and_every_use(tiny_config):
    """kernels.home_for_fused_lora (run on CUDA half weights when the op is loaded): W becomes the first K columns
    of a zeroed [N, K + 64] matrix. On the CPU the move is made by hand; forward, merge, unload and saving must not
    notice it."""
    from phift import kernels

    torch.manual_seed(0)
    model, reference = Phi(tiny_config).eval(), Phi(tiny_config).eval()
    reference.load_state_dict(model.state_dict())
    for m in (model, reference):
        lora.inject(m, "Wqkv", r=4, alpha=8)
    torch.manual_seed(1)
    for name, module in lora.lora_modules(model).items():
        torch.nn.init.normal_(module.lora_B)
        other = lora.lora_modules(reference)[name]
        other.lora_A.data.copy_(module.lora_A.data)
        other.lora_B.data.copy_(module.lora_B.data)
        n, k = module.weight.shape
        kernels.home_for_fused_lora(module.weight)
        assert module.weight.stride() == (k + kernels.FUSED_EXTRA_COLUMNS, 1)
        assert module.weight.untyped_storage().nbytes() == n * (k + 64) * module.weight.element_size()
        storage = module.weight.untyped_storage().data_ptr()
        kernels.home_for_fused_lora(module.weight)  # already there: not moved again
        assert module.weight.untyped_storage().data_ptr() == storage
        assert torch.equal(module.weight, other.weight)
        padding = torch.as_strided(module.weight, (n, 64), (k + 64, 1), module.weight.storage_offset() + k)
        assert not padding.any()
    ids = torch.randint(0, 100, (2, 12))
    assert torch.equal(model(ids), reference(ids))
    lora.set_merged(model, True)
    lora.set_merged(reference, True)
    assert torch.equal(model(ids), reference(ids))
    lora.set_merged(model, False)
    lora.set_merged(reference, False)
    model, reference = lora.unload(model, merge=True), lora.unload(reference, merge=True)
    assert torch.equal(model(ids), reference(ids))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_saving_a_padded_weight_writes_the_weight_alone(tmp_path, tiny_config):
    from phift import kernels

    torch.manual_seed(0)
    model = Phi(tiny_config)
    kernels.home_for_fused_lora(model.layers[0].attn.Wqkv.weight)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_only_weights_the_fused_op_will_serve_are_moved(monkeypatch):
    from phift import kernels

    module = lora.LoRALinear(nn.Linear(64, 48).to(torch.bfloat16), r=8, alpha=16)
    assert kernels.home_lora_weights(module) == 0 and module.weight.is_contiguous()  # the CPU: no op there
    monkeypatch.setattr(kernels, "fused_home_applies", lambda weight, rank: rank <= kernels.MAX_KERNEL_RANK)
    wide = lora.LoRALinear(nn.Linear(64, 48).to(torch.bfloat16), r=64, alpha=16)
    assert kernels.home_lora_weights(nn.Sequential(module, wide, nn.Linear(8, 8))) == 1  # not rank 64, not plain
    assert module.weight.stride() == (64 + 64, 1) and wide.weight.is_contiguous()
