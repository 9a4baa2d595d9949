"""Experiment tracking, `--report_to tensorboard|wandb`: the scalars of trainer_log.jsonl, under the names the HF
Trainer gives them (train/loss, train/learning_rate, train/grad_norm, ..., eval/loss), at their step.

TensorBoard writes event files to output_dir/runs (`tensorboard --logdir output_dir/runs`); Weights & Biases logs to
the project in WANDB_PROJECT (default "phift"), and with WANDB_MODE=offline to output_dir/wandb, no network needed
(`wandb sync` uploads it later).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

STEP_KEYS = ("current_steps", "total_steps")


def scalars(entry: dict) -> dict[str, float]:
    """A trainer_log.jsonl entry as tracker scalars: eval_x → eval/x, the rest → train/x."""
    out = {}
    for k, v in entry.items():
        if k in STEP_KEYS or not isinstance(v, (int, float)):
            continue
        out[f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"] = float(v)
    return out


class Tracker:
    def __init__(self, report_to: str, output_dir: Path, config: dict):
        self.kind, self.writer, self.run = report_to, None, None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(f"--report_to tensorboard needs the tensorboard package ({e.name} is missing): "
                                  "pip install 'phift[tensorboard]'") from None
            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "runs"))
            self.writer.add_text("config", json.dumps(config, indent=2, default=str))
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise ImportError("--report_to wandb needs the wandb package: pip install 'phift[wandb]'") from None
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "phift"), dir=str(output_dir),
                                  name=Path(output_dir).name, config=config)
        elif report_to != "none":
            raise ValueError(f"--report_to must be none, tensorboard or wandb, got {report_to!r}")

    def log(self, entry: dict):
        step = entry["current_steps"]
        if self.writer is not None:
            for name, value in scalars(entry).items():
                self.writer.add_scalar(name, value, step)
        if self.run is not None:
            self.run.log(scalars(entry), step=step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()
