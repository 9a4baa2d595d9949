"""Every random number generator a run draws from: seeded once at the start, saved in each checkpoint, restored
on resume (Python, numpy, torch on the CPU and on every GPU)."""
from __future__ import annotations

import random

import numpy as np
import torch


def set_seed(seed: int):
    """Seed every generator a run draws from (Python, numpy, torch on the CPU and every GPU), as the HF Trainer's
    set_seed does before the model is built: LoRA's initialisation, dropout masks and NEFTune noise follow --seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    """Every generator's state, as plain tensors and lists (a checkpoint is read back with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    if "python" in state:  # checkpoints written before Python and numpy states were kept hold only torch's
        random.setstate(_tuples(state["python"]))
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, torch.Tensor):  # one device's state, as older checkpoints kept it
            torch.cuda.set_rng_state(cuda)
        else:
            torch.cuda.set_rng_state_all(cuda)


def _tuples(x):
    """random.setstate wants back the nested tuples that a checkpoint keeps as lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
