"""The training benchmark's cases: each one a set of explicit behaviour fields, and the table of them in run order.

A case's id (`shape/impl`, e.g. `full-1x1024-ckpt/phift+graphs (pure bf16)`) is built from its fields for display
and for `--only`; nothing reads behaviour back out of it.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

LR, MAX_GRAD_NORM = 2e-4, 1.0
# The models the cases train (random weights of a phift preset's shape) and the tokens of each one's real tokenizer,
# which the random batches draw from (the embeddings are padded beyond them: phi-1_5 to 51200, Phi-3.5-mini to 32064);
# the smoke test's tiny shape of each
MODELS = ("phi-1_5", "phi-3.5-mini")
VOCAB_USED = {"phi-1_5": 50295, "phi-3.5-mini": 32011}
TINY = {"phi-1_5": "tiny", "phi-3.5-mini": "tiny-phi3"}
T4_GIB = 15.0

FAMILIES = ("phift", "hf", "litgpt", "seed")
MODES = ("lora", "full")
PRECISIONS = ("fp16", "bf16", "pure_bf16")
CHECKPOINTING = ("off", "full", "mlp")
ENGINES = ("plain", "deepspeed", "offload")
# phift's fused ops as PHIFT_DISABLE_KERNELS names them ("all": every op), and as an impl names them
KERNELS = {"all": "fused", "lora": "LoRA", "rotary": "rotary", "ce": "CE"}


@dataclass(frozen=True)
class Case:
    shape: str  # the shape's name: the id's first part
    family: str  # phift | hf (transformers + PEFT) | litgpt | seed (HF + PEFT under deepspeed.initialize)
    mode: str  # lora | full
    batch: int
    seq: int
    # LoRA: half base + fp32 adapters + autocast; full: fp32 master weights + autocast (DeepSpeed: its own half mode);
    # pure_bf16: bf16 weights without autocast, fp32 masters in the optimizer (phift --pure_bf16)
    precision: str = "bf16"
    ckpt: str = "off"  # activation checkpointing: off | full (each family's own) | mlp (phift: fc1 + GELU only)
    compile: bool = False  # phift: per-block torch.compile (--compile); peers: the whole model
    graphs: bool = False  # phift --cuda_graphs: each micro-batch's forward + backward a replayed CUDA graph
    # plain: a PyTorch optimizer; deepspeed: ZeRO-2 with DeepSpeed's CPU Adam (examples/ds_config.json);
    # offload: phift --offload_optimizer cpu
    engine: str = "plain"
    kernels_off: tuple[str, ...] = ()  # phift's fused ops switched off (keys of KERNELS; "all": every op)
    lean: bool = True  # phift's lean recomputation: a checkpointed block skips out_proj's and fc2's GEMMs
    packing: bool = False  # phift --packing (the law recipe's batching)
    recipe: bool = False  # the whole `phift train` command on the self-cognition data, not timed steps
    mem_cap_gib: float | None = None  # torch.cuda.set_per_process_memory_fraction (a T4-sized budget)
    quick: bool = True  # in --quick
    model: str = "phi-1_5"  # the preset whose shape is trained (MODELS); its tiny shape in the smoke test

    def __post_init__(self):
        for name, allowed in (("family", FAMILIES), ("mode", MODES), ("precision", PRECISIONS),
                              ("ckpt", CHECKPOINTING), ("engine", ENGINES), ("model", MODELS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {allowed}")
        if not set(self.kernels_off) <= set(KERNELS):
            raise ValueError(f"kernels_off {self.kernels_off} names an op not in {tuple(KERNELS)}")
        phift_only = self.graphs or self.kernels_off or not self.lean or self.packing or self.recipe or \
            self.precision == "pure_bf16" or self.engine == "offload"
        if self.family != "phift" and phift_only:
            raise ValueError(f"{self.family}: graphs, kernels_off, lean, packing, recipe, pure_bf16 and the offload "
                             "engine are phift's")
        if self.family != "phift" and (self.family == "seed") != (self.engine == "deepspeed"):
            raise ValueError("the seed's stack is HF under DeepSpeed; only it and phift run DeepSpeed")
        if self.model != "phi-1_5" and (self.recipe or self.family == "seed"):
            raise ValueError("the recipes and the seed's stack are phi-1_5's")

    @property
    def impl(self) -> str:
        """The display name: family, then what is switched on, then in parentheses what differs from the default."""
        name = "phift train" if self.recipe else self.family
        name += "+packing" * self.packing + "+compile" * self.compile + "+graphs" * self.graphs
        if self.family == "phift":
            name += {"plain": "", "deepspeed": "+ds", "offload": "+offload"}[self.engine]
        notes = ["pure bf16"] * (self.precision == "pure_bf16") + ["full recompute"] * (not self.lean)
        notes += [f"no {KERNELS[k]} kernel" for k in self.kernels_off]
        return name + (f" ({', '.join(notes)})" if notes else "")

    @property
    def id(self) -> str:
        return f"{self.shape}/{self.impl}"

    @property
    def vocab_used(self) -> int:
        """The token ids a batch draws from: the real tokenizer's."""
        return VOCAB_USED[self.model]

    @property
    def half(self) -> str:
        """The half dtype the case trains in."""
        return "fp16" if self.precision == "fp16" else "bf16"

    def tiny(self) -> Case:
        """The smoke test's version: short batches (the model is its tiny preset: model_shape)."""
        return dataclasses.replace(self, batch=min(self.batch, 2), seq=min(self.seq, 64))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Case:
        return cls(**{**d, "kernels_off": tuple(d.get("kernels_off", ()))})


def model_shape(model: str = "phi-1_5", tiny: bool = False):
    """The config a case trains: its model's preset, or for smoke tests that preset's 2-layer tiny version."""
    from phift import families
    return families.preset(TINY[model] if tiny else model)


SHAPES = {  # mode, batch × seq, precision, checkpointing
    "lora-6x1024": dict(mode="lora", batch=6, seq=1024),
    "lora-6x1024-ckpt": dict(mode="lora", batch=6, seq=1024, ckpt="full"),
    "lora-6x1024-ckpt-mlp": dict(mode="lora", batch=6, seq=1024, ckpt="mlp"),
    "lora-1x1792": dict(mode="lora", batch=1, seq=1792),
    "lora-8x2048": dict(mode="lora", batch=8, seq=2048),
    "full-1x1024-ckpt": dict(mode="full", batch=1, seq=1024, ckpt="full"),
    "full-4x2048-ckpt": dict(mode="full", batch=4, seq=2048, ckpt="full"),
    "lora-6x1024-fp16": dict(mode="lora", batch=6, seq=1024, precision="fp16"),
    # recipe 3: full fine-tuning, fp16, checkpointing on (LLaMA-Factory's and phift's default), ZeRO-2 CPU offload
    "recipe3-full-1x1024-zero2": dict(mode="full", batch=1, seq=1024, precision="fp16", ckpt="full"),
    "t4-lora-1x2048-fp16": dict(mode="lora", batch=1, seq=2048, precision="fp16", ckpt="full", mem_cap_gib=T4_GIB),
    # `phift train` on the self-cognition data, as the README's first recipe runs it
    "self-cognition": dict(mode="lora", batch=6, seq=1024, precision="fp16", ckpt="full"),
    # Phi-3.5-mini (3.8 B parameters, bf16), its LoRA on qkv_proj: without recomputation, and with it as phift's
    # defaults give it (full, lean); full fine-tuning with phift's optimizer offload; a T4's budget. Every length
    # stays within LongRoPE's original 4096, where its short factors apply
    "phi3.5-lora-4x1024": dict(model="phi-3.5-mini", mode="lora", batch=4, seq=1024),
    "phi3.5-lora-4x1024-ckpt": dict(model="phi-3.5-mini", mode="lora", batch=4, seq=1024, ckpt="full"),
    "phi3.5-lora-1x2048": dict(model="phi-3.5-mini", mode="lora", batch=1, seq=2048),
    "phi3.5-lora-1x2048-ckpt": dict(model="phi-3.5-mini", mode="lora", batch=1, seq=2048, ckpt="full"),
    "phi3.5-full-1x2048-ckpt-offload": dict(model="phi-3.5-mini", mode="full", batch=1, seq=2048, ckpt="full",
                                            engine="offload"),
    "phi3.5-t4-lora-1x2048-fp16": dict(model="phi-3.5-mini", mode="lora", batch=1, seq=2048, precision="fp16",
                                       ckpt="full", mem_cap_gib=T4_GIB),
}


def case(shape: str, family: str, **fields) -> Case:
    return Case(shape=shape, family=family, **{**SHAPES[shape], **fields})


PURE = dict(precision="pure_bf16")
SEED = dict(engine="deepspeed")

# In the order they run, what the targets need most first; quick=False: left out of --quick
CASES = [
    case("lora-6x1024", "hf"), case("lora-6x1024", "hf", compile=True),
    case("lora-6x1024", "litgpt", compile=True),
    case("lora-6x1024", "phift"), case("lora-6x1024", "phift", compile=True),
    case("lora-6x1024-ckpt", "phift"), case("lora-6x1024-ckpt", "phift", compile=True),
    case("lora-6x1024-ckpt-mlp", "phift"), case("lora-6x1024-ckpt-mlp", "phift", compile=True),
    # phift's DeepSpeed run also stands for the T4 budget's "full fine-tuning with ZeRO-2 CPU offload runs"
    case("recipe3-full-1x1024-zero2", "phift", engine="deepspeed", mem_cap_gib=T4_GIB),
    case("recipe3-full-1x1024-zero2", "seed", **SEED),
    case("recipe3-full-1x1024-zero2", "phift", engine="offload"),
    case("self-cognition", "phift", recipe=True), case("self-cognition", "phift", recipe=True, engine="deepspeed"),
    case("lora-6x1024", "litgpt"),
    case("full-1x1024-ckpt", "hf"), case("full-1x1024-ckpt", "phift"),
    case("full-1x1024-ckpt", "hf", compile=True), case("full-1x1024-ckpt", "phift", compile=True),
    case("lora-1x1792", "hf", compile=True), case("lora-1x1792", "litgpt", compile=True),
    case("lora-1x1792", "phift", compile=True),
    case("t4-lora-1x2048-fp16", "phift"),
    case("lora-6x1024-fp16", "hf"), case("lora-6x1024-fp16", "phift"),
    case("lora-6x1024-ckpt", "hf"),
    case("lora-6x1024", "phift", kernels_off=("all",)),
    case("lora-6x1024", "phift", kernels_off=("lora",), quick=False),
    case("lora-6x1024", "phift", kernels_off=("rotary",), quick=False),
    case("lora-6x1024", "phift", kernels_off=("ce",), quick=False),
    case("full-1x1024-ckpt", "phift", **PURE, quick=False),
    case("full-1x1024-ckpt", "phift", **PURE, compile=True, quick=False),
    case("full-1x1024-ckpt", "phift", **PURE, graphs=True, quick=False),
    case("full-4x2048-ckpt", "hf", quick=False), case("full-4x2048-ckpt", "phift", quick=False),
    case("full-4x2048-ckpt", "hf", compile=True, quick=False),
    case("full-4x2048-ckpt", "phift", compile=True, quick=False),
    case("full-4x2048-ckpt", "phift", **PURE, quick=False),
    case("full-4x2048-ckpt", "phift", **PURE, compile=True, quick=False),
    case("full-4x2048-ckpt", "phift", **PURE, graphs=True, quick=False),
    case("full-4x2048-ckpt", "phift", **PURE, lean=False, quick=False),
    case("lora-6x1024-ckpt", "phift", lean=False, quick=False),
    case("lora-1x1792", "hf", quick=False), case("lora-1x1792", "litgpt", quick=False),
    case("lora-1x1792", "phift", quick=False),
    case("lora-8x2048", "hf", quick=False), case("lora-8x2048", "hf", compile=True, quick=False),
    case("lora-8x2048", "litgpt", quick=False), case("lora-8x2048", "litgpt", compile=True, quick=False),
    case("lora-8x2048", "phift", quick=False), case("lora-8x2048", "phift", compile=True, quick=False),
    case("lora-6x1024-fp16", "hf", compile=True, quick=False),
    case("lora-6x1024-fp16", "phift", compile=True, quick=False),
    case("lora-6x1024-ckpt", "hf", compile=True, quick=False),
    # Phi-3.5-mini: the peers without recomputation (as the phi-1_5 LoRA rows run them), phift both ways
    case("phi3.5-lora-4x1024", "hf"), case("phi3.5-lora-4x1024", "hf", compile=True),
    case("phi3.5-lora-4x1024", "litgpt", compile=True),
    case("phi3.5-lora-4x1024", "phift"), case("phi3.5-lora-4x1024", "phift", compile=True),
    case("phi3.5-lora-4x1024-ckpt", "phift"), case("phi3.5-lora-4x1024-ckpt", "phift", compile=True),
    case("phi3.5-lora-1x2048", "hf"), case("phi3.5-lora-1x2048", "hf", compile=True),
    case("phi3.5-lora-1x2048", "litgpt", compile=True),
    case("phi3.5-lora-1x2048", "phift"), case("phi3.5-lora-1x2048", "phift", compile=True),
    case("phi3.5-lora-1x2048-ckpt", "phift"), case("phi3.5-lora-1x2048-ckpt", "phift", compile=True),
    # compiled with the PyTorch LoRA math in place of the fused op: does the [W | s·B] GEMM pay at Phi-3.5's width?
    case("phi3.5-lora-4x1024", "phift", compile=True, kernels_off=("lora",), quick=False),
    case("phi3.5-lora-1x2048", "phift", compile=True, kernels_off=("lora",), quick=False),
    # compiled with the PyTorch rotary math, which Inductor may fuse with the q/k/v split, instead of the opaque op
    case("phi3.5-lora-4x1024", "phift", compile=True, kernels_off=("rotary",), quick=False),
    case("phi3.5-lora-1x2048", "phift", compile=True, kernels_off=("rotary",), quick=False),
    case("phi3.5-t4-lora-1x2048-fp16", "phift"),
    case("phi3.5-full-1x2048-ckpt-offload", "phift"),
]
BY_ID = {c.id: c for c in CASES}


def select(quick: bool = False, only: str | None = None) -> list[Case]:
    """The cases a run takes, in table order: --quick keeps the quick ones, --only those whose id matches."""
    return [c for c in CASES if (c.quick or not quick) and (only is None or re.search(only, c.id))]


def case_of(row: dict) -> Case:
    """A result row's case: the fields it carries, or (rows written before rows carried them) the table's case of
    its shape and impl."""
    if "case" in row:
        return Case.from_dict(row["case"])
    return BY_ID[f"{row['config']}/{row['impl']}"]
