"""The run configuration: typed groups of LLaMA-Factory v0.3.3's `train_bash.py` flags, parsed in one place.

    ModelArgs        what to load and how to run it        (v0.3.3's ModelArguments, plus phift's accelerations)
    DataArgs         datasets, template, cutoff            (DataArguments)
    FinetuningArgs   LoRA or full, and what trains         (FinetuningArguments)
    TrainingArgs     optimizer, schedule, precision, checkpoints, logging    (HF's Seq2SeqTrainingArguments)
    GeneratingArgs   decoding for predict and chat         (GeneratingArguments)

Every field is a flag of its own name (`--cutoff_len`), with its default and a one-line help; boolean flags take a
value (`--fp16 True`) as in LLaMA-Factory. `phift train config.yaml [--flag value ...]` reads the same keys from a
YAML file (LLaMA-Factory's examples), flags overriding it. Unknown flags or keys and unsupported values are errors.
`check` holds every cross-field rule, and `decide_precision` turns the precision flags into one explicit
`Precision` for the device at hand.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

REQUIRED = "<required>"


def arg(default, help: str, choices=None, aliases=()):
    return field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases})


@dataclass
class ModelArgs:
    model_name_or_path: str = arg(REQUIRED, "checkpoint directory, hub repo id (e.g. microsoft/phi-1_5, "
                                            "microsoft/Phi-3.5-mini-instruct), or a preset name for a random-init "
                                            "model (phift.config.PRESETS: tiny, phi-1_5, phi-3.5-mini, phi-4-mini, "
                                            "...)")
    tokenizer_name_or_path: str | None = arg(None, "tokenizer directory for a preset (random-init) model; default: a "
                                                   "demo tokenizer trained on the dataset")
    checkpoint_dir: str | None = arg(None, "comma-separated LoRA adapter directories to start from, phift's or PEFT "
                                           "adapters of transformers' PhiForCausalLM or Phi3ForCausalLM (see "
                                           "--resume_lora_training); --adapter_name_or_path is the name later "
                                           "LLaMA-Factory versions use",
                                     aliases=("--adapter_name_or_path",))
    flash_attn: bool = arg(False, "accepted for compatibility: attention always runs through PyTorch SDPA, which "
                                  "picks flash attention on GPUs that have it")
    shift_attn: bool = arg(False, "LongLoRA shift-short attention (not available for phi: must be False)")
    trust_remote_code: bool = arg(False, "accepted for LLaMA-Factory's YAML files: phift never runs a checkpoint's "
                                         "code, it reads config.json and safetensors only")
    disable_gradient_checkpointing: bool = arg(False, "activation recomputation is on by default, as in "
                                                      "LLaMA-Factory; True turns it off (faster, more memory)")
    gradient_checkpointing_policy: str = arg("full", "full: recompute whole blocks in backward (least memory); mlp: "
                                                     "recompute only each block's fc1 + GELU (their activation is "
                                                     "the largest; faster, more memory)", choices=("full", "mlp"))
    compile: bool = arg(False, "torch.compile each block")
    cuda_graphs: bool = arg(False, "replay each micro-batch's forward and backward as a CUDA graph, one per batch "
                                   "shape (lengths padded to multiples of 64; preference pairs in the shared-prompt "
                                   "layout, each span padded so): for steps the host's kernel launches bound; needs a "
                                   "step without random numbers")


@dataclass
class DataArgs:
    template: str = arg("vanilla", "prompt template (phift.data.TEMPLATES)")
    dataset: str = arg(REQUIRED, "comma-separated names from dataset_info.json")
    dataset_dir: str = arg("data", "the folder holding dataset_info.json")
    cutoff_len: int = arg(1024, "tokens a sample keeps, split between prompt and response as LLaMA-Factory v0.3.3 "
                                "splits them")
    max_samples: int | None = arg(None, "the first N rows of each dataset")
    val_size: float = arg(0.0, "fraction (<1) or number of samples held out")
    train_on_prompt: bool = arg(False, "also train on prompt tokens")
    packing: bool = arg(False, "padding-free packing of several samples per row (no cross-sample attention)")
    system_prompt: str | None = arg(None, "the system text of every row that has none of its own: one for all "
                                          "datasets, or one per dataset separated by | (v0.3.3's flag)")
    identity_name: str | None = arg(None, "replaces <NAME>/{{name}} in self_cognition data")
    identity_author: str | None = arg(None, "replaces <AUTHOR>/{{author}} in self_cognition data")
    mcq_files: str | None = arg(None, "comma-separated exam CSVs (input,output,A,B,C,D,...,multichoice) to score by "
                                      "likelihood")
    overwrite_cache: bool = arg(False, "accepted for LLaMA-Factory's YAML files: phift keeps no dataset cache")
    preprocessing_num_workers: int | None = arg(None, "accepted for LLaMA-Factory's YAML files: phift tokenizes in "
                                                      "the training process")


@dataclass
class FinetuningArgs:
    stage: str = arg("sft", "sft: supervised fine-tuning; pt: continued pre-training on plain text; rm: a reward "
                            "model (value head) on preference pairs; dpo: direct preference optimisation; orpo: "
                            "odds-ratio preference optimisation (no reference model)",
                     choices=("sft", "pt", "rm", "dpo", "orpo"))
    finetuning_type: str = arg("lora", "train LoRA adapters or every weight", choices=("lora", "full"))
    lora_rank: int = arg(8, "LoRA rank r")
    lora_alpha: float | None = arg(None, "LoRA alpha; default: 2 × lora_rank")
    lora_dropout: float = arg(0.1, "dropout on the adapters' input")
    lora_target: str = arg("Wqkv", "Wqkv,out_proj,fc1,fc2 or all (q_proj/k_proj/v_proj → Wqkv, dense → out_proj); on "
                                   "Phi-3 models qkv_proj,o_proj,gate_up_proj,down_proj, phi's names meaning those")
    use_rslora: bool = arg(False, "scale by alpha/sqrt(r) instead of alpha/r")
    resume_lora_training: bool = arg(True, "True: keep training the last adapter of --checkpoint_dir; False: merge "
                                           "them all into the base and train a new adapter")
    upcast_layernorm: bool = arg(False, "keep LayerNorm weights in fp32")
    neft_alpha: float = arg(0.0, "NEFTune noise alpha (0 = off)")
    plot_loss: bool = arg(False, "write training_loss.png (raw and smoothed), and training_metrics.png of the rm, "
                                 "dpo and orpo metrics")
    dpo_beta: float = arg(0.1, "DPO's beta (the strength of the pull towards the reference), ORPO's lambda")
    dpo_loss: str = arg("sigmoid", "sigmoid: DPO's; hinge: SLiC's; ipo: IPO's (log-ratios averaged over answer "
                                   "tokens, as TRL)", choices=("sigmoid", "hinge", "ipo"))
    dpo_label_smoothing: float = arg(0.0, "cDPO's probability that a pair's preference is flipped (sigmoid loss "
                                          "only)")
    ref_model: str | None = arg(None, "the DPO reference model (a checkpoint directory or hub id); default: the model "
                                      "itself before training (LoRA: with its adapter turned off; full: a frozen "
                                      "copy)", aliases=("--dpo_ref_model",))
    ref_model_checkpoint: str | None = arg(None, "comma-separated LoRA adapters merged into --ref_model",
                                           aliases=("--ref_model_adapters",))
    dpo_precompute_ref: bool = arg(False, "compute the reference's log-probabilities of every pair once before "
                                          "training (no reference forward a step, no reference copy kept)")
    dpo_ref_offload: bool = arg(False, "full fine-tuning: keep the frozen reference copy in CPU memory and stream "
                                       "each block to the GPU for its forward")
    dpo_share_prompt: bool = arg(True, "rm, dpo, orpo: run each pair's prompt once for both answers (a row "
                                       "[prompt | chosen | rejected], the rejected answer blind to the chosen; the "
                                       "same log-probabilities and scores) in each batch where that holds fewer "
                                       "tokens; False: a row per answer, as LLaMA-Factory and TRL batch them")


@dataclass
class TrainingArgs:
    do_train: bool = arg(True, "train (False with --do_eval/--do_predict runs evaluation only)")
    do_eval: bool = arg(False, "eval loss and perplexity on the validation split")
    do_predict: bool = arg(False, "generate on the dataset and score BLEU-4 / ROUGE")
    predict_with_generate: bool = arg(False, "required with --do_predict, as in LLaMA-Factory")
    output_dir: str = arg(REQUIRED, "where the model, logs and checkpoints go")
    overwrite_output_dir: bool = arg(False, "start over in a non-empty output_dir: what an earlier run wrote there "
                                            "(checkpoints, logs, results, weights) is removed first")
    learning_rate: float = arg(5e-5, "peak learning rate of AdamW")
    num_train_epochs: float = arg(3.0, "passes over the training set")
    max_steps: int = arg(-1, "> 0 overrides num_train_epochs")
    per_device_train_batch_size: int = arg(8, "samples (or packed rows) a micro-batch, per GPU")
    per_device_eval_batch_size: int = arg(8, "samples a batch in evaluation, per GPU")
    gradient_accumulation_steps: int = arg(1, "micro-batches an optimizer step")
    lr_scheduler_type: str = arg("linear", "the learning-rate schedule after warm-up",
                                 choices=("linear", "cosine", "constant", "constant_with_warmup"))
    warmup_steps: int = arg(0, "steps of linear warm-up (wins over warmup_ratio)")
    warmup_ratio: float = arg(0.0, "warm-up as a fraction of all steps")
    max_grad_norm: float = arg(1.0, "clip the gradients' global norm (0: no clipping)")
    weight_decay: float = arg(0.0, "AdamW's decoupled weight decay (matrices only)")
    adam_beta1: float = arg(0.9, "AdamW beta1")
    adam_beta2: float = arg(0.999, "AdamW beta2")
    adam_epsilon: float = arg(1e-8, "AdamW epsilon")
    seed: int = arg(42, "seeds every generator at the start of the run")
    full_determinism: bool = arg(False, "deterministic GPU kernels too, so a GPU run repeats bit for bit (slower)")
    fp16: bool = arg(False, "fp16 mixed precision with dynamic loss scaling (CUDA)")
    bf16: bool = arg(False, "bf16 mixed precision")
    pure_bf16: bool = arg(False, "train the model itself in bf16, without autocast (implies --bf16); full "
                                 "fine-tuning keeps fp32 master weights in the optimizer (phift.optim)")
    deepspeed: str | None = arg(None, "DeepSpeed config JSON ('auto' values filled from these flags)")
    offload_optimizer: str = arg("none", "cpu: full fine-tuning with the fp32 optimizer state in CPU memory, without "
                                         "DeepSpeed (one GPU, --fp16 or --bf16)", choices=("none", "cpu"))
    local_rank: int = arg(-1, "set by the deepspeed launcher")
    ddp_timeout: int = arg(1800, "seconds a rank waits for the others in a collective before the run fails")
    logging_steps: int = arg(10, "log the mean loss every N steps")
    save_steps: int = arg(500, "write a checkpoint every N steps")
    save_strategy: str = arg("steps", "no: write no checkpoints (the final weights are still saved)",
                             choices=("steps", "no"))
    save_total_limit: int | None = arg(None, "keep only the newest N checkpoints")
    eval_strategy: str = arg("steps", "steps: eval loss on the validation split every eval_steps; no: only at the end",
                             choices=("steps", "no"), aliases=("--evaluation_strategy",))
    eval_steps: int | None = arg(None, "default: save_steps (needs --val_size)")
    resume_from_checkpoint: str | None = arg(None, "a checkpoint directory, or 'latest' for output_dir's newest "
                                                   "complete checkpoint")
    estimate: bool = arg(False, "print phift estimate's memory report first, and warn, naming the part that "
                                "overflows, when the run will not fit this GPU")
    report_to: str = arg("none", "also log the scalars of trainer_log.jsonl to TensorBoard (output_dir/runs) or "
                                 "Weights & Biases (WANDB_MODE=offline works without a network)",
                         choices=("none", "tensorboard", "wandb"))


@dataclass
class GeneratingArgs:
    max_new_tokens: int = arg(512, "tokens generated at most per answer")
    temperature: float = arg(0.0, "0: greedy; else the softmax temperature of sampling")
    top_p: float = arg(1.0, "nucleus sampling: the smallest set of tokens whose probability reaches top_p")


@dataclass
class InferArgs:
    """What `phift chat` and `phift export` load."""
    model_name_or_path: str = arg(REQUIRED, "checkpoint directory or hub repo id")
    adapter_name_or_path: str | None = arg(None, "comma-separated LoRA adapter directories (phift's, or PEFT's for "
                                                 "transformers' PhiForCausalLM or Phi3ForCausalLM), merged in order",
                                           aliases=("--checkpoint_dir",))
    template: str = arg("vanilla", "prompt template (phift.data.TEMPLATES)")
    dtype: str | None = arg(None, "default: bf16 for a bf16 checkpoint on a GPU that has it, else fp16 on a GPU and "
                                  "fp32 on the CPU (as LLaMA-Factory)", choices=("fp32", "fp16", "bf16"))


@dataclass
class ExportArgs:
    export_dir: str | None = arg(None, "where the merged checkpoint (or the PEFT adapter) goes")
    peft: bool = arg(False, "export the (single) adapter in PEFT's format instead of merging it")
    gguf: str | None = arg(None, "also (or only) write the merged model as one GGUF file for llama.cpp and Ollama "
                                 "(llama.cpp's phi2 architecture), the tokenizer included")
    gguf_type: str = arg("f16", "the GGUF file's weight type: f16, or q8_0 (8-bit blocks, about half the size)",
                         choices=("f16", "q8_0"))

    def __post_init__(self):
        if self.export_dir is None and self.gguf is None:
            raise ConfigError("--export_dir is required (or --gguf OUT.gguf for a GGUF file)")
        if self.peft and self.gguf:
            raise ConfigError("--gguf writes a merged model; --peft writes an adapter: one at a time")


@dataclass
class ServeArgs:
    """What `phift api` serves on."""
    host: str = arg("127.0.0.1", "the address to listen on (0.0.0.0: every interface)")
    port: int = arg(8000, "the port to listen on")
    served_model_name: str | None = arg(None, "the model's id in the API (default: --model_name_or_path)")
    max_batch_size: int = arg(16, "completions generated together on the device; each holds KV-cache rows for the "
                                  "whole context")
    max_queue: int = arg(256, "completions that may wait for a free row; more are answered 429")

    def __post_init__(self):
        for name in ("max_batch_size", "max_queue"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

GROUPS = {"model": ModelArgs, "data": DataArgs, "finetuning": FinetuningArgs, "training": TrainingArgs,
          "generating": GeneratingArgs}


@dataclass
class RunConfig:
    model: ModelArgs
    data: DataArgs
    finetuning: FinetuningArgs
    training: TrainingArgs
    generating: GeneratingArgs

    def flags(self) -> list[str]:
        """The flags that give this configuration (defaults left out)."""
        out = []
        for group in GROUPS:
            values = getattr(self, group)
            for f in dataclasses.fields(values):
                v = getattr(values, f.name)
                if v != f.default:
                    out += [f"--{f.name}", str(v)]
        return out


class ConfigError(ValueError):
    """A flag, a YAML key or a combination of them that phift cannot run."""


# ------------------------------------------------------------------------------------------------------ parsing
def str2bool(v) -> bool:
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("true", "1", "yes"):
        return True
    if str(v).lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {v!r}")


def _converter(tp):
    """The argparse type for an annotation: bool, int, float, str, or X | None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    return str2bool if tp is bool else tp


def _fields(group: type):
    hints = typing.get_type_hints(group)
    return [(f, _converter(hints[f.name])) for f in dataclasses.fields(group)]


# LLaMA-Factory v0.3.3 flags phift does not take, and what to do instead
NOT_TAKEN = {
    "sft_packing": "phift's --packing packs whole rows without attention across them (v0.3.3 concatenated rows and "
                   "cut them into cutoff_len blocks)",
    "streaming": "phift reads a dataset whole",
    "mix_strategy": "several datasets are concatenated, v0.3.3's default",
    "interleave_probs": "several datasets are concatenated, v0.3.3's default",
    "cache_path": "phift keeps no dataset cache",
    "reserved_label_len": "phift keeps v0.3.3's default of 1",
}


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line at the CLI) where it would print its usage and exit, and reads
    `-1e-3` as a value: its own pattern takes only `-1` and `-.5` for negative numbers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$")

    def error(self, message):
        hints = [f"--{name}: {why}" for name, why in NOT_TAKEN.items()
                 if re.search(rf"unrecognized arguments:.*--{name}\b", message)]
        raise ConfigError("; ".join([message, *hints]))


def parser(prog: str = "phift train", groups=GROUPS, description: str | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, allow_abbrev=False, description=description or (
        "Fine-tuning of phi models with LLaMA-Factory's flags (--stage sft, pt, rm, dpo, orpo). A YAML file of the "
        "same keys may come first (`phift train config.yaml --learning_rate 1e-4`); flags override it."))
    for name, group in groups.items():
        g = p.add_argument_group(name)
        for f, convert in _fields(group):
            kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata["help"],
                      choices=f.metadata["choices"])
            if convert is str2bool:
                kw.update(type=str2bool, nargs="?", const=True, metavar="{True,False}")
            else:
                kw.update(type=convert)
            g.add_argument(f"--{f.name}", *f.metadata["aliases"], **kw)
    return p


def _yaml_values(path: Path, groups) -> dict:
    import yaml

    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read it as YAML ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a run configuration is a mapping of flag names to values")
    known = {f.name: convert for group in groups.values() for f, convert in _fields(group)}
    aliases = {a.lstrip("-"): f.name for group in groups.values() for f in dataclasses.fields(group)
               for a in f.metadata["aliases"]}
    out = {}
    for key, value in values.items():
        name = aliases.get(key, key)
        if name not in known:
            hint = f"; {NOT_TAKEN[key]}" if key in NOT_TAKEN else ""
            raise ConfigError(f"{path}: unknown key {key!r} (the keys are phift train's flag names){hint}")
        if isinstance(value, list):  # YAML lists for the comma-separated flags (dataset: [a, b])
            value = ",".join(map(str, value))
        try:
            out[name] = None if value is None else known[name](value)
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            kind = {int: "an integer", float: "a number", str2bool: "true or false"}.get(known[name], "text")
            raise ConfigError(f"{path}: key {key!r} has value {value!r}, which is not {kind}") from None
    return out


def parse_args(argv=None, prog: str = "phift train", groups=GROUPS) -> dict[str, object]:
    """{group name: its dataclass} from flags, after an optional leading YAML file; a bad flag is a ConfigError."""
    argv = list(argv) if argv is not None else None
    values = {}
    if argv and argv[0].endswith((".yaml", ".yml")):
        values = _yaml_values(Path(argv[0]), groups)
        argv = argv[1:]
    values.update(vars(parser(prog, groups).parse_args(argv)))
    out = {}
    for name, group in groups.items():
        out[name] = group(**{f.name: values[f.name] for f in dataclasses.fields(group) if f.name in values})
        missing = [f.name for f in dataclasses.fields(group) if getattr(out[name], f.name) is REQUIRED]
        if missing:
            raise ConfigError(f"--{missing[0]} is required (a flag, or a key of the YAML file)")
    return out


def parse_train_args(argv=None) -> RunConfig:
    run = RunConfig(**parse_args(argv))
    check(run)
    return resolve(run)


# ------------------------------------------------------------------------------------------------------ checks
def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


# The values a numeric flag can take: (what the error says, the test). Written so that NaN fails every test.
DOMAINS = {
    "cutoff_len": ("positive", _positive),
    "max_samples": ("positive", _positive),
    "val_size": ("non-negative", _non_negative),
    "lora_rank": ("positive", _positive),
    "lora_alpha": ("positive", _positive),
    "lora_dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
    "neft_alpha": ("non-negative (0: off)", _non_negative),
    "dpo_beta": ("positive", _positive),
    "dpo_label_smoothing": ("in [0, 0.5)", lambda v: 0 <= v < 0.5),
    "learning_rate": ("positive", _positive),
    "num_train_epochs": ("positive", _positive),
    "per_device_train_batch_size": ("positive", _positive),
    "per_device_eval_batch_size": ("positive", _positive),
    "gradient_accumulation_steps": ("positive", _positive),
    "warmup_steps": ("non-negative", _non_negative),
    "warmup_ratio": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "max_grad_norm": ("non-negative (0: no clipping)", _non_negative),
    "weight_decay": ("non-negative", _non_negative),
    "adam_beta1": ("in [0, 1)", lambda v: 0 <= v < 1),
    "adam_beta2": ("in [0, 1)", lambda v: 0 <= v < 1),
    "adam_epsilon": ("positive", _positive),
    "seed": ("in [0, 2**32)", lambda v: 0 <= v < 2**32),  # numpy's seed range
    "ddp_timeout": ("positive", _positive),
    "logging_steps": ("positive", _positive),
    "save_steps": ("positive", _positive),
    "save_total_limit": ("positive", _positive),
    "eval_steps": ("positive", _positive),
    "max_new_tokens": ("positive", _positive),
    "temperature": ("non-negative (0: greedy)", _non_negative),
    "top_p": ("in (0, 1]", lambda v: 0 < v <= 1),
}


def check_domains(*groups) -> None:
    """Each numeric flag of these argument groups within its DOMAINS entry (None, where allowed, passes)."""
    for group in groups:
        for f in dataclasses.fields(group):
            value = getattr(group, f.name)
            if f.name in DOMAINS and value is not None and not DOMAINS[f.name][1](value):
                raise ConfigError(f"--{f.name} must be {DOMAINS[f.name][0]}, got {value}")


def check(run: RunConfig) -> None:
    """Every rule that ties flags together; each error names the flags involved."""
    m, d, f, t = run.model, run.data, run.finetuning, run.training
    check_domains(m, d, f, t, run.generating)
    if m.shift_attn:
        raise ConfigError("--shift_attn True (LongLoRA S²-attention) is LLaMA-only in LLaMA-Factory; phi has no such "
                          "path")
    if t.fp16 and t.bf16:
        raise ConfigError("--fp16 and --bf16 are exclusive")
    if t.pure_bf16:
        if t.fp16:
            raise ConfigError("--pure_bf16 and --fp16 are exclusive")
        if t.deepspeed:
            raise ConfigError("--pure_bf16 is for the plain PyTorch engine; DeepSpeed's own bf16 mode already keeps "
                              "the model in bf16 with fp32 master weights: drop --pure_bf16 and pass --bf16 True")
        if f.upcast_layernorm:
            raise ConfigError("--pure_bf16 keeps every weight in bf16; it cannot be combined with --upcast_layernorm "
                              "True")
    if t.offload_optimizer == "cpu":
        if f.finetuning_type != "full":
            raise ConfigError("--offload_optimizer cpu is for --finetuning_type full (LoRA's optimizer state is a "
                              "few MB)")
        if t.deepspeed:
            raise ConfigError("--offload_optimizer cpu is phift's own offload; with --deepspeed, offload in the "
                              "DeepSpeed config")
        if not (t.fp16 or t.bf16 or t.pure_bf16):
            raise ConfigError("--offload_optimizer cpu trains the model in half precision: pass --fp16 True or --bf16 "
                              "True")
        if f.upcast_layernorm:
            raise ConfigError("--offload_optimizer cpu keeps every weight in half precision; drop --upcast_layernorm "
                              "True")
    if m.cuda_graphs:
        if t.deepspeed or t.offload_optimizer == "cpu":
            raise ConfigError("--cuda_graphs is for the plain PyTorch engine (not --deepspeed or --offload_optimizer "
                              "cpu)")
        if m.compile:
            raise ConfigError("--cuda_graphs and --compile are exclusive: pick one way to cut the host's launch cost")
        if f.neft_alpha > 0:
            raise ConfigError("--cuda_graphs needs a step without random numbers; NEFTune (--neft_alpha) draws noise")
        if f.finetuning_type == "lora" and f.lora_dropout > 0 and f.stage not in ("dpo", "orpo"):
            raise ConfigError("--cuda_graphs needs a step without random numbers, but LoRA dropout draws masks: pass "
                              "--lora_dropout 0")  # (dpo and orpo turn every dropout off)
    if not (t.do_train or t.do_eval or t.do_predict or d.mcq_files):
        raise ConfigError("nothing to evaluate with --do_train False (as `phift eval` runs): add --do_eval True (loss "
                          "and perplexity), --do_predict True --predict_with_generate True (BLEU/ROUGE) or "
                          "--mcq_files exam.csv (multiple-choice accuracy)")
    if t.do_predict and not t.predict_with_generate:
        raise ConfigError("--do_predict needs --predict_with_generate True (as in LLaMA-Factory)")
    check_stage(run)
    if f.finetuning_type == "full" and m.checkpoint_dir:
        raise ConfigError("--checkpoint_dir holds LoRA adapters; with --finetuning_type full point "
                          "--model_name_or_path at the checkpoint instead")
    for group, name in ((m, "trust_remote_code"), (d, "overwrite_cache"), (d, "preprocessing_num_workers")):
        if getattr(group, name):
            logger.info("--%s has no effect in phift (%s)", name,
                        next(x.metadata["help"] for x in dataclasses.fields(group) if x.name == name).split(": ")[-1])


PAIRWISE_STAGES = ("rm", "dpo", "orpo")  # the stages that train on preference pairs


def check_stage(run: RunConfig) -> None:
    """The rules of --stage and the flags that belong to one stage."""
    d, f, t = run.data, run.finetuning, run.training
    if d.packing and f.stage != "sft":
        raise ConfigError(f"--packing packs supervised samples; --stage {f.stage} "
                          + ("cuts its text into blocks of --cutoff_len already" if f.stage == "pt" else
                             "keeps each pair's chosen and rejected answers in rows of their own"))
    if f.stage in PAIRWISE_STAGES and d.train_on_prompt:
        raise ConfigError(f"--stage {f.stage} scores the answers of a pair, which share their prompt: "
                          "--train_on_prompt True has nothing to add")
    if run.model.cuda_graphs and f.stage in PAIRWISE_STAGES:
        if not f.dpo_share_prompt:
            raise ConfigError(f"--cuda_graphs replays --stage {f.stage}'s pairs in the shared-prompt layout: drop "
                              "--dpo_share_prompt False")
        if f.dpo_ref_offload:
            raise ConfigError("--cuda_graphs and --dpo_ref_offload are exclusive: the streamed reference copies its "
                              "weights in from the host each forward, outside what a graph can replay")
    if t.do_predict and f.stage != "sft":
        raise ConfigError(f"--do_predict generates answers to score them, which is --stage sft's evaluation (as in "
                          f"LLaMA-Factory); --stage {f.stage} evaluates with --do_eval")
    if d.mcq_files and f.stage == "rm":
        raise ConfigError("--mcq_files scores the answers a language model writes; a reward model writes none")
    dpo_flags = [name for name, default in (("ref_model", None), ("ref_model_checkpoint", None),
                                            ("dpo_precompute_ref", False), ("dpo_ref_offload", False))
                 if getattr(f, name) != default]
    if dpo_flags and f.stage != "dpo":
        raise ConfigError(f"--{dpo_flags[0]} is about DPO's reference model, which --stage {f.stage} does not have")
    if f.dpo_label_smoothing > 0 and f.dpo_loss != "sigmoid":
        raise ConfigError(f"--dpo_label_smoothing is the sigmoid loss's (cDPO); --dpo_loss {f.dpo_loss} has none")
    if f.ref_model_checkpoint and not f.ref_model:
        raise ConfigError("--ref_model_checkpoint names adapters of --ref_model: give --ref_model too")
    if f.dpo_ref_offload:
        if f.dpo_precompute_ref:
            raise ConfigError("--dpo_precompute_ref computes the reference once and keeps no copy of it: "
                              "--dpo_ref_offload has nothing to offload")
        if f.finetuning_type == "lora" and not f.ref_model:
            raise ConfigError("--dpo_ref_offload: a LoRA run's reference is the model with its adapter turned off, "
                              "which keeps no copy to offload")


def resolve(run: RunConfig) -> RunConfig:
    """The defaults that depend on other flags, filled in once."""
    if run.finetuning.lora_alpha is None:
        run.finetuning.lora_alpha = 2.0 * run.finetuning.lora_rank
    if run.training.eval_steps is None:
        run.training.eval_steps = run.training.save_steps
    return run


def check_runtime(run: RunConfig, world_size: int, device: torch.device, precision: Precision) -> None:
    """The rules that depend on where the run landed: how many processes, which device."""
    t = run.training
    if world_size > 1 and not t.deepspeed:
        raise ConfigError("multi-process runs go through DeepSpeed: add --deepspeed <config.json>")
    if t.offload_optimizer == "cpu":
        if world_size > 1:
            raise ConfigError("--offload_optimizer cpu runs on one GPU; for several, use --deepspeed with "
                              "examples/ds_config.json (ZeRO-2, optimizer offloaded)")
        if precision.compute is None:
            raise ConfigError("--offload_optimizer cpu needs a half-precision model: --fp16 needs a CUDA GPU, --bf16 "
                              "True runs anywhere")
    if run.model.cuda_graphs and device.type != "cuda":
        raise ConfigError("--cuda_graphs needs a CUDA GPU")


# ------------------------------------------------------------------------------------------------------ precision
@dataclass(frozen=True)
class Precision:
    """How the numbers of a run are kept, decided once from --fp16/--bf16/--pure_bf16, the engine and the device.

    compute: the half dtype the math runs in, or None (fp32).
    load: the dtype the base weights are loaded in.
    upcast_trainable: trainable weights become fp32 masters under autocast (full fine-tuning, plain engine).
    autocast: the dtype autocast casts to, or None for no autocast.
    loss_scaling: fp16's dynamic loss scale.
    master_weights: the optimizer keeps fp32 masters of half trainable weights (--pure_bf16, --offload_optimizer).
    """
    compute: torch.dtype | None
    load: torch.dtype
    upcast_trainable: bool
    autocast: torch.dtype | None
    loss_scaling: bool
    master_weights: bool


def decide_precision(run: RunConfig, device: torch.device) -> Precision:
    t, full = run.training, run.finetuning.finetuning_type == "full"
    fp16 = t.fp16
    if fp16 and device.type != "cuda":
        logger.warning("--fp16 needs a CUDA GPU (as in transformers' Trainer); training in fp32 on the CPU")
        fp16 = False
    compute = torch.float16 if fp16 else torch.bfloat16 if (t.bf16 or t.pure_bf16) else None
    own_masters = t.pure_bf16 or t.offload_optimizer == "cpu"  # phift's optimizer keeps the fp32 copy
    plain = not (t.deepspeed or t.offload_optimizer == "cpu")
    return Precision(
        compute=compute, load=compute or torch.float32,
        upcast_trainable=compute is not None and full and plain and not own_masters,
        autocast=compute if plain and not t.pure_bf16 else None,
        loss_scaling=fp16 and not t.deepspeed,
        master_weights=compute is not None and full and own_masters)
