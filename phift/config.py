"""Model configs: the few numbers that define a model, named presets, and reading a checkpoint's config.json.

PhiConfig is phi-1, phi-1_5 and phi-2 (model_type "phi"); Phi3Config is Phi-3-mini, Phi-3.5-mini and Phi-4-mini
(model_type "phi3", transformers' Phi3ForCausalLM). `phift.families` maps a config.json or a preset name to its class.
"""
from __future__ import annotations

import dataclasses
import json
import math
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

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads  # phi's attention is multi-head: every query head has its own keys and values

    @classmethod
    def from_name(cls, name: str, **overrides) -> "PhiConfig":
        return _from_name(cls, name, overrides)

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


@dataclass(frozen=True)
class LongRoPE:
    """LongRoPE's per-frequency stretch (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini), as transformers computes it:
    inv_freq_i = 1 / (factor_i · theta^(2i / rotary_dim)), with `short_factor` while the longest sequence of a forward
    (its largest position + 1) is within `original_max_position_embeddings` and `long_factor` beyond it, and cos and
    sin multiplied by `attention_scaling` at every length."""
    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    attention_factor: float | None = None  # None: sqrt(1 + ln(factor) / ln(original)), LongRoPE's own
    factor: float | None = None  # None: max_position_embeddings / original_max_position_embeddings


@dataclass
class Phi3Config:
    name: str = "phi-3-mini-4k"
    vocab_size: int = 32064
    hidden_size: int = 3072
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32  # grouped-query attention when fewer than num_heads (Phi-4-mini: 8 for 24)
    intermediate_size: int = 8192
    rotary_dim: int = 96  # rotary on the first rotary_dim dims of each head (partial_rotary_factor × head_dim)
    rope_theta: float = 10000.0
    rope_scaling: LongRoPE | None = None
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    sliding_window: int | None = None  # a query sees itself and the sliding_window - 1 keys before it
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False  # lm_head is the embedding matrix (Phi-4-mini)
    # dropout in training, as transformers' Phi3ForCausalLM applies it; it reads embd_pdrop but never applies it,
    # and neither does phift
    resid_pdrop: float = 0.0  # on the attention output and on the MLP output, each with its own mask
    attention_dropout: float = 0.0  # on the attention probabilities
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 32000
    pad_token_id: int | None = 32000  # its embedding row gets no gradient from the lookup (nn.Embedding padding_idx)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.rotary_dim > self.head_dim or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and <= head_dim {self.head_dim}")
        if self.rope_scaling is not None:
            for field in ("short_factor", "long_factor"):
                if len(getattr(self.rope_scaling, field)) != self.rotary_dim // 2:
                    raise ValueError(f"LongRoPE's {field} has {len(getattr(self.rope_scaling, field))} values; "
                                     f"rotary_dim {self.rotary_dim} needs {self.rotary_dim // 2}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is outside the vocabulary of {self.vocab_size}")
        for name in ("resid_pdrop", "attention_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rope_attention_scaling(self) -> float:
        """The factor on cos and sin (1 without LongRoPE), as transformers' _compute_longrope_parameters sets it."""
        s = self.rope_scaling
        if s is None:
            return 1.0
        if s.attention_factor is not None:
            return s.attention_factor
        factor = s.factor if s.factor is not None else (self.max_position_embeddings
                                                         / self.original_max_position_embeddings)
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(self.original_max_position_embeddings))

    @property
    def rope_switch_length(self) -> int | None:
        """The sequence length past which LongRoPE rotates every position with its long factors: keys cached at a
        shorter length are then stale. None without LongRoPE."""
        return self.original_max_position_embeddings if self.rope_scaling is not None else None

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Phi3Config":
        return _from_name(cls, name, overrides)

    @classmethod
    def from_hf_dict(cls, d: dict, name: str = "") -> "Phi3Config":
        """Accept transformers' Phi3Config (model_type "phi3") in the forms 4.x and 5.x write, with transformers'
        defaults for missing fields. A field that would change the math in a way phift does not implement is an error
        naming it, never silently dropped."""
        name = name or d.get("_name_or_path", "") or "phi3"
        if d.get("model_type", "phi3") != "phi3":
            raise ValueError(f"config.json has model_type {d['model_type']!r}; Phi3Config reads model_type 'phi3' "
                             "(Phi-3, Phi-3.5, Phi-4-mini)")
        hidden, heads = d["hidden_size"], d["num_attention_heads"]
        if d.get("head_dim") not in (None, hidden // heads):
            raise ValueError(f"head_dim {d['head_dim']} differs from hidden_size / num_attention_heads = "
                             f"{hidden // heads}; no published Phi-3/4 model does that and phift does not implement it")
        act = d.get("hidden_act") or "silu"
        if act != "silu":
            raise ValueError(f"hidden_act {act!r}: phift implements Phi-3's SwiGLU MLP (silu) only")
        for field, harmless in (("attention_bias", False), ("mlp_bias", False), ("lm_head_bias", False),
                                ("interpolate_factor", 1), ("full_attn_mod", 1)):
            if d.get(field, harmless) not in (harmless, None):
                raise ValueError(f"{field}={d[field]!r} is not implemented (phift supports {field}={harmless!r}, "
                                 "as every published Phi-3/Phi-4-mini checkpoint has it)")
        # transformers 5 nests the rotary settings in rope_parameters, 4.x wrote rope_scaling; either way the dict's own
        # rope_theta and partial_rotary_factor win over the top-level ones, and the top-level
        # original_max_position_embeddings (default 4096) over the dict's
        params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
        kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
        partial = params.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        params.pop("original_max_position_embeddings", None)
        if kind in ("longrope", "su"):  # "su" is the name the first Phi-3-mini-128k release used
            unknown = set(params) - {"short_factor", "long_factor", "attention_factor", "factor"}
            if unknown or not {"short_factor", "long_factor"} <= set(params):
                raise ValueError(f"LongRoPE parameters {sorted(params)}: phift reads short_factor, long_factor and "
                                 f"optionally attention_factor and factor (not {sorted(unknown) or 'without factors'})")
            scaling = LongRoPE(tuple(params["short_factor"]), tuple(params["long_factor"]),
                               params.get("attention_factor"), params.get("factor"))
        elif kind == "default" and not params:
            scaling = None
        else:
            raise ValueError(f"RoPE scaling {kind!r} ({d.get('rope_scaling') or d.get('rope_parameters')}) is not "
                             "implemented: phift computes Phi-3's plain rotary embedding and LongRoPE")
        kv_heads = d.get("num_key_value_heads") or heads
        return cls(name=name, vocab_size=d.get("vocab_size", 32064), hidden_size=hidden,
                   num_layers=d["num_hidden_layers"], num_heads=heads, num_kv_heads=kv_heads,
                   intermediate_size=d.get("intermediate_size", 8192), rotary_dim=int(hidden // heads * partial),
                   rope_theta=theta, rope_scaling=scaling,
                   max_position_embeddings=d.get("max_position_embeddings", 4096),
                   original_max_position_embeddings=d.get("original_max_position_embeddings") or 4096,
                   sliding_window=d.get("sliding_window"), rms_norm_eps=d.get("rms_norm_eps", 1e-5),
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                   resid_pdrop=d.get("resid_pdrop") or 0.0, attention_dropout=d.get("attention_dropout") or 0.0,
                   bos_token_id=d.get("bos_token_id", 1), eos_token_id=d.get("eos_token_id", 32000),
                   pad_token_id=d.get("pad_token_id", 32000))

    @classmethod
    def from_json(cls, path) -> "Phi3Config":
        try:
            return cls.from_hf_dict(json.loads(Path(path).read_text()))
        except KeyError as e:
            raise ValueError(f"{path}: no {e.args[0]!r}, which a phi3 config.json needs") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict:
        """The HF-native config.json (transformers 4.x's field names, which 5.x reads too), so
        `transformers.AutoModelForCausalLM` loads what phift saves."""
        s = self.rope_scaling
        rope_scaling = None if s is None else {
            "type": "longrope", "short_factor": list(s.short_factor), "long_factor": list(s.long_factor),
            **({"attention_factor": s.attention_factor} if s.attention_factor is not None else {}),
            **({"factor": s.factor} if s.factor is not None else {})}
        return {
            "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size, "hidden_act": "silu",
            "partial_rotary_factor": self.rotary_dim / self.head_dim, "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling, "max_position_embeddings": self.max_position_embeddings,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "sliding_window": self.sliding_window, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_dropout": self.attention_dropout,
            "embd_pdrop": 0.0, "resid_pdrop": self.resid_pdrop, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id, "initializer_range": 0.02,
            "use_cache": True,
        }


def _from_name(cls, name: str, overrides: dict):
    own = {n: c for n, c in PRESETS.items() if isinstance(c, cls)}
    if name not in own:
        raise ValueError(f"unknown {cls.__name__} preset {name!r}; known: {', '.join(own)}")
    return dataclasses.replace(own[name], **overrides)


# The published configs' LongRoPE factors (config.json's rope_scaling), one per rotary frequency
PHI3_MINI_128K_ROPE = LongRoPE(  # Phi-3-mini-128k-instruct as updated in June 2024 ("type": "longrope")
    short_factor=(1.1, 1.1, 1.1, 1.3000000000000003, 1.3500000000000003, 1.3500000000000003, 1.4000000000000004,
                  1.5500000000000005, *[2.000000000000001] * 17, *[2.0500000000000007] * 6, 2.1000000000000005,
                  2.1000000000000005, 2.1500000000000004, *[2.25] * 5, 2.3999999999999995, 2.4499999999999993,
                  2.499999999999999, 2.6999999999999984, 2.6999999999999984, 2.7499999999999982, 2.799999999999998,
                  2.8999999999999977, 3.049999999999997),
    long_factor=(1.0700000524520874, 1.1200000047683716, 1.149999976158142, 1.4199999570846558, 1.5699999332427979,
                 1.7999999523162842, 2.129999876022339, 2.129999876022339, 3.009999990463257, 5.910000324249268,
                 6.950000286102295, 9.070000648498535, 9.930000305175781, 10.710000038146973, 11.130000114440918,
                 14.609999656677246, 15.409998893737793, 19.809999465942383, 37.279998779296875, 38.279998779296875,
                 38.599998474121094, 40.12000274658203, 46.20000457763672, 50.940006256103516, 53.66000747680664,
                 54.9373893737793, 56.89738845825195, 57.28738784790039, 59.98738479614258, 60.86738586425781,
                 60.887386322021484, 61.71739196777344, 62.91739273071289, 62.957393646240234, 63.41739273071289,
                 63.8173942565918, 63.83739471435547, 63.897396087646484, 63.93739700317383, 64.06739807128906,
                 64.11434936523438, 64.12435150146484, 64.15435028076172, 64.19435119628906, 64.24435424804688,
                 64.57435607910156, 64.69000244140625, 64.76000213623047))
PHI3_5_MINI_ROPE = LongRoPE(  # Phi-3.5-mini-instruct
    short_factor=(1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, *[1.0499999523162842] * 5,
                  1.0699999332427979, 1.0999999046325684, 1.1099998950958252, 1.1599998474121094, 1.1599998474121094,
                  1.1699998378753662, 1.2899998426437378, 1.339999794960022, 1.679999828338623, 1.7899998426437378,
                  1.8199998140335083, 1.8499997854232788, 1.8799997568130493, 1.9099997282028198, 1.9399996995925903,
                  1.9899996519088745, *[2.0199997425079346] * 6, *[2.0299997329711914] * 9, 2.0799996852874756,
                  2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328,
                  2.749999523162842, 2.8399994373321533),
    long_factor=(1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
                 1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
                 4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
                 17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
                 32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
                 50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
                 62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
                 63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
                 64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
                 64.51000213623047, 64.52999877929688, 64.83999633789062))
PHI4_MINI_ROPE = LongRoPE(  # Phi-4-mini-instruct
    short_factor=(1.0,) * 48,
    long_factor=(1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
                 2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845,
                 5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129,
                 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418,
                 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28,
                 33.49, 33.5, 44.16, 47.77))

PRESETS.update({
    # the published configs' shapes (config.json of each *-instruct checkpoint)
    "phi-3-mini-4k": Phi3Config(name="phi-3-mini-4k", sliding_window=2047),
    "phi-3-mini-128k": Phi3Config(name="phi-3-mini-128k", rope_scaling=PHI3_MINI_128K_ROPE,
                                  max_position_embeddings=131072, sliding_window=262144),
    "phi-3.5-mini": Phi3Config(name="phi-3.5-mini", rope_scaling=PHI3_5_MINI_ROPE, max_position_embeddings=131072,
                               sliding_window=262144),
    "phi-4-mini": Phi3Config(name="phi-4-mini", vocab_size=200064, num_heads=24, num_kv_heads=8, rotary_dim=96,
                             rope_scaling=PHI4_MINI_ROPE, max_position_embeddings=131072, sliding_window=262144,
                             tie_word_embeddings=True, bos_token_id=199999, eos_token_id=199999,
                             pad_token_id=199999),
    # tests and the offline demo: Phi-3.5-mini's and Phi-4-mini's shapes scaled down (LongRoPE past 256 positions;
    # Phi-4-mini's grouped-query attention, partial rotary and tied embeddings); the demo tokenizer's vocabulary
    "tiny-phi3": Phi3Config(name="tiny-phi3", vocab_size=2048, hidden_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=4, intermediate_size=128, rotary_dim=16,
                            rope_scaling=LongRoPE((1.0,) * 8, tuple(1.0 + i for i in range(8))),
                            max_position_embeddings=1024, original_max_position_embeddings=256,
                            bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "tiny-phi4": Phi3Config(name="tiny-phi4", vocab_size=2048, hidden_size=96, num_layers=2, num_heads=6,
                            num_kv_heads=2, intermediate_size=128, rotary_dim=12,
                            rope_scaling=LongRoPE((1.0,) * 6, tuple(1.0 + i for i in range(6))),
                            max_position_embeddings=1024, original_max_position_embeddings=256,
                            tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0),
})
