"""Will a run fit? Its GPU and host memory, predicted from its flags before a byte is loaded (`phift estimate`).

    phift estimate <phift train's flags | config.yaml> [--num_gpus N] [--num_nodes M] [--gpu T4] [--host_gib 12.7]
                   [--json] [--plot memory.png]
    phift train ... --estimate True       the same report first, and a warning naming what overflows the GPU

The model, of either family (phi or Phi-3: phift.families), is built on the meta device: its parameters (LoRA
adapters included, a tied embedding once) are counted exactly, and nothing is read but a checkpoint's config.json.
The rest is arithmetic on the run's shapes, written from what phift's code and DeepSpeed's allocate:

- model states: weights, gradients, AdamW's two moments, fp32 master weights, per engine (plain, phift's
  --offload_optimizer cpu, DeepSpeed ZeRO-1/2/3 partitioned over --num_gpus × --num_nodes, optimizer offloaded);
- activations: what autograd keeps for backward, tensor by tensor as each op of a block saves it (`block_saved`:
  phi's parallel block, Phi-3's sequential one with its RMSNorms, grouped-query attention and SwiGLU), without
  recomputation, with full recomputation (only the block inputs) or with the mlp policy, plus what the
  recomputation holds while one block's backward runs; the chunked loss head and its kept-gradient rule;
- the step's worst moment: the end of the forward pass, the first block's backward, or the end of backward and
  the optimizer step, whichever holds most (`Estimate.phases`);
- what torch.cuda.max_memory_allocated does not count: the CUDA context and the caching allocator's slack;
- host memory: the process, pinned buffers (rounded up to powers of two, as PyTorch's pinned allocator does) and
  pageable optimizer state.

Activation memory grows with sequence length: every sample is taken at --cutoff_len, every position labelled (the
worst batch); a preference pair (--stage rm, dpo, orpo) as two such rows, one per answer (a batch shares its
prompts only where that holds fewer tokens, and then adds masks where prompts are padded), with the stage's head:
DPO's and ORPO's per-token log-probabilities (every dropout off), the reward model's value head. DPO's reference is a
frozen copy of the model's weights beside it for full fine-tuning (in pinned host memory with --dpo_ref_offload),
nothing under LoRA or with --dpo_precompute_ref. Constants that are measured rather than derived are marked as such
below; bench/bench_estimate.py measures the whole prediction on a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import families
from .args import PAIRWISE_STAGES, ConfigError, RunConfig, check, decide_precision
from .config import PRESETS, Phi3Config, PhiConfig
from .kernels import FUSED_EXTRA_COLUMNS, MAX_KERNEL_VOCAB

logger = logging.getLogger(__name__)

GIB = 1 << 30
MIB = 1 << 20

# What max_memory_allocated does not see, and the slack around it: guesses until bench/bench_estimate.py measures them.
CUDA_CONTEXT = 512 * MIB  # the CUDA context and the libraries' module images, per process (CUDA 12+, lazy loading)
NCCL_BUFFERS = 512 * MIB  # NCCL's communicator buffers, per process, when there are several
ALLOCATOR_SLACK = 0.05  # the caching allocator's reserved-but-free blocks, a share of the peak allocated
WORKSPACES = 32 * MIB  # cuBLAS/cuBLASLt workspaces (PyTorch's default ':4096:8' on Hopper), through the allocator
HOST_PROCESS = int(2.5 * GIB)  # a training process: Python, torch, the CUDA runtime's resident pages, tokenizer, data
HOST_DEEPSPEED = 512 * MIB  # DeepSpeed's import and its CPU Adam extension, per process

# From the code: phift.model.LMHead.chunk_bytes, the fused LoRA op's padding (kernels/lora_op.cpp's kWidth and
# padded_rank), DeepSpeed 0.19's zero_optimization defaults (deepspeed/runtime/zero/config.py).
LORA_AUGMENT_COLUMNS = FUSED_EXTRA_COLUMNS
DS_DEFAULTS = {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "contiguous_gradients": True,
               "stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9,
               "stage3_param_persistence_threshold": 1e5, "sub_group_size": 1e9}

# The fit table: (name, GiB the card has, whether it has bf16); host memory of the seed's Colab runtimes.
GPUS = (("T4", 15, False), ("L4", 22, True), ("A10", 24, True), ("A100-40", 40, True), ("A100-80", 80, True),
        ("H100", 80, True), ("H200", 141, True))
HOSTS = (("Colab", 12.7), ("Colab high-RAM", 51))
POLICIES = ("none", "full", "mlp")
NO_DROPOUT_STAGES = ("dpo", "orpo")  # their objectives turn every dropout off (phift.stages.disable_dropout)
Config = PhiConfig | Phi3Config  # a model of either family (phift.families)


# ------------------------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class Params:
    """The parameters of a model as the memory model needs them, counted on a meta-device build."""
    tensors: tuple[tuple[int, bool, int], ...]  # (numel, trainable, ndim) of each parameter
    largest_module: int  # DeepSpeed's "largest layer": the most parameters one module holds itself
    lm_head: int  # the output projection's weight + bias
    adapted: tuple[tuple[int, int], ...]  # (in, out) of each LoRA-adapted linear

    @property
    def total(self) -> int:
        return sum(n for n, _, _ in self.tensors)

    @property
    def trainable(self) -> int:
        return sum(n for n, t, _ in self.tensors if t)

    @property
    def largest_trainable(self) -> int:
        return max((n for n, t, _ in self.tensors if t), default=0)

    def groups(self) -> tuple[int, int]:
        """Trainable numel in AdamW's two groups (phift.engines.param_groups): matrices, then the rest."""
        return (sum(n for n, t, d in self.tensors if t and d >= 2), sum(n for n, t, d in self.tensors if t and d < 2))

    def largest_sub_group(self, world: int, sub_group_size: int) -> int:
        """ZeRO-3 steps the optimizer one sub-group at a time (stage3's _create_fp16_sub_groups): each group's
        parameters, in order, are cut once their partitions reach sub_group_size. The most elements one sub-group
        holds on a rank."""
        largest = 0
        for matrices in (True, False):
            parts = [math.ceil(n / world) for n, t, d in self.tensors if t and (d >= 2) == matrices]
            if sum(parts) <= sub_group_size:
                largest = max(largest, sum(parts))
                continue
            run = 0
            for n in parts:
                run += n
                if run >= sub_group_size:
                    largest, run = max(largest, run), 0
            largest = max(largest, run)
        return largest


def count_parameters(config: Config, run: RunConfig) -> Params:
    """Build the model as `phift train` would (LoRA injected as the flags say) on the meta device and count it: a
    tied embedding is one parameter, counted once."""
    from . import lora

    f = run.finetuning
    with torch.device("meta"):
        model = families.build(config)
        if f.finetuning_type == "lora":
            lora.inject(model, f.lora_target, r=f.lora_rank, alpha=f.lora_alpha, verbose=False)
    adapted = tuple((m.in_features, m.out_features) for m in lora.lora_modules(model).values())
    return Params(tensors=tuple((p.numel(), p.requires_grad, p.ndim) for p in model.parameters()),
                  largest_module=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
                  lm_head=sum(p.numel() for p in model.lm_head.parameters()), adapted=adapted)


def read_config(model_name_or_path: str) -> Config:
    """A preset by name needs nothing; a checkpoint directory gives its config.json; a hub id, config.json alone.
    Either family: config.json's model_type says which (phift.families)."""
    path = Path(model_name_or_path)
    if model_name_or_path in PRESETS and not path.exists():
        return families.preset(model_name_or_path)
    if path.is_dir():
        return families.config_from_json(path / "config.json")
    from huggingface_hub import hf_hub_download

    try:
        return families.config_from_json(hf_hub_download(model_name_or_path, "config.json"))
    except Exception as e:  # offline, a typo: say what else works
        raise ValueError(f"{model_name_or_path}: cannot read its config.json ({type(e).__name__}: {e}); give a "
                         f"checkpoint directory or a preset name ({', '.join(PRESETS)})") from e


# ------------------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Zero:
    """A DeepSpeed config's ZeRO settings, read after phift fills its "auto" values."""
    stage: int
    offload_optimizer: bool
    offload_param: bool
    pin_memory: bool
    reduce_bucket: int
    overlap_comm: bool
    contiguous_gradients: bool
    allgather_bucket: int
    prefetch_bucket: int
    max_live: int
    persistence_threshold: int
    sub_group_size: int = int(DS_DEFAULTS["sub_group_size"])

    @classmethod
    def from_config(cls, cfg: dict) -> Zero:
        z = cfg.get("zero_optimization", {})
        stage = int(z.get("stage", 0))

        def get(key):
            return int(float(z.get(key, DS_DEFAULTS[key])))
        off_opt, off_par = z.get("offload_optimizer") or {}, z.get("offload_param") or {}
        offload_optimizer = off_opt.get("device", "none") not in ("none", None)
        return cls(stage=stage, offload_optimizer=offload_optimizer,
                   offload_param=off_par.get("device", "none") not in ("none", None),
                   pin_memory=bool(off_opt.get("pin_memory", True)), reduce_bucket=get("reduce_bucket_size"),
                   overlap_comm=bool(z.get("overlap_comm", stage == 3)),
                   contiguous_gradients=bool(z.get("contiguous_gradients", True)),
                   allgather_bucket=get("allgather_bucket_size"), prefetch_bucket=get("stage3_prefetch_bucket_size"),
                   max_live=get("stage3_max_live_parameters"),
                   persistence_threshold=get("stage3_param_persistence_threshold"),
                   sub_group_size=get("sub_group_size"))


@dataclass(frozen=True)
class Plan:
    """What decides a run's memory, from its flags as phift.train decides it (element sizes in bytes)."""
    device: str  # "cuda", what the estimate is for; "cpu" runs the PyTorch reference ops (the tests' ground truth)
    engine: str  # plain | offload | deepspeed
    full: bool
    batch: int
    seq: int
    accumulation: int
    policy: str  # none | full | mlp
    weight: int  # a base weight element (and the residual stream's: the embedding's output dtype)
    compute: int  # what matmuls produce: autocast's dtype, else the model's
    trainable: int  # a trainable parameter element, and its gradient's
    autocast: bool
    ln_fp32: bool  # LayerNorm works on an fp32 copy of a half input (CUDA autocast's policy, --upcast_layernorm)
    master: bool  # fp32 master weights beside the trainable ones (MasterAdamW, DeepSpeed)
    lora_targets: tuple[str, ...]
    lora_rank: int
    lora_dropout: float
    packing: bool
    gpus: int = 1  # per node
    nodes: int = 1
    zero: Zero | None = None
    stage: str = "sft"  # what the head computes: sft and pt a loss, dpo and orpo log-probabilities, rm scores
    pairs: bool = False  # preference pairs: `batch` counts rows, two a pair
    shared: bool = False  # the pairs share their prompt, one row a pair (--dpo_share_prompt)
    reference: str = ""  # DPO's reference: "copy" (frozen weights on the GPU), "streamed" (pinned host copy), "" none
    reference_element: int = 2  # its weights' element size

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def fused(self) -> bool:
        """phift's CUDA ops (rotary over qkv, the LoRA linear, the CE gradient) run: half precision on a GPU."""
        return self.device == "cuda" and self.compute == 2


def plan_for(run: RunConfig, device: str = "cuda", gpus: int = 1, nodes: int = 1, ds_config: dict | None = None,
             config: Config | None = None) -> Plan:
    """The plan of `run` on `device` for a model of `config` (default: phi-1_5), its precision decided by
    phift.args.decide_precision, its LoRA targets in the family's names. A DeepSpeed config is read from --deepspeed
    (or given) and filled as phift's DeepSpeed engine fills it."""
    config = config or PRESETS["phi-1_5"]
    m, d, f, t = run.model, run.data, run.finetuning, run.training
    precision = decide_precision(run, torch.device(device))
    full = f.finetuning_type == "full"
    engine = "deepspeed" if t.deepspeed else "offload" if t.offload_optimizer == "cpu" else "plain"
    weight = 4 if precision.upcast_trainable else precision.load.itemsize
    zero = None
    if engine == "deepspeed":
        from .engines import OptimSpec
        from .engines.deepspeed import fill_deepspeed_config

        cfg = ds_config if ds_config is not None else json.loads(Path(t.deepspeed).read_text())
        cfg = fill_deepspeed_config(cfg, OptimSpec.from_training(t, 1), t.per_device_train_batch_size,
                                    precision.compute == torch.float16, precision.compute == torch.bfloat16,
                                    gpus * nodes, config.hidden_size)
        zero = Zero.from_config(cfg)
    lora_targets = ()
    if not full:
        from .lora import FAMILY_NAMES, resolve_targets

        lora_targets = tuple(resolve_targets(f.lora_target, FAMILY_NAMES[families.family_of(config).name])[0])
    pairs = f.stage in PAIRWISE_STAGES
    reference = ("streamed" if f.dpo_ref_offload else "copy") if keeps_dpo_reference(f) else ""
    return Plan(device=device, engine=engine, full=full, batch=t.per_device_train_batch_size * (2 if pairs else 1),
                seq=d.cutoff_len, stage=f.stage, pairs=pairs, shared=pairs and f.dpo_share_prompt, reference=reference,
                reference_element=precision.load.itemsize,
                accumulation=t.gradient_accumulation_steps,
                policy="none" if m.disable_gradient_checkpointing else m.gradient_checkpointing_policy,
                weight=weight, compute=precision.compute.itemsize if precision.compute else weight,
                # DeepSpeed casts the whole module, adapters included, to its half dtype; phift keeps them fp32
                trainable=weight if full or engine == "deepspeed" else 4,
                autocast=precision.autocast is not None,
                ln_fp32=weight < 4 and (f.upcast_layernorm or (device == "cuda" and precision.autocast is not None)),
                master=engine != "plain" or precision.master_weights, lora_targets=lora_targets,
                lora_rank=f.lora_rank, lora_dropout=0.0 if f.stage in NO_DROPOUT_STAGES else f.lora_dropout,
                packing=d.packing, gpus=gpus, nodes=nodes,
                zero=zero)


# ---------------------------------------------------------------------------------------------------- activations
def keeps_dpo_reference(f) -> bool:
    """Whether DPO keeps a reference model through training, as phift.train.dpo_reference does: --ref_model, or for
    full fine-tuning a frozen copy, unless --dpo_precompute_ref reads it once before training."""
    return f.stage == "dpo" and not f.dpo_precompute_ref and (bool(f.ref_model) or f.finetuning_type != "lora")


def _padded_rank(rank: int) -> int:
    return next((p for p in (8, 16, 32, 64) if p >= rank), rank)


def _rotary_fused(c: Config, p: Plan) -> bool:
    """kernels.rotary_fused_applies: half precision on a GPU, as many key-value heads as query heads, heads of a
    multiple of 8 elements."""
    return p.fused and c.num_kv_heads == c.num_heads and c.head_dim % 8 == 0


def _ce_fused(c: Config, p: Plan) -> bool:
    """kernels.cross_entropy_fused_applies: half precision on a GPU and a vocabulary its kernel keeps in registers
    (Phi-4-mini's 200064 tokens are beyond it)."""
    return p.fused and c.vocab_size <= MAX_KERNEL_VOCAB


def _masked(c: Config, p: Plan) -> bool:
    """Whether attention gets a boolean mask [B, 1, T, T]: packed samples, a cutoff past the sliding window, or
    preference pairs sharing their prompt, whose masks hide the padding of the shorter prompts (the worst batch has
    some) and the chosen answer from the rejected one: about [rows, 1, cutoff, cutoff] for the rows' tokens."""
    window = getattr(c, "sliding_window", None)
    return p.packing or p.shared or (window is not None and p.seq > window)


class _Saved(dict):
    """One block's saved tensors by name, and the rule for what a linear (with its LoRA adapter) keeps, which both
    families' blocks share."""

    def __init__(self, p: Plan, recomputing: bool):
        super().__init__()
        self.p, self.recomputing = p, recomputing
        self.mask = 1 if p.device == "cuda" else None  # a dropout mask: bool on CUDA, a noise tensor of the
        # input's dtype on the CPU

    def lora_fused(self, fan_in: int) -> bool:
        """kernels.fused_applies for a frozen half base on a GPU."""
        p = self.p
        return p.fused and p.weight == 2 and p.lora_rank <= 32 and fan_in % 8 == 0

    def linear(self, name, x_key, x_elem, fan_in, fan_out, x_rg, lean=False) -> bool:
        """What a linear (and its LoRA adapter) keeps; returns whether its output needs a gradient. lean: one of
        phift.recompute.UNREAD_OUTPUTS, whose rerun keeps its input whatever trains."""
        p, n, cd = self.p, self.p.tokens, self.p.compute
        adapted = name in p.lora_targets
        if lean and self.recomputing and not adapted:  # phift.recompute._LinearForBackward: input and weight
            self[x_key] = n * fan_in * x_elem
            return True
        if p.full:  # the weight's gradient needs the input (autocast's cast copy of it)
            key, elem = (f"{name} input (cast)", cd) if p.autocast and x_elem != cd else (x_key, x_elem)
            self[key] = n * fan_in * elem
        if x_rg and p.autocast and p.weight != cd:  # the input's gradient needs the weight, cast
            self[f"{name} weight (cast)"] = fan_in * fan_out * cd
        if adapted and self.lora_fused(fan_in):  # x, s·u and the dropout's Philox seed (kernels/lora_op.cpp)
            self[x_key] = n * fan_in * x_elem
            self[f"{name} LoRA s·u"] = n * _padded_rank(p.lora_rank) * cd
        elif adapted:  # phift.kernels.lora_linear_reference
            rank, dropped = p.lora_rank, x_key
            if p.lora_dropout > 0:
                dropped = f"{name} LoRA dropout output"
                if x_rg:
                    self[f"{name} LoRA dropout mask"] = n * fan_in * (self.mask or x_elem)
            self[dropped] = n * fan_in * x_elem
            if x_elem != p.trainable:  # lora_A.to(x.dtype), lora_B.to(x.dtype): copies
                if x_rg:
                    self[f"{name} LoRA A (cast)"] = rank * fan_in * x_elem
                self[f"{name} LoRA B (cast)"] = fan_out * rank * x_elem
            self[f"{name} LoRA u"] = n * rank * x_elem
            self[f"{name} LoRA scaling"] = 8  # `scaling * …` keeps the Python float as a 0-dim double
        return x_rg or p.full or adapted

    def attention(self, c: Config, qkv_name: str) -> None:
        """Rotary and SDPA over the fused projection's output: q, k, v (the reference rotary makes new q and k; v
        stays a view of the whole projection output), the attention output and its logsumexp, and for a mask the
        additive bias SDPA makes of it."""
        p, n, cd = self.p, self.p.tokens, self.p.compute
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        repeated = kv < q and _masked(c, p)  # model.attend repeats grouped heads for a masked call: SDPA keeps those
        if _rotary_fused(c, p):  # kernels.rotary_qkv: one [3, B, T, H, D] tensor; q, k, v are views of it
            self["q, k, v"] = n * (q + 2 * kv) * cd
        elif repeated:
            self["q"], self["k, v (heads repeated)"] = n * q * cd, 2 * n * q * cd
        else:
            self["q"], self["k"] = n * q * cd, n * kv * cd
            self[f"{qkv_name} output (v is a view of it)"] = n * (q + 2 * kv) * cd
        self["attention output"] = n * q * cd
        self["attention logsumexp"] = 4 * p.batch * c.num_heads * p.seq
        if p.shared and not repeated:
            # model.attend_shared: the rejected answers' call attends to their prompt's keys and values joined to
            # their own, a copy (about half of each row's, for half the rows' worth of tokens)
            self["rejected answers' keys and values (their prompt's joined)"] = n * kv * cd
        if _masked(c, p):  # memory-efficient attention (CUDA), the CPU kernel: each keeps a bias made of the mask
            self["attention bias (mask)"] = p.batch * p.seq * p.seq * cd


def block_saved(c: Config, p: Plan, policy: str, input_requires_grad: bool = True,
                recomputing: bool = False) -> dict[str, int]:
    """The tensors one block keeps for backward, by name (a storage shared by several ops is named once).

    policy "full": only the block's input. recomputing: what the block's rerun in backward keeps (its lean linears,
    phift.recompute.UNREAD_OUTPUTS, then keep their inputs whatever trains). The CPU rows (device "cpu") are
    PyTorch's reference ops, which the tests measure; the CUDA rows are phift's fused ops and SDPA's flash kernels.
    """
    if policy == "full" and not recomputing:
        return {"block input": p.weight * p.tokens * c.hidden_size}
    block = _phi3_block_saved if families.family_of(c).name == "phi3" else _phi_block_saved
    return dict(block(c, p, policy, input_requires_grad or recomputing, _Saved(p, recomputing)))


def _phi_block_saved(c: PhiConfig, p: Plan, policy: str, x_rg: bool, saved: _Saved) -> _Saved:
    """phi's block: x + attn(ln(x)) + mlp(ln(x)), the MLP fc2(GELU(fc1(·)))."""
    n, h, inter, r, cd = p.tokens, c.hidden_size, c.intermediate_size, p.weight, p.compute
    cuda, recomputing, linear = p.device == "cuda", saved.recomputing, saved.linear
    if x_rg or p.full:
        if p.ln_fp32:
            saved["layer-norm input (fp32 copy)"] = 4 * n * h
        elif not recomputing:  # a recomputation reads the input its checkpoint kept
            saved["block input"] = r * n * h
        saved["layer-norm statistics"] = 2 * n * (4 if cuda or p.ln_fp32 else r)
    h_rg = x_rg or p.full
    qkv_rg = linear("Wqkv", "layer-norm output", r, h, 3 * h, h_rg)
    if qkv_rg:
        saved.attention(c, "Wqkv")
    # CUDA's attention output is [B, T, H, D] under its [B, H, T, D] view: out_proj reads it without a copy
    # (shared-prompt rows join their two calls' outputs: a tensor of its own, out_proj's input)
    out_rg = linear("out_proj", "attention output" if cuda and not p.shared else "out_proj input (copy)", cd, h, h,
                    qkv_rg, lean=True)
    if policy == "mlp" and not recomputing:
        # inside the checkpoint nothing is kept; the checkpoint holds its input, fc2 may keep its output
        f1_rg = h_rg or p.full or "fc1" in p.lora_targets
        if f1_rg:
            saved["layer-norm output"] = r * n * h
        if "fc1" in p.lora_targets and not saved.lora_fused(h):
            saved["fc1 LoRA scaling"] = 8  # a Python float as a 0-dim double, kept outside the checkpoint
    else:
        f1_rg = linear("fc1", "layer-norm output", r, h, inter, h_rg)
        if f1_rg:
            saved["fc1 output (GELU input)"] = n * inter * cd
    mlp_rg = linear("fc2", "GELU output", cd, inter, h, f1_rg, lean=True)
    if c.resid_pdrop > 0:
        for branch, rg in (("attention", out_rg), ("MLP", mlp_rg)):
            if rg:
                saved[f"{branch} dropout mask"] = n * h * (saved.mask or cd)
    return saved


def _phi3_block_saved(c: Phi3Config, p: Plan, policy: str, x_rg: bool, saved: _Saved) -> _Saved:
    """Phi-3's block: x + attn(norm(x)), then x + mlp(norm(x)), the MLP down(up · SiLU(gate)) over one fused
    gate_up_proj. Its RMSNorm (phift.phi3.RMSNorm) squares an fp32 view of its input (a copy when the input is half)
    and keeps the rsqrt statistics; a trained weight keeps the normalised input too."""
    n, h, inter, r, cd = p.tokens, c.hidden_size, c.intermediate_size, p.weight, p.compute
    cuda, recomputing, linear = p.device == "cuda", saved.recomputing, saved.linear

    def rms_norm(name: str, x_key: str, x_rg: bool, kept_by_checkpoint: bool = False) -> bool:
        if x_rg:
            if r != 4:
                saved[f"{name} input (fp32 copy)"] = 4 * n * h
            elif not kept_by_checkpoint:
                saved[x_key] = 4 * n * h
            saved[f"{name} statistics"] = 4 * n
        if p.full:
            saved[f"{name}: normalised input (its weight's gradient)"] = r * n * h
        return x_rg or p.full

    a_rg = rms_norm("attention norm", "block input", x_rg, kept_by_checkpoint=recomputing)
    qkv_rg = linear("qkv_proj", "attention norm output", r, h, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, a_rg)
    if qkv_rg:
        saved.attention(c, "qkv_proj")
    # CUDA's attention output is [B, T, H, D] under its [B, H, T, D] view: o_proj reads it without a copy
    out_rg = linear("o_proj", "attention output" if cuda and not p.shared else "o_proj input (copy)", cd, h, h, qkv_rg)
    if c.resid_pdrop > 0 and out_rg:
        saved["attention dropout mask"] = n * h * (saved.mask or cd)
    m_rg = rms_norm("MLP norm", "attention residual (MLP norm input)", x_rg or out_rg)
    if policy == "mlp" and not recomputing:
        # inside the checkpoint nothing is kept; the checkpoint holds its input, down_proj may keep its output
        gu_rg = m_rg or "gate_up_proj" in p.lora_targets
        if gu_rg:
            saved["MLP norm output"] = r * n * h
        if "gate_up_proj" in p.lora_targets and not saved.lora_fused(h):
            saved["gate_up_proj LoRA scaling"] = 8  # a Python float as a 0-dim double, kept outside the checkpoint
    else:
        gu_rg = linear("gate_up_proj", "MLP norm output", r, h, 2 * inter, m_rg)
        if gu_rg:  # SiLU reads gate, the product reads up and SiLU's output: gate and up are views of one tensor
            saved["gate_up_proj output"] = n * 2 * inter * cd
            saved["SiLU output"] = n * inter * cd
    mlp_rg = linear("down_proj", "up · SiLU(gate)", cd, inter, h, gu_rg, lean=True)
    if c.resid_pdrop > 0 and mlp_rg:
        saved["MLP dropout mask"] = n * h * (saved.mask or cd)
    return saved


def head_saved(c: Config, p: Plan) -> dict[str, int]:
    """What the forward keeps outside the blocks: rotary tables, the final norm, and the chunked loss's gradients
    (phift.model._ChunkedLinearCrossEntropy: computed in the forward, kept for backward)."""
    n, h, v, r = p.tokens, c.hidden_size, c.vocab_size, p.weight
    rows = p.batch * (p.seq - 1)  # labelled positions: all of them, the worst case
    saved = {"rotary cos, sin": 2 * 4 * n * c.rotary_dim}
    if families.family_of(c).name == "phi3":  # RMSNorm: an fp32 view of its input (a copy when half), rsqrt
        saved["last block output" if r == 4 else "final norm input (fp32 copy)"] = 4 * n * h
        saved["final norm statistics"] = 4 * n
        if p.full:
            saved["final norm: normalised input (its weight's gradient)"] = r * n * h
    else:
        saved["last block output"] = (4 if p.ln_fp32 else r) * n * h
        saved["ln_f statistics"] = 2 * n * (4 if p.device == "cuda" or p.ln_fp32 else r)
        if c.embd_pdrop > 0:
            saved["embedding dropout mask"] = n * h * (1 if p.device == "cuda" else r)
    if p.stage == "rm":  # the value head reads each answer's last hidden state, cast to its dtype (autocast's)
        if p.autocast:
            saved["scored hidden states (value head input)"] = p.batch * h * p.compute
            saved["value head weight (autocast's copy)"] = h * p.compute
        else:
            saved["scored hidden states (value head input)"] = p.batch * h * p.trainable
        if not p.shared:
            saved["scored rows' index"] = 8 * p.batch
        return saved
    if p.stage in ("dpo", "orpo"):
        # stages.sequence_logps: model._ChunkedLinearLogProbs keeps the labelled rows' hidden states and log-sum-exp
        # and computes the logits again in backward; a row per answer also finds its labels and their answer rows
        saved["selected hidden states"] = rows * h * r
        saved["log-sum-exp of each labelled row"] = 4 * rows
        if not p.shared:  # the shared rows bring theirs in the batch
            saved["label rows"] = 8 * rows
            saved["labels of those rows, their answer index"] = 2 * 8 * rows
        return saved
    saved["label rows"] = 8 * rows
    saved["loss: hidden-state gradient (fp32)"] = 4 * rows * h
    if p.full:
        g_elem = p.compute if _ce_fused(c, p) else 4  # the fused CE kernel writes the gradient over half logits
        chunk_rows = max(1, _chunk_rows(c))
        if rows <= chunk_rows and rows * g_elem <= 4 * h:  # the kept-gradient rule for few rows
            saved["loss: logits gradient (kept)"] = rows * v * g_elem
            saved["loss: selected hidden states"] = rows * h * r
            saved["loss: 1 / labelled rows"] = 4
        else:
            saved["loss: lm_head weight gradient (fp32)"] = 4 * v * h
        if families.family_of(c).name == "phi":  # phi's lm_head has a bias, Phi-3's none
            saved["loss: lm_head bias gradient (fp32)"] = 4 * v
    return saved


def _chunk_rows(c: Config) -> int:
    from .model import LMHead

    return LMHead.chunk_bytes // (4 * c.vocab_size)


@dataclass
class Activations:
    per_layer: dict[str, int]  # policy → bytes one block keeps
    first_layer: dict[str, int]  # policy → bytes the first block keeps (under LoRA its input may need no gradient)
    head: int
    recompute_transient: dict[str, int]  # policy → what one block's recomputation holds while its backward runs
    layers: int

    def total(self, policy: str) -> int:
        return self.first_layer[policy] + (self.layers - 1) * self.per_layer[policy] + self.head


def activations(c: Config, p: Plan) -> Activations:
    per_layer, first = {}, {}
    # the first block's input is the embedding's: under LoRA it needs no gradient, unless a reentrant checkpoint
    # made it need one (phift.recompute._input_requires_grad)
    for policy in POLICIES:
        per_layer[policy] = sum(block_saved(c, p, policy).values())
        first[policy] = sum(block_saved(c, p, policy, input_requires_grad=p.full or policy == "full").values())
    if _masked(c, p):  # a checkpoint keeps its tensor arguments: the one boolean mask every block is given
        first["full"] += p.batch * p.seq * p.seq
    rerun = sum(block_saved(c, p, "none", recomputing=True).values())
    # the mlp policy's rerun: phi's fc1 output and GELU output; Phi-3's gate_up output (two wide) and SiLU output
    widths = 3 if families.family_of(c).name == "phi3" else 2
    return Activations(per_layer=per_layer, first_layer=first, head=sum(head_saved(c, p).values()),
                       recompute_transient={"none": 0, "full": rerun,
                                            "mlp": widths * p.tokens * c.intermediate_size * p.compute},
                       layers=c.num_layers)


def head_transient(c: Config, p: Plan) -> int:
    """The most the chunked loss allocates beside what it keeps, within the forward (phift.model's
    _ChunkedLinearCrossEntropy, chunk by chunk: logits, their gradient, its casts, the weight-gradient product)."""
    h, v, r, cd = c.hidden_size, c.vocab_size, p.weight, p.compute  # r: the final norm's output, lm_head's weight
    rows = p.batch * (p.seq - 1)
    k = min(rows, _chunk_rows(c))
    fused = _ce_fused(c, p)
    g_elem = cd if fused else 4
    cast = p.autocast  # autocast casts each operand that is not already its dtype, every call (no cache)
    w_cast = v * h * cd if cast and r != cd else 0
    inputs = p.tokens * h * r + rows * h * r  # the final norm's output and the selected rows, alive through the head
    logits = k * v * cd + (0 if fused else 2 * k * v * 4)  # the reference CE: an fp32 copy and its gradient
    g = k * v * g_elem + (k * v * r if g_elem != r else 0)  # g, and g.to(h.dtype)
    g_cast = k * v * cd if cast and r != cd else 0
    steps = [w_cast + logits, g + g_cast + w_cast]
    if p.full and not (rows <= k and rows * g_elem <= 4 * h):
        product = v * h * cd + (v * h * 4 if rows > k else 0)  # after the first chunk, its fp32 copy is extra
        steps.append(g + g_cast + product)
    return inputs + max(steps)


def block_backward(c: Config, p: Plan) -> tuple[int, int]:
    """(gradients, attention workspace) one block's backward allocates at its worst: the residual gradients, the
    MLP's [tokens, intermediate] gradients (and a trainable weight's half gradient before its fp32 cast), or
    attention's dq, dk, dv and the output's gradient with the flash kernel's fp32 dq accumulator."""
    n, h, inter, r, cd = p.tokens, c.hidden_size, c.intermediate_size, p.weight, p.compute
    residual = 2 * r * n * h
    # phi: GELU's and fc1's output gradients, fc1's weight; Phi-3: the product's, and gate_up's (two wide) and weight
    wide = 2 if families.family_of(c).name == "phi3" else 1
    mlp = (1 + wide) * n * inter * cd + (wide * inter * h * cd if p.full else 0)
    attention = n * (2 * h + 2 * c.num_kv_heads * c.head_dim) * cd
    workspace = 4 * n * h + 4 * p.batch * c.num_heads * p.seq
    if mlp >= attention + workspace:
        return residual + mlp, 0
    return residual + attention, workspace


# --------------------------------------------------------------------------------------------------- model states
def pow2(nbytes: float) -> int:
    """PyTorch's pinned-memory allocator hands out blocks rounded up to a power of two."""
    return 1 << max(0, math.ceil(math.log2(nbytes))) if nbytes > 0 else 0


def deepspeed_reference(total: int, largest_layer: int, stage: int, gpus: int, nodes: int, offload_optimizer: bool,
                        offload_param: bool = False, zero_init: bool = False,
                        additional_buffer_factor: float = 1.5) -> tuple[int, int]:
    """(host bytes per node, GPU bytes per GPU): DeepSpeed's own model-state estimate, the formulas of its
    estimate_zero2_model_states_mem_needs (stage 1 and 2) and estimate_zero3_model_states_mem_needs (stage 3), for
    the settings phift runs (no deepspeed.zero.Init: zero_init False)."""
    total_gpus = gpus * nodes
    if stage < 3:
        if offload_optimizer:
            return int(total * max(4 * total_gpus, 16) * additional_buffer_factor), int(2 * total)
        return int(total * 4 * gpus * additional_buffer_factor), int(2 * total + int(18 * total / total_gpus))
    gpus_factor = 1 / nodes
    largest = 4 * largest_layer
    if offload_optimizer and offload_param:
        k = 18 * gpus_factor if zero_init else max(4 * gpus, 18 * gpus_factor)
        return int(total * k * additional_buffer_factor), largest
    if offload_optimizer:
        k = 16 * gpus_factor if zero_init else max(4 * gpus, 16 * gpus_factor)
        return int(total * k * additional_buffer_factor), largest + int(2 * total / total_gpus)
    host = largest_layer * 4 * gpus if zero_init else total * 4 * gpus
    return int(host * additional_buffer_factor), largest + int(18 * total / total_gpus)


@dataclass
class States:
    """Model states and engine buffers, each a bytes-by-name dict: on the GPU (always live, from the first step on),
    on the host per node (pinned, pageable); the GPU's gradients by the moment of the step they are live at."""
    gpu: dict[str, int] = field(default_factory=dict)
    pinned: dict[str, int] = field(default_factory=dict)
    pageable: dict[str, int] = field(default_factory=dict)
    grads_carried: int = 0  # live through the forward (accumulated micro-batches, engine buffers)
    grads_head: int = 0  # the loss head's, at the start of backward
    grads_all: int = 0  # at the end of backward
    grads_embedding: int = 0  # the last to arrive
    step: dict[str, int] = field(default_factory=dict)  # what the optimizer step adds on the GPU
    step_grads: int | None = None  # the gradients live at the step, when not grads_all
    step_frees: tuple[str, ...] = ()  # `gpu` terms no longer live at the step
    model_states_gpu: int = 0  # weights + gradients + master weights + moments, DeepSpeed's sense of the word
    model_states_host: int = 0


def states(c: Config, params: Params, p: Plan) -> States:
    s = States()
    total, nt = params.total, params.trainable
    lora = "" if p.full else "LoRA "
    frozen = total - nt
    if frozen:
        s.gpu["weights (frozen base)"] = frozen * p.weight
    grad_bytes = nt * p.trainable
    # the embedding's gradient arrives last; a tied one (Phi-4-mini) is lm_head's, there from the start
    wte = 0 if getattr(c, "tie_word_embeddings", False) else c.vocab_size * c.hidden_size
    head = params.lm_head if p.full else 0
    in_flight = 2 * params.largest_trainable * p.trainable  # one gradient being made, one leaving
    if p.fused and p.weight == 2 and p.lora_rank <= 32:
        # without DeepSpeed LoRA base weights live in [W | s·B] matrices of their own (phift.kernels.
        # home_lora_weights): only the extra columns are more; under DeepSpeed the op keeps a copy of each W
        copies = p.zero is not None
        s.gpu["fused LoRA [W | s·B] copies" if copies else "fused LoRA s·B columns beside W"] = sum(
            o * ((i if copies else 0) + LORA_AUGMENT_COLUMNS) * 2 for i, o in params.adapted if i % 8 == 0)
    if p.engine == "plain":
        s.gpu[f"{lora}weights" if p.full else "LoRA adapters"] = nt * p.trainable
        s.gpu[f"{lora}optimizer states (AdamW moments)"] = 8 * nt
        if p.master:
            s.gpu["fp32 master weights"] = 4 * nt
        s.grads_all, s.grads_head = grad_bytes, head * p.trainable
        s.grads_embedding = wte * p.trainable if p.full else 0
        s.grads_carried = grad_bytes if p.accumulation > 1 else 0
        s.model_states_gpu = frozen * p.weight + 2 * grad_bytes + 8 * nt + (4 * nt if p.master else 0)
    elif p.engine == "offload":
        s.gpu["weights"] = total * 2
        s.grads_all = s.grads_head = in_flight
        s.grads_carried = 2 * nt if p.accumulation > 1 else 0
        # one pinned buffer each for weights and gradients per dtype group: the model is all fp16 or all bf16
        s.pinned["half weights (offload)"] = pow2(2 * nt)
        s.pinned["half gradients (offload)"] = pow2(2 * nt)
        s.pageable["fp32 master weights"] = 4 * nt
        s.pageable["optimizer states (AdamW moments)"] = 8 * nt
        s.model_states_gpu, s.model_states_host = 2 * total, 16 * nt
    else:
        _deepspeed_states(c, params, p, s, in_flight, lora)
    return s


def _deepspeed_states(c: Config, params: Params, p: Plan, s: States, in_flight: int, lora: str) -> None:
    z, total, nt = p.zero, params.total, params.trainable
    g = p.world if z.stage > 0 else 1  # stage 0: DeepSpeed's fp16 optimizer, nothing partitioned
    elem = p.trainable  # DeepSpeed's fp16/bf16 module (fp32 without either)
    part = nt / g
    if z.stage < 3:
        s.gpu[f"{lora}weights" if p.full else "LoRA adapters"] = nt * elem
        if z.contiguous_gradients:
            s.gpu["DeepSpeed reduce bucket"] = z.reduce_bucket * (4 if z.stage == 1 else elem) * (
                2 if z.overlap_comm else 1)
        grads_gpu = 2 * nt if z.stage <= 1 else 0 if z.offload_optimizer else int(2 * part)
        s.grads_carried = s.grads_all = grads_gpu
    else:
        persistent = sum(n for n, _, _ in params.tensors if n <= z.persistence_threshold)
        s.gpu["weights (ZeRO-3 partition)"] = int(2 * total / g) if not z.offload_param else 0
        if g > 1:
            s.gpu["weights kept whole (persistence threshold)"] = int(2 * persistent * (1 - 1 / g))
            s.gpu["gathered weights (prefetch bucket)"] = 2 * min(z.prefetch_bucket, total)
        s.gpu["gathered module: weights + gradient (DeepSpeed's 4 × largest layer)"] = 4 * params.largest_module
        s.gpu["DeepSpeed reduce bucket"] = z.reduce_bucket * elem
        if "weights (frozen base)" in s.gpu:  # ZeRO-3 partitions every parameter, frozen ones too
            del s.gpu["weights (frozen base)"]
        grads_gpu = 0 if z.offload_optimizer else int(2 * part)
        s.grads_carried = s.grads_all = grads_gpu
    s.grads_head = s.grads_all
    s.grads_all += in_flight
    where = s.pinned if z.offload_optimizer and z.pin_memory else s.pageable
    gpus_here = p.gpus  # the ranks that share this node's host memory
    if z.offload_optimizer:
        if z.stage < 3:
            s.gpu["DeepSpeed gradient staging (largest parameter)"] = 2 * params.largest_trainable
            for i, group in enumerate(params.groups()):
                gp = math.ceil(group / g)
                name = ("matrices", "biases, norms")[i]
                round_ = pow2 if z.pin_memory else (lambda b: b)
                where[f"fp32 master weights ({name})"] = gpus_here * round_(4 * gp)
                where[f"fp32 gradients ({name})"] = gpus_here * round_(4 * gp)
                where[f"half weights for the upload ({name})"] = gpus_here * round_(2 * gp)
            where["gradient staging (largest parameter)"] = gpus_here * (
                pow2(2 * params.largest_trainable) if z.pin_memory else 2 * params.largest_trainable)
            if p.accumulation > 1:  # accumulated_grads_in_cpu: one buffer a parameter
                where["accumulated gradients"] = gpus_here * sum(
                    (pow2(2 * n) if z.pin_memory else 2 * n) / g for n, t, _ in params.tensors if t)
        else:
            where["fp32 gradients"] = gpus_here * (pow2(4 * part) if z.pin_memory else int(4 * part))
            s.pageable["fp32 master weights"] = gpus_here * int(4 * part)
            if z.offload_param:
                where["half weights (offloaded)"] = gpus_here * (
                    pow2(2 * total / g) if z.pin_memory else int(2 * total / g))
        s.pageable["optimizer states (AdamW moments)"] = s.pageable.get("optimizer states (AdamW moments)", 0) \
            + gpus_here * int(8 * part)
        s.model_states_host = int(16 * nt / p.nodes) + (int(2 * total / p.nodes) if z.offload_param else 0)
    else:
        s.gpu["fp32 master weights"] = int(4 * part)
        s.gpu[f"{lora}optimizer states (AdamW moments)"] = int(8 * part)
        if z.stage < 3:
            s.step["fp32 gradients (optimizer step)"] = int(4 * part)
            s.step["flattened half gradients (optimizer step)"] = int(2 * part)
        else:  # one sub-group's half gradients flattened, then cast to fp32, freed before the next; by then every
            # gathered module is partitioned again and the per-parameter gradients cleared (stage3's step)
            sub = params.largest_sub_group(g, z.sub_group_size)
            s.step["fp32 gradients (optimizer step, largest sub-group)"] = 4 * sub
            s.step["flattened half gradients (optimizer step, largest sub-group)"] = 2 * sub
            s.step_grads = s.grads_carried
            s.step_frees = tuple(k for k in s.gpu if k.startswith(("gathered module", "gathered weights")))
    # DeepSpeed's sense of model states: its estimator's terms, for the parameters that train here
    frozen = total - nt
    if z.stage < 3:
        weights = total * elem
    else:
        weights = 4 * params.largest_module + (0 if z.offload_param else int(2 * frozen / g))
    partitioned = 0 if z.offload_param and z.offload_optimizer else 2 if z.offload_optimizer and z.stage == 3 \
        else 0 if z.offload_optimizer else 18
    s.model_states_gpu = weights + int(partitioned * nt / g)


# ---------------------------------------------------------------------------------------------------- the estimate
@dataclass
class Estimate:
    """A run's memory. `gpu` holds the terms live at the step's worst moment (`peak_phase`): their sum is what
    torch.cuda.max_memory_allocated would report. `overheads` is what the GPU needs beyond it."""
    gpu: dict[str, int]
    overheads: dict[str, int]
    pinned: dict[str, int]
    pageable: dict[str, int]
    peak_phase: str
    phases: dict[str, int]
    activations: Activations
    model_states_gpu: int
    model_states_host: int
    deepspeed: dict | None
    plan: Plan
    notes: list[str]

    @property
    def gpu_allocated(self) -> int:
        return sum(self.gpu.values())

    @property
    def gpu_total(self) -> int:
        return self.gpu_allocated + sum(self.overheads.values())

    @property
    def host_total(self) -> int:
        return sum(self.pinned.values()) + sum(self.pageable.values())

    def to_dict(self) -> dict:
        a = self.activations
        return {
            "gpu_peak_allocated_bytes": self.gpu_allocated, "gpu_total_bytes": self.gpu_total,
            "host_total_bytes": self.host_total, "host_pinned_bytes": sum(self.pinned.values()),
            "peak_phase": self.peak_phase, "phases": self.phases, "gpu": self.gpu, "gpu_overheads": self.overheads,
            "host_pinned": self.pinned, "host_pageable": self.pageable,
            "activations_per_layer": a.per_layer, "activations_total": {k: a.total(k) for k in POLICIES},
            "recompute_transient": a.recompute_transient, "model_states_gpu": self.model_states_gpu,
            "model_states_host": self.model_states_host, "deepspeed_estimator": self.deepspeed,
            "plan": dataclasses.asdict(self.plan), "notes": self.notes}


def estimate(config: Config, run: RunConfig, gpus: int = 1, nodes: int = 1, ds_config: dict | None = None,
             device: str = "cuda", params: Params | None = None) -> Estimate:
    """The memory of `run` on GPUs (device "cpu": the same arithmetic for the PyTorch reference ops)."""
    params = params or count_parameters(config, run)
    p = plan_for(run, device, gpus, nodes, ds_config, config)
    if p.stage in NO_DROPOUT_STAGES:
        config = dataclasses.replace(config, **{k: 0.0 for k in ("resid_pdrop", "embd_pdrop", "attention_dropout")
                                                if hasattr(config, k)})
    act = activations(config, p)
    s = states(config, params, p)
    base = dict(s.gpu)
    base["cuBLAS workspaces"] = WORKSPACES
    base["batch (input ids, labels)"] = 2 * 8 * p.tokens
    reference = [n for n, trainable, _ in params.tensors if p.full or not trainable]  # the model without adapters
    if p.reference == "copy":
        base["DPO reference (frozen copy of the weights)"] = sum(reference) * p.reference_element
    elif p.reference == "streamed":
        # each tensor pinned on its own (stages.FrozenReference), as the pinned allocator rounds it
        s.pinned["DPO reference (host copy, streamed a block at a time)"] = sum(
            pow2(n * p.reference_element) for n in reference)
    head = sum(head_saved(config, p).values())
    saved = act.total(p.policy)
    saved_name = f"activations ({'no recomputation' if p.policy == 'none' else p.policy + ' recomputation'})"
    grads = "gradients" if p.full else "LoRA gradients"
    bwd_grads, workspace = block_backward(config, p)
    rerun = act.recompute_transient[p.policy]
    phases_terms = {
        "end of forward (loss head)": {grads: s.grads_carried, saved_name: saved,
                                       "loss head (chunked logits)": head_transient(config, p)},
        "backward, first block": {grads: max(s.grads_carried, s.grads_head), saved_name: saved - head,
                                  "recomputation (one block)": rerun, "block backward gradients": bwd_grads,
                                  "attention backward workspace": workspace},
        "backward, last block": {grads: s.grads_all - s.grads_embedding, saved_name: act.first_layer[p.policy],
                                 "recomputation (one block)": rerun, "block backward gradients": bwd_grads,
                                 "attention backward workspace": workspace},
        "optimizer step": {grads: s.grads_all if s.step_grads is None else s.step_grads, **s.step,
                           **{k: 0 for k in s.step_frees}},
    }
    phases = {name: sum({**base, **t}.values()) for name, t in phases_terms.items()}  # a 0 term: freed by then
    peak = max(phases, key=phases.get)
    gpu = {k: v for k, v in {**base, **phases_terms[peak]}.items() if v}
    allocated = sum(gpu.values())
    overheads = {"CUDA context": CUDA_CONTEXT, "allocator slack": int(ALLOCATOR_SLACK * allocated)}
    if p.world > 1:
        overheads["NCCL buffers"] = NCCL_BUFFERS
    processes = p.gpus if p.engine == "deepspeed" else 1
    pageable = {"process (Python, torch, CUDA runtime)": processes * HOST_PROCESS}
    if p.engine == "deepspeed":
        pageable["DeepSpeed"] = processes * HOST_DEEPSPEED
    pageable.update(s.pageable)
    notes = [f"every sample at --cutoff_len {p.seq}: {p.batch} × {p.seq} tokens a micro-batch, every position "
             "labelled (the worst batch)" if not p.pairs else
             f"every answer at --cutoff_len {p.seq}: {p.batch // 2} pairs, {p.batch} rows × {p.seq} tokens a "
             "micro-batch (a row per answer; a batch shares its prompts only where that holds fewer tokens), every "
             "position labelled (the worst batch)" + ("; shared prompts of different lengths are padded and masked, "
                                                      "the masks' additive biases counted in" if p.shared else "")]
    if p.reference:
        notes.append("DPO's reference: a frozen copy of these weights (a --ref_model of another size differs); its "
                     "no-grad forward runs before the policy's and holds less")
    if p.packing:
        notes.append("--packing: each row's segment mask keeps an additive bias per block (memory-efficient "
                     "attention), counted in")
    if device == "cuda" and p.compute == 2:
        notes.append("phift's CUDA kernels assumed built (rotary, LoRA, cross-entropy); without them the "
                     "PyTorch fallbacks keep more")
        if not _rotary_fused(config, p):
            notes.append(f"{config.num_heads} query heads over {config.num_kv_heads} key-value heads: the rotary runs "
                         "the PyTorch math (phift's fused rotary takes as many of each), keeping new q and k")
        if not _ce_fused(config, p):
            notes.append(f"a vocabulary of {config.vocab_size:,} is beyond the fused cross-entropy kernel's "
                         f"{MAX_KERNEL_VOCAB:,}: the loss head runs the PyTorch math on fp32 copies of the logits")
    window = getattr(config, "sliding_window", None)
    if window is not None and p.seq > window:
        notes.append(f"--cutoff_len {p.seq} is past the sliding window ({window:,}): every block keeps the additive "
                     "bias SDPA makes of the window's mask, [batch, cutoff, cutoff]")
    ds = None
    if p.engine == "deepspeed":
        z = p.zero
        host_ds, gpu_ds = deepspeed_reference(params.total, params.largest_module, z.stage, p.gpus, p.nodes,
                                              z.offload_optimizer, z.offload_param)
        ds = {"host_bytes": host_ds, "gpu_bytes": gpu_ds, "stage": z.stage, "offload_optimizer": z.offload_optimizer}
    return Estimate(gpu=gpu, overheads=overheads, pinned=s.pinned, pageable=pageable, peak_phase=peak, phases=phases,
                    activations=act, model_states_gpu=s.model_states_gpu, model_states_host=s.model_states_host,
                    deepspeed=ds, plan=p, notes=notes)


# ------------------------------------------------------------------------------------------ fit, and what would fit
def fits(e: Estimate, gpu_gib: float, host_gib: float) -> bool:
    return e.gpu_total <= gpu_gib * GIB and e.host_total <= host_gib * GIB


def _variants(run: RunConfig, ds_config: dict | None, gpu_bf16: bool):
    """Changes that cut memory, cheapest first: (kind, the flags that say it, {group: fields}, DeepSpeed config or
    None). A later change of a kind replaces an earlier one of the same kind."""
    m, d, f, t = run.model, run.data, run.finetuning, run.training
    if keeps_dpo_reference(f):
        # the reference's log-probabilities once before training: no copy kept, no reference forward a step
        off = {"dpo_ref_offload": False} if f.dpo_ref_offload else {}
        yield "reference", "--dpo_precompute_ref True" + (" --dpo_ref_offload False" if off else ""), \
            {"finetuning": dict(dpo_precompute_ref=True, **off)}, None
    if m.disable_gradient_checkpointing:
        yield "recompute", "--disable_gradient_checkpointing False --gradient_checkpointing_policy mlp", \
            {"model": dict(disable_gradient_checkpointing=False, gradient_checkpointing_policy="mlp")}, None
    if m.disable_gradient_checkpointing or m.gradient_checkpointing_policy == "mlp":
        yield "recompute", "--disable_gradient_checkpointing False --gradient_checkpointing_policy full", \
            {"model": dict(disable_gradient_checkpointing=False, gradient_checkpointing_policy="full")}, None
    if f.finetuning_type == "full" and t.deepspeed and ds_config is not None:
        zero = ds_config.get("zero_optimization", {})
        if (zero.get("offload_optimizer") or {}).get("device", "none") == "none":
            cfg = json.loads(json.dumps(ds_config))
            cfg.setdefault("zero_optimization", {})["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
            if cfg["zero_optimization"].get("stage", 0) == 0:
                cfg["zero_optimization"]["stage"] = 2
            yield "offload", f"zero_optimization.offload_optimizer.device cpu in {t.deepspeed}", {}, cfg
    elif f.finetuning_type == "full" and t.offload_optimizer == "none":
        half = {} if (t.fp16 or t.bf16 or t.pure_bf16) else {"bf16": True} if gpu_bf16 else {"fp16": True}
        yield "offload", "--offload_optimizer cpu" + "".join(f" --{k} True" for k in half), \
            {"training": dict(offload_optimizer="cpu", **half), "finetuning": dict(upcast_layernorm=False)}, None
    batch, accum = t.per_device_train_batch_size, t.gradient_accumulation_steps
    while batch > 1:
        batch, accum = batch // 2, accum * 2
        yield "batch", f"--per_device_train_batch_size {batch} --gradient_accumulation_steps {accum}", \
            {"training": dict(per_device_train_batch_size=batch, gradient_accumulation_steps=accum)}, None
    for share in (3 / 4, 1 / 2, 1 / 4):
        cutoff = int(d.cutoff_len * share) // 64 * 64
        if 64 <= cutoff < d.cutoff_len:
            yield "cutoff", f"--cutoff_len {cutoff} (longer samples are cut)", {"data": dict(cutoff_len=cutoff)}, None
    if f.finetuning_type == "full":
        # a LoRA run's DPO reference is the policy with its adapter off: nothing to offload
        off = {"dpo_ref_offload": False} if f.dpo_ref_offload and not f.ref_model else {}
        yield "lora", "--finetuning_type lora" + (" --dpo_ref_offload False" if off else ""), \
            {"finetuning": dict(finetuning_type="lora", **off), "training": dict(offload_optimizer="none")}, None


def suggest(config: Config, run: RunConfig, gpu: tuple[str, float, bool], host_gib: float, gpus: int = 1,
            nodes: int = 1, ds_config: dict | None = None) -> tuple[str, Estimate] | None:
    """The cheapest change that makes the run fit `gpu` and `host_gib`: DPO's reference computed once before training
    (where a copy is kept), recomputation, then optimizer offload, then
    smaller micro-batches with more accumulation, a shorter cutoff, LoRA instead of full fine-tuning, each
    re-estimated. A change that brought the run closer stays under the next ones; once one fits, the earlier ones it
    does not need are dropped. None: nothing on the list fits."""
    _, gpu_gib, gpu_bf16 = gpu
    if ds_config is None and run.training.deepspeed:
        ds_config = json.loads(Path(run.training.deepspeed).read_text())

    def excess(e):
        return max(0, e.gpu_total - gpu_gib * GIB) + max(0, e.host_total - host_gib * GIB)

    def trial(changes):
        """The estimate with these changes applied to the run, or None where phift would refuse the flags."""
        candidate, cfg = run, ds_config
        for _, _, groups, new_cfg in changes:
            candidate = dataclasses.replace(candidate, **{
                g: dataclasses.replace(getattr(candidate, g), **kw) for g, kw in groups.items()})
            cfg = new_cfg if new_cfg is not None else cfg
        try:
            check(candidate)
        except ConfigError:
            return None
        return estimate(config, candidate, gpus, nodes, cfg)

    kept, best = [], estimate(config, run, gpus, nodes, ds_config)
    for variant in _variants(run, ds_config, gpu_bf16):
        changes = [c for c in kept if c[0] != variant[0]] + [variant]
        e = trial(changes)
        if e is None:
            continue
        if fits(e, gpu_gib, host_gib):
            for c in changes[:-1]:  # drop what the last change made unnecessary
                fewer = [x for x in changes if x is not c]
                smaller = trial(fewer)
                if smaller is not None and fits(smaller, gpu_gib, host_gib):
                    changes, e = fewer, smaller
            return "; ".join(text for _, text, _, _ in changes), e
        if excess(e) < excess(best):
            kept, best = changes, e
    return None


# ------------------------------------------------------------------------------------------------------ the report
def _gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB"


def render(e: Estimate, config: Config, params: Params, suggestion, target: tuple[str, float, float]) -> str:
    p, a = e.plan, e.activations
    what = "full fine-tuning" if p.full else f"LoRA r{p.lora_rank} on {','.join(p.lora_targets)}"
    lines = [f"phift estimate: {config.name}, {what}, "
             f"{params.total / 1e6:,.1f} M parameters ({params.trainable / 1e6:,.2f} M trainable), engine {p.engine}"
             + (f" ZeRO-{p.zero.stage}" + (" (optimizer offloaded)" if p.zero.offload_optimizer else "")
                if p.zero else "") + f", {p.world} GPU{'s' if p.world > 1 else ''}",
             f"  micro-batch {f'{p.batch // 2} pairs = ' if p.pairs else ''}{p.batch} × {p.seq} tokens (every "
             f"{'answer' if p.pairs else 'sample'} at the cutoff), accumulation {p.accumulation}, "
             f"recomputation {p.policy}; element bytes: weights {p.weight}, matmuls {p.compute}, trainable "
             f"{p.trainable}{', autocast' if p.autocast else ''}", "",
             f"GPU, per device: {_gib(e.gpu_total)} needed; {_gib(e.gpu_allocated)} allocated at the peak "
             f"({e.peak_phase})"]
    for name, b in e.gpu.items():
        if b < MIB:
            continue
        lines.append(f"  {name:58s} {_gib(b):>11s}")
    for name, b in e.overheads.items():
        lines.append(f"  {name + ' (not in max_memory_allocated)':58s} {_gib(b):>11s}")
    lines.append("  the step's moments: " + ", ".join(f"{k} {_gib(v)}" for k, v in e.phases.items()))
    lines += ["", f"Activations kept per block ({p.batch} × {p.seq} tokens): "
              + ", ".join(f"{k} {_gib(v)}" for k, v in (("no recomputation", a.per_layer["none"]),
                                                        ("full recomputation", a.per_layer["full"]),
                                                        ("mlp policy", a.per_layer["mlp"])))
              + f"; the recomputation holds {_gib(a.recompute_transient['full'])} (full) or "
              f"{_gib(a.recompute_transient['mlp'])} (mlp) more while a block's backward runs",
              f"  all {a.layers} blocks and the loss head: " + ", ".join(
                  f"{k} {_gib(a.total(k))}" for k in POLICIES)]
    lines += ["", f"Host, per node: {_gib(e.host_total)} ({_gib(sum(e.pinned.values()))} pinned)"]
    for name, b in {**{k + " [pinned]": v for k, v in e.pinned.items()}, **e.pageable}.items():
        if b < MIB:  # --json lists them all
            continue
        lines.append(f"  {name:58s} {_gib(b):>11s}")
    lines.append(f"  model states (weights, gradients, fp32 masters, moments): GPU {_gib(e.model_states_gpu)}, host "
                 f"{_gib(e.model_states_host)}")
    if e.deepspeed:
        lines.append(f"  DeepSpeed's own estimator (model states only, every parameter trained, its ×1.5 host buffer "
                     f"factor): GPU {_gib(e.deepspeed['gpu_bytes'])}, host {_gib(e.deepspeed['host_bytes'])}")
    lines += ["", "Fits?  " + "  ".join(f"{n} {g}: {'yes' if e.gpu_total <= g * GIB else 'no'}" for n, g, _ in GPUS),
              "       " + "  ".join(f"{n} {g} GiB host: {'yes' if e.host_total <= g * GIB else 'no'}"
                                   for n, g in HOSTS)]
    name, gpu_gib, host_gib = target
    if fits(e, gpu_gib, host_gib):
        lines.append(f"It fits {name} ({gpu_gib} GiB) with {host_gib} GiB of host memory.")
    elif suggestion:
        text, s = suggestion
        lines.append(f"To fit {name} ({gpu_gib} GiB) with {host_gib} GiB of host memory: {text} "
                     f"(GPU {_gib(s.gpu_total)}, host {_gib(s.host_total)})")
    else:
        listed = (("DPO's reference once, " if e.plan.reference else "")
                  + "recomputation, offload, micro-batch, cutoff, LoRA")
        lines.append(f"Nothing on the list ({listed}) fits {name} "
                     f"({gpu_gib} GiB) with {host_gib} GiB of host memory.")
    lines += [f"Note: {n}" for n in e.notes]
    return "\n".join(lines)


def memory_panels(e: Estimate, suggestion, target: tuple[str, float, float]) -> dict:
    """plot.plot_memory's panels: the GPU's parts (the allocated terms, then what max_memory_allocated does not see)
    and the host's (pinned, then pageable), for this run and the suggested change, against the target's capacity.
    Parts under 2 % of a bar are drawn together as "other"."""
    name, gpu_gib, host_gib = target

    def parts(terms: dict[str, int]) -> list[tuple[str, float]]:
        total = sum(terms.values()) or 1
        big = [(k, v / GIB) for k, v in terms.items() if v >= 0.02 * total]
        rest = sum(v for v in terms.values() if v < 0.02 * total)
        return big + ([("other", rest / GIB)] if rest else [])

    def gpu(x: Estimate):
        return parts({**x.gpu, **{k + " (outside max_memory_allocated)": v for k, v in x.overheads.items()}})

    def host(x: Estimate):
        return parts({**{k + " [pinned]": v for k, v in x.pinned.items()}, **x.pageable})

    runs = [("this run", e)] + ([("with " + suggestion[0], suggestion[1])] if suggestion else [])
    return {f"GPU, per device ({name})": (gpu_gib, f"{name}: {gpu_gib:g} GiB", [(_wrap(t), gpu(x)) for t, x in runs]),
            "host, per node": (host_gib, f"host: {host_gib:g} GiB", [(_wrap(t), host(x)) for t, x in runs])}


def _wrap(text: str, width: int = 34) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _target(gpu: str | None, host_gib: float | None) -> tuple[tuple[str, float, bool], float]:
    """The GPU and host to fit: as named, else this machine's, else the seed's free Colab (T4, 12.7 GiB)."""
    cards = {n.lower(): (n, g, bf) for n, g, bf in GPUS}
    if gpu:
        try:
            card = cards.get(gpu.lower()) or (f"{float(gpu):g} GiB GPU", float(gpu), True)
        except ValueError:
            raise ConfigError(f"--gpu {gpu!r}: a card of the table ({', '.join(n for n, _, _ in GPUS)}) or GiB") \
                from None
    elif torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        card = (props.name, props.total_memory / GIB, torch.cuda.is_bf16_supported())
    else:
        card = cards["t4"]
    if host_gib is None:
        host_gib = _host_memory() / GIB if gpu is None and torch.cuda.is_available() else HOSTS[0][1]
    return card, host_gib


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main(argv) -> None:
    """`phift estimate`: phift train's flags (or YAML file), and where to fit it."""
    from .args import parse_train_args

    extra = argparse.ArgumentParser(prog="phift estimate", add_help=False, allow_abbrev=False)
    extra.add_argument("--num_gpus", type=int, default=1, help="GPUs per node (DeepSpeed's partitions)")
    extra.add_argument("--num_nodes", type=int, default=1, help="nodes")
    extra.add_argument("--gpu", default=None, help="the GPU to fit: a card of the table or GiB (default: this "
                                                   "machine's, else a T4)")
    extra.add_argument("--host_gib", type=float, default=None, help="host memory to fit (default: this machine's "
                                                                    "with a GPU, else Colab's 12.7)")
    extra.add_argument("--json", action="store_true", help="print the numbers as JSON")
    extra.add_argument("--plot", default=None, metavar="FILE.png",
                       help="also draw where the memory goes, against the target, to this PNG")
    ours, rest = extra.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        extra.print_help()
        print("\nand every flag of `phift train` (phift train --help), or its YAML file first")
        return
    if ours.num_gpus < 1 or ours.num_nodes < 1:
        raise ConfigError("--num_gpus and --num_nodes must be positive")
    for flag, placeholder in (("--dataset", "none"), ("--output_dir", "unused")):
        # the estimate reads neither the data nor the output directory: a command may leave them out
        if not any(a == flag or a.startswith(flag + "=") for a in rest):
            rest += [flag, placeholder]
    run = parse_train_args(rest)
    if ours.num_gpus * ours.num_nodes > 1 and not run.training.deepspeed:
        raise ConfigError("multi-process runs go through DeepSpeed: add --deepspeed <config.json>")
    config = read_config(run.model.model_name_or_path)
    params = count_parameters(config, run)
    e = estimate(config, run, ours.num_gpus, ours.num_nodes, params=params)
    card, host_gib = _target(ours.gpu, ours.host_gib)
    fit = fits(e, card[1], host_gib)
    suggestion = None if fit else suggest(config, run, card, host_gib, ours.num_gpus, ours.num_nodes)
    if ours.json:
        out = e.to_dict()
        out["fits"] = {"gpus": {n: e.gpu_total <= g * GIB for n, g, _ in GPUS},
                       "hosts": {n: e.host_total <= g * GIB for n, g in HOSTS},
                       "target": {"gpu": card[0], "gpu_gib": card[1], "host_gib": host_gib, "fits": fit}}
        out["suggestion"] = None if suggestion is None else {
            "change": suggestion[0], "gpu_total_bytes": suggestion[1].gpu_total,
            "host_total_bytes": suggestion[1].host_total}
        print(json.dumps(out, indent=2))
    else:
        print(render(e, config, params, suggestion, (card[0], card[1], host_gib)))
    if ours.plot:
        from .plot import plot_memory

        p = e.plan
        what = "full fine-tuning" if p.full else f"LoRA r{p.lora_rank}"
        batch = f"{p.batch // 2} pairs" if p.pairs else f"{p.batch}"
        title = (f"phift estimate: {config.name}, --stage {run.finetuning.stage}, {what}, {batch} × {p.seq} tokens, "
                 f"recomputation {p.policy}: {'fits' if fit else 'does not fit'} {card[0]} with {host_gib:g} GiB host")
        written = plot_memory(ours.plot, title, memory_panels(e, suggestion, (card[0], card[1], host_gib)))
        print(f"wrote {written}", file=sys.stderr if ours.json else sys.stdout)


def preflight(run: RunConfig, world: int, device: torch.device) -> Estimate | None:
    """`phift train --estimate True`: the report before training; a warning naming what overflows this GPU."""
    if device.type != "cuda":
        logger.warning("--estimate True: no CUDA GPU here; the estimate is for one (phift estimate shows it)")
    config = read_config(run.model.model_name_or_path)
    gpus = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    params = count_parameters(config, run)
    e = estimate(config, run, gpus, max(1, world // gpus), params=params)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        card = (props.name, props.total_memory / GIB, torch.cuda.is_bf16_supported())
    else:
        card = next(g for g in GPUS if g[0] == "T4")
    host_gib = _host_memory() / GIB
    fit = fits(e, card[1], host_gib)
    suggestion = None if fit else suggest(config, run, card, host_gib, gpus, max(1, world // gpus))
    logger.info("%s", render(e, config, params, suggestion, (card[0], card[1], host_gib)))
    if e.gpu_total > card[1] * GIB:
        largest = max(e.gpu, key=e.gpu.get)
        logger.warning("--estimate: this run needs %s on %s, which has %s; the largest part is %s (%s)",
                       _gib(e.gpu_total), card[0], _gib(card[1] * GIB), largest, _gib(e.gpu[largest]))
    if e.host_total > host_gib * GIB:
        logger.warning("--estimate: this run needs %s of host memory, this machine has %s", _gib(e.host_total),
                       _gib(host_gib * GIB))
    return e
