"""Training: one explicit loop, batch → forward → loss → backward → clip → step → schedule → log → save.

What the forward computes is the stage's (--stage sft, pt, rm, dpo, orpo: phift.stages): the network's own loss, or an
objective around it whose forward is the loss and whose `metrics` the loop logs beside it.

Runs as `phift train <flags | config.yaml>`, as `python examples/train_bash.py <flags>` and under
`deepspeed --num_gpus N examples/train_bash.py --deepspeed cfg.json <flags>` with the same flags. Whatever engine
sits behind it (plain PyTorch, DeepSpeed, the CPU-offloaded optimizer, CUDA graphs: phift.engines), the loop is the
same calls.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data, distributed, estimate, families, kernels, lora, stages
from .args import PAIRWISE_STAGES, Precision, RunConfig, check_runtime, decide_precision, parse_train_args
from .config import PRESETS
from .engines import Engine, build_engine, graphs
from .evaluate import loss_sums
from .model import LMHead
from .neftune import add_neftune
from .plot import plot_loss, plot_metrics
from .recompute import compile_blocks, recompute
from .state import (TrainableWeights, check_finite, keep_optimizer_flags, last_checkpoint_note, load_checkpoint,
                    optimizer_flags, prepare_output_dir, WRITE_PROBE, save_checkpoint, set_seed, write_atomic)
from .tokenizer import load_tokenizer, train_demo_tokenizer
from .tracking import Tracker
from .weights import load_for_inference, load_model, resolve_checkpoint_dir, save_model

logger = logging.getLogger(__name__)


def writable_output_dir(out: Path) -> None:
    """Create --output_dir and write a file in it: a read-only directory fails now, not at the first checkpoint."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=WRITE_PROBE) as probe:
            probe.write(b"x")
            probe.flush()
    except OSError as e:
        raise OSError(f"--output_dir {out} is not writable ({e.strerror or e})") from None


# ---------------------------------------------------------------------------------------------- model, tokenizer
def load_base(model_name_or_path: str, tokenizer_name_or_path: str | None, device, dtype, texts=()):
    """(model, tokenizer, source dir). A preset name gives a random-init model and, unless the name is a real
    checkpoint, the demo tokenizer trained on the dataset's own text (the offline default)."""
    if model_name_or_path in PRESETS and not Path(model_name_or_path).exists():
        config = families.preset(model_name_or_path)
        if tokenizer_name_or_path:
            tokenizer = load_tokenizer(tokenizer_name_or_path)
        else:
            tokenizer = train_demo_tokenizer(texts, vocab_size=min(config.vocab_size, 2048))
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, model {config.name} only "
                             f"{config.vocab_size}")
        with torch.device(device):  # initialise on the GPU: 1.4B parameters take seconds on a CPU
            model = families.build(config).to(dtype=dtype)
        return model, tokenizer, None
    d = resolve_checkpoint_dir(model_name_or_path)
    return load_model(d, dtype=dtype, device=device), load_tokenizer(d), d


def prepare_model(model, run: RunConfig, precision: Precision):
    """LoRA or full fine-tuning, precision as decided, then what training wraps around the network from outside:
    NEFTune noise, compiled blocks, activation recomputation."""
    m, f = run.model, run.finetuning
    if f.finetuning_type == "lora":
        adapters = [a for a in (m.checkpoint_dir or "").split(",") if a]
        resume = adapters[-1:] if f.resume_lora_training else []
        for d in adapters[: len(adapters) - len(resume)]:  # older adapters are merged into the base
            lora.load_adapter(model, d, trainable=False)
            lora.unload(model, merge=True)
            logger.info("merged adapter %s into the base model", d)
        if resume:
            lora.load_adapter(model, resume[0], trainable=True)
            logger.info("resumed adapter %s", resume[0])
            logger.info(lora.trainable_summary(model))
        else:
            lora.inject(model, f.lora_target, r=f.lora_rank, alpha=f.lora_alpha, dropout=f.lora_dropout,
                        use_rslora=f.use_rslora)
        if not run.training.deepspeed:  # the fused op then keeps no copy of W (DeepSpeed wants dense weights)
            kernels.home_lora_weights(model)
    elif precision.upcast_trainable:
        model.float()  # full fine-tuning under autocast keeps fp32 master weights (else the optimizer keeps them)
    if f.upcast_layernorm:
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
                module.float()
    if f.neft_alpha > 1e-6:
        add_neftune(model.wte, f.neft_alpha)
    if m.compile:
        compile_blocks(model)
    if not m.disable_gradient_checkpointing:
        # graphs and compiled blocks were measured with the non-reentrant form; under graphs nothing draws random
        # numbers (phift.args.check), so no RNG state is kept; a compiled block is traced for one kind of run
        recompute(model, m.gradient_checkpointing_policy, reentrant=not (m.cuda_graphs or m.compile),
                  preserve_rng_state=not m.cuda_graphs, lean=not m.compile)
    return model


def dpo_reference(base, run: RunConfig, precision: Precision, device) -> stages.FrozenReference | None:
    """DPO's reference as a model of its own, made before LoRA or training change `base`: --ref_model (plus
    --ref_model_checkpoint's adapters), or for full fine-tuning a frozen copy of the base. None where no copy is
    needed: under LoRA the policy with its adapters off is the base, and --dpo_precompute_ref reads the untrained
    policy once."""
    f = run.finetuning
    if f.stage != "dpo" or (not f.ref_model and (f.finetuning_type == "lora" or f.dpo_precompute_ref)):
        return None
    at = torch.device("cpu") if f.dpo_ref_offload else device
    if f.ref_model:
        ref = load_for_inference(f.ref_model, f.ref_model_checkpoint, dtype=precision.load, device=at)[0]
        if ref.config.vocab_size != base.config.vocab_size:
            raise ValueError(f"--ref_model {f.ref_model} has {ref.config.vocab_size} tokens, the model "
                             f"{base.config.vocab_size}: a reference must share the tokenizer")
    else:
        ref = copy.deepcopy(base).to(at)
    return stages.FrozenReference(ref, device, offload=f.dpo_ref_offload)


def build_objective(model, run: RunConfig, precision: Precision, device, reference=None) -> torch.nn.Module:
    """What the engine trains for --stage (phift.stages): the network itself for sft and pt, else an objective
    around it. A reward model's value head is fp32 like LoRA's adapters and full fine-tuning's masters (in the
    model's half precision where the optimizer keeps the masters), and continues the head of the last
    --checkpoint_dir adapter that has one, as v0.3.3 loaded it from there."""
    f = run.finetuning
    if f.stage == "rm":
        objective = stages.RewardModel(model)
        objective.v_head.to(device=device, dtype=precision.load if precision.master_weights else torch.float32)
        adapters = [a for a in (run.model.checkpoint_dir or "").split(",") if a]
        if adapters and (Path(adapters[-1]) / stages.VALUE_HEAD_WEIGHTS).is_file():
            stages.load_value_head(objective, adapters[-1])
            logger.info("value head from %s", adapters[-1])
        return objective
    if f.stage == "dpo":
        if f.finetuning_type == "lora" and reference is None and run.model.checkpoint_dir and f.resume_lora_training:
            logger.warning("--stage dpo goes on training the adapter of --checkpoint_dir, and its reference is the "
                           "model with its adapter turned off: the base without that adapter. To make the model with "
                           "it the reference, pass --resume_lora_training False (it is merged into the base and a new "
                           "adapter trains) or --ref_model")
        return stages.DPO(model, f.dpo_beta, f.dpo_loss, f.dpo_label_smoothing, reference)
    if f.stage == "orpo":
        return stages.ORPO(model, f.dpo_beta)
    return model


@torch.no_grad()
def precompute_reference(objective: stages.DPO, splits, batch_size: int, pad_id, device, precision: Precision,
                         layout: dict | None = None):
    """--dpo_precompute_ref: each pair's reference log-probabilities, computed once (in the dataset's order, so that a
    resumed run computes the same) and kept in the example as `reference_logps`; the reference copy is let go."""
    autocast = (torch.autocast(device.type, dtype=precision.autocast, cache_enabled=False) if precision.autocast
                else contextlib.nullcontext())
    rank = distributed.rank_and_world()[0]
    examples = [e for split in splits for e in split]
    for start in tqdm(range(0, len(examples), batch_size), desc="reference", unit="batch", disable=rank != 0):
        micro = examples[start:start + batch_size]
        b = to_batch(micro, False, pad_id, device, **(layout or {}))
        with autocast:
            chosen, rejected = objective.reference_logps(b["input_ids"], b.get("labels"), b.get("label_rows"),
                                                         b.get("pairs")).chunk(2)
        for e, c, r in zip(micro, chosen.tolist(), rejected.tolist()):
            e["reference_logps"] = (c, r)
    objective.reference = None


# ------------------------------------------------------------------------------------------------------ batches
def epoch_batches(examples, epoch: int, seed: int, batch_size: int, packing: bool, cutoff_len: int, rank: int = 0,
                  world: int = 1, skip: int = 0):
    """This rank's micro-batches for an epoch: a seeded shuffle per epoch, then rank r takes every world-th sample.

    Interleaved shards make the samples consumed after k micro-batches on every rank a prefix of the epoch's
    order (k × batch × world long), so `skip` — samples already consumed this epoch — resumes on any world size.
    """
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(examples), generator=g).tolist()[skip:]
    order += order[: (-len(order)) % world]  # every rank gets as many samples (as DistributedSampler)
    shard = [examples[i] for i in order[rank::world]]
    if packing:
        rows = data.pack(shard, cutoff_len)
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    return [shard[i:i + batch_size] for i in range(0, len(shard), batch_size)]


def count(micro) -> tuple[int, int]:
    """(samples, tokens) in a micro-batch of examples, of packed rows (lists of examples) or of preference pairs (a
    pair: its prompt twice and both answers); padding not counted."""
    examples = [e for row in micro for e in (row if isinstance(row, list) else [row])]
    return len(examples), sum(len(e["input_ids"]) if "input_ids" in e else
                              2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
                              for e in examples)


def shares_prompt(run: RunConfig, config) -> dict:
    """to_batch's keywords for this run: whether preference pairs (rm, dpo, orpo) share their prompt
    (--dpo_share_prompt), the span a pair's prompt + answer must keep within (a sliding window, beyond which the
    shared layout would need the window's mask), and under --cuda_graphs the graphs' static shapes."""
    f = run.finetuning
    share = f.dpo_share_prompt and f.stage in PAIRWISE_STAGES
    return {"share_prompt": share, "window": getattr(config, "sliding_window", None),
            "static": graphs.BUCKET if share and run.model.cuda_graphs else None}


def to_batch(micro, packed: bool, pad_id, device, share_prompt: bool = False, window: int | None = None,
             static: int | None = None):
    """static: shared-prompt batches in the shapes a CUDA graph replays (collate_shared_pairs), shared even where a
    row per answer would hold fewer tokens (such a batch would run eagerly)."""
    # preference pairs share their prompt where that makes fewer tokens (the same log-probabilities either way)
    if share_prompt and "prompt_ids" in micro[0] and (static or data.sharing_saves_tokens(micro)) and (
            window is None or max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"]))
                                  for e in micro) <= window):
        # its answer positions are found here on the CPU too
        b = data.collate_shared_pairs(micro, pad_id, static=static)
        return {k: v.to(device) if isinstance(v, data.SharedPairs) else data.to_device(v, device)
                for k, v in b.items()}
    if packed and all(len(row) == 1 for row in micro):
        # rows of one sample each (long samples leave no room to pack): the same batch unpacked needs no
        # segment mask, so attention keeps its flash kernel
        micro, packed = [row[0] for row in micro], False
    if packed:
        b = data.collate_packed(micro, pad_id)
    else:
        b = data.collate_pairs(micro, pad_id) if "prompt_ids" in micro[0] else data.collate(micro, pad_id)
        # right padding + causal attention: real tokens never see the pads after them, so the loss is exact
        # without a mask, and SDPA can take its flash kernel
        del b["attention_mask"]
    # the labelled rows, found here on the CPU: found on the GPU, they would make the host wait for the GPU to finish
    # the previous step's optimizer before it could queue this step's forward
    b["label_rows"] = LMHead.label_rows(b["labels"])
    return {k: data.to_device(v, device) for k, v in b.items()}


@torch.no_grad()
def pairwise_sums(forward, objective, examples, pad_id, batch_size: int, device, progress: bool = True,
                  layout: dict | None = None) -> dict:
    """{"pairs": n} and, for the objective's loss and each of its metrics, Σ over batches of its value × the batch's
    pairs (float64 on `device`): `forward(batch) -> loss` is the objective or an engine's forward."""
    sums = {"pairs": torch.zeros((), dtype=torch.float64, device=device)}
    for start in tqdm(range(0, len(examples), batch_size), desc="eval", unit="batch", disable=not progress):
        micro = examples[start:start + batch_size]
        loss = forward(to_batch(micro, False, pad_id, device, **(layout or {})))
        for k, v in {"loss": loss, **objective.metrics}.items():
            sums[k] = sums.get(k, 0) + v.detach().double() * len(micro)
        sums["pairs"] += len(micro)
    return sums


def pairwise_means(sums: dict) -> dict:
    """pairwise_sums' means, under the eval_ names of LLaMA-Factory's (eval_loss, eval_accuracy, eval_rewards/...)."""
    n = sums["pairs"].clamp(min=1)
    return {f"eval_{k}": round((v / n).item(), 4) for k, v in sums.items() if k != "pairs"}


def eval_metrics(engine: Engine, examples, batch_size: int, pad_id, device, layout: dict | None = None) -> dict:
    """The split's eval_loss (token-weighted over a language model's labels; a pairwise objective's, with its metrics,
    weighted by pairs): each rank takes a shard, the sums are added across ranks."""
    rank, world = distributed.rank_and_world()
    engine.module.eval()
    shard = examples[rank::world]
    if "prompt_ids" in examples[0]:
        sums = pairwise_sums(engine.forward, engine.module, shard, pad_id, batch_size, device, progress=rank == 0,
                             layout=layout)
        if world > 1:
            for v in sums.values():
                torch.distributed.all_reduce(v)
        out = pairwise_means(sums)
    else:
        total = loss_sums(engine.forward, shard, pad_id, batch_size, device, progress=rank == 0)
        if world > 1:
            torch.distributed.all_reduce(total)
        out = {"eval_loss": round((total[0] / total[1].clamp(min=1)).item(), 4)}
    engine.module.train()
    return out


def mean_over_ranks(x: torch.Tensor) -> float:
    world = distributed.rank_and_world()[1]
    if world > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
        x /= world
    return x.item()


class RunLog:
    """trainer_log.jsonl (LLaMA-Factory's names), the experiment tracker and the progress bar; rank 0 writes.
    A resumed run first cuts the log back to its checkpoint's step: what the interrupted run logged after that is
    logged again."""

    def __init__(self, out: Path, total_steps: int, first_step: int, report_to: str, config: dict):
        self.main = distributed.is_main()
        self.file, self.history = out / "trainer_log.jsonl", []
        if self.main and self.file.exists():
            kept = [line for line in self.file.read_text().splitlines() if _logged_by(line, first_step)]
            write_atomic(self.file, "".join(line + "\n" for line in kept))
        self.tracker = Tracker(report_to, out, config) if self.main else None
        self.bar = tqdm(total=total_steps, initial=first_step, disable=not self.main, desc="train", dynamic_ncols=True)

    def write(self, entry: dict):
        self.history.append(entry)
        if self.main:
            with self.file.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            self.tracker.log(entry)
            if "loss" in entry:
                self.bar.set_postfix(loss=entry["loss"], lr=f"{entry['learning_rate']:.2e}")

    def last_loss(self) -> float | None:
        return next((e["loss"] for e in reversed(self.history) if "loss" in e), None)

    def close(self):
        self.bar.close()
        if self.tracker:
            self.tracker.close()


def _logged_by(line: str, step: int) -> bool:
    try:
        return json.loads(line)["current_steps"] <= step
    except ValueError:  # a line half written when the run was killed
        return False


MAX_SKIPPED_IN_A_ROW = 5  # steps skipped one after another for non-finite gradients that stop a run


class TrainingDiverged(RuntimeError):
    """MAX_SKIPPED_IN_A_ROW optimizer steps in a row had gradients that were not finite."""


class SkippedSteps:
    """Steps whose update was skipped because the gradients were not finite: each is logged, and
    MAX_SKIPPED_IN_A_ROW in a row stop the run (TrainingDiverged); the weights stay those of the last applied step.

    The plain engine decides a skip on the device (see TorchEngine.update), so the flags are read here in batches: at
    each logged step and save, and at least every MAX_SKIPPED_IN_A_ROW steps; one host sync a batch. An fp16
    overflow while the loss scale is above 1 is the scale's own business (it halves); from 1 down it counts, as
    DeepSpeed stops at its min_loss_scale of 1."""

    def __init__(self, output_dir: Path, learning_rate: float):
        self.out, self.learning_rate, self.pending, self.in_a_row = output_dir, learning_rate, [], []

    def add(self, step: int, info: dict):
        self.pending.append((step, info))

    def due(self) -> bool:
        return len(self.pending) >= MAX_SKIPPED_IN_A_ROW

    def check(self):
        flags = [info["skipped"] for _, info in self.pending]
        if flags and all(isinstance(f, torch.Tensor) for f in flags):
            flags = torch.stack(flags).tolist()
        for (step, info), skipped in zip(self.pending, flags, strict=True):
            scale = info["loss_scale"]
            if not skipped:
                self.in_a_row = []
            elif scale is not None and scale > 1:
                logger.info("step %d: fp16 overflow, update skipped (loss scale now %s)", step, scale)
            else:
                logger.warning("step %d: the gradients are not finite (grad_norm %s), update skipped", step,
                               float(info["grad_norm"]))
                self.in_a_row.append(step)
                if len(self.in_a_row) == MAX_SKIPPED_IN_A_ROW:
                    raise TrainingDiverged(
                        f"steps {self.in_a_row[0]}-{step}: the gradients were not finite (NaN or inf) "
                        f"{MAX_SKIPPED_IN_A_ROW} in a row, so their updates were skipped and training stopped; "
                        f"{last_checkpoint_note(self.out)}. Lower --learning_rate (it is {self.learning_rate:g}) or "
                        "look for a bad sample in the data")
        self.pending = []


# ---------------------------------------------------------------------------------------------------- the loop
def train(run: RunConfig) -> dict:
    m, d, f, t = run.model, run.data, run.finetuning, run.training
    set_seed(t.seed, t.full_determinism)
    rank, world, device = distributed.start(bool(t.deepspeed), t.ddp_timeout)
    precision = decide_precision(run, device)
    check_runtime(run, world, device, precision)
    if t.estimate and rank == 0:
        estimate.preflight(run, world, device)
    kernels.load(device)
    out = Path(t.output_dir)
    writable_output_dir(out)
    ckpt = prepare_output_dir(out, t.resume_from_checkpoint, t.overwrite_output_dir)

    model, tokenizer, source_dir = load_base(m.model_name_or_path, m.tokenizer_name_or_path, device, precision.load,
                                             dataset_texts(run))
    train_set, val_set = data.get_dataset(d.dataset, d.dataset_dir, tokenizer, d.template, d.cutoff_len,
                                          d.max_samples, d.train_on_prompt, d.val_size, t.seed, d.identity_name,
                                          d.identity_author, stage=f.stage, system_prompt=d.system_prompt)
    if not train_set:
        raise ValueError(f"dataset {d.dataset} gave no training samples")
    reference = dpo_reference(model, run, precision, device)
    model = prepare_model(model, run, precision)
    if source_dir is None and f.finetuning_type == "lora" and rank == 0 and model.num_params() <= 100_000_000:
        # a random-init preset under LoRA: keep the base (older adapters merged in) so chat/eval can load the new
        # adapter onto it; a random phi-1_5 is only ever a benchmark, and gigabytes of noise are not worth writing
        save_model(model, out / "base_model")
        tokenizer.save(out / "base_model")
    objective = build_objective(model, run, precision, device, reference)
    del reference  # the objective holds it, and --dpo_precompute_ref lets it go there once it has been read
    layout = shares_prompt(run, model.config)  # how preference pairs are batched
    if f.stage == "dpo" and f.dpo_precompute_ref:  # before a checkpoint's weights replace the untrained ones
        precompute_reference(objective, (train_set, val_set), t.per_device_eval_batch_size, tokenizer.pad_token_id,
                             device, precision, layout)
    weights = TrainableWeights(f.finetuning_type == "lora", m.model_name_or_path, tokenizer, source_dir)

    accum, batch_size = t.gradient_accumulation_steps, t.per_device_train_batch_size

    def batches_of(epoch: int, skip: int = 0):
        return epoch_batches(train_set, epoch, t.seed, batch_size, d.packing, d.cutoff_len, rank, world, skip)

    steps_per_epoch = max(1, math.ceil(len(batches_of(0)) / accum))
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
    if ckpt is not None:
        keep_optimizer_flags(t, ckpt, total_steps)
    engine = build_engine(objective, run, precision, total_steps, device)
    objective.train()

    progress = {"global_step": 0, "epoch": 0, "samples_in_epoch": 0, "total_steps": total_steps,
                "optimizer": optimizer_flags(t)}
    if ckpt is not None:
        progress.update(load_checkpoint(engine, weights, ckpt), total_steps=total_steps)
    log = RunLog(out, total_steps, progress["global_step"], t.report_to, run_summary(run))
    logger.info("train samples %d, val %d, micro batch %d × accumulation %d × world %d, %d steps", len(train_set),
                len(val_set), batch_size, accum, world, total_steps)

    skips = SkippedSteps(out, t.learning_rate)
    # the losses since the last logged step, summed: a checkpoint keeps the sum (its mean over ranks) and the count,
    # so that the first loss a resumed run logs covers the steps the uninterrupted run's covered
    loss_window, loss_n = progress.get("loss_window", (0.0, 0))
    start, t_log, loss_sum, tokens = time.time(), time.time(), torch.tensor(loss_window, device=device), 0
    # the objective's metrics (phift.stages), summed over the same steps
    metric_sums = {k: torch.tensor(v, device=device) for k, v in progress.get("metrics_window", {}).items()}
    pad_id = tokenizer.pad_token_id
    epoch, skip = progress["epoch"], progress["samples_in_epoch"]
    try:  # the progress bar and the tracker close whatever ends the loop (the error then ends the output)
        while progress["global_step"] < total_steps:
            batches, consumed = batches_of(epoch, skip), skip
            for i, micro in enumerate(batches):
                batch = to_batch(micro, d.packing, pad_id, device, **layout)
                n_samples, n_tokens = count(micro)
                consumed += n_samples * world
                boundary = (i + 1) % accum == 0 or i == len(batches) - 1
                loss = engine.forward_backward(batch, boundary)  # forward, loss, backward
                info = engine.step(boundary)  # at a boundary: clip, optimizer step, schedule, zero gradients
                loss_sum += loss.detach().float()
                for k, v in getattr(engine.module, "metrics", {}).items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + v.detach().float()
                loss_n, tokens = loss_n + 1, tokens + n_tokens
                if info is None:
                    continue
                step = progress["global_step"] = progress["global_step"] + 1
                progress.update(epoch=epoch, samples_in_epoch=consumed)
                log.bar.update(1)
                logging_now = step % t.logging_steps == 0 or step == total_steps
                saving_now = t.save_strategy == "steps" and step % t.save_steps == 0 and step < total_steps
                skips.add(step, info)
                if logging_now or saving_now or skips.due():
                    skips.check()
                if logging_now:
                    if world > 1:  # the logged loss is the mean over all ranks' micro-batches
                        torch.distributed.all_reduce(loss_sum)
                        loss_sum /= world
                    entry = {"current_steps": step, "total_steps": total_steps,
                             "loss": round((loss_sum / max(loss_n, 1)).item(), 4),
                             **{k: round(mean_over_ranks(v) / max(loss_n, 1), 4) for k, v in metric_sums.items()},
                             "learning_rate": engine.lr(), "grad_norm": round(float(info["grad_norm"]), 4),
                             "epoch": round(epoch + consumed / len(train_set), 2),
                             "tokens_per_second": round(tokens * world / max(time.time() - t_log, 1e-9), 1),
                             "percentage": round(100 * step / total_steps, 2),
                             "elapsed_time": round(time.time() - start, 1)}
                    if device.type == "cuda":
                        entry["gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                    log.write(entry)
                    loss_sum.zero_()
                    metric_sums = {}
                    loss_n, tokens, t_log = 0, 0, time.time()
                if val_set and t.eval_strategy == "steps" and step % t.eval_steps == 0:
                    evaluated = eval_metrics(engine, val_set, t.per_device_eval_batch_size, pad_id, device, layout)
                    logger.info("step %d: %s", step, evaluated)
                    log.write({"current_steps": step, **evaluated})
                if saving_now:
                    progress["loss_window"] = (mean_over_ranks(loss_sum), loss_n)
                    progress["metrics_window"] = {k: mean_over_ranks(v) for k, v in metric_sums.items()}
                    save_checkpoint(engine, weights, out, progress, t.save_total_limit)
                if step >= total_steps:
                    break
            else:
                epoch, skip = epoch + 1, 0
                progress.update(epoch=epoch, samples_in_epoch=0)
    finally:
        log.close()

    runtime = time.time() - start
    if t.save_strategy == "steps":
        progress["loss_window"] = (mean_over_ranks(loss_sum), loss_n)
        progress["metrics_window"] = {k: mean_over_ranks(v) for k, v in metric_sums.items()}
        save_checkpoint(engine, weights, out, progress, t.save_total_limit)
    state = engine.weights_state_dict()
    check_finite(engine, state, "the final model was not saved", out)
    results = {"train_runtime": round(runtime, 2), "global_step": progress["global_step"],
               "train_loss": log.last_loss()}
    if val_set:
        results.update(eval_metrics(engine, val_set, t.per_device_eval_batch_size, pad_id, device, layout))
    if rank == 0:
        weights.save(engine.module, out, state)
        (out / "train_results.json").write_text(json.dumps(results, indent=2))
        if f.plot_loss:
            plot_loss(out)
            plot_metrics(out, list(getattr(engine.module, "metrics", {})))
        logger.info("done: %s; saved to %s", results, out)
    return results


def evaluate(run: RunConfig) -> dict:
    """--do_eval / --do_predict / --mcq_files: on the model just trained (output_dir) when --do_train ran, else on
    --model_name_or_path plus the adapters in --checkpoint_dir. Writes all_results.json."""
    from .evaluate import evaluate_loss, load_multiple_choice, predict, score_multiple_choice

    m, d, f, t, g = run.model, run.data, run.finetuning, run.training, run.generating
    set_seed(t.seed)  # sampled predictions (--temperature > 0) follow --seed, as LLaMA-Factory's eval does
    out = Path(t.output_dir)
    writable_output_dir(out)
    if t.do_train:
        trained_lora = (out / "adapter_config.json").is_file()
        base = out / "base_model" if (out / "base_model").is_dir() else m.model_name_or_path
        name, adapters = (base, str(out)) if trained_lora else (out, None)
    else:
        name, adapters = m.model_name_or_path, m.checkpoint_dir
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    requested = torch.float16 if t.fp16 else torch.bfloat16 if (t.bf16 or t.pure_bf16) else None
    model, tokenizer = load_for_inference(name, adapters, dtype=requested, device=device)
    template = data.get_template(d.template)
    results = {}
    if t.do_eval:
        def split(val_size):
            return data.get_dataset(d.dataset, d.dataset_dir, tokenizer, template, d.cutoff_len, d.max_samples,
                                    d.train_on_prompt, val_size, t.seed, d.identity_name, d.identity_author,
                                    stage=f.stage, system_prompt=d.system_prompt)
        # no held-out split asked for: evaluate on the whole dataset, as --do_eval alone did
        val = split(d.val_size)[1] or split(0.0)[0]
        if f.stage in PAIRWISE_STAGES:
            objective = eval_objective(model, run, name, adapters, requested, device).eval()
            results.update(pairwise_means(pairwise_sums(lambda batch: objective(**batch), objective, val,
                                                        tokenizer.pad_token_id, t.per_device_eval_batch_size,
                                                        device, layout=shares_prompt(run, model.config))))
        else:
            results.update(evaluate_loss(model, val, tokenizer.pad_token_id, t.per_device_eval_batch_size))
    if t.do_predict:
        rows = data.load_rows(d.dataset, d.dataset_dir, d.max_samples, d.identity_name, d.identity_author,
                              system_prompt=d.system_prompt)
        results.update(predict(model, tokenizer, template, rows, t.per_device_eval_batch_size, g.max_new_tokens,
                               g.temperature, g.top_p, d.cutoff_len, out))
    if d.mcq_files:
        questions = [q for path in d.mcq_files.split(",") if path for q in load_multiple_choice(path)]
        scored = score_multiple_choice(model, tokenizer, template, questions,
                                       batch_size=t.per_device_eval_batch_size)
        results["mcq_accuracy"] = scored["accuracy"]
        results["mcq_files"] = scored["files"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "all_results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(results, indent=2, ensure_ascii=False))
    return results


def eval_objective(model, run: RunConfig, name, adapters: str | None, dtype, device) -> stages.Objective:
    """The pairwise objective `phift eval` scores held-out pairs with, around the model (its adapters merged in):
    a reward model with the value head saved beside the last adapter (or the checkpoint); DPO with --ref_model as
    its reference, else the model without the adapters (v0.3.3 used the model itself, whose rewards are all 0)."""
    f = run.finetuning
    adapters = [a for a in (adapters or "").split(",") if a]
    if f.stage == "rm":
        objective = stages.RewardModel(model).to(device)
        stages.load_value_head(objective, Path(adapters[-1]) if adapters else resolve_checkpoint_dir(name))
        return objective
    if f.stage == "orpo":
        return stages.ORPO(model, f.dpo_beta)
    if f.ref_model:
        reference = load_for_inference(f.ref_model, f.ref_model_checkpoint, dtype=dtype, device=device)[0]
    elif adapters:
        reference = load_for_inference(name, None, dtype=dtype, device=device)[0]
    else:
        logger.warning("--stage dpo evaluation without --ref_model or an adapter: the model is its own reference, "
                       "so every reward is 0 (as in LLaMA-Factory)")
        reference = model
    return stages.DPO(model, f.dpo_beta, f.dpo_loss, f.dpo_label_smoothing, stages.FrozenReference(reference, device))


def dataset_texts(run: RunConfig) -> list[str]:
    """The dataset's texts, which a preset (random-init) model's demo tokenizer is trained on. Read before the model
    loads, so that a dataset's error comes before a download."""
    d, stage = run.data, run.finetuning.stage
    if stage == "pt":
        return data.load_texts(d.dataset, d.dataset_dir, d.max_samples)
    rows = data.load_rows(d.dataset, d.dataset_dir, d.max_samples, d.identity_name, d.identity_author,
                          ranking=stage in PAIRWISE_STAGES, system_prompt=d.system_prompt)
    return [r[k] for r in rows for k in ("prompt", "response", "chosen", "rejected") if k in r]


def run_summary(run: RunConfig) -> dict:
    """The configuration as one flat dict of flag values, for the experiment tracker."""
    return {k: v for group in (run.model, run.data, run.finetuning, run.training, run.generating)
            for k, v in vars(group).items()}


def main(argv=None):
    run = parse_train_args(argv)
    distributed.setup_logging()
    if run.training.do_train:
        train(run)
    if run.training.do_eval or run.training.do_predict or run.data.mcq_files:
        evaluate(run)
    distributed.stop()


if __name__ == "__main__":
    main()
