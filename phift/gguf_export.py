"""A merged model as one GGUF file for llama.cpp (and Ollama): llama.cpp's `phi2` architecture, which covers every
phi (phi-1, phi-1_5, phi-2), written with `gguf`, llama.cpp's own writer.

What llama.cpp's convert_hf_to_gguf.py writes for PhiForCausalLM (its Phi2Model), from phift's weights directly:
the fused Wqkv goes in as attn_qkv (rows q;k;v, which llama.cpp splits the same way), and the GPT-2 byte-level BPE
vocabulary as its get_vocab_base writes it (padded to the model's vocab_size with unused [PADn] tokens, added tokens
that are special as control tokens, the others as user-defined).
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch

from .model import Phi

T = gguf.MODEL_TENSOR
# phift module → llama.cpp tensor (gguf.TENSOR_NAMES gives its name in the file, e.g. blk.{bid}.attn_qkv)
TENSORS = {
    "wte": T.TOKEN_EMBD,
    "layers.{i}.ln": T.ATTN_NORM,
    "layers.{i}.attn.Wqkv": T.ATTN_QKV,
    "layers.{i}.attn.out_proj": T.ATTN_OUT,
    "layers.{i}.mlp.fc1": T.FFN_UP,
    "layers.{i}.mlp.fc2": T.FFN_DOWN,
    "ln_f": T.OUTPUT_NORM,
    "lm_head": T.OUTPUT,
}
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def tensor_names(num_layers: int) -> dict[str, str]:
    """phift module name → GGUF tensor name (without .weight/.bias)."""
    out = {}
    for ours, tensor in TENSORS.items():
        for i in range(num_layers) if "{i}" in ours else [0]:
            out[ours.format(i=i)] = gguf.TENSOR_NAMES[tensor].format(bid=i)
    return out


def _looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE tokenizer, `vocab_size` tokens long."""
    spec = tokenizer.to_json()
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    pieces = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if model.get("type") != "BPE" or not any(p.get("type") == "ByteLevel" for p in pieces):
        raise ValueError(f"GGUF export writes GPT-2 byte-level BPE tokenizers (phi's); {tokenizer.source or 'this'} "
                         f"is {model.get('type')} with the pre-tokenizer {pre.get('type')}")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has token id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = by_id[i]
        if i in added:
            if not added[i].get("normalized", False):  # llama.cpp matches added tokens as normalized text
                token = tokenizer.decode(tokenizer.encode(token), skip_special_tokens=False)
            special = added[i].get("special") or _looks_special(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _array(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A weight in the file's type: 1-D tensors (norms, biases) stay fp32, as llama.cpp's converter keeps them;
    matrices whose rows do not split into q8_0 blocks of 32 fall back to f16, as there."""
    data = t.detach().float().cpu().numpy()
    if data.ndim == 1:
        return data, gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        try:
            return gguf.quants.quantize(data, qtype), qtype
        except gguf.quants.QuantError:
            pass
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def write_gguf(model: Phi, tokenizer, path: str | os.PathLike, gguf_type: str = "f16", name: str | None = None) -> Path:
    """Write the model (LoRA adapters already merged) and its tokenizer as one GGUF file."""
    if gguf_type not in FILE_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}; known: {', '.join(FILE_TYPES)}")
    c = model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, types, merges = vocabulary(tokenizer, c.vocab_size)
    names = tensor_names(c.num_layers)
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]

    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.PHI2])
    w.add_name(name or c.name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_layers)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_heads)
    w.add_layer_norm_eps(c.layer_norm_eps)
    w.add_rope_dimension_count(c.rotary_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_file_type(FILE_TYPES[gguf_type])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("phi-2")  # GPT-2's pre-tokenizer regex, under the name llama.cpp gives phi's tokenizer
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_unk_token_id(tokenizer.eos_token_id)  # phi's <|endoftext|> is bos, eos and unk
    w.add_add_bos_token(False)  # as llama.cpp's converter for phi2: phi's prompts start without it
    for key, t in model.state_dict().items():
        module, param = key.rsplit(".", 1)
        if ".lora_" in key:
            raise ValueError(f"{key}: merge the LoRA adapters into the model before writing GGUF")
        data, dtype = _array(t, qtype)  # numpy gives f16 and f32 their type; a quantized array is raw bytes
        quantized = dtype == gguf.GGMLQuantizationType.Q8_0
        w.add_tensor(f"{names[module]}.{param}", data, raw_dtype=dtype if quantized else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
