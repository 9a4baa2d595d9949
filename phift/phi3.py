"""The Phi-3 network (Phi-3-mini 4k/128k, Phi-3.5-mini, Phi-4-mini: transformers' Phi3ForCausalLM), from scratch.

embedding → N × [x + attn(norm(x)), then x + mlp(norm(x))] → RMSNorm → lm_head (tied to the embedding in Phi-4-mini)
Attention has one fused qkv_proj (rows q;k;v, fewer key-value heads than query heads under grouped-query attention)
and rotary embedding on the first `rotary_dim` dims of each head, through the same `kernels.rotary_qkv` and
PyTorch SDPA as phi; the MLP is SwiGLU over one fused gate_up_proj (rows gate;up): down(up · silu(gate)). No biases.

Same contract as `model.Phi`: forward(input_ids, labels, attention_mask, position_ids, kv_cache, label_rows,
hidden_only), the same LMHead loss, `KVCache`, `num_params`; `wte`, `layers` and each block's `mlp.hidden` for what is
applied from outside (recompute, NEFTune).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Phi3Config
from .kernels import rotary_qkv
from .model import LMHead, attend, attention_kernels, build_attention_mask


@functools.lru_cache(maxsize=None)
def _inv_freq(rotary_dim: int, theta: float, factors: tuple[float, ...] | None, device: torch.device) -> torch.Tensor:
    """1 / (factor_i · theta^(2i / rotary_dim)) in fp32, computed on the CPU as transformers computes it, and copied
    to `device` once (not a host-to-device copy every forward)."""
    base = theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    inv_freq = 1.0 / base if factors is None else 1.0 / (torch.tensor(factors, dtype=torch.float32) * base)
    return inv_freq.to(device)


def rope_cos_sin(position_ids: torch.Tensor, config: Phi3Config):
    """cos, sin of shape [B, T, rotary_dim] in fp32, as transformers' Phi3RotaryEmbedding computes them.

    LongRoPE picks one set of factors for the whole forward, from its largest position: the short factors while
    max(position_ids) + 1 <= original_max_position_embeddings, the long ones beyond (chosen on the device: no sync),
    and cos and sin carry its attention scaling at every length."""
    dim, dev = config.rotary_dim, position_ids.device
    s = config.rope_scaling
    if s is None:
        inv_freq = _inv_freq(dim, config.rope_theta, None, dev)
    else:
        longer = position_ids.max() + 1 > config.original_max_position_embeddings
        inv_freq = torch.where(longer, _inv_freq(dim, config.rope_theta, s.long_factor, dev),
                               _inv_freq(dim, config.rope_theta, s.short_factor, dev))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    scaling = config.rope_attention_scaling
    return (cos, sin) if scaling == 1.0 else (cos * scaling, sin * scaling)


class RMSNorm(nn.RMSNorm):
    """x / rms(x) in fp32, rounded to x's dtype, times the weight: transformers' Phi3RMSNorm. A weight kept in fp32
    (--upcast_layernorm) multiplies in fp32 and the result returns to x's dtype."""

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h.to(x.dtype)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: Phi3Config, layer: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.layer = config.num_heads, config.num_kv_heads, layer
        self.dropout = config.attention_dropout  # on the attention probabilities, in training
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, q + 2 * kv, bias=False)
        self.o_proj = nn.Linear(q, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask=None, kv_cache=None):
        """mask: boolean [B, 1, T, past + T], or None for plain causal attention over x alone."""
        B, T, _ = x.shape
        q, k, v = rotary_qkv(self.qkv_proj(x), cos, sin, self.num_heads, self.num_kv_heads)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def hidden(self, x):
        """The [T, intermediate] activation: the largest a block keeps for backward."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return up * F.silu(gate)

    def forward(self, x):
        return self.down_proj(self.hidden(x))


class Phi3Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)): one after the other, each with its own RMSNorm."""

    def __init__(self, config: Phi3Config, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x, cos, sin, mask=None, kv_cache=None):
        a = self.attn(self.attn_norm(x), cos, sin, mask, kv_cache)
        x = x + (self.resid_dropout(a) if self.resid_dropout.p > 0 else a)
        m = self.mlp(self.mlp_norm(x))
        return x + (self.resid_dropout(m) if self.resid_dropout.p > 0 else m)  # a mask of its own, as transformers


class Phi3(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(Phi3Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:  # one Parameter in both modules: optimizers and ZeRO-3 see it once
            self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])  # as transformers initialises it

    def forward(self, input_ids, labels=None, attention_mask=None, position_ids=None, kv_cache=None,
                label_rows=None, hidden_only=False, shared_prompt=None):
        """Logits [B, T, vocab], or the mean loss over labels != -100 when labels are given, or with hidden_only the
        final RMSNorm's output (see model.Phi.forward).

        attention_mask: [B, past + T], 0 = padding, else a segment index (packed samples); None = all causal.
        position_ids: [B, T]; by default counted over non-padding tokens (so left padding works). LongRoPE chooses its
        factors from the largest of them.
        shared_prompt: rows of preference pairs sharing their prompt (model.SharedPrompt, with position_ids), whose
        prompt + answer spans the caller keeps within the sliding window.
        """
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if labels is not None and label_rows is None:
            label_rows = LMHead.label_rows(labels)
        x = self.wte(input_ids)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = ((attention_mask > 0).long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.config)
        window = self.config.sliding_window
        windowed = window is not None and past + T > window and shared_prompt is None
        if attention_mask is None and ((past and T > 1) or windowed):  # causal over the cache, or a window to apply
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        # no mask: plain causal attention (flash kernels); a single new token sees the whole cache
        mask = (build_attention_mask(attention_mask, T, past, window if windowed else None)
                if attention_mask is not None else shared_prompt)
        with attention_kernels(kv_cache):
            for block in self.layers:
                x = block(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        if hidden_only:
            return self.norm(x)
        return self.lm_head(self.norm(x), labels, label_rows)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
