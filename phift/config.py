"""PhiConfig: the few numbers that define a phi model, named presets, and reading a checkpoint's config.json."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

ENDOFTEXT_ID = 50256  # phi's <|endoftext|>: bos, eos and pad


@dataclass
class PhiConfig:
    name: str = "phi-1_5"
    vocab_size: int = 51200  # padded; the tokenizer has 50295 tokens
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 32
    intermediate_size: int = 8192
    rotary_dim: int = 32  # rotary on the first rotary_dim dims of each head
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    # dropout in training, as transformers' PhiForCausalLM applies it (phi-2 ships resid_pdrop 0.1, phi-1/1.5 none)
    resid_pdrop: float = 0.0  # on the attention output and on the MLP output, each with its own mask
    embd_pdrop: float = 0.0  # on the token embeddings
    attention_dropout: float = 0.0  # on the attention probabilities

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.rotary_dim > self.head_dim or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and <= head_dim {self.head_dim}")
        for name in ("resid_pdrop", "embd_pdrop", "attention_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> "PhiConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf_dict(cls, d: dict, name: str = "") -> "PhiConfig":
        """Accept the HF-native config (model_type "phi", as transformers 4.x and 5.x write it) and the old
        remote-code ones (mixformer-sequential, phi-msft). A field that would change the math in a way phift does not
        implement is an error naming it, never silently dropped."""
        name = name or d.get("_name_or_path", "") or "phi"
        if "hidden_size" in d:  # HF-native PhiConfig
            if d.get("model_type", "phi") != "phi":
                raise ValueError(f"config.json has model_type {d['model_type']!r}; phift reads phi-1, phi-1_5 and "
                                 "phi-2 checkpoints (model_type 'phi')")
            hidden, heads = d["hidden_size"], d["num_attention_heads"]
            kv_heads = d.get("num_key_value_heads") or heads
            if kv_heads != heads:
                raise ValueError(f"grouped-query attention (num_key_value_heads={kv_heads}) is not a phi-1/1.5/2 "
                                 "layout; phift supports multi-head attention only")
            if d.get("head_dim") not in (None, hidden // heads):
                raise ValueError(f"head_dim {d['head_dim']} differs from hidden_size / num_attention_heads = "
                                 f"{hidden // heads}; phi's heads split the hidden size evenly")
            if d.get("qk_layernorm"):
                raise ValueError("qk_layernorm=true (LayerNorm on queries and keys) is not used by any published "
                                 "phi model and is not implemented")
            # transformers 5 nests the rotary settings in rope_parameters; 4.x kept them at the top level
            params, scaling = d.get("rope_parameters") or {}, d.get("rope_scaling") or {}
            rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
            extra = (set(params) | set(scaling)) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
            if rope_type != "default" or extra:
                raise ValueError(f"RoPE scaling ({params or scaling}) is not implemented: phift computes phi's plain "
                                 "rotary embedding (rope_type 'default')")
            rope = {**d, **params}
            return cls(name=name, vocab_size=d["vocab_size"], hidden_size=hidden, num_layers=d["num_hidden_layers"],
                       num_heads=heads, intermediate_size=d.get("intermediate_size") or 4 * hidden,
                       rotary_dim=int(rope.get("partial_rotary_factor", 0.5) * (hidden // heads)),
                       rope_theta=rope.get("rope_theta", 10000.0),
                       max_position_embeddings=d.get("max_position_embeddings", 2048),
                       layer_norm_eps=d.get("layer_norm_eps", 1e-5), **_common(d, "hidden_act", "attention_dropout"))
        if "n_embd" in d:  # MixFormerSequential (Sep 2023) and phi-msft (Dec 2023) remote code
            if d.get("n_head_kv") not in (None, d["n_head"]):
                raise ValueError(f"n_head_kv={d['n_head_kv']} (grouped-query attention) is not a phi-1/1.5/2 layout")
            hidden = d["n_embd"]
            return cls(name=name, vocab_size=d["vocab_size"], hidden_size=hidden, num_layers=d["n_layer"],
                       num_heads=d["n_head"], intermediate_size=d.get("n_inner") or 4 * hidden,
                       rotary_dim=d["rotary_dim"],
                       max_position_embeddings=d.get("n_positions", 2048),
                       layer_norm_eps=d.get("layer_norm_epsilon", 1e-5),
                       **_common(d, "activation_function", "attn_pdrop"))
        raise ValueError("config.json is neither an HF-native phi config (hidden_size, num_hidden_layers, ...) nor a "
                         "remote-code MixFormer/phi-msft one (n_embd, n_layer, ...)")

    @classmethod
    def from_json(cls, path) -> "PhiConfig":
        try:
            return cls.from_hf_dict(json.loads(Path(path).read_text()))
        except KeyError as e:
            raise ValueError(f"{path}: no {e.args[0]!r}, which a phi config.json needs") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict:
        """The HF-native config.json, so `transformers.AutoModelForCausalLM` loads what phift saves."""
        return {
            "architectures": ["PhiForCausalLM"], "model_type": "phi", "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_heads,
            "intermediate_size": self.intermediate_size, "hidden_act": "gelu_new",
            "partial_rotary_factor": self.rotary_dim / self.head_dim, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings, "layer_norm_eps": self.layer_norm_eps,
            "qk_layernorm": False, "rope_scaling": None, "tie_word_embeddings": False,
            "attention_dropout": self.attention_dropout, "embd_pdrop": self.embd_pdrop,
            "resid_pdrop": self.resid_pdrop,
            "bos_token_id": ENDOFTEXT_ID if self.vocab_size > ENDOFTEXT_ID else None,
            "eos_token_id": ENDOFTEXT_ID if self.vocab_size > ENDOFTEXT_ID else None,
            "initializer_range": 0.02, "use_cache": True,
        }


# phi's activation: GELU's tanh approximation, under each name a phi config has used for it
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _common(d: dict, act_key: str, attn_drop_key: str) -> dict:
    """The fields both config forms share under different names: the activation (checked) and the dropouts."""
    act = d.get(act_key) or "gelu_new"
    if act not in GELU_TANH:
        raise ValueError(f"{act_key} {act!r} is not phi's activation; phift implements GELU's tanh approximation "
                         f"({', '.join(GELU_TANH)})")
    if d.get("tie_word_embeddings"):
        raise ValueError("tie_word_embeddings=true: phi's lm_head is a separate matrix with a bias; tied "
                         "embeddings are not implemented")
    return {"resid_pdrop": d.get("resid_pdrop") or 0.0, "embd_pdrop": d.get("embd_pdrop") or 0.0,
            "attention_dropout": d.get(attn_drop_key) or 0.0}


PRESETS = {
    "phi-1": PhiConfig(name="phi-1"),
    "phi-1_5": PhiConfig(name="phi-1_5"),
    "phi-2": PhiConfig(name="phi-2", hidden_size=2560, num_layers=32, num_heads=32, intermediate_size=10240,
                       rotary_dim=32, resid_pdrop=0.1),
    # tests and the offline demo: 2 layers, hidden 64, a small vocabulary (the demo tokenizer's)
    "tiny": PhiConfig(name="tiny", vocab_size=2048, hidden_size=64, num_layers=2, num_heads=4,
                      intermediate_size=256, rotary_dim=8, max_position_embeddings=1024),
}
