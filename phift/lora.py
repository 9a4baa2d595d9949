"""Hand-written LoRA: y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ on frozen linears, with PEFT's math and defaults.

phi's attention input projection is one fused `Wqkv` (rows q;k;v). One adapter on it has a shared A [r, d] and
B [3d, r]; its update ΔW = s·B·A splits exactly into three PEFT adapters on q_proj/k_proj/v_proj with the same A
and the three row blocks of B, which is how `export_peft` writes it for the HF-native checkpoint.

PEFT adapters trained on transformers' PhiForCausalLM load as well (`load_adapter`). Adapters on q/k/v that share
A and rank (as `export_peft` writes them) fuse back into one; others are stacked along the rank: A = [A_q; A_k; A_v],
B block-diagonal, each block keeping its own PEFT scaling (a LoRALinear made of `parts`).

Phi-3's fused projections (qkv_proj, gate_up_proj) are transformers' Phi3ForCausalLM's own modules, so its PEFT
adapters map one to one. Each family's names are a row of FAMILY_NAMES.

phift's adapter_config.json: `r`, `lora_alpha`, `lora_dropout`, `use_rslora`, `target_modules` (phift names) and
`base_model_name_or_path`; modules whose adapter is anything but one of rank `r` and alpha `lora_alpha` over all
rows are listed in `modules`: path → its parts in rank order, each {"r", "lora_alpha", "rows": [start, stop]}
("rows" absent: all of them).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from . import kernels
from .families import family_of
from .tensorfile import load_safetensors

logger = logging.getLogger(__name__)


class LoraNames(NamedTuple):
    """A model family's LoRA vocabulary."""
    targets: tuple[str, ...]  # the linears an adapter may wrap, in --lora_target all's order; the first is the
    # fused q/k/v projection, which the default --lora_target (Wqkv) names
    aliases: dict[str, str]  # names users know (the HF-native checkpoint's, PEFT's, the other family's) → a target
    peft: dict[str, tuple[str, ...]]  # target → the HF-native module path(s) under model.layers.{i}; B splits into
    # one row block per path

    @property
    def blocks(self) -> dict[str, tuple[str, int]]:
        """HF-native module path → (phift module, its row block)."""
        return {path: (leaf, j) for leaf, paths in self.peft.items() for j, path in enumerate(paths)}

    def peft_key(self) -> re.Pattern:
        return re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(%s)\.lora_([AB])\.weight"
                          % "|".join(map(re.escape, self.blocks)))


FAMILY_NAMES = {  # by phift.families name
    "phi": LoraNames(
        ("Wqkv", "out_proj", "fc1", "fc2"),
        {"q_proj": "Wqkv", "k_proj": "Wqkv", "v_proj": "Wqkv", "query_key_value": "Wqkv", "dense": "out_proj",
         "qkv_proj": "Wqkv", "o_proj": "out_proj"},
        {"Wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "out_proj": ("self_attn.dense",),
         "fc1": ("mlp.fc1",), "fc2": ("mlp.fc2",)}),
    "phi3": LoraNames(
        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        # phi's names too, so that a phi recipe's --lora_target (default Wqkv) means the same layers here
        {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "query_key_value": "qkv_proj",
         "Wqkv": "qkv_proj", "dense": "o_proj", "out_proj": "o_proj", "gate_proj": "gate_up_proj",
         "up_proj": "gate_up_proj", "fc1": "gate_up_proj", "fc2": "down_proj"},
        {"qkv_proj": ("self_attn.qkv_proj",), "o_proj": ("self_attn.o_proj",), "gate_up_proj": ("mlp.gate_up_proj",),
         "down_proj": ("mlp.down_proj",)}),
}


def lora_names(model: nn.Module) -> LoraNames:
    """The LoRA vocabulary of the model's family (phi's for a module without a config)."""
    config = getattr(model, "config", None)
    return FAMILY_NAMES[family_of(config).name if config is not None else "phi"]


# PEFT LoraConfig fields whose other values change the math or what is adapted → the value phift can honour
# (for None, an empty list or dict is off as well)
PEFT_REQUIRED = {"bias": "none", "fan_in_fan_out": False, "use_dora": False, "lora_bias": False, "use_qalora": False,
                 "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
                 "exclude_modules": None, "layer_replication": None, "target_parameters": None,
                 "trainable_token_indices": None, "alora_invocation_tokens": None, "velora_config": None,
                 "monteclora_config": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None}
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


class Part(NamedTuple):
    """One adapter inside a LoRALinear: `r` consecutive ranks with their own alpha, writing output rows
    [start, stop) (None: all rows)."""
    r: int
    alpha: float
    rows: tuple[int, int] | None = None


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Linear):
    """A frozen nn.Linear (same `weight`/`bias` keys) plus fp32 `lora_A` [r, in] and `lora_B` [out, r].

    One adapter (rank r, alpha) over all rows, or `parts` stacked along the rank: each part scales its own ranks
    and writes only its own rows, so B acts block-diagonal, and outside the blocks its gradient is zero."""

    def __init__(self, base: nn.Linear, r: int | None = None, alpha: float | None = None, dropout: float = 0.0,
                 use_rslora: bool = False, parts: tuple[Part, ...] | None = None):
        nn.Module.__init__(self)
        if (parts is None) == (r is None):
            raise TypeError("LoRALinear takes r and alpha (one adapter) or parts (adapters stacked along the rank)")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.parts = tuple(parts) if parts is not None else (Part(r, alpha),)
        for p in self.parts:
            if p.rows is not None and not 0 <= p.rows[0] < p.rows[1] <= self.out_features:
                raise ValueError(f"adapter part {p} writes rows outside the {self.out_features} of this linear")
        self.r, self.lora_dropout, self.use_rslora = sum(p.r for p in self.parts), dropout, use_rslora
        # one adapter hands its scaling to the kernel; stacked parts fold theirs into B (scaled_B)
        plain = len(self.parts) == 1 and self.parts[0].rows is None
        self.scaling = lora_scaling(self.r, self.parts[0].alpha, use_rslora) if plain else None
        device = base.weight.device if base.weight.device.type != "meta" else None
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT: B = 0 makes a fresh adapter a no-op
        self.merged = False
        self.disabled = False  # the base alone (`disabled`)

    def forward(self, x):
        if self.merged or self.disabled:
            return F.linear(x, self.weight, self.bias)
        B, scaling = self.scaled_B()
        return kernels.lora_linear(x, self.weight, self.bias, self.lora_A, B, scaling, self.lora_dropout,
                                   self.training)

    def scaled_B(self) -> tuple[torch.Tensor, float]:
        """(B, s) with ΔW = s·B·A. Stacked parts: B scaled part by part on its rows × ranks, 0 elsewhere."""
        if self.scaling is not None:
            return self.lora_B, self.scaling
        B, start = torch.zeros_like(self.lora_B), 0
        for p in self.parts:
            rows, ranks = slice(*p.rows) if p.rows else slice(None), slice(start, start + p.r)
            B[rows, ranks] = self.lora_B[rows, ranks] * lora_scaling(p.r, p.alpha, self.use_rslora)
            start += p.r
        return B, 1.0

    def delta_weight(self) -> torch.Tensor:
        B, scaling = self.scaled_B()
        return scaling * (B.float() @ self.lora_A.float())

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
        adapters = (f"r={self.r}, alpha={self.parts[0].alpha}" if self.scaling is not None else
                    "parts=" + ", ".join(f"(r={p.r}, alpha={p.alpha}, rows={p.rows})" for p in self.parts))
        return super().extra_repr() + f", {adapters}, dropout={self.lora_dropout}"


def resolve_targets(spec: str | list[str], names: LoraNames = FAMILY_NAMES["phi"]) -> tuple[list[str], list[str]]:
    """`--lora_target` → the family's module names, plus notes on the aliases that were mapped."""
    wanted = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if wanted == ["all"]:
        return list(names.targets), []
    fused = names.aliases.get("q_proj")  # q, k and v are one fused projection in every family
    targets, notes = [], []
    for n in wanted:
        if n in names.aliases:
            target = names.aliases[n]
            notes.append(f"lora_target {n} → {target}" +
                         (f" (q/k/v are one fused {target} projection)" if target == fused else ""))
            n = target
        if n not in targets:
            targets.append(n)
    return targets, notes


def target_linears(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """The linears whose name is one of `targets` (phift names); a target that matches none is an error."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linears})
    unmatched = [t for t in targets if t not in leaf_names]
    if unmatched:
        raise ValueError(f"lora_target {','.join(unmatched)} matches no module; the linear modules are "
                         f"{', '.join(leaf_names)} (aliases: {', '.join(lora_names(model).aliases)}; or 'all')")
    return {name: m for name, m in linears.items() if name.rsplit(".", 1)[-1] in targets}


def inject(model: nn.Module, targets: str | list[str] = "Wqkv", r: int = 8, alpha: float | None = None,
           dropout: float = 0.1, use_rslora: bool = False, verbose: bool = True) -> list[str]:
    """Wrap every linear whose name is a target (or an alias of one: the default Wqkv is qkv_proj on Phi-3) with a
    LoRALinear; freeze everything else. Returns the paths."""
    wanted, notes = resolve_targets(targets, lora_names(model))
    alpha = 2.0 * r if alpha is None else alpha
    paths = [name for name, m in target_linears(model, wanted).items() if not isinstance(m, LoRALinear)]
    _wrap(model, {name: (Part(r, alpha),) for name in paths}, dropout, use_rslora)
    if verbose:
        for n in notes:
            logger.info(n)
        logger.info(trainable_summary(model))
    return paths


def _wrap(model: nn.Module, parts: dict[str, tuple[Part, ...]], dropout: float, use_rslora: bool) -> None:
    """Freeze the model and replace each named linear by a LoRALinear made of its parts."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module_parts in parts.items():
        m = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        wrapped = LoRALinear(m, dropout=dropout, use_rslora=use_rslora, parts=module_parts).train(m.training)
        setattr(model.get_submodule(parent_name), child, wrapped)


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_merged(model: nn.Module, merged: bool) -> None:
    for m in lora_modules(model).values():
        m.merge() if merged else m.unmerge()


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside, the model runs as its base: every adapter is skipped (one that is merged is taken out first and put
    back after). DPO's reference under LoRA is the policy with its adapters turned off: no second copy."""
    mods = list(lora_modules(model).values())
    merged = [m for m in mods if m.merged]
    for m in merged:
        m.unmerge()
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m in mods:
            m.disabled = False
        for m in merged:
            m.merge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear (with the update merged in, unless merge=False)."""
    mods = lora_modules(model)
    for name, m in mods.items():
        if merge:
            m.merge()
        elif m.merged:
            m.unmerge()
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, plain)
    if merge and mods:
        model.name_or_path = None  # the weights are no longer the checkpoint's: no adapter can name it as its base
    return model


def _most_common(parts) -> Part:
    """The (r, alpha) of most parts: a config's top-level r and lora_alpha, which the others differ from."""
    (r, alpha), _ = Counter((p.r, p.alpha) for p in parts).most_common(1)[0]
    return Part(r, alpha)


def _describe(parts: dict[str, tuple[Part, ...]]) -> str:
    default = _most_common(p for ps in parts.values() for p in ps)
    return f"r={default.r}, targets {sorted({n.rsplit('.', 1)[-1] for n in parts})}"


def adapter_config(model: nn.Module, base_model_name_or_path: str = "") -> dict:
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters")
    first = next(iter(mods.values()))
    default = _most_common(p for m in mods.values() for p in m.parts)
    cfg = {"format": "phift-lora", "r": default.r, "lora_alpha": default.alpha,
           "lora_dropout": first.lora_dropout, "use_rslora": first.use_rslora,
           "target_modules": sorted({n.rsplit(".", 1)[-1] for n in mods}),
           "base_model_name_or_path": base_model_name_or_path}
    modules = {name: [{"r": p.r, "lora_alpha": p.alpha, **({"rows": list(p.rows)} if p.rows else {})}
                      for p in m.parts] for name, m in mods.items() if m.parts != (default,)}
    if modules:
        cfg["modules"] = modules
    return cfg


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def save_adapter(model: nn.Module, directory, base_model_name_or_path: str = "",
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model) if state is None else state
    save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(d / ADAPTER_WEIGHTS))
    base = base_model_name_or_path or getattr(model, "name_or_path", None) or ""
    (d / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(model, base), indent=2))
    return d


def load_adapter(model: nn.Module, directory, trainable: bool = True) -> dict:
    """Inject (if needed) and load an adapter: phift's own, or a PEFT LoRA adapter of transformers' PhiForCausalLM
    (Phi3ForCausalLM for a phi3 model), mapped exactly (what cannot be is refused, naming the file and field). Wrong
    rank, shape or targets are errors naming the key. Returns the adapter's config as written."""
    d = Path(directory)
    cfg_file, weights = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if cfg_file.is_file() and not weights.is_file() and (d / "adapter_model.bin").is_file():
        raise ValueError(f"{d / 'adapter_model.bin'} is a pickle, which phift never loads: save the adapter as "
                         f"{ADAPTER_WEIGHTS} (PEFT's save_pretrained does by default)")
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{d} is not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    cfg = json.loads(cfg_file.read_text())
    read = _read_peft if "peft_type" in cfg else _read_phift
    parts, state, dropout, use_rslora = read(model, cfg_file, cfg, weights)
    existing = {name: m.parts for name, m in lora_modules(model).items()}
    if existing and existing != parts:
        name = next(n for n in [*existing, *parts] if existing.get(n) != parts.get(n))
        raise ValueError(f"adapter {d} ({_describe(parts)}) does not match the adapters on the model "
                         f"({_describe(existing)}): {name} has {parts.get(name)} in the adapter, "
                         f"{existing.get(name)} on the model")
    if not existing:
        _wrap(model, parts, dropout, use_rslora)
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


def _read_phift(model, cfg_file: Path, cfg: dict, weights: Path):
    """(parts by module, state, dropout, use_rslora) of a phift adapter."""
    paths = list(target_linears(model, cfg["target_modules"]))
    modules = cfg.get("modules", {})
    unknown = sorted(set(modules) - set(paths))
    if unknown:
        raise ValueError(f"{cfg_file}: modules lists {unknown[:4]}, which are not among the adapted linears "
                         f"(target_modules {cfg['target_modules']}) of this model")
    default = (Part(cfg["r"], cfg["lora_alpha"]),)
    parts = {name: tuple(Part(p["r"], p["lora_alpha"], tuple(p["rows"]) if "rows" in p else None)
                         for p in modules[name]) if name in modules else default for name in paths}
    return parts, load_safetensors(weights), cfg["lora_dropout"], cfg.get("use_rslora", False)


def _peft_value(cfg: dict, pattern: str, field: str, module: str):
    """PEFT's value for one module: the first key of cfg[pattern] that matches its name (as
    peft.utils.other.get_pattern_key matches), else cfg[field]."""
    for key, value in (cfg.get(pattern) or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return cfg[field]


def _read_peft(model, cfg_file: Path, cfg: dict, weights: Path):
    """(parts by module, state, dropout, use_rslora) of a PEFT LoRA adapter trained on transformers'
    PhiForCausalLM: q/k/v adapters with one A and rank fuse into one Wqkv adapter; others stack along the rank. On
    Phi3ForCausalLM every PEFT module is phift's own."""
    if cfg["peft_type"] != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {cfg['peft_type']!r}: phift loads LoRA adapters only")
    for field, honoured in PEFT_REQUIRED.items():
        value = cfg.get(field, honoured)
        if not (value == honoured or (honoured is None and not value)):
            raise ValueError(f"{cfg_file}: {field} = {value!r} has no exact equivalent in phift's LoRA "
                             f"(phift needs {honoured!r})")
    family = lora_names(model)
    peft_blocks, peft_key = family.blocks, family.peft_key()
    names = {path.rsplit(".", 1)[-1]: path for path in peft_blocks}  # q_proj → self_attn.q_proj
    targets = cfg.get("target_modules")
    if isinstance(targets, str) or not targets or any(t not in names for t in targets):
        raise ValueError(f"{cfg_file}: target_modules {targets!r}: phift maps a list of the module names "
                         f"{', '.join(names)} (on every layer; not regular expressions or paths)")
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in load_safetensors(weights).items():
        m = peft_key.fullmatch(key)
        if not m or m[2].rsplit(".", 1)[-1] not in targets:
            raise ValueError(f"{weights}: {key} is not the lora_A or lora_B weight of a target_modules entry "
                             f"({', '.join(targets)}) under base_model.model.model.layers.N")
        found.setdefault((int(m[1]), m[2]), {})[m[3]] = t
    linears = {(int(n.split(".")[1]), n.rsplit(".", 1)[-1]): (n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.startswith("layers.")}  # (layer, phift name) → (path, module)
    blocks: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, Part]]] = {}  # phift module → row block → ...
    for i in sorted({i for i, _ in linears}):
        for target in targets:
            hf = names[target]
            leaf, j = peft_blocks[hf]
            prefix = f"base_model.model.model.layers.{i}.{hf}"
            pair = found.pop((i, hf), {})
            if set(pair) != {"A", "B"}:
                raise ValueError(f"{weights}: no {prefix}.lora_{'B' if 'A' in pair else 'A'}.weight; phift maps "
                                 "adapters on every layer, not a selection of them")
            (path, module), n = linears[(i, leaf)], len(family.peft[leaf])
            r = _peft_value(cfg, "rank_pattern", "r", f"model.layers.{i}.{hf}")
            alpha = _peft_value(cfg, "alpha_pattern", "lora_alpha", f"model.layers.{i}.{hf}")
            size = module.out_features // n
            A, B = pair["A"], pair["B"]
            if A.shape != (r, module.in_features) or B.shape != (size, r):
                raise ValueError(f"{weights}: {prefix}.lora_A.weight has shape {tuple(A.shape)} and "
                                 f"{prefix}.lora_B.weight {tuple(B.shape)}; with r={r} (from {cfg_file}) this "
                                 f"model's {hf} needs {(r, module.in_features)} and {(size, r)}")
            rows = (j * size, (j + 1) * size) if n > 1 else None
            blocks.setdefault(path, {})[j] = (A, B, Part(r, alpha, rows))
    if found:
        (i, hf), _ = next(iter(found.items()))
        raise ValueError(f"{weights}: base_model.model.model.layers.{i}.{hf} is beyond this model's "
                         f"{len({i for i, _ in linears})} layers")
    parts, state = {}, {}
    for name, by_row in blocks.items():
        A, B, ps = zip(*(by_row[j] for j in sorted(by_row)))
        if (len(ps) == len(family.peft[name.rsplit(".", 1)[-1]]) and len({(p.r, p.alpha) for p in ps}) == 1
                and all(torch.equal(a, A[0]) for a in A)):  # one adapter over all rows, as export_peft writes
            parts[name] = (Part(ps[0].r, ps[0].alpha),)
            state[f"{name}.lora_A"], state[f"{name}.lora_B"] = A[0], torch.cat(B)
        else:
            parts[name] = ps
            stacked = A[0].new_zeros(model.get_submodule(name).out_features, sum(p.r for p in ps))
            start = 0
            for p, b in zip(ps, B):
                stacked[p.rows[0]:p.rows[1], start:start + p.r] = b
                start += p.r
            state[f"{name}.lora_A"], state[f"{name}.lora_B"] = torch.cat(A), stacked
    return parts, state, cfg.get("lora_dropout", 0.0), cfg.get("use_rslora", False)


def export_peft(model: nn.Module, directory, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters in PEFT's format for transformers' PhiForCausalLM (Wqkv → q_proj/k_proj/v_proj) or
    Phi3ForCausalLM (the same modules); ranks and alphas that differ from the most common go to
    rank_pattern/alpha_pattern. The base defaults to where `load_model` read the model from."""
    base = base_model_name_or_path or getattr(model, "name_or_path", None)
    if not base:
        raise ValueError("export_peft needs base_model_name_or_path: the model was not read by load_model (or "
                         "adapters were merged into it), so nothing says which base PEFT should load it onto")
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters")
    entries: dict[str, tuple[torch.Tensor, torch.Tensor, Part]] = {}  # HF-native module → (A, B, part)
    peft_names = lora_names(model).peft
    for name, m in mods.items():
        layer, leaf = name.split(".")[1], name.rsplit(".", 1)[-1]
        paths = peft_names[leaf]
        size, start = m.out_features // len(paths), 0
        blocks = [(j * size, (j + 1) * size) for j in range(len(paths))]
        for p in m.parts:
            A, B = m.lora_A.detach()[start:start + p.r], m.lora_B.detach()[:, start:start + p.r]
            start += p.r
            covered = range(len(paths)) if p.rows is None else [j for j, b in enumerate(blocks) if b == p.rows]
            if not covered:
                raise ValueError(f"{name}: an adapter on rows {p.rows} is no PEFT module's (rows of "
                                 f"{dict(zip(paths, blocks))})")
            for j in covered:
                key = f"model.layers.{layer}.{paths[j]}"
                if key in entries:
                    raise ValueError(f"{name}: two adapters write the rows of {paths[j]}; PEFT holds one a module")
                entries[key] = (A, B[blocks[j][0]:blocks[j][1]], Part(p.r, p.alpha))
    default = _most_common(p for _, _, p in entries.values())
    state = {}
    for key, (A, B, _) in entries.items():  # each its own copy: q/k/v share one A
        state[f"base_model.model.{key}.lora_A.weight"] = A.float().cpu().clone(memory_format=torch.contiguous_format)
        state[f"base_model.model.{key}.lora_B.weight"] = B.float().cpu().clone(memory_format=torch.contiguous_format)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file(state, str(d / ADAPTER_WEIGHTS))
    first = next(iter(mods.values()))
    peft_cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": default.r, "lora_alpha": default.alpha,
                "rank_pattern": {k: p.r for k, (_, _, p) in entries.items() if p.r != default.r},
                "alpha_pattern": {k: p.alpha for k, (_, _, p) in entries.items() if p.alpha != default.alpha},
                "lora_dropout": first.lora_dropout, "use_rslora": first.use_rslora, "bias": "none",
                "target_modules": sorted({k.rsplit(".", 1)[-1] for k in entries}), "fan_in_fan_out": False,
                "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
                "base_model_name_or_path": str(base)}
    (d / ADAPTER_CONFIG).write_text(json.dumps(peft_cfg, indent=2))
    return d
