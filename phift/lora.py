"""Hand-written LoRA: y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ on frozen linears, with PEFT's math and defaults.

phi's attention input projection is one fused `Wqkv` (rows q;k;v). One adapter on it has a shared A [r, d] and
B [3d, r]; its update ΔW = s·B·A splits exactly into three PEFT adapters on q_proj/k_proj/v_proj with the same A
and the three row blocks of B, which is how `export_peft` writes it for the HF-native checkpoint.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import kernels

LORA_TARGETS = ("Wqkv", "out_proj", "fc1", "fc2")
# Names users know from the HF-native checkpoint (and PEFT configs) → phift's module.
TARGET_ALIASES = {"q_proj": "Wqkv", "k_proj": "Wqkv", "v_proj": "Wqkv", "query_key_value": "Wqkv",
                  "dense": "out_proj"}
# phift module → the HF-native module path(s) under model.layers.{i}; B splits into one row block per path
PEFT_NAMES = {"Wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "out_proj": ("self_attn.dense",), "fc1": ("mlp.fc1",), "fc2": ("mlp.fc2",)}
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


class LoRALinear(nn.Linear):
    """A frozen nn.Linear (same `weight`/`bias` keys) plus fp32 `lora_A` [r, in] and `lora_B` [out, r]."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, alpha, dropout, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = base.weight.device if base.weight.device.type != "meta" else None
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT: B = 0 makes a fresh adapter a no-op
        self.merged = False

    def forward(self, x):
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return kernels.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                                   self.lora_dropout, self.training)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return super().extra_repr() + f", r={self.r}, alpha={self.lora_alpha}, dropout={self.lora_dropout}"


def resolve_targets(spec: str | list[str]) -> tuple[list[str], list[str]]:
    """`--lora_target` → phift module names, plus notes on the aliases that were mapped."""
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if names == ["all"]:
        return list(LORA_TARGETS), []
    targets, notes = [], []
    for n in names:
        if n in TARGET_ALIASES:
            notes.append(f"lora_target {n} → {TARGET_ALIASES[n]} (phi's q/k/v are one fused Wqkv projection)"
                         if TARGET_ALIASES[n] == "Wqkv" else f"lora_target {n} → {TARGET_ALIASES[n]}")
            n = TARGET_ALIASES[n]
        if n not in targets:
            targets.append(n)
    return targets, notes


def inject(model: nn.Module, targets: str | list[str] = "Wqkv", r: int = 8, alpha: float | None = None,
           dropout: float = 0.1, use_rslora: bool = False, verbose: bool = True) -> list[str]:
    """Wrap every linear whose name is a target with a LoRALinear; freeze everything else. Returns the paths."""
    wanted, notes = resolve_targets(targets)
    alpha = 2.0 * r if alpha is None else alpha
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linears})
    unmatched = [t for t in wanted if t not in leaf_names]
    if unmatched:
        raise ValueError(f"lora_target {','.join(unmatched)} matches no module; the linear modules are "
                         f"{', '.join(leaf_names)} (aliases: {', '.join(TARGET_ALIASES)}; or 'all')")
    for p in model.parameters():
        p.requires_grad_(False)
    paths = []
    for name, m in linears.items():
        if name.rsplit(".", 1)[-1] in wanted and not isinstance(m, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            wrapped = LoRALinear(m, r, alpha, dropout, use_rslora).train(m.training)
            setattr(model.get_submodule(parent_name), child, wrapped)
            paths.append(name)
    if verbose:
        for n in notes:
            print(n)
        print(trainable_summary(model))
    return paths


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_merged(model: nn.Module, merged: bool) -> None:
    for m in lora_modules(model).values():
        m.merge() if merged else m.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear (with the update merged in, unless merge=False)."""
    for name, m in lora_modules(model).items():
        if merge:
            m.merge()
        elif m.merged:
            m.unmerge()
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, plain)
    return model


def adapter_config(model: nn.Module, base_model_name_or_path: str = "") -> dict:
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters")
    first = next(iter(mods.values()))
    return {"format": "phift-lora", "r": first.r, "lora_alpha": first.lora_alpha,
            "lora_dropout": first.lora_dropout, "use_rslora": first.use_rslora,
            "target_modules": sorted({n.rsplit(".", 1)[-1] for n in mods}),
            "base_model_name_or_path": base_model_name_or_path}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def save_adapter(model: nn.Module, directory, base_model_name_or_path: str = "",
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model) if state is None else state
    save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(d / ADAPTER_WEIGHTS))
    (d / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(model, base_model_name_or_path), indent=2))
    return d


def load_adapter(model: nn.Module, directory, trainable: bool = True) -> dict:
    """Inject (if needed) and load a phift adapter; wrong rank, shape or targets are errors naming the key."""
    d = Path(directory)
    cfg_file, weights = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{d} is not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type"):
        raise ValueError(f"{d} holds a PEFT adapter; phift loads its own adapters (see `phift export --peft`)")
    existing = lora_modules(model)
    if existing:
        have = next(iter(existing.values()))
        if (have.r, sorted({n.rsplit('.', 1)[-1] for n in existing})) != (cfg["r"], cfg["target_modules"]):
            raise ValueError(f"adapter {d} (r={cfg['r']}, targets {cfg['target_modules']}) does not match the "
                             f"adapters on the model (r={have.r}, targets "
                             f"{sorted({n.rsplit('.', 1)[-1] for n in existing})})")
    else:
        inject(model, cfg["target_modules"], r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"],
               use_rslora=cfg.get("use_rslora", False), verbose=False)
    state = load_file(str(weights))
    own = adapter_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"adapter {weights} does not fit this model: missing {missing[:6]}, unexpected "
                         f"{unexpected[:6]}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"adapter {weights}: {k} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)
    for m in lora_modules(model).values():
        m.lora_A.requires_grad_(trainable)
        m.lora_B.requires_grad_(trainable)
    return cfg


def export_peft(model: nn.Module, directory, base_model_name_or_path: str = "") -> Path:
    """Write the adapters in PEFT's format for transformers' PhiForCausalLM (Wqkv → q_proj/k_proj/v_proj)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state, targets = {}, set()
    for name, m in lora_modules(model).items():
        layer, leaf = name.split(".")[1], name.rsplit(".", 1)[-1]
        paths = PEFT_NAMES[leaf]
        for path, B in zip(paths, m.lora_B.detach().float().chunk(len(paths), dim=0)):
            prefix = f"base_model.model.model.layers.{layer}.{path}"
            state[f"{prefix}.lora_A.weight"] = m.lora_A.detach().float().cpu().clone()  # one copy per module
            state[f"{prefix}.lora_B.weight"] = B.cpu().contiguous()
            targets.add(path.rsplit(".", 1)[-1])
    cfg = adapter_config(model, base_model_name_or_path)
    save_file(state, str(d / ADAPTER_WEIGHTS))
    peft_cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg["r"], "lora_alpha": cfg["lora_alpha"],
                "lora_dropout": cfg["lora_dropout"], "use_rslora": cfg["use_rslora"], "bias": "none",
                "target_modules": sorted(targets), "fan_in_fan_out": False, "inference_mode": True,
                "init_lora_weights": True, "modules_to_save": None,
                "base_model_name_or_path": base_model_name_or_path}
    (d / ADAPTER_CONFIG).write_text(json.dumps(peft_cfg, indent=2))
    return d
