"""Reading tensor files. Weights come from safetensors files only: a file cut short (an interrupted download or save)
or otherwise corrupt, and a tensor holding NaN or inf, are errors that name the file and the tensor. Training state
(optimizer, generators, DeepSpeed's) is read with torch.load(weights_only=True): a pickle that asks for anything but
tensors and plain values is refused, naming the file, and never run."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


class WeightsError(ValueError):
    """A weights file, or a checkpoint's set of them, that phift cannot load."""


def open_safetensors(path: Path, device="cpu"):
    """safe_open, which reads the header and checks that the data it describes is all there."""
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except SafetensorError as e:
        raise WeightsError(f"{path} is truncated or corrupt ({e}); download or save it again") from None


def get_tensor(handle, key: str, path: Path) -> torch.Tensor:
    """One tensor, checked as it is read: a NaN or inf in weights would make every output NaN, far from its cause."""
    try:
        t = handle.get_tensor(key)
    except SafetensorError as e:
        raise WeightsError(f"{path}: {key} cannot be read, the file is truncated or corrupt ({e})") from None
    if t.is_floating_point():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise WeightsError(f"{path}: {key} holds {bad} value{'s' * (bad > 1)} that {'are' if bad > 1 else 'is'} "
                               "not finite (NaN or inf)")
    return t


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a file (an adapter's: small), each checked."""
    with open_safetensors(path) as f:
        return {key: get_tensor(f, key, path) for key in f.keys()}


def refused(path, error: pickle.UnpicklingError) -> WeightsError:
    """torch's weights-only refusal, a screen long and without the file's name, as one line that has it."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    what = f"the global {found[1]}" if found else str(error).strip().splitlines()[0]
    return WeightsError(f"{path}: refused: its pickle calls for {what}, which is not allowed (phift reads training "
                        "state with torch.load(weights_only=True): tensors and plain values only); was it tampered "
                        "with?")


def load_state(path: Path, map_location=None):
    """A training-state file phift wrote (optimizer.pt, rng_state_N.pt)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise refused(path, e) from None
