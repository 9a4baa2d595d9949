"""Reading safetensors files, the only weights phift reads: a file cut short (an interrupted download or save) or
otherwise corrupt, and a tensor holding NaN or inf, are errors that name the file and the tensor."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


class WeightsError(ValueError):
    """A weights file, or a checkpoint's set of them, that phift cannot load."""


def open_safetensors(path: Path, device="cpu"):
    """safe_open, which reads the header and checks that the data it describes is all there."""
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except (SafetensorError, OSError) as e:
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
