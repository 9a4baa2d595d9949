"""Training state: the checkpoint-N/ directories of a run, which hold everything a resume needs.

    checkpoint-N/   the trainable weights (the LoRA adapter, or the whole model) and the tokenizer, as in the final
                    output; the engine's state (optimizer, schedule, loss scale); every generator's state per rank;
                    trainer_state.json (step, epoch, samples consumed in it, world size, the losses summed since
                    the last logged step, the optimizer flags)
    latest          the name of the newest complete checkpoint

A run starts in an empty output_dir, or with --overwrite_output_dir in one cleared of what an earlier run wrote
(`prepare_output_dir`): two runs never mix in one directory. A checkpoint is written in a hidden directory and renamed
into place; one saved again (a resumed run saves the step it resumed from) is renamed aside first and removed last,
so that whenever a crash strikes, `latest` names a complete checkpoint or a complete copy of it lies beside it, which
the resume puts back. Rotation (--save_total_limit) never removes the checkpoint `latest` names, and weights that are
not finite are never saved, so the last checkpoint with finite weights is never rotated away.
Every random number generator a run draws from is seeded once at the start (`set_seed`) and restored on resume.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from . import lora
from .distributed import barrier, is_main, rank_and_world
from .stages import VALUE_HEAD_WEIGHTS, RewardModel, load_value_head, network_of, save_value_head
from .tensorfile import load_state
from .weights import load_state_dict, save_model

logger = logging.getLogger(__name__)

DISK_FULL_BYTES = 16 << 20  # free space under which a failed write is taken for a full disk
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json")
# what a run (and evaluation after it) writes into output_dir: --overwrite_output_dir removes these, nothing else
RUN_OUTPUTS = ("latest", "latest.tmp", "trainer_log.jsonl", "train_results.json", "all_results.json",
               "predict_results.json", "generated_predictions.jsonl", "runs", "base_model", "config.json",
               "model.safetensors.index.json", lora.ADAPTER_WEIGHTS, lora.ADAPTER_CONFIG, VALUE_HEAD_WEIGHTS,
               *TOKENIZER_FILES)
WRITE_PROBE = ".phift-write-test-"  # the file train writes to check that --output_dir is writable
RUN_OUTPUT_PATTERNS = ("checkpoint-*", ".tmp-checkpoint-*", ".old-checkpoint-*", "model*.safetensors",
                       "training_*.png")


# what the optimizer and its schedule were built from: a resumed run goes on with the checkpoint's values
OPTIMIZER_FLAGS = ("learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "max_grad_norm",
                   "lr_scheduler_type", "warmup_steps", "warmup_ratio")


class NonFiniteWeights(RuntimeError):
    """The weights hold a NaN or an inf: nothing is saved."""


def set_seed(seed: int, deterministic: bool = False):
    """Seed every generator a run draws from (Python, numpy, torch on the CPU and every GPU), as the HF Trainer's
    set_seed does before the model is built: LoRA's initialisation, dropout masks and NEFTune noise follow --seed.

    deterministic (--full_determinism): also pick deterministic GPU kernels, as the HF Trainer's flag of that name
    does. Seeds alone repeat a run on the CPU; on a GPU, attention's backward (flash and memory-efficient) and
    cuBLAS's split reductions add in a varying order, so the same seed drifts in the last bits from the first step.
    An op with no deterministic kernel warns (naming it) instead of stopping the run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS first runs in the process
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    """Every generator's state, as plain tensors and lists (a checkpoint is read back with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    if "python" in state:  # checkpoints written before Python and numpy states were kept hold only torch's
        random.setstate(_tuples(state["python"]))
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, torch.Tensor):  # one device's state, as older checkpoints kept it
            torch.cuda.set_rng_state(cuda)
        else:
            torch.cuda.set_rng_state_all(cuda)


def _tuples(x):
    """random.setstate wants back the nested tuples that a checkpoint keeps as lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class TrainableWeights:
    """What a checkpoint, and a run's final output, holds of the model: the LoRA adapter (with the base it belongs
    to) or every weight, a reward model's value head beside them, plus the tokenizer (the source checkpoint's own
    files where it had them)."""

    def __init__(self, lora_adapter: bool, base_name_or_path: str, tokenizer, source_dir: Path | None):
        self.lora, self.base, self.tokenizer, self.source_dir = lora_adapter, base_name_or_path, tokenizer, source_dir

    def save(self, module, directory: Path, state: dict | None = None):
        """module: the network, or a stage's objective around it (phift.stages). state: the full weights where the
        module's own are not (ZeRO-3 gathers them, under the module's names); else read the module."""
        model = network_of(module)
        if state is not None and model is not module:
            head = {k: v for k, v in state.items() if k.startswith("v_head.")}
            state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        if self.lora:
            lora.save_adapter(model, directory, self.base,
                              state={k: v for k, v in state.items() if ".lora_" in k} if state else None)
        else:
            save_model(model, directory, state_dict=state)
        if isinstance(module, RewardModel):
            save_value_head(module, directory, head if state is not None else None)
        files = [Path(self.source_dir) / f for f in TOKENIZER_FILES] if self.source_dir is not None else []
        if any(f.is_file() for f in files):
            for f in files:
                if f.is_file():
                    shutil.copy(f, directory / f.name)
        else:
            self.tokenizer.save(directory)

    def restore(self, module, directory: Path):
        model = network_of(module)
        if self.lora:
            lora.load_adapter(model, directory, trainable=True)
        else:
            p = next(model.parameters())
            model.load_state_dict(load_state_dict(directory, model, p.dtype, p.device)[0])
        if isinstance(module, RewardModel):
            load_value_head(module, directory)


def prepare_output_dir(output_dir, resume_from: str | None, overwrite: bool) -> Path | None:
    """Before a run writes anything (every rank calls it): a fresh run needs an empty output_dir, or
    --overwrite_output_dir, which clears what an earlier run wrote there; a resumed run first puts back a checkpoint
    that a crash left beside its place, and drops the copies of unfinished saves. Returns the checkpoint to resume
    from, or None."""
    out = Path(output_dir)
    resuming = _resuming(resume_from)
    if not resuming and not overwrite:
        # another rank's write probe (or one a kill left behind) is not a previous run's output
        held = sorted(p.name for p in out.iterdir() if not p.name.startswith(WRITE_PROBE)) if out.is_dir() else []
        if held:
            raise FileExistsError(_occupied(out, held))
    barrier()  # every rank has looked before rank 0 changes anything
    if is_main():
        if resuming:
            try:
                _restore(_named_checkpoint(resume_from, out))
            except FileNotFoundError:
                pass  # find_checkpoint says so below, on every rank
            for leftover in (*out.glob(".tmp-checkpoint-*"), *out.glob(".old-checkpoint-*")):
                _remove(leftover)
        elif overwrite:
            _clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    return find_checkpoint(resume_from, out)


def _occupied(out: Path, held: list[str]) -> str:
    shown = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
    ways = ("--overwrite_output_dir True to start over (what a previous run wrote there is removed first), or "
            "another --output_dir")
    if "latest" in held or any(n.startswith("checkpoint-") for n in held):
        ways = "--resume_from_checkpoint latest to continue the run it holds, " + ways
    return f"output_dir {out} is not empty ({shown}): pass {ways}"


def _clear_run(out: Path):
    doomed = {out / name for name in RUN_OUTPUTS} | {p for pattern in RUN_OUTPUT_PATTERNS for p in out.glob(pattern)}
    removed = sorted(p.name for p in doomed if p.exists() or p.is_symlink())
    for p in doomed:
        if p.is_dir() and not p.is_symlink():
            _remove(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    if removed:
        logger.info("--overwrite_output_dir: removed the previous run's %s from %s", ", ".join(removed), out)


def save_checkpoint(engine, weights: TrainableWeights, output_dir: Path, progress: dict,
                    save_total_limit: int | None = None) -> Path:
    """checkpoint-N/, written in a hidden temp dir and renamed into place; `latest` then names it. Every rank calls
    it. Weights that are not finite are refused (NonFiniteWeights) before anything is written."""
    rank, world = rank_and_world()
    out, step = Path(output_dir), progress["global_step"]
    final = out / f"checkpoint-{step}"
    tmp, aside = final.with_name(f".tmp-{final.name}"), final.with_name(f".old-{final.name}")
    state = engine.weights_state_dict()
    check_finite(engine, state, f"step {step}: no checkpoint was written", out)
    if rank == 0:
        _remove(tmp)
        tmp.mkdir(parents=True)
    barrier()
    try:
        engine.save(tmp)
        torch.save(rng_state(), tmp / f"rng_state_{rank}.pt")
        barrier()
        if rank == 0:
            weights.save(engine.module, tmp, state)
            # written last: a copy holding trainer_state.json is complete
            write_atomic(tmp / "trainer_state.json", json.dumps({**progress, "world_size": world}, indent=2))
    except Exception as e:
        raise _save_failed(e, tmp, final) from e
    if rank == 0:
        _commit(tmp, final, aside)
        _rotate(out, save_total_limit)
    barrier()
    return final


def _commit(tmp: Path, final: Path, aside: Path):
    """Put the complete copy `tmp` in place of `final` and point `latest` at it. A crash between any two lines
    leaves `latest` naming a complete checkpoint (the old one, or the new), or, between the two renames, names one
    whose complete copies lie at `tmp` (new) and `aside` (old), which `_restore` puts back."""
    if final.exists():
        _remove(aside)
        _rename(final, aside)
    _rename(tmp, final)
    write_atomic(final.parent / "latest", final.name)
    _remove(aside)


def _restore(ckpt: Path):
    """Put back a checkpoint that a crash between the renames of `_commit` left only as a complete copy beside it."""
    if (ckpt / "trainer_state.json").is_file():
        return
    for copy in (ckpt.with_name(f".tmp-{ckpt.name}"), ckpt.with_name(f".old-{ckpt.name}")):  # the newer first
        if (copy / "trainer_state.json").is_file():
            _remove(ckpt)
            _rename(copy, ckpt)
            logger.warning("%s was missing (a crash cut its save short): restored it from the complete copy %s",
                           ckpt, copy.name)
            return


def _rotate(out: Path, save_total_limit: int | None):
    """Keep the newest save_total_limit checkpoints, and always the one `latest` names: it may sort below older
    ones (a run resumed from an early checkpoint of a longer one)."""
    if not save_total_limit:
        return
    latest = (out / "latest").read_text().strip()
    found = sorted((p for p in out.glob("checkpoint-*") if p.name[11:].isdigit()), key=lambda p: int(p.name[11:]))
    for old in found[:-save_total_limit]:
        if old.name != latest:
            doomed = old.with_name(f".old-{old.name}")
            _rename(old, doomed)  # first: a crash mid-delete leaves no partial checkpoint-N
            _remove(doomed)


def check_finite(engine, state: dict | None, what: str, output_dir):
    """Raise NonFiniteWeights unless every trainable weight is finite, on every rank alike (one pass over the
    weights and one host sync: at a save, not at every step)."""
    tensors = list(state.values()) if state is not None else engine.params
    device = engine.params[0].device if engine.params else torch.device("cpu")
    finite = torch.stack([torch.isfinite(t).all().to(device) for t in tensors]).all().float() if tensors \
        else torch.ones((), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if not finite.item():
        raise NonFiniteWeights(f"{what}: the weights hold NaN or inf values; {last_checkpoint_note(output_dir)}")


def last_checkpoint_note(output_dir) -> str:
    pointer = Path(output_dir) / "latest"
    if pointer.is_file():
        return f"the last checkpoint, {Path(output_dir) / pointer.read_text().strip()}, holds finite weights"
    return "no checkpoint was written before"


def _save_failed(error: Exception, tmp: Path, final: Path) -> RuntimeError:
    """The partial checkpoint removed (a full disk stays full otherwise) and the error that says so. torch.save
    reports a full disk as "enforce fail at inline_container.cc" without an errno: the free space left tells."""
    full = any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in (error, error.__cause__, error.__context__))
    try:
        full = full or shutil.disk_usage(tmp.parent).free < DISK_FULL_BYTES
    except OSError:
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    why = "disk full" if full else f"{type(error).__name__}: {error}"
    return RuntimeError(f"writing checkpoint {final} failed ({why}); removed the partial checkpoint, the last complete "
                        f"one stays (--resume_from_checkpoint latest)")


def write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _rename(tmp, path)


def _rename(src: Path, dst: Path):
    os.replace(src, dst)


def _remove(path: Path):
    shutil.rmtree(path, ignore_errors=True)


def _resuming(resume_from: str | None) -> bool:
    return resume_from not in (None, "", "False", "false")


def _named_checkpoint(resume_from: str, output_dir) -> Path:
    if resume_from in ("latest", "True", "true"):
        pointer = Path(output_dir) / "latest"
        if not pointer.is_file():
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}")
        return Path(output_dir) / pointer.read_text().strip()
    return Path(resume_from)


def find_checkpoint(resume_from: str | None, output_dir) -> Path | None:
    """--resume_from_checkpoint: a checkpoint directory, or latest (True) for output_dir's newest complete one."""
    if not _resuming(resume_from):
        return None
    d = _named_checkpoint(resume_from, output_dir)
    if not (d / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{d} is not a complete phift checkpoint (no trainer_state.json)")
    return d


def optimizer_flags(training) -> dict:
    """The OPTIMIZER_FLAGS of a phift.args.TrainingArgs, as a checkpoint keeps them."""
    return {name: getattr(training, name) for name in OPTIMIZER_FLAGS}


def keep_optimizer_flags(training, ckpt: Path, total_steps: int):
    """Before the engine is built for a resume: the optimizer and its schedule go on as the checkpoint's run set them
    (its optimizer state holds the learning rate and betas anyway, and a schedule half run under other flags would
    continue neither run), so each flag given another value takes the checkpoint's, with a warning naming both. The
    run's length is the flags' own: a longer or shorter run stretches the schedule, which is said too."""
    saved = json.loads((ckpt / "trainer_state.json").read_text())
    for name, value in saved.get("optimizer", {}).items():
        if getattr(training, name) != value:
            if is_main():
                logger.warning("--%s %s does not apply on resume: the checkpoint's run trained with %s, and its "
                               "optimizer and schedule go on with that (start a new run to change it)", name,
                               getattr(training, name), value)
            setattr(training, name, value)
    if saved.get("total_steps", total_steps) != total_steps and is_main():
        logger.warning("resuming for %d steps in all where the checkpoint's run planned %d: the learning-rate "
                       "schedule follows the new length from step %d", total_steps, saved["total_steps"],
                       saved["global_step"])


def load_checkpoint(engine, weights: TrainableWeights, ckpt: Path) -> dict:
    """Restore the weights, the engine's state and this rank's generators; returns the progress to go on from."""
    progress = json.loads((ckpt / "trainer_state.json").read_text())
    engine.load(ckpt, weights.restore)
    rng_file = ckpt / f"rng_state_{rank_and_world()[0]}.pt"
    if rng_file.is_file():
        set_rng_state(load_state(rng_file))
    logger.info("resumed from %s at step %d (epoch %d, %d samples into it)", ckpt, progress["global_step"],
                progress["epoch"], progress["samples_in_epoch"])
    return progress
