"""Generation with a KV cache: batched prompts (left-padded), greedy or temperature/top-p sampling, eos stop.

LongRoPE (phi3) rotates every position with other frequencies once the longest sequence outgrows the model's original
length (config.rope_switch_length): the keys cached before that point are then stale, so the cache starts again from
the whole sequence at that step, as transformers' Phi3ForCausalLM.prepare_inputs_for_generation does. Cached
generation gives the tokens uncached generation gives.
"""
from __future__ import annotations

from typing import Callable

import torch

from .model import KVCache


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, vocab]: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token once the mass before it already reaches top_p (the most likely token always stays)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int = 128, eos_token_id: int | list[int] | None = None,
             pad_token_id: int = 0, temperature: float = 0.0, top_p: float = 1.0, use_cache: bool = True,
             generator: torch.Generator | None = None,
             on_token: Callable[[int], None] | None = None) -> list[list[int]]:
    """The new tokens of each prompt (eos not included). `on_token` streams row 0's tokens as they come.
    eos_token_id: one id or several (a chat template's stop tokens, data.stop_token_ids); any of them ends a row."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    was_training = model.training
    model.eval()
    device = model.wte.weight.device
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, L), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # left padding: every row's next token is at the same column
        ids[i, L - len(p):] = torch.tensor(p, device=device)
        mask[i, L - len(p):] = 1
    attention_mask = None if bool(mask.all()) else mask
    cache = KVCache(model.config, B, L + max_new_tokens, device, model.wte.weight.dtype) if use_cache else None
    stops = torch.tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long, device=device).reshape(-1)
    switch = getattr(model.config, "rope_switch_length", None) if use_cache else None
    longest = _longest(ids, attention_mask) if switch is not None else 0
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_input = ids
    try:
        for _ in range(max_new_tokens):
            logits = model(step_input if use_cache else ids, attention_mask=attention_mask, kv_cache=cache)[:, -1]
            nxt = sample_next(logits, temperature, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            finished = torch.isin(nxt, stops)
            for i, t in enumerate(nxt.tolist()):
                if not done[i] and not finished[i]:
                    out[i].append(t)
                    if i == 0 and on_token is not None:
                        on_token(t)
            done |= finished
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, (~done).long()[:, None]], dim=1)
            if switch is not None:
                before, longest = longest, _longest(ids, attention_mask)
                if before <= switch < longest:  # LongRoPE has just switched to its long factors: start again
                    cache.length, step_input = 0, ids
    finally:
        model.train(was_training)
    return out


def _longest(ids, attention_mask) -> int:
    """The model's largest position + 1 for this input: its length, or with a mask the most tokens a row has (the
    model counts a row's positions over its tokens)."""
    return ids.shape[1] if attention_mask is None else int(attention_mask.sum(-1).max())
