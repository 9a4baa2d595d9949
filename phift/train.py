"""Supervised fine-tuning: one explicit loop, batch → forward → loss → backward → clip → step → schedule → log → save.

Runs as `phift train <flags>`, as `python examples/train_bash.py <flags>` and under
`deepspeed --num_gpus N examples/train_bash.py --deepspeed cfg.json <flags>` with the same flags.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data, graphs, lora
from .args import parse_train_args
from .checkpoint import load_model, load_state_dict, resolve_checkpoint_dir, save_model
from .config import PRESETS, PhiConfig
from .engine import DeepSpeedEngine, TorchEngine, init_distributed_env
from .evaluate import loss_sums
from .model import LMHead, Phi
from .offload import OffloadEngine
from .neftune import add_neftune
from .plot import plot_loss
from .recompute import compile_blocks, recompute
from .rng import rng_state, set_rng_state, set_seed
from .tokenizer import load_tokenizer, train_demo_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json")


def rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def log0(*msg):
    if rank_and_world()[0] == 0:
        print(*msg, flush=True)


# ---------------------------------------------------------------------------------------------- model, tokenizer
def precision(args, device) -> torch.dtype:
    if args.fp16 and device.type != "cuda":
        log0("warning: --fp16 needs a CUDA GPU (as in transformers' Trainer); training in fp32 on the CPU")
        args.fp16 = False
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


def load_base(args, device, dtype, texts=None):
    """(model, tokenizer, source dir). A preset name gives a random-init model and, unless the name is a real
    checkpoint, the demo tokenizer trained on the dataset's own text (the offline default)."""
    if args.model_name_or_path in PRESETS and not Path(args.model_name_or_path).exists():
        config = PhiConfig.from_name(args.model_name_or_path)
        if args.tokenizer_name_or_path:
            tokenizer = load_tokenizer(args.tokenizer_name_or_path)
        else:
            tokenizer = train_demo_tokenizer(texts, vocab_size=min(config.vocab_size, 2048))
        if tokenizer.vocab_size > config.vocab_size:
            raise SystemExit(f"tokenizer has {tokenizer.vocab_size} tokens, model {config.name} only "
                             f"{config.vocab_size}")
        with torch.device(device):  # initialise on the GPU: 1.4B parameters take seconds on a CPU
            model = Phi(config).to(dtype=dtype)
        return model, tokenizer, None
    d = resolve_checkpoint_dir(args.model_name_or_path)
    return load_model(d, dtype=dtype, device=device), load_tokenizer(d), d


def prepare_model(args, model, dtype):
    """LoRA or full fine-tuning; precision as on a T4: half base + fp32 adapters, or fp32 master weights."""
    if args.finetuning_type == "lora":
        adapters = [a for a in (args.checkpoint_dir or "").split(",") if a]
        resume = adapters[-1:] if args.resume_lora_training else []
        for d in adapters[: len(adapters) - len(resume)]:  # older adapters are merged into the base
            lora.load_adapter(model, d, trainable=False)
            lora.unload(model, merge=True)
            log0(f"merged adapter {d} into the base model")
        if resume:
            lora.load_adapter(model, resume[0], trainable=True)
            log0(f"resumed adapter {resume[0]}")
            log0(lora.trainable_summary(model))
        else:
            lora.inject(model, args.lora_target, r=args.lora_rank, alpha=args.lora_alpha,
                        dropout=args.lora_dropout, use_rslora=args.use_rslora, verbose=rank_and_world()[0] == 0)
    elif dtype != torch.float32 and not (args.deepspeed or args.pure_bf16 or args.offload_optimizer == "cpu"):
        model.float()  # full fine-tuning under autocast keeps fp32 master weights (else the optimizer keeps them)
    if args.upcast_layernorm:
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.float()
    if args.neft_alpha > 1e-6:
        add_neftune(model.wte, args.neft_alpha)
    if args.compile:
        compile_blocks(model)
    if not args.disable_gradient_checkpointing:
        # graphs and compiled blocks were measured with the non-reentrant form; under graphs nothing draws random
        # numbers (graphs.check), so no RNG state is kept; a compiled block is traced for one kind of run (no lean)
        recompute(model, args.gradient_checkpointing_policy, reentrant=not (args.cuda_graphs or args.compile),
                  preserve_rng_state=not args.cuda_graphs, lean=not args.compile)
    return model


# ------------------------------------------------------------------------------------------------------ batches
def epoch_batches(examples, epoch, args, rank, world, skip: int = 0):
    """This rank's micro-batches for an epoch: a seeded shuffle per epoch, then rank r takes every world-th sample.

    Interleaved shards make the samples consumed after k micro-batches on every rank a prefix of the epoch's
    order (k × batch × world long), so `skip` — samples already consumed this epoch — resumes on any world size.
    """
    g = torch.Generator().manual_seed(args.seed + epoch)
    order = torch.randperm(len(examples), generator=g).tolist()[skip:]
    order += order[: (-len(order)) % world]  # every rank gets as many samples (as DistributedSampler)
    shard = [examples[i] for i in order[rank::world]]
    bs = args.per_device_train_batch_size
    if args.packing:
        rows = data.pack(shard, args.cutoff_len)
        return [rows[i:i + bs] for i in range(0, len(rows), bs)]
    return [shard[i:i + bs] for i in range(0, len(shard), bs)]


def count(micro) -> tuple[int, int]:
    """(samples, tokens) in a micro-batch of examples or of packed rows (lists of examples); padding not counted."""
    examples = [e for row in micro for e in (row if isinstance(row, list) else [row])]
    return len(examples), sum(len(e["input_ids"]) for e in examples)


def to_batch(micro, packed: bool, pad_id, device):
    if packed and all(len(row) == 1 for row in micro):
        # rows of one sample each (long samples leave no room to pack): the same batch unpacked needs no
        # segment mask, so attention keeps its flash kernel
        micro, packed = [row[0] for row in micro], False
    if packed:
        b = data.collate_packed(micro, pad_id)
    else:
        b = data.collate(micro, pad_id)
        # right padding + causal attention: real tokens never see the pads after them, so the loss is exact
        # without a mask, and SDPA can take its flash kernel
        del b["attention_mask"]
    # the labelled rows, found here on the CPU: found on the GPU, they would make the host wait for the GPU to finish
    # the previous step's optimizer before it could queue this step's forward
    b["label_rows"] = LMHead.label_rows(b["labels"])
    return {k: v.to(device, non_blocking=True) for k, v in b.items()}


# ------------------------------------------------------------------------------------------------- checkpoints
def save_weights(model, args, directory: Path, tokenizer, source_dir, state=None):
    if args.finetuning_type == "lora":
        lora.save_adapter(model, directory, args.model_name_or_path,
                          state={k: v for k, v in state.items() if ".lora_" in k} if state else None)
    else:
        save_model(model, directory, state_dict=state)
    if source_dir is not None and any((Path(source_dir) / f).is_file() for f in TOKENIZER_FILES):
        for f in TOKENIZER_FILES:
            if (Path(source_dir) / f).is_file():
                shutil.copy(Path(source_dir) / f, directory / f)
    else:
        tokenizer.save(directory)


def full_state_dict(engine, args):
    """Under ZeRO-3 the weights are partitioned: gather them (rank 0 gets the dict). Else None: use the module."""
    if args.deepspeed and engine.engine.zero_optimization_stage() == 3:
        return engine.engine._zero3_consolidated_16bit_state_dict()
    return None


def save_checkpoint(engine, model, args, progress: dict, tokenizer, source_dir) -> Path:
    """checkpoint-N/ written in a hidden temp dir, then renamed: a crash mid-save never leaves a broken one,
    and `latest` names the newest complete checkpoint."""
    rank, world = rank_and_world()
    out = Path(args.output_dir)
    final, tmp = out / f"checkpoint-{progress['global_step']}", out / f".tmp-checkpoint-{progress['global_step']}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    state = full_state_dict(engine, args)
    engine.save(tmp)
    torch.save(rng_state(), tmp / f"rng_state_{rank}.pt")
    barrier()
    if rank == 0:
        save_weights(model, args, tmp, tokenizer, source_dir, state)
        (tmp / "trainer_state.json").write_text(json.dumps({**progress, "world_size": world}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(out / "latest", final.name)
        if args.save_total_limit:
            for old in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[
                    : -args.save_total_limit]:
                shutil.rmtree(old)
    barrier()
    return final


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def find_checkpoint(args) -> Path | None:
    if args.resume_from_checkpoint in (None, "", "False", "false"):
        return None
    if args.resume_from_checkpoint in ("latest", "True", "true"):
        pointer = Path(args.output_dir) / "latest"
        if not pointer.is_file():
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint in {args.output_dir}")
        return Path(args.output_dir) / pointer.read_text().strip()
    d = Path(args.resume_from_checkpoint)
    if not (d / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{d} is not a complete phift checkpoint (no trainer_state.json)")
    return d


def load_checkpoint(engine, model, args, ckpt: Path) -> dict:
    progress = json.loads((ckpt / "trainer_state.json").read_text())
    if args.deepspeed:
        engine.load(ckpt)  # DeepSpeed restores the module's trainable weights with the fp32 master copy
    else:
        if args.finetuning_type == "lora":
            lora.load_adapter(model, ckpt, trainable=True)
        else:
            dtype = next(model.parameters()).dtype
            model.load_state_dict(load_state_dict(ckpt, model, dtype, next(model.parameters()).device)[0])
        engine.load(ckpt)
    rank = rank_and_world()[0]
    rng_file = ckpt / f"rng_state_{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    log0(f"resumed from {ckpt} at step {progress['global_step']} (epoch {progress['epoch']}, "
         f"{progress['samples_in_epoch']} samples into it)")
    return progress


def eval_loss(engine, examples, args, pad_id, device) -> float:
    """Token-weighted mean loss over the split: each rank takes a shard, the sums are added across ranks."""
    rank, world = rank_and_world()
    engine.module.eval()
    total = loss_sums(engine.forward, examples[rank::world], pad_id, args.per_device_eval_batch_size, device,
                      progress=rank == 0)
    if world > 1:
        torch.distributed.all_reduce(total)
    engine.module.train()
    return (total[0] / total[1].clamp(min=1)).item()


# ---------------------------------------------------------------------------------------------------- the loop
def setup_device(args) -> tuple[int, int, torch.device]:
    """(rank, world size, device); DeepSpeed runs start torch.distributed (NCCL on GPUs, gloo on the CPU)."""
    if rank_and_world()[1] > 1 and not args.deepspeed:
        raise SystemExit("multi-process runs go through DeepSpeed: add --deepspeed <config.json>")
    if args.deepspeed:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        init_distributed_env()
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return (*rank_and_world(), device)


def micro_step(engine, model, args, device):
    """loss = f(batch, boundary): one micro-batch's forward and backward, eager or (--cuda_graphs) a replayed graph."""
    def eager(batch, boundary=True):
        loss = engine.forward(batch)
        engine.backward(loss, boundary)
        return loss

    if not args.cuda_graphs:
        return eager
    why = graphs.check(args, model, device)
    if why:
        raise SystemExit(why)
    return graphs.GraphedStep(engine.params, eager, args.gradient_accumulation_steps)


def append_log(log_file: Path, entry: dict):
    if rank_and_world()[0] == 0:
        with log_file.open("a") as f:
            f.write(json.dumps(entry) + "\n")


def train(args) -> dict:
    set_seed(args.seed)
    rank, world, device = setup_device(args)
    out = Path(args.output_dir)
    if args.resume_from_checkpoint is None and not args.overwrite_output_dir and any(out.glob("checkpoint-*")):
        raise SystemExit(f"{out} already holds checkpoints: pass --resume_from_checkpoint latest to continue, or "
                         "--overwrite_output_dir True to start over")
    out.mkdir(parents=True, exist_ok=True)
    dtype = precision(args, device)

    rows = data.load_rows(args.dataset, args.dataset_dir, args.max_samples, args.identity_name,
                          args.identity_author)
    texts = [t for r in rows for t in (r.get("prompt", ""), r.get("query", ""), r.get("response", ""))]
    model, tokenizer, source_dir = load_base(args, device, dtype, texts)
    template = data.get_template(args.template)
    train_set, val_set = data.get_dataset(args.dataset, args.dataset_dir, tokenizer, template, args.cutoff_len,
                                          args.max_samples, args.train_on_prompt, args.val_size, args.seed,
                                          args.identity_name, args.identity_author)
    if not train_set:
        raise SystemExit(f"dataset {args.dataset} gave no training samples")
    model = prepare_model(args, model, dtype)
    if source_dir is None and args.finetuning_type == "lora" and rank == 0:
        # a random-init preset under LoRA: keep the base (older adapters merged in) so chat/eval can load the new
        # adapter onto it; a random phi-1_5 is only ever a benchmark, and gigabytes of noise are not worth writing
        if model.num_params() <= 100_000_000:
            save_model(model, out / "base_model")
            tokenizer.save(out / "base_model")

    accum = args.gradient_accumulation_steps
    batches_per_epoch = len(epoch_batches(train_set, 0, args, rank, world))
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / accum))
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    if args.offload_optimizer == "cpu":
        if world > 1:
            raise SystemExit("--offload_optimizer cpu runs on one GPU; for several, use --deepspeed with "
                             "examples/ds_config.json (ZeRO-2, optimizer offloaded)")
        if dtype == torch.float32:
            raise SystemExit("--offload_optimizer cpu needs a half-precision model: --fp16 needs a CUDA GPU, "
                             "--bf16 True runs anywhere")
    Engine = (DeepSpeedEngine if args.deepspeed else OffloadEngine if args.offload_optimizer == "cpu"
              else TorchEngine)
    engine = Engine(model, args, total_steps, device)
    model.train()
    forward_backward = micro_step(engine, model, args, device)

    progress = {"global_step": 0, "epoch": 0, "samples_in_epoch": 0, "total_steps": total_steps}
    ckpt = find_checkpoint(args)
    if ckpt is not None:
        progress.update(load_checkpoint(engine, model, args, ckpt), total_steps=total_steps)
    log_file = out / "trainer_log.jsonl"
    if rank == 0 and ckpt is None and log_file.exists():
        log_file.unlink()
    log0(f"train samples {len(train_set)}, val {len(val_set)}, world {world}, micro batch "
         f"{args.per_device_train_batch_size} × accumulation {accum} × world {world}, {total_steps} steps")

    bar = tqdm(total=total_steps, initial=progress["global_step"], disable=rank != 0, desc="train", dynamic_ncols=True)
    start, loss_sum, loss_n, tokens = time.time(), torch.zeros((), device=device), 0, 0
    t_log, history = time.time(), []
    pad_id = tokenizer.pad_token_id
    epoch, skip = progress["epoch"], progress["samples_in_epoch"]
    while progress["global_step"] < total_steps:
        batches = epoch_batches(train_set, epoch, args, rank, world, skip)
        consumed = skip
        for i in range(len(batches)):
            batch = to_batch(batches[i], args.packing, pad_id, device)
            n_samples, n_tokens = count(batches[i])
            consumed += n_samples * world
            boundary = (i + 1) % accum == 0 or i == len(batches) - 1
            loss = forward_backward(batch, boundary)
            info = engine.step(boundary)
            loss_sum += loss.detach().float()
            loss_n += 1
            tokens += n_tokens
            if info is None:
                continue
            step = progress["global_step"] = progress["global_step"] + 1
            progress.update(epoch=epoch, samples_in_epoch=consumed)
            if info["skipped"]:
                log0(f"step {step}: fp16 overflow, update skipped (loss scale now {info['loss_scale']})")
            bar.update(1)
            if step % args.logging_steps == 0 or step == total_steps:
                if world > 1:  # the logged loss is the mean over all ranks' micro-batches
                    torch.distributed.all_reduce(loss_sum)
                    loss_sum /= world
                elapsed = time.time() - t_log
                entry = {"current_steps": step, "total_steps": total_steps,
                         "loss": round((loss_sum / max(loss_n, 1)).item(), 4),
                         "learning_rate": engine.lr(), "grad_norm": round(float(info["grad_norm"]), 4),
                         "epoch": round(epoch + consumed / len(train_set), 2),
                         "tokens_per_second": round(tokens * world / max(elapsed, 1e-9), 1),
                         "percentage": round(100 * step / total_steps, 2),
                         "elapsed_time": round(time.time() - start, 1)}
                if device.type == "cuda":
                    entry["gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                history.append(entry)
                append_log(log_file, entry)
                bar.set_postfix(loss=entry["loss"], lr=f"{entry['learning_rate']:.2e}")
                loss_sum.zero_()
                loss_n, tokens, t_log = 0, 0, time.time()
            if val_set and step % args.eval_steps == 0:
                entry = {"current_steps": step, "eval_loss": round(eval_loss(engine, val_set, args, pad_id, device), 4)}
                log0(f"step {step}: eval_loss {entry['eval_loss']}")
                history.append(entry)
                append_log(log_file, entry)
            if args.save_strategy == "steps" and step % args.save_steps == 0 and step < total_steps:
                save_checkpoint(engine, model, args, progress, tokenizer, source_dir)
            if step >= total_steps:
                break
        else:
            epoch, skip = epoch + 1, 0
            progress.update(epoch=epoch, samples_in_epoch=0)
    bar.close()

    runtime = time.time() - start
    if args.save_strategy == "steps":
        save_checkpoint(engine, model, args, progress, tokenizer, source_dir)
    state = full_state_dict(engine, args)
    results = {"train_runtime": round(runtime, 2), "global_step": progress["global_step"],
               "train_loss": next((e["loss"] for e in reversed(history) if "loss" in e), None)}
    if val_set:
        results["eval_loss"] = round(eval_loss(engine, val_set, args, pad_id, device), 4)
    if rank == 0:
        save_weights(model, args, out, tokenizer, source_dir, state)
        (out / "train_results.json").write_text(json.dumps(results, indent=2))
        if args.plot_loss:
            plot_loss(out)
        log0(f"done: {results}; saved to {out}")
    return results


def main(argv=None):
    args = parse_train_args(argv)
    if args.do_train:
        train(args)
    if args.do_eval or args.do_predict or args.mcq_files:
        from .evaluate import run_from_args

        run_from_args(args)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # every rank waits for rank 0's last save, then the group is torn down before the interpreter exits: a
        # live gloo or shared-memory group at exit has aborted a finished run ("terminate called without an
        # active exception")
        barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
