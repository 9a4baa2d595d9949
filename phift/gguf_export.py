"""A merged model as one GGUF file for llama.cpp (and Ollama), written with `gguf`, llama.cpp's own writer, in the
llama.cpp architecture of its family: `phi2` for phi (phi-1, phi-1_5, phi-2), `phi3` for Phi-3 (Phi-3-mini,
Phi-3.5-mini, Phi-4-mini).

What llama.cpp's convert_hf_to_gguf.py writes for PhiForCausalLM (its Phi2Model) and Phi3ForCausalLM (its
Phi3MiniModel), from phift's weights directly. The fused projections go in as they are: Wqkv and qkv_proj as
attn_qkv (rows q;k;v, which llama.cpp splits the same way, grouped-query sizes included), gate_up_proj as ffn_up
(rows gate;up: llama.cpp's SwiGLU takes SiLU of the first half). LongRoPE's factors are two f32 tensors,
rope_factors_long and rope_factors_short, beside its attention factor and original length; a tied embedding
(Phi-4-mini) is token_embd alone, which llama.cpp then reads as the output too.

The tokenizer goes in as the model's tokenizer.json has it: GPT-2's byte-level BPE (phi, Phi-4-mini) as
llama.cpp's get_vocab_base writes it, its pre-tokenizer named as llama.cpp knows it (GPT-2's regex, or GPT-4o's:
Phi-4-mini's); LLaMA's sentencepiece BPE (Phi-3, Phi-3.5) as llama.cpp's `llama` vocabulary, each merged token
scored by its merge's rank so that llama.cpp's highest-score-first merging takes the merges in their order. Both
are padded to the model's vocab_size with unused [PADn] tokens.

llama.cpp strips the whitespace after special tokens, as Phi-3's tokenizer.json marks them (rstrip), for a model
whose name contains phi-3 or phi3, and for no other: the file's general.name says so exactly when the tokenizer does.

Where llama.cpp cannot compute what phift computes, the file's context length stops short of it, so that llama.cpp's
own default context (`-c 0`) stays where its answers are phift's:
- LongRoPE's switch: llama.cpp picks the short or the long factors once, from the context it is started with, not
  from the sequence. Within the original length (4096) it takes the short ones, as phift does for sequences that
  long; started with more (`-c 8192`), it takes the long ones for every position from the first, which is phift's
  answer for sequences past 4096 only. A LongRoPE model's file says 4096 (with 131072 in LongRoPE's factors).
- The sliding window: llama.cpp runs Phi-3 without it ("Phi SWA is currently disabled"), attending to every earlier
  token. A window shorter than the context (Phi-3-mini-4k: 2047 of 4096) becomes the file's context length.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from .families import family_of

logger = logging.getLogger(__name__)

T = gguf.MODEL_TENSOR


@dataclass(frozen=True)
class Arch:
    arch: gguf.MODEL_ARCH
    tensors: dict[str, gguf.MODEL_TENSOR]  # phift module → llama.cpp tensor (gguf.TENSOR_NAMES: its name in the file)


ARCHS = {  # by phift.families name
    "phi": Arch(gguf.MODEL_ARCH.PHI2, {
        "wte": T.TOKEN_EMBD, "layers.{i}.ln": T.ATTN_NORM, "layers.{i}.attn.Wqkv": T.ATTN_QKV,
        "layers.{i}.attn.out_proj": T.ATTN_OUT, "layers.{i}.mlp.fc1": T.FFN_UP, "layers.{i}.mlp.fc2": T.FFN_DOWN,
        "ln_f": T.OUTPUT_NORM, "lm_head": T.OUTPUT}),
    "phi3": Arch(gguf.MODEL_ARCH.PHI3, {
        "wte": T.TOKEN_EMBD, "layers.{i}.attn_norm": T.ATTN_NORM, "layers.{i}.attn.qkv_proj": T.ATTN_QKV,
        "layers.{i}.attn.o_proj": T.ATTN_OUT, "layers.{i}.mlp_norm": T.FFN_NORM,
        "layers.{i}.mlp.gate_up_proj": T.FFN_UP, "layers.{i}.mlp.down_proj": T.FFN_DOWN, "norm": T.OUTPUT_NORM,
        "lm_head": T.OUTPUT}),
}
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

# The pre-tokenizer regex of Phi-4-mini's tokenizer.json (o200k's), which llama.cpp knows as "gpt-4o"
GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m"
               r"|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re"
               r"|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def tensor_names(config) -> dict[str, str]:
    """phift module name → GGUF tensor name (without .weight/.bias), for a model of this config."""
    out = {}
    for ours, tensor in ARCHS[family_of(config).name].tensors.items():
        for i in range(config.num_layers) if "{i}" in ours else [0]:
            out[ours.format(i=i)] = gguf.TENSOR_NAMES[tensor].format(bid=i)
    return out


def _looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def _pieces(spec: dict) -> list[dict]:
    pre = spec.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]


def _byte_level(spec: dict) -> bool:
    return spec["model"].get("type") == "BPE" and any(p.get("type") == "ByteLevel" for p in _pieces(spec))


def _sentencepiece(spec: dict) -> bool:
    """LLaMA's sentencepiece BPE as tokenizer.json writes it: byte fallback, spaces as ▁ (a normalizer that prepends
    and replaces, or a Metaspace pre-tokenizer)."""
    model, norm = spec["model"], spec.get("normalizer") or {}
    norms = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    return model.get("type") == "BPE" and model.get("byte_fallback", False) and (
        any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in norms)
        or any(p.get("type") == "Metaspace" for p in _pieces(spec)))


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for a byte-level BPE's pre-tokenizer: GPT-2's regex (phi's: llama.cpp calls it phi-2), or
    GPT-4o's (Phi-4-mini's). llama.cpp splits text with its own copy of each regex, so an unknown one is refused."""
    pieces = _pieces(spec)
    if [p.get("type") for p in pieces] == ["ByteLevel"] and pieces[0].get("use_regex", True):
        return "phi-2"
    split = next((p for p in pieces if p.get("type") == "Split"), None)
    if split is not None and split.get("pattern", {}).get("Regex") == GPT4O_SPLIT and \
            [p.get("type") for p in pieces] == ["Split", "ByteLevel"] and not pieces[1].get("use_regex", True):
        return "gpt-4o"
    raise ValueError(f"GGUF export names a byte-level BPE's pre-tokenizer as llama.cpp knows it: GPT-2's regex (phi) "
                     f"or GPT-4o's (Phi-4-mini); this tokenizer's is {spec.get('pre_tokenizer')}")


def _added(tokenizer, spec: dict) -> dict[int, tuple[str, bool]]:
    """id → (text as llama.cpp matches it, special) of the tokenizer's added tokens."""
    out = {}
    for a in spec.get("added_tokens", []):
        token = a["content"]
        if not a.get("normalized", False) and _byte_level(spec):  # llama.cpp matches added tokens as normalized text
            token = tokenizer.decode(tokenizer.encode(token), skip_special_tokens=False)
        out[a["id"]] = (token, bool(a.get("special")) or _looks_special(token))
    return out


def _check_size(by_id: dict, vocab_size: int) -> None:
    if max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has token id {max(by_id)}, beyond the model's vocab_size {vocab_size}")


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE tokenizer, `vocab_size` tokens long."""
    spec = tokenizer.to_json()
    if not _byte_level(spec):
        raise ValueError(f"not a GPT-2 byte-level BPE tokenizer: {tokenizer.source or 'this one'} is "
                         f"{spec['model'].get('type')} with the pre-tokenizer {spec.get('pre_tokenizer')}")
    model = spec["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    added = _added(tokenizer, spec)
    by_id.update({i: text for i, (text, _) in added.items()})
    _check_size(by_id, vocab_size)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i][0])
            types.append(gguf.TokenType.CONTROL if added[i][1] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def sentencepiece_vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of a LLaMA-style sentencepiece BPE tokenizer (Phi-3's), `vocab_size` long.

    llama.cpp's `llama` tokenizer merges the adjacent pair whose concatenation scores highest; scoring each merged
    token by minus its merge's rank makes it take the merges in tokenizer.json's order, as BPE does. The tokens no
    merge makes (single characters, bytes) are never such a concatenation and score below every merge; added
    tokens, which llama.cpp matches whole before it merges anything, score 0 as sentencepiece's control tokens do."""
    spec = tokenizer.to_json()
    model = spec["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    added = _added(tokenizer, spec)
    by_id.update({i: text for i, (text, _) in added.items()})
    _check_size(by_id, vocab_size)
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(merges):
        rank.setdefault(a + b, r)
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1e9)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        scores.append(-float(rank.get(token, len(merges) + i)) if i not in added else 0.0)
        if token == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i][1] else gguf.TokenType.USER_DEFINED)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, scores, types


def gguf_name(name: str, tokenizer) -> str:
    """The file's general.name: `name`, with or without llama.cpp's Phi-3 marker as the tokenizer strips the
    whitespace after its special tokens or not (see the module's docstring)."""
    strips = any(a.get("special") and a.get("rstrip") for a in tokenizer.to_json().get("added_tokens", []))
    if strips == bool(re.search(r"phi-?3", name, re.IGNORECASE)):
        return name
    return f"{name} (Phi-3 tokenizer)" if strips else re.sub(r"phi-?3", "Phi 3", name, flags=re.IGNORECASE)


def _write_tokenizer(w: gguf.GGUFWriter, tokenizer, vocab_size: int, family: str) -> None:
    spec = tokenizer.to_json()
    if _byte_level(spec):
        tokens, types, merges = vocabulary(tokenizer, vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre_tokenizer_name(spec))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
    elif _sentencepiece(spec):
        tokens, scores, types = sentencepiece_vocabulary(tokenizer, vocab_size)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(True)  # the ▁ sentencepiece puts before a text, and after each special token
        unk = spec["model"].get("unk_token")
        if unk is not None:
            w.add_unk_token_id(tokenizer._id(unk))
    else:
        raise ValueError(f"GGUF export writes GPT-2's byte-level BPE (phi, Phi-4-mini) and LLaMA's sentencepiece BPE "
                         f"(Phi-3); {tokenizer.source or 'this tokenizer'} is {spec['model'].get('type')} with the "
                         f"pre-tokenizer {spec.get('pre_tokenizer')}")
    w.add_bos_token_id(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    if family == "phi":
        w.add_unk_token_id(tokenizer.eos_token_id)  # phi's <|endoftext|> is bos, eos and unk
        w.add_add_bos_token(False)  # as llama.cpp's converter for phi2: phi's prompts start without it
    else:
        w.add_pad_token_id(tokenizer.pad_token_id)
        w.add_add_bos_token(getattr(tokenizer, "add_bos_token", False))  # tokenizer_config.json's, else none


def _array(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A weight in the file's type: 1-D tensors (norms, biases, rotary factors) stay fp32, as llama.cpp's converter
    keeps them; matrices whose rows do not split into q8_0 blocks of 32 fall back to f16, as there."""
    data = t.detach().float().cpu().numpy()
    if data.ndim == 1:
        return data, gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        try:
            return gguf.quants.quantize(data, qtype), qtype
        except gguf.quants.QuantError:
            pass
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def _phi_parameters(w: gguf.GGUFWriter, c) -> dict[str, torch.Tensor]:
    w.add_context_length(c.max_position_embeddings)
    w.add_head_count_kv(c.num_heads)
    w.add_layer_norm_eps(c.layer_norm_eps)
    return {}


def served_context(c) -> tuple[int, str | None]:
    """(the file's context length, why it is shorter than the model's): see the module's docstring."""
    context, why = c.max_position_embeddings, None
    if c.rope_scaling is not None and c.original_max_position_embeddings < context:
        context = c.original_max_position_embeddings
        why = (f"llama.cpp picks LongRoPE's factors from its context size, not from the sequence: up to {context} "
               f"tokens it computes phift's numbers; `-c` above that applies the long factors to every position")
    if c.sliding_window is not None and c.sliding_window < context:
        context = c.sliding_window
        why = f"llama.cpp runs Phi-3 without its sliding window: past {context} tokens it attends to all of them"
    return context, why


def _phi3_parameters(w: gguf.GGUFWriter, c) -> dict[str, torch.Tensor]:
    """Phi-3's keys, and LongRoPE's factor tensors (by GGUF name)."""
    context, why = served_context(c)
    if why:
        logger.warning("GGUF context length %d (the model's is %d): %s", context, c.max_position_embeddings, why)
    w.add_context_length(context)
    w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_sliding_window(c.sliding_window or 0)  # 0: none (Phi-4-mini's config has none)
    s = c.rope_scaling
    if s is None:
        return {}
    w.add_rope_scaling_attn_factors(c.rope_attention_scaling)
    return {gguf.TENSOR_NAMES[T.ROPE_FACTORS_LONG] + ".weight": torch.tensor(s.long_factor),
            gguf.TENSOR_NAMES[T.ROPE_FACTORS_SHORT] + ".weight": torch.tensor(s.short_factor)}


def write_gguf(model, tokenizer, path: str | os.PathLike, gguf_type: str = "f16", name: str | None = None) -> Path:
    """Write the model (LoRA adapters already merged) and its tokenizer as one GGUF file."""
    if gguf_type not in FILE_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}; known: {', '.join(FILE_TYPES)}")
    c = model.config
    family = family_of(c).name
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = tensor_names(c)
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]

    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[ARCHS[family].arch])
    w.add_name(gguf_name(name or c.name, tokenizer))
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_layers)
    w.add_head_count(c.num_heads)
    w.add_rope_dimension_count(c.rotary_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_file_type(FILE_TYPES[gguf_type])
    extra = _phi_parameters(w, c) if family == "phi" else _phi3_parameters(w, c)
    _write_tokenizer(w, tokenizer, c.vocab_size, family)
    tensors = {}
    for key, t in model.state_dict().items():
        module, param = key.rsplit(".", 1)
        if ".lora_" in key:
            raise ValueError(f"{key}: merge the LoRA adapters into the model before writing GGUF")
        if module == "lm_head" and getattr(c, "tie_word_embeddings", False):
            continue  # the embedding is the output matrix too: llama.cpp reads token_embd for both
        tensors[f"{names[module]}.{param}"] = t
    for name_, t in {**tensors, **extra}.items():
        data, dtype = _array(t, qtype)  # numpy gives f16 and f32 their type; a quantized array is raw bytes
        quantized = dtype == gguf.GGMLQuantizationType.Q8_0
        w.add_tensor(name_, data, raw_dtype=dtype if quantized else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
