"""Training state: the checkpoint-N/ directories of a run, which hold everything a resume needs.

    checkpoint-N/   the trainable weights (the LoRA adapter, or the whole model) and the tokenizer, as in the final
                    output; the engine's state (optimizer, schedule, loss scale); every generator's state per rank;
                    trainer_state.json (step, epoch, samples consumed in it, world size)
    latest          the name of the newest complete checkpoint

A checkpoint is written in a hidden directory and renamed into place, so a crash mid-save never breaks the last one.
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
from .distributed import barrier, rank_and_world
from .tensorfile import load_state
from .weights import load_state_dict, save_model

logger = logging.getLogger(__name__)

DISK_FULL_BYTES = 16 << 20  # free space under which a failed write is taken for a full disk
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json")


def set_seed(seed: int):
    """Seed every generator a run draws from (Python, numpy, torch on the CPU and every GPU), as the HF Trainer's
    set_seed does before the model is built: LoRA's initialisation, dropout masks and NEFTune noise follow --seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


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
    to) or every weight, plus the tokenizer (the source checkpoint's own files where it had them)."""

    def __init__(self, lora_adapter: bool, base_name_or_path: str, tokenizer, source_dir: Path | None):
        self.lora, self.base, self.tokenizer, self.source_dir = lora_adapter, base_name_or_path, tokenizer, source_dir

    def save(self, model, directory: Path, state: dict | None = None):
        """state: the full weights where the module's own are not (ZeRO-3 gathers them); else read the module."""
        if self.lora:
            lora.save_adapter(model, directory, self.base,
                              state={k: v for k, v in state.items() if ".lora_" in k} if state else None)
        else:
            save_model(model, directory, state_dict=state)
        files = [Path(self.source_dir) / f for f in TOKENIZER_FILES] if self.source_dir is not None else []
        if any(f.is_file() for f in files):
            for f in files:
                if f.is_file():
                    shutil.copy(f, directory / f.name)
        else:
            self.tokenizer.save(directory)

    def restore(self, model, directory: Path):
        if self.lora:
            lora.load_adapter(model, directory, trainable=True)
        else:
            p = next(model.parameters())
            model.load_state_dict(load_state_dict(directory, model, p.dtype, p.device)[0])


def save_checkpoint(engine, weights: TrainableWeights, output_dir: Path, progress: dict,
                    save_total_limit: int | None = None) -> Path:
    """checkpoint-N/ written in a hidden temp dir, then renamed: a crash mid-save never leaves a broken one,
    and `latest` names the newest complete checkpoint. Every rank calls it."""
    rank, world = rank_and_world()
    out = Path(output_dir)
    final, tmp = out / f"checkpoint-{progress['global_step']}", out / f".tmp-checkpoint-{progress['global_step']}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        state = engine.weights_state_dict()
        engine.save(tmp)
        torch.save(rng_state(), tmp / f"rng_state_{rank}.pt")
        barrier()
        if rank == 0:
            weights.save(engine.module, tmp, state)
            (tmp / "trainer_state.json").write_text(json.dumps({**progress, "world_size": world}, indent=2))
    except Exception as e:
        raise _save_failed(e, tmp, final) from e
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(out / "latest", final.name)
        if save_total_limit:
            for old in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-save_total_limit]:
                shutil.rmtree(old)
    barrier()
    return final


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


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def find_checkpoint(resume_from: str | None, output_dir) -> Path | None:
    """--resume_from_checkpoint: a checkpoint directory, or latest (True) for output_dir's newest complete one."""
    if resume_from in (None, "", "False", "false"):
        return None
    if resume_from in ("latest", "True", "true"):
        pointer = Path(output_dir) / "latest"
        if not pointer.is_file():
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}")
        return Path(output_dir) / pointer.read_text().strip()
    d = Path(resume_from)
    if not (d / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{d} is not a complete phift checkpoint (no trainer_state.json)")
    return d


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
