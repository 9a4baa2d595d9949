"""The phi network (phi-1, phi-1_5, phi-2), written from scratch.

embedding → N × [one LayerNorm feeding attention and MLP in parallel: x + attn(ln(x)) + mlp(ln(x))] → LayerNorm → lm_head
Attention uses a fused Wqkv projection (rows q;k;v), rotary embedding on the first `rotary_dim` dims of each head
(rotate-half, computed in fp32; `kernels.rotary_qkv`, one CUDA pass on GPU) and PyTorch's scaled_dot_product_attention.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right

from .config import PhiConfig
from .kernels import cross_entropy_grad_, rotary_qkv

IGNORE_INDEX = -100


def rotary_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float):
    """cos, sin of shape [B, T, rotary_dim] in fp32 (positions beyond 2048 lose precision in half)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.float32)
                               / rotary_dim)
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


class KVCache:
    """Preallocated keys/values for all layers: [layers, B, key-value heads, max_len, head_dim].

    A forward over fewer rows than B reads and writes the cache's first rows: a server keeps a pool of rows and
    runs each step on the rows in use."""

    def __init__(self, config: PhiConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions already written; the model advances it after each forward

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end, rows = self.length + k.shape[2], k.shape[0]  # a batch may use the first rows only (phift.serve)
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache holds {self.k.shape[3]} positions, asked for {end}")
        self.k[layer, :rows, :, self.length:end] = k
        self.v[layer, :rows, :, self.length:end] = v
        return self.k[layer, :rows, :, :end], self.v[layer, :rows, :, :end]


def build_attention_mask(attention_mask: torch.Tensor, q_len: int, past_len: int,
                         sliding_window: int | None = None) -> torch.Tensor:
    """Boolean [B, 1, q, k] mask from a per-token mask over all k positions.

    `attention_mask` holds 0 for padding and a segment index > 0 otherwise (a plain 0/1 padding mask is the
    one-segment case): a query sees earlier keys of its own segment only, so packed samples never attend to
    each other. Every query also sees itself, so padding rows get no all-masked softmax (NaN) in SDPA.
    sliding_window: a query sees only keys less than that many columns back (itself and window - 1 before it), as
    transformers' sliding_window_overlay counts them: in columns of the batch, padding included.
    """
    k_len = past_len + q_len
    dev = attention_mask.device
    q_pos = torch.arange(past_len, k_len, device=dev)[:, None]
    k_pos = torch.arange(k_len, device=dev)[None, :]
    seg_k = attention_mask[:, None, :]
    seg_q = attention_mask[:, past_len:, None]
    allowed = (k_pos <= q_pos) & (seg_k == seg_q) & (seg_k > 0)
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    return (allowed | (k_pos == q_pos))[:, None]


@dataclass
class SharedPrompt:
    """Attention for preference pairs laid out one row a pair, [prompt | chosen | rejected]: each answer sees the
    prompt and itself, never the other answer, so the prompt's keys and values serve both (prompt + chosen + rejected
    tokens a pair instead of twice the prompt). Prompts are left-padded to `prompt` columns, the chosen answers
    right-padded to `chosen`; the rejected answers fill the rest.

    prompt_mask: [B, 1, P + C, P + C], causal with the prompts' padding hidden, or None when no prompt is padded (plain
    causal attention, flash kernels); rejected_mask: [B, 1, R, P + R], each rejected token seeing the prompt and its
    own answer up to itself, or None when no prompt is padded (a lower-right causal bias, flash kernels)."""
    prompt: int
    chosen: int
    prompt_mask: torch.Tensor | None = None
    rejected_mask: torch.Tensor | None = None

    @classmethod
    def of(cls, prompt: int, chosen: int, rejected: int, prompt_pad: torch.Tensor | None) -> SharedPrompt:
        """prompt_pad: [B] each row's padding columns at the prompt's start, or None when there are none."""
        if prompt_pad is None:
            return cls(prompt, chosen)
        P, C, R, dev = prompt, chosen, rejected, prompt_pad.device
        pad = prompt_pad[:, None, None]
        cols = torch.arange(P + C, device=dev)
        rows = cols[:, None]
        # every query also sees itself, so a padding query gets no all-masked (NaN) softmax
        seen = ((cols <= rows) & (cols >= pad)) | (cols == rows)
        kcols, qrows = torch.arange(P + R, device=dev), torch.arange(R, device=dev)[:, None]
        rejected_seen = torch.where(kcols < P, (kcols >= pad).expand(-1, R, -1), kcols - P <= qrows)
        return cls(P, C, seen[:, None], rejected_seen[:, None])


def attend_shared(q, k, v, s: SharedPrompt, dropout_p: float):
    """`attend` over a [prompt | chosen | rejected] row: the prompt and the chosen answer in one causal call, the
    rejected answer against the prompt's keys and its own in another. The three spans change from batch to batch (the
    longest prompt sets the first), so no kernel that plans per shape."""
    with sdpa_kernel(PLANLESS_KERNELS):
        return _attend_shared(q, k, v, s, dropout_p)


def _attend_shared(q, k, v, s: SharedPrompt, dropout_p: float):
    pc = s.prompt + s.chosen
    first = attend(q[:, :, :pc], k[:, :, :pc], v[:, :, :pc], s.prompt_mask, dropout_p)
    k_r, v_r = _join_spans(k, s.prompt, pc), _join_spans(v, s.prompt, pc)
    q_r = q[:, :, pc:]
    R, S = q_r.shape[2], k_r.shape[2]
    if s.rejected_mask is not None:
        second = attend(q_r, k_r, v_r, s.rejected_mask, dropout_p)
    elif torch.compiler.is_compiling():  # dynamo cannot trace a CausalBias: the same mask, written out
        second = attend(q_r, k_r, v_r, torch.ones(R, S, dtype=torch.bool, device=q.device).tril(S - R), dropout_p)
    else:
        if k_r.shape[1] != q_r.shape[1]:
            # grouped heads repeated: on an H200 the lower-right bias's flash call with grouped heads gave LoRA
            # gradients off from a row per answer's (phi-3 shape, bf16), which equal heads and the masked call match
            k_r, v_r = (t.repeat_interleave(q_r.shape[1] // k_r.shape[1], dim=1) for t in (k_r, v_r))
        second = attend(q_r, k_r, v_r, causal_lower_right(R, S), dropout_p)
    # joined as [B, T, H, D], under the [B, H, T, D] view attend returns: the caller's transpose back to [B, T, H, D]
    # is then contiguous, and out_proj reads it without a copy (the kernels' own outputs are laid out so)
    return torch.cat([first.transpose(1, 2), second.transpose(1, 2)], dim=1).transpose(1, 2)


def _join_spans(t: torch.Tensor, prompt: int, start: int) -> torch.Tensor:
    """t[:, :, :prompt] and t[:, :, start:] of a [B, H, T, D] tensor joined along T, copied in t's own memory order.
    The fused rotary op's outputs are [B, T, H, D] underneath, where each span of a row is one contiguous block; in
    [B, H, T, D] order the copy reads rows of D scattered over the heads (on an H200, the 144 joins of a DPO step of
    phi-1_5 took 5.6 ms so)."""
    if t.stride(1) < t.stride(2):  # [B, T, H, D] memory
        u = t.transpose(1, 2)
        return torch.cat([u[:, :prompt], u[:, start:]], dim=1).transpose(1, 2)
    return torch.cat([t[:, :, :prompt], t[:, :, start:]], dim=2)


def attend(q, k, v, mask, dropout_p: float):
    """softmax(q kᵀ / sqrt(head_dim)) v with PyTorch's SDPA; mask None is plain causal attention over the keys (a single
    query sees them all), a SharedPrompt the layout of preference pairs sharing their prompt. Fewer key-value heads
    than query heads: each serves a group of consecutive query heads."""
    if isinstance(mask, SharedPrompt):
        return attend_shared(q, k, v, mask, dropout_p)
    causal = mask is None and q.shape[2] > 1
    gqa = k.shape[1] != q.shape[1]
    if gqa and isinstance(mask, torch.Tensor) and not isinstance(mask, CausalBias):
        # PyTorch's memory-efficient kernel takes no grouped heads and flash no mask: a masked grouped call would
        # fall to the math kernel, which holds [B, heads, T, S] fp32 scores. Repeated heads keep the fused kernels.
        # (A lower-right causal bias goes to flash, which takes grouped heads.)
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        gqa = False
    if q.dtype == torch.float16 and q.device.type == "cpu":  # CPU's math kernel would softmax in fp16
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=causal, enable_gqa=gqa).half()
    # CUDA kernels (flash, memory-efficient, cuDNN) accumulate the softmax in fp32
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                          enable_gqa=gqa)


# cuDNN's attention (PyTorch's first choice on Hopper) builds a plan for each new shape, ~35 ms on an H200, then
# reuses it: free for training's repeated shapes, but generation's keys grow a column every step, so each decode step
# would pay it (46 ms a step at phi-1_5 against 10 ms with the memory-efficient kernel; bench/profile_decode.py).
# Attention whose shapes move call after call takes the kernels without plans.
PLANLESS_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_kernels(kv_cache):
    """The attention kernels a forward may use: all of them, or with a KV cache (generating) all but cuDNN's."""
    return contextlib.nullcontext() if kv_cache is None else sdpa_kernel(PLANLESS_KERNELS)


class LayerNorm(nn.LayerNorm):
    """LayerNorm that computes in its parameters' dtype (fp32 after --upcast_layernorm) and returns x's dtype."""

    def forward(self, x):
        return F.layer_norm(x.to(self.weight.dtype), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: PhiConfig, layer: int):
        super().__init__()
        self.num_heads, self.layer = config.num_heads, layer  # layer: this block's slot in a KV cache
        self.dropout = config.attention_dropout  # on the attention probabilities, in training
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, cos, sin, mask=None, kv_cache=None):
        """mask: boolean [B, 1, T, past + T], or None for plain causal attention over x alone."""
        B, T, C = x.shape
        q, k, v = rotary_qkv(self.Wqkv(x), cos, sin, self.num_heads)  # one fused pass on CUDA
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: PhiConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def hidden(self, x):
        """The [T, intermediate] activation: the largest a block keeps for backward."""
        return F.gelu(self.fc1(x), approximate="tanh")

    def forward(self, x):
        return self.fc2(self.hidden(x))


class Block(nn.Module):
    """x + attn(ln(x)) + mlp(ln(x)): attention and MLP read the same normalised input, in parallel."""

    def __init__(self, config: PhiConfig, layer: int):
        super().__init__()
        self.ln = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x, cos, sin, mask=None, kv_cache=None):
        h = self.ln(x)
        a, m = self.attn(h, cos, sin, mask, kv_cache), self.mlp(h)
        if self.resid_dropout.p > 0:  # each branch draws its own mask, as transformers' PhiDecoderLayer
            a, m = self.resid_dropout(a), self.resid_dropout(m)
        return x + a + m


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean CE(h Wᵀ + b, labels) computed a chunk of rows at a time.

    The gradients are computed in the forward pass, chunk by chunk, and only they are kept: the [n, vocab]
    fp32 logits (n × 51200 × 4 bytes, the largest activation of a phi step) never exist all at once. On CUDA a
    chunk's loss and softmax − onehot come from one fused kernel over its fp16/bf16 logits.

    The weight's gradient is the exception for few rows: when all n rows fit one chunk and their logits' gradient
    g [n, vocab] is no larger than an fp32 weight gradient [vocab, hidden] (n ≤ 2·hidden in half precision: one
    1×1024 sample), g itself is kept and gᵀh computed in backward. A forward then holds g alone instead of g, the
    half product and its fp32 copy, and backward starts without the fp32 buffer and its scaled copy (~1 GB less
    for phi-1_5 at 1×1024 by arithmetic, not measured alone; the same rounding: one half-precision product, scaled).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, labels, chunk_rows, with_grad):
        n = h.shape[0]
        want_h, want_w = with_grad and ctx.needs_input_grad[0], with_grad and ctx.needs_input_grad[1]
        want_b = with_grad and bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty(h.shape, device=h.device, dtype=torch.float32) if want_h else None
        grad_w = None  # the first chunk's product becomes it: no zero-filled buffer beside that product
        grad_b = torch.zeros(bias.shape, device=h.device, dtype=torch.float32) if want_b else None
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        keep_g = None  # g of the single chunk, when the weight's gradient waits for backward
        for s in range(0, n, chunk_rows):
            hc, lc = h[s:s + chunk_rows], labels[s:s + chunk_rows]
            # d(sum CE)/d logits = softmax − onehot, in [-1, 1]: safe in fp16/bf16 for the matmuls (dividing by n
            # first would underflow fp16); the 1/n of the mean is applied in fp32 after.
            loss, g = cross_entropy_grad_(F.linear(hc, weight, bias), lc, want_h or want_w or want_b)
            total += loss.sum()
            if g is not None:
                if want_b:
                    grad_b += g.sum(0, dtype=torch.float32)
                if want_w and n <= chunk_rows and n * g.element_size() <= 4 * h.shape[1]:
                    keep_g = g
                g = g.to(h.dtype)
                if want_h:
                    grad_h[s:s + chunk_rows] = g @ weight
                if want_w and keep_g is None:
                    product = (g.t() @ hc).float()
                    grad_w = product if grad_w is None else grad_w.add_(product)
                    del product
        if want_w and grad_w is None and keep_g is None:  # no row to learn from
            grad_w = torch.zeros(weight.shape, device=h.device, dtype=torch.float32)
        # the mean over labelled rows, counted on the device: the rows given are usually exactly those, but a caller
        # that must keep shapes fixed (phift.graphs) passes every row, the unlabelled ones contributing nothing
        scale = 1.0 / (labels != IGNORE_INDEX).sum().clamp(min=1).float()
        ctx.keep_g = keep_g is not None
        saved = [t.mul_(scale) if t is not None else None for t in (grad_h, grad_w, grad_b)]
        ctx.save_for_backward(*saved, *((keep_g, h, scale) if ctx.keep_g else ()))
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grads = [None if t is None else (t * grad_out).to(dt) for t, dt in zip(ctx.saved_tensors[:3], ctx.dtypes)]
        if ctx.keep_g:
            g, h, scale = ctx.saved_tensors[3:]
            grads[1] = (g.t() @ h.to(g.dtype)).mul_(scale * grad_out).to(ctx.dtypes[1])
        return (*grads, None, None, None)


class _ChunkedLinearLogProbs(torch.autograd.Function):
    """log softmax(h Wᵀ + b)[label] of each row, and each row's mean logit, computed a chunk of rows at a time.

    A mean loss's gradient is known in the forward (see _ChunkedLinearCrossEntropy); these are a vector, each row's
    weight in the loss known only in backward (DPO's depends on every sequence's sum). So the forward keeps nothing
    of the vocabulary but each row's log-sum-exp, and backward computes each chunk's logits again (one more h Wᵀ of
    the labelled rows) to form g_row · (onehot − softmax): [chunk, vocab] fp32 at most, forward or backward. The
    logits are recomputed in the dtype the forward made them in (autocast's half), so the softmax matches.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, labels, chunk_rows):
        n, acc = h.shape[0], torch.promote_types(h.dtype, torch.float32)  # fp32, or fp64 for a float64 check
        logps, mean_logits, lse = (torch.empty(n, device=h.device, dtype=acc) for _ in range(3))
        ctx.compute_dtype = h.dtype
        for s in range(0, n, chunk_rows):
            c = slice(s, s + chunk_rows)
            logits = F.linear(h[c], weight, bias)
            ctx.compute_dtype = logits.dtype
            logits = logits.to(acc)
            lse[c] = torch.logsumexp(logits, dim=-1)
            logps[c] = logits.gather(1, labels[c, None]).squeeze(1) - lse[c]
            mean_logits[c] = logits.mean(dim=-1)
        ctx.save_for_backward(h, weight, bias, labels, lse)
        ctx.chunk_rows = chunk_rows
        ctx.mark_non_differentiable(mean_logits)
        return logps, mean_logits

    @staticmethod
    def backward(ctx, grad_logps, _):
        h, weight, bias, labels, lse = ctx.saved_tensors
        dt, rows = ctx.compute_dtype, ctx.chunk_rows
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        w, b = weight.to(dt), bias.to(dt) if bias is not None else None
        acc = lse.dtype
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, device=h.device, dtype=acc) if want_w else None
        grad_b = torch.zeros(bias.shape, device=h.device, dtype=acc) if want_b else None
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], rows):
                c = slice(s, s + rows)
                hc = h[c].to(dt)
                g = (F.linear(hc, w, b).to(acc) - lse[c, None]).exp_().neg_()  # − softmax
                g.scatter_add_(1, labels[c, None], torch.ones_like(g[:, :1]))  # + onehot
                g.mul_(grad_logps[c, None].to(acc))
                if want_b:
                    grad_b += g.sum(0)
                g = g.to(dt)
                if want_h:
                    grad_h[c] = g @ w
                if want_w:
                    grad_w += (g.t() @ hc).to(acc)
        return (grad_h, grad_w.to(weight.dtype) if want_w else None,
                grad_b.to(bias.dtype) if want_b else None, None, None)


class LMHead(nn.Linear):
    """The output projection; given labels it returns the shifted, masked mean cross-entropy instead of logits, or
    with per_token=True each labelled position's log-probability of its label and mean logit.

    The loss lives in this module's forward (not the model's) so that DeepSpeed ZeRO-3 gathers its weight.
    """

    chunk_bytes = 1 << 28  # fp32 logits per chunk

    @staticmethod
    def label_rows(labels):
        """Indices of the shifted positions that carry a label: prompt and padding rows never reach the vocabulary
        projection. Finding them waits for the GPU (their count sizes the chunks), so Phi.forward asks before it
        queues the blocks, while the GPU has almost nothing to finish, rather than here, after all of them."""
        return (labels[:, 1:].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)

    def forward(self, h, labels=None, rows=None, per_token=False, shifted=True):
        """Logits; or, given labels, the mean cross-entropy of the labelled shifted positions (`rows` of the
        flattened [B, T - 1] positions, LMHead.label_rows); with per_token=True, (log p(label), mean logit) of each of
        those rows, fp32 vectors in the order of `rows`. shifted=False: `rows` index the flattened [B, T] positions
        and `labels` holds each one's next token (a pair's rejected answer is predicted from its prompt's end,
        not from the column before it: model.SharedPrompt)."""
        if labels is None:
            return super().forward(h)
        if not shifted:
            h = h.reshape(-1, h.shape[-1]).index_select(0, rows)
        else:
            if rows is None:
                rows = self.label_rows(labels)
            h = h[:, :-1].reshape(-1, h.shape[-1]).index_select(0, rows)
            labels = labels[:, 1:].reshape(-1).index_select(0, rows)
        chunk_rows = max(1, self.chunk_bytes // (4 * self.out_features))
        if per_token:
            return _ChunkedLinearLogProbs.apply(h, self.weight, self.bias, labels, chunk_rows)
        return _ChunkedLinearCrossEntropy.apply(h, self.weight, self.bias, labels, chunk_rows,
                                                torch.is_grad_enabled())


class Phi(nn.Module):
    def __init__(self, config: PhiConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embd_dropout = nn.Dropout(config.embd_pdrop)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.ln_f = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids, labels=None, attention_mask=None, position_ids=None, kv_cache=None,
                label_rows=None, hidden_only=False, shared_prompt: SharedPrompt | None = None):
        """Logits [B, T, vocab], or the mean loss over labels != -100 when labels are given, or with hidden_only the
        final LayerNorm's output [B, T, hidden] (what a value head or LMHead's per-token log-probs read).

        label_rows: LMHead.label_rows(labels), when the caller found them without waiting for the GPU (the training
        loop does, on the CPU); else they are found here, a host sync.
        attention_mask: [B, past + T], 0 = padding, else a segment index (packed samples); None = all causal.
        position_ids: [B, T]; by default counted over non-padding tokens (so left padding works).
        shared_prompt: rows of preference pairs sharing their prompt (SharedPrompt; position_ids required), in place of
        attention_mask.
        """
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if labels is not None and label_rows is None:
            label_rows = LMHead.label_rows(labels)
        x = self.wte(input_ids)
        if self.embd_dropout.p > 0:
            x = self.embd_dropout(x)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = ((attention_mask > 0).long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        cos, sin = rotary_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta)
        if attention_mask is None and past and T > 1:  # new tokens after a cache: causal over the whole of it
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        # no mask: plain causal attention (flash kernels); a single new token sees the whole cache
        mask = build_attention_mask(attention_mask, T, past) if attention_mask is not None else shared_prompt
        with attention_kernels(kv_cache):
            for block in self.layers:
                x = block(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        if hidden_only:
            return self.ln_f(x)
        return self.lm_head(self.ln_f(x), labels, label_rows)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
