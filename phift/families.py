"""Model families: the one table from what names a model (a preset, config.json's model_type) to the classes that
build it and the checkpoint layouts that hold its weights.

    phi    phi-1, phi-1_5, phi-2           PhiConfig   model.Phi    layouts hf, phi-msft, mixformer-sequential
    phi3   Phi-3-mini, Phi-3.5-mini,       Phi3Config  phi3.Phi3    layout phi3
           Phi-4-mini (Phi3ForCausalLM)

Whatever reads a config or builds a model (weights.load_model, train.load_base, an estimator) asks here, so a new
family is one row: its config class (presets in config.PRESETS), its network, its layout in weights.LAYOUTS, and its
LoRA names in lora.FAMILY_NAMES.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .config import PRESETS, Phi3Config, PhiConfig
from .model import Phi
from .phi3 import Phi3


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json's model_type values it reads
    config_class: type
    model_class: type
    layouts: tuple[str, ...]  # the checkpoint layouts (weights.LAYOUTS) it loads; the first is the one it saves


FAMILIES = (
    # the remote-code phi configs carry model_type "phi-msft" or "mixformer-sequential"; PhiConfig reads them all
    Family("phi", ("phi", "phi-msft", "mixformer-sequential"), PhiConfig, Phi,
           ("hf", "phi-msft", "mixformer-sequential")),
    Family("phi3", ("phi3",), Phi3Config, Phi3, ("phi3",)),
)


def family_of(config_or_model) -> Family:
    config = getattr(config_or_model, "config", config_or_model)
    for family in FAMILIES:
        if isinstance(config, family.config_class):
            return family
    raise ValueError(f"{type(config).__name__} belongs to no model family phift knows "
                     f"({', '.join(f.name for f in FAMILIES)})")


def config_from_hf_dict(d: dict, name: str = ""):
    """The config of a checkpoint's config.json, read by its family's config class (model_type decides; a config
    without one is phi's remote-code form)."""
    model_type = d.get("model_type")
    family = next((f for f in FAMILIES if model_type in f.model_types), None)
    if family is None:
        if model_type is not None:
            known = ", ".join(repr(t) for f in FAMILIES for t in f.model_types)
            raise ValueError(f"config.json has model_type {model_type!r}; phift reads phi-1, phi-1_5 and phi-2 "
                             f"(model_type 'phi') and Phi-3, Phi-3.5 and Phi-4-mini (model_type 'phi3'); known: "
                             f"{known}")
        family = FAMILIES[0]
    return family.config_class.from_hf_dict(d, name)


def config_from_json(path):
    try:
        d = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    try:
        return config_from_hf_dict(d)
    except KeyError as e:
        kind = d.get("model_type") or "phi"
        raise ValueError(f"{path}: no {e.args[0]!r}, which a {kind} config.json needs") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def preset(name: str, **overrides):
    """A preset's config (config.PRESETS), of whichever family."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return type(PRESETS[name]).from_name(name, **overrides)


def build(config) -> nn.Module:
    """A randomly initialised model of the config's family, on the current default device."""
    return family_of(config).model_class(config)


def num_params(config) -> int:
    """Parameters of a model of this config (tied embeddings counted once), built on the meta device: no memory."""
    with torch.device("meta"):
        return build(config).num_params()
