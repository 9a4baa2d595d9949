"""training_loss.png from trainer_log.jsonl: the raw curve and a smoothed one, as LLaMA-Factory draws it; and
training_metrics.png, one panel a metric, for the rm, dpo and orpo stages' rewards, accuracies, log-probs and logits."""
from __future__ import annotations

import json
import math
from pathlib import Path


def smooth(values: list[float]) -> list[float]:
    """Exponential moving average whose weight grows with the curve's length (short curves stay close to raw)."""
    if not values:
        return []
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0]
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line.strip()]


def plot_loss(output_dir, keys=("loss", "eval_loss")) -> list[Path]:
    plt = _pyplot()
    out = Path(output_dir)
    log = _log(out)
    written = []
    for key in keys:
        points = [(e["current_steps"], e[key]) for e in log if key in e]
        if not points:
            continue
        steps, values = zip(*points)
        plt.figure()
        plt.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
        plt.plot(steps, smooth(list(values)), color="#1f77b4", label="smoothed")
        plt.title(f"training {key} of {out}")
        plt.xlabel("step")
        plt.ylabel(key)
        plt.legend()
        path = out / ("training_loss.png" if key == "loss" else f"training_{key}.png")
        plt.savefig(path, format="png", dpi=100)
        plt.close()
        written.append(path)
    return written


def plot_metrics(output_dir, keys) -> Path | None:
    """training_metrics.png: a panel for each of `keys` that trainer_log.jsonl holds (raw and smoothed), or None."""
    out = Path(output_dir)
    log = _log(out)
    series = {k: [(e["current_steps"], e[k]) for e in log if k in e] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    plt = _pyplot()
    cols = min(4, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (key, points) in zip(axes.flat, series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, color="#1f77b4", alpha=0.4)
        ax.plot(steps, smooth(list(values)), color="#1f77b4")
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.suptitle(f"training metrics of {out}")
    fig.tight_layout()
    path = out / "training_metrics.png"
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path
