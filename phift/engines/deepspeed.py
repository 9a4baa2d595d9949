"""DeepSpeed's engine behind phift's engine interface: ZeRO stages, DeepSpeed's fp16/bf16 modes and CPU Adam, as the
seed's examples/ds_config.json asks; its "auto" values are filled from the flags as transformers' Trainer fills them.

DeepSpeed 0.19 reads its checkpoints with torch.load(weights_only=False), which runs whatever code a crafted file's
pickle names. phift reads them only inside `weights_only_loads`, where every torch.load takes tensors and DeepSpeed's
few plain state types and refuses anything else, naming the file.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import torch

from ..tensorfile import refused
from . import Engine, OptimSpec, lr_lambda, param_groups


def fill_deepspeed_config(config: dict, spec: OptimSpec, micro_batch: int, fp16: bool, bf16: bool,
                          world_size: int, hidden_size: int) -> dict:
    """Replace the config's "auto" values from the flags, as transformers' Trainer does for the seed's ds config."""
    cfg = copy.deepcopy(config)
    accum = spec.accumulation
    fill = {
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accum,
        "train_batch_size": micro_batch * accum * world_size, "gradient_clipping": spec.max_grad_norm,
    }
    for k, v in fill.items():
        if cfg.get(k, "auto") == "auto":
            cfg[k] = v
        elif cfg[k] != v:
            raise ValueError(f"DeepSpeed config has {k}={cfg[k]} but the flags give {v}; set it to \"auto\"")
    for section, enabled in (("fp16", fp16), ("bf16", bf16)):
        sec = cfg.setdefault(section, {})
        if sec.get("enabled", "auto") == "auto":
            sec["enabled"] = enabled
        elif sec["enabled"] != enabled:
            raise ValueError(f"DeepSpeed config has {section}.enabled={sec['enabled']}, but --{section} is {enabled}")
    zero = cfg.get("zero_optimization", {})
    zero_auto = {"reduce_bucket_size": hidden_size * hidden_size,
                 "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                 "stage3_param_persistence_threshold": 10 * hidden_size}
    for k, v in list(zero.items()):
        if v == "auto":
            if k not in zero_auto:
                raise ValueError(f"DeepSpeed config: don't know how to fill zero_optimization.{k}=\"auto\"")
            zero[k] = zero_auto[k]
    adamw = {"lr": spec.lr, "betas": list(spec.betas), "eps": spec.eps, "weight_decay": spec.weight_decay}
    if "optimizer" not in cfg:
        cfg["optimizer"] = {"type": "AdamW", "params": dict(adamw)}
        if zero.get("offload_optimizer", {}).get("device", "none") == "none":
            # DeepSpeed's CPU Adam serves an offloaded optimizer; otherwise torch's AdamW (fused on CUDA) needs no
            # JIT-built op, unlike DeepSpeed's FusedAdam
            cfg["optimizer"]["params"].update(torch_adam=True, fused=torch.cuda.is_available())
    opt_params = cfg["optimizer"].setdefault("params", {})
    for k, v in list(opt_params.items()):
        if v == "auto" and k in adamw:
            opt_params[k] = adamw[k]
    bad = [k for k, v in _walk(cfg) if v == "auto"]
    if bad:
        raise ValueError(f"DeepSpeed config: cannot fill \"auto\" for {', '.join(bad)}")
    return cfg


def _walk(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def refuse_unskipped_non_finite_steps(config: dict):
    """A step whose gradients are not finite must be skipped (phift's loop stops after a run of them). DeepSpeed's
    ZeRO stages 1-3 and its fp16 and bf16 optimizers skip it; ZeRO stage 0 in fp32 hands the gradients to the
    optimizer as they are, and bf16 with check_grad_overflow false applies them too."""
    stage = config.get("zero_optimization", {}).get("stage", 0)
    fp16, bf16 = config["fp16"]["enabled"], config["bf16"]["enabled"]
    if stage == 0 and not (fp16 or bf16):
        raise ValueError("DeepSpeed's ZeRO stage 0 in fp32 would apply a step whose gradients are not finite: use "
                         "ZeRO stage 1, 2 or 3 in the DeepSpeed config, or --bf16 True")
    if bf16 and config["bf16"].get("check_grad_overflow") is False:
        raise ValueError("DeepSpeed config has bf16.check_grad_overflow false, which applies steps whose gradients "
                         "are not finite: leave it true")


def _deepspeed_state_types() -> list:
    """The classes DeepSpeed's ZeRO checkpoints hold besides tensors and builtins: plain state, no code on load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """Inside, every torch.load is weights_only=True whatever its call says (DeepSpeed's say False), with DeepSpeed's
    state types allowed; TORCH_FORCE_WEIGHTS_ONLY_LOAD holds the same for whatever bypasses torch.load's name, and
    for the worker processes of a checkpoint conversion."""
    real_load, forced = torch.load, os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return real_load(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise refused(f, e) from None

    torch.load = load
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_state_types()):
            yield
    finally:
        torch.load = real_load
        if forced is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = forced


class DeepSpeedEngine(Engine):
    """deepspeed.initialize with the trainable parameters only; DeepSpeed owns precision, clipping, accumulation."""

    def __init__(self, model, spec: OptimSpec, config: str | dict, precision, micro_batch: int):
        import deepspeed

        self.fp16 = precision.compute == torch.float16
        config = json.loads(Path(config).read_text()) if isinstance(config, (str, Path)) else config
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.config = fill_deepspeed_config(config, spec, micro_batch, self.fp16,
                                            precision.compute == torch.bfloat16, world, model.config.hidden_size)
        refuse_unskipped_non_finite_steps(self.config)
        schedule = lr_lambda(spec.schedule, spec.warmup_steps, spec.total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, spec.weight_decay), config=self.config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))

    @property
    def module(self):
        return self.engine.module

    def forward(self, batch):
        return self.engine(**batch)

    def backward(self, loss, boundary: bool):
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps and applies the loss scale

    def step(self, boundary: bool):
        """DeepSpeed counts micro-batches itself: its step runs after every one and acts at the boundary."""
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        if not boundary:
            return None
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        scale = getattr(self.engine.optimizer, "cur_scale", None) if self.fp16 else None
        return {"grad_norm": norm, "skipped": self.engine.skipped_steps > skipped_before, "loss_scale": scale}

    def weights_state_dict(self):
        """Under ZeRO-3 the weights are partitioned: gathered here (rank 0 gets the dict, the others None)."""
        if self.engine.zero_optimization_stage() == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return None

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path):
        # frozen base weights are not state: a LoRA checkpoint stays adapter-sized
        self.engine.save_checkpoint(str(directory), tag="deepspeed", save_latest=False,
                                    exclude_frozen_parameters=True)

    def load(self, directory: Path, restore):
        """DeepSpeed restores the module's trainable weights itself, with their fp32 master copy."""
        tag = "deepspeed"
        saved_world = json.loads((directory / "trainer_state.json").read_text()).get("world_size", 1)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if saved_world != world:
            # ZeRO partitions the optimizer state by rank; DeepSpeed's universal checkpoint re-partitions it
            tag = "deepspeed_universal"
            if int(os.environ.get("RANK", "0")) == 0 and not (directory / tag).is_dir():
                _to_universal(directory / "deepspeed", directory / tag)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
            self.engine._config.load_universal_checkpoint = True  # read by load_checkpoint at call time
        with weights_only_loads():
            self.engine.load_checkpoint(str(directory), tag=tag, load_module_strict=False,
                                        load_optimizer_states=True, load_lr_scheduler_states=True)


def _to_universal(src: Path, dst: Path):
    """DeepSpeed's ds_to_universal in a process of its own, its loads inside weights_only_loads."""
    cmd = [sys.executable, "-c", "from phift.engines.deepspeed import _universal_main; _universal_main()",
           "--input_folder", str(src), "--output_folder", str(dst), "--inject_missing_state",
           "--num_extract_workers", "1", "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = next((line for line in reversed(proc.stderr.splitlines()) if line.strip()), "no message")
        raise RuntimeError(f"converting {src} to a universal checkpoint failed: {last}")


def _universal_main():
    """The converting process: ds_to_universal's own main, its failure as its last line on stderr."""
    from deepspeed.checkpoint import ds_to_universal

    try:
        with weights_only_loads():
            ds_to_universal.main(ds_to_universal.parse_arguments())
    except Exception as e:  # noqa: BLE001 - a process's entry: the parent reports this line
        sys.exit(f"{type(e).__name__}: {e}")
