"""NEFTune (Jain et al., 2023): uniform noise on the token embeddings in training, `--neft_alpha`.

Added from outside as a forward hook on the embedding, as LLaMA-Factory and transformers' Trainer add it: noise of
magnitude alpha / sqrt(T · hidden) (T the padded length of the batch), in training mode only.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def add_neftune(embedding: nn.Module, alpha: float):
    """Returns the hook's handle (`.remove()` takes the noise away)."""
    def noise(module, args, output):
        if not module.training:
            return output
        mag = alpha / torch.sqrt(torch.tensor(output.size(1) * output.size(2)))
        return output + torch.zeros_like(output).uniform_(-mag, mag)
    return embedding.register_forward_hook(noise)
