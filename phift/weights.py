"""Loading and saving phi and Phi-3 weights (safetensors only: nothing is ever unpickled).

Each published key layout is one table: phift's module prefix → the checkpoint's prefix(es). Where the checkpoint
splits what phift fuses (HF-native phi's q_proj/k_proj/v_proj → Wqkv), the row lists the pieces in order and they are
concatenated along dim 0 (rows q;k;v). Which layouts a model's family reads, and which it writes, phift.families says.
Tied weights (Phi-4-mini's lm_head is its embedding) are one tensor: read and written under the first key only.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import families
from .tensorfile import WeightsError, get_tensor, open_safetensors

# "{i}": layer index; "{i1}": layer index + 1; "{last}": num_layers + 1 (MixFormerSequential's head).
LAYOUTS: dict[str, list[tuple[str, str | tuple[str, ...]]]] = {
    "hf": [  # transformers' PhiForCausalLM (model_type "phi"), Jan 2024 onwards
        ("wte", "model.embed_tokens"),
        ("layers.{i}.ln", "model.layers.{i}.input_layernorm"),
        ("layers.{i}.attn.Wqkv", ("model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.k_proj",
                                  "model.layers.{i}.self_attn.v_proj")),
        ("layers.{i}.attn.out_proj", "model.layers.{i}.self_attn.dense"),
        ("layers.{i}.mlp.fc1", "model.layers.{i}.mlp.fc1"),
        ("layers.{i}.mlp.fc2", "model.layers.{i}.mlp.fc2"),
        ("ln_f", "model.final_layernorm"),
        ("lm_head", "lm_head"),
    ],
    "phi-msft": [  # remote code "PhiForCausalLM" of Dec 2023
        ("wte", "transformer.embd.wte"),
        ("layers.{i}.ln", "transformer.h.{i}.ln"),
        ("layers.{i}.attn.Wqkv", "transformer.h.{i}.mixer.Wqkv"),
        ("layers.{i}.attn.out_proj", "transformer.h.{i}.mixer.out_proj"),
        ("layers.{i}.mlp.fc1", "transformer.h.{i}.mlp.fc1"),
        ("layers.{i}.mlp.fc2", "transformer.h.{i}.mlp.fc2"),
        ("ln_f", "lm_head.ln"),
        ("lm_head", "lm_head.linear"),
    ],
    "mixformer-sequential": [  # remote code MixFormerSequentialForCausalLM of Sep 2023: one flat nn.Sequential
        ("wte", "layers.0.wte"),
        ("layers.{i}.ln", "layers.{i1}.ln"),
        ("layers.{i}.attn.Wqkv", "layers.{i1}.mixer.Wqkv"),
        ("layers.{i}.attn.out_proj", "layers.{i1}.mixer.out_proj"),
        ("layers.{i}.mlp.fc1", "layers.{i1}.mlp.fc1"),
        ("layers.{i}.mlp.fc2", "layers.{i1}.mlp.fc2"),
        ("ln_f", "layers.{last}.ln"),
        ("lm_head", "layers.{last}.linear"),
    ],
    "phi3": [  # transformers' Phi3ForCausalLM (model_type "phi3"): its fused projections are phift's, one to one
        ("wte", "model.embed_tokens"),
        ("layers.{i}.attn_norm", "model.layers.{i}.input_layernorm"),
        ("layers.{i}.attn.qkv_proj", "model.layers.{i}.self_attn.qkv_proj"),
        ("layers.{i}.attn.o_proj", "model.layers.{i}.self_attn.o_proj"),
        ("layers.{i}.mlp_norm", "model.layers.{i}.post_attention_layernorm"),
        ("layers.{i}.mlp.gate_up_proj", "model.layers.{i}.mlp.gate_up_proj"),
        ("layers.{i}.mlp.down_proj", "model.layers.{i}.mlp.down_proj"),
        ("norm", "model.norm"),
        ("lm_head", "lm_head"),
    ],
}
# A key each layout has and the other layouts of its family lack.
LAYOUT_MARKERS = {"hf": "model.embed_tokens.weight", "phi-msft": "transformer.embd.wte.weight",
                  "mixformer-sequential": "layers.0.wte.weight", "phi3": "model.embed_tokens.weight"}
# Buffers some exporters wrote that carry no weights (rotary tables are recomputed).
IGNORED_KEYS = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def key_map(layout: str, state_keys, num_layers: int) -> dict[str, tuple[str, ...]]:
    """phift state-dict key → the checkpoint key(s) that make it, for every key in `state_keys`."""
    prefixes = {}
    for ours, theirs in LAYOUTS[layout]:
        theirs = (theirs,) if isinstance(theirs, str) else theirs
        for i in range(num_layers) if "{i}" in ours else [0]:
            fmt = dict(i=i, i1=i + 1, last=num_layers + 1)
            prefixes[ours.format(**fmt)] = tuple(t.format(**fmt) for t in theirs)
    out = {}
    for key in state_keys:
        prefix, param = key.rsplit(".", 1)
        if prefix not in prefixes:
            raise WeightsError(f"phift key {key} has no entry in the {layout} layout table")
        out[key] = tuple(f"{t}.{param}" for t in prefixes[prefix])
    return out


def detect_layout(keys, layouts) -> str:
    """Which of `layouts` (a family's, phift.families) the checkpoint keys are in."""
    keys = set(keys)
    found = [name for name in layouts if LAYOUT_MARKERS[name] in keys]
    if len(found) != 1:
        sample = ", ".join(sorted(keys)[:6])
        raise WeightsError(f"cannot tell the checkpoint layout (markers found: {found or 'none'}); "
                              f"expected one of {({n: LAYOUT_MARKERS[n] for n in layouts})}; first keys: {sample}")
    return found[0]


def tied_keys(model) -> dict[str, str]:
    """State-dict key → the earlier key of the same Parameter (tied embeddings: lm_head.weight → wte.weight)."""
    first, tied = {}, {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        tied[key] = first.setdefault(id(tensor), key)
    return {k: v for k, v in tied.items() if k != v}


def resolve_checkpoint_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a hub repo id, fetched with huggingface_hub (weights as safetensors only)."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    if p.exists():
        raise WeightsError(f"{p} is a file; give the directory holding config.json and *.safetensors")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), revision=revision,
                                      allow_patterns=["*.safetensors", "*.safetensors.index.json", "*.json",
                                                      "tokenizer*", "vocab.json", "merges.txt"]))
    except Exception as e:  # offline, a typo, a gated repo: say which, and what else would work
        raise WeightsError(f"{name_or_path} is not a local directory and could not be fetched from the hub "
                              f"({type(e).__name__}: {e}); give a directory holding config.json and "
                              "*.safetensors, or a preset name for a random-init model (tiny, phi-1_5, ...)") from e


VALUE_HEAD_WEIGHTS = "value_head.safetensors"  # a reward model's head beside its weights (later LLaMA-Factory's name)


def _weight_files(d: Path) -> dict[str, Path]:
    """checkpoint key → file holding it (single file or sharded with an index)."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: d / f for k, f in weight_map.items()}
    files = sorted(f for f in d.glob("*.safetensors")  # not LoRA's files, nor a reward model's value head
                   if not f.name.startswith("adapter_") and f.name != VALUE_HEAD_WEIGHTS)
    if not files:
        extra = " (it has pytorch_model.bin: phift loads safetensors only, never pickles)" if any(
            d.glob("*.bin")) else ""
        raise WeightsError(f"no *.safetensors weights in {d}{extra}")
    out = {}
    for f in files:
        with open_safetensors(f) as sf:
            out.update({k: f for k in sf.keys()})
    return out


def load_state_dict(d: Path, model, dtype: torch.dtype, device="cpu"):
    """Read the checkpoint in `d` into phift's keys, cast to dtype tensor by tensor (no full fp32 copy). A tied key
    gets its source's tensor; a checkpoint that stores it as well (under its own key) is not read there."""
    files = _weight_files(d)
    layout = detect_layout(files, families.family_of(model).layouts)
    tied = tied_keys(model)
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in tied}
    mapping = key_map(layout, expected, model.config.num_layers)
    used = {k for keys in mapping.values() for k in keys} | {
        k for keys in key_map(layout, tied, model.config.num_layers).values() for k in keys}
    unexpected = sorted(k for k in files if k not in used and not IGNORED_KEYS.search(k))
    missing = sorted(k for keys in mapping.values() for k in keys if k not in files)
    if missing or unexpected:
        raise WeightsError(f"checkpoint {d} (layout {layout}) does not match the model "
                              f"{model.config.name}: missing {missing[:8]}{' …' if len(missing) > 8 else ''}, "
                              f"unexpected {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}")
    handles = {}
    state = {}
    try:
        for ours, theirs in mapping.items():
            parts = []
            for key in theirs:
                f = files[key]
                if f not in handles:
                    handles[f] = open_safetensors(f, device)
                parts.append(get_tensor(handles[f], key, f).to(dtype))
            t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            if t.shape != expected[ours]:
                found = " + ".join(f"{k} {tuple(p.shape)}" for k, p in zip(theirs, parts))
                raise WeightsError(f"shape mismatch in {d} (layout {layout}): {ours} expects "
                                      f"{tuple(expected[ours])}, found {found}")
            state[ours] = t
    finally:
        handles.clear()
    state.update({key: state[source] for key, source in tied.items()})
    return state, layout


def load_model(name_or_path, dtype: torch.dtype = torch.float32, device="cpu", revision=None):
    """Build the model a checkpoint directory or hub id holds (phi or Phi-3, as its config.json says), in `dtype` on
    `device`."""
    d = resolve_checkpoint_dir(name_or_path, revision)
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise WeightsError(f"no config.json in {d}")
    config = families.config_from_json(cfg_file)
    with torch.device("meta"):
        model = families.build(config)
    tied = tied_keys(model)
    state, layout = load_state_dict(d, model, dtype, device)
    model.load_state_dict(state, assign=True, strict=True)
    for key, source in tied.items():  # assign gave each key a Parameter of its own: tie them again
        module, _, name = key.rpartition(".")
        setattr(model.get_submodule(module), name, model.get_parameter(source))
    model.checkpoint_layout = layout
    # where the base came from, for adapters that must name it (export_peft): a local directory absolute, else the id
    model.name_or_path = str(d.resolve()) if Path(name_or_path).is_dir() else str(name_or_path)
    return model


def to_hf_state_dict(state: dict[str, torch.Tensor], num_layers: int, layout: str = "hf",
                     tied: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """phift keys → HF-native keys of `layout` (phi's Wqkv split back into q/k/v). Keys of LoRA adapters are not
    weights, nor are the `tied` keys (stored once, under their source): skipped."""
    state = {k: v for k, v in state.items() if ".lora_" not in k and k not in (tied or {})}
    out = {}
    for ours, theirs in key_map(layout, state, num_layers).items():
        pieces = state[ours].chunk(len(theirs), dim=0)
        out.update({k: p.contiguous() for k, p in zip(theirs, pieces)})
    return out


def save_model(model, directory, dtype: torch.dtype | None = None, max_shard_bytes: int = 4 << 30,
               state_dict: dict | None = None) -> Path:
    """Save in the family's HF-native layout + config.json, loadable by transformers.AutoModelForCausalLM."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state_dict is None else state_dict
    layout = families.family_of(model).layouts[0]
    hf = {k: (v.to(dtype) if dtype else v).detach().cpu() for k, v in
          to_hf_state_dict(state, model.config.num_layers, layout, tied_keys(model)).items()}
    shards, cur, size = [], {}, 0
    for k, v in hf.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + nbytes
    shards.append(cur)
    for old in d.glob("model*.safetensors*"):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(d / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(d / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in hf.values())
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(dtype or next(iter(hf.values())).dtype).replace("torch.", "")
    (d / "config.json").write_text(json.dumps(config, indent=2))
    return d


def inference_dtype(checkpoint_dir: Path, device) -> torch.dtype:
    """The dtype LLaMA-Factory v0.3.3 runs a model in when none is asked for: bf16 for a bf16 checkpoint on a GPU
    that has it, else fp16 on a GPU, fp32 on the CPU."""
    if torch.device(device).type != "cuda":
        return torch.float32
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text()) if (
        Path(checkpoint_dir) / "config.json").is_file() else {}
    saved = config.get("dtype") or config.get("torch_dtype")  # transformers 5 writes dtype, 4.x torch_dtype
    return torch.bfloat16 if saved == "bfloat16" and torch.cuda.is_bf16_supported() else torch.float16


def load_for_inference(name_or_path, adapters: str | list[str] | None = None, dtype: torch.dtype | None = None,
                       device="cpu"):
    """(model in eval mode, tokenizer): a checkpoint plus LoRA adapter directories merged in, in order, in `dtype`
    (default: inference_dtype), with the CUDA kernels loaded for `device`."""
    from . import kernels, lora
    from .tokenizer import load_tokenizer

    d = resolve_checkpoint_dir(name_or_path)
    kernels.load(device)
    model = load_model(d, dtype=dtype or inference_dtype(d, device), device=device)
    adapters = [a for a in (adapters.split(",") if isinstance(adapters, str) else adapters or []) if a]
    for a in adapters:
        lora.load_adapter(model, a, trainable=False)
        lora.unload(model, merge=True)
    tok_dir = next((Path(a) for a in reversed(adapters) if (Path(a) / "tokenizer.json").is_file()), d)
    return model.eval(), load_tokenizer(tok_dir)
