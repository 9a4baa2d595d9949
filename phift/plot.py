"""training_loss.png from trainer_log.jsonl: the raw curve and a smoothed one, as LLaMA-Factory draws it."""
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


def plot_loss(output_dir, keys=("loss", "eval_loss")) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(output_dir)
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
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
