"""training_loss.png from trainer_log.jsonl: the raw curve and a smoothed one, as LLaMA-Factory draws it;
training_metrics.png, one panel a metric, for the rm, dpo and orpo stages' rewards, accuracies, log-probs and logits;
and `phift estimate --plot`'s picture of where a run's memory goes."""
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


def plot_memory(path, title: str,
                panels: dict[str, tuple[float, str, list[tuple[str, list[tuple[str, float]]]]]]) -> Path:
    """Stacked horizontal bars of GiB, a panel per memory (GPU, host): panels[name] = (capacity GiB, its label,
    [(bar label, [(part, GiB), ...]), ...]), the capacity a dashed line. A part keeps its colour in every bar."""
    plt = _pyplot()
    parts = list(dict.fromkeys(part for _, _, bars in panels.values() for _, segs in bars for part, _ in segs))
    cmap = plt.get_cmap("tab20")
    palette = [cmap(i) for i in range(20) if i not in (6, 7)]  # tab20 without its reds: red is the capacity line
    colour = {part: palette[i % len(palette)] for i, part in enumerate(p for p in parts if p != "other")}
    colour["other"] = "#bbbbbb"
    heights = [len(bars) for _, _, bars in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 1.2 + 1.1 * sum(heights) + 0.6 * len(panels)),
                             squeeze=False, gridspec_kw={"height_ratios": heights})
    for ax, (name, (capacity, capacity_label, bars)) in zip(axes[:, 0], panels.items()):
        for y, (label, segs) in enumerate(reversed(bars)):
            left = 0.0
            for part, gib in segs:
                ax.barh(y, gib, left=left, color=colour[part], edgecolor="white", linewidth=0.5)
                left += gib
            ax.text(left, y, f" {left:.2f} GiB", va="center", fontsize=9)
        ax.set_yticks(range(len(bars)), [label for label, _ in reversed(bars)], fontsize=9)
        ax.axvline(capacity, color="#d62728", linestyle="--")
        ax.text(capacity, len(bars) - 0.45, f" {capacity_label}", color="#d62728", fontsize=9, va="bottom")
        most = max([capacity] + [sum(g for _, g in segs) for _, segs in bars])
        ax.set_xlim(0, most * 1.18)
        ax.set_ylim(-0.6, len(bars) - 0.1)
        ax.set_title(name, fontsize=10, loc="left")
        ax.set_xlabel("GiB")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[p]) for p in parts]
    fig.legend(handles, parts, loc="center left", bbox_to_anchor=(0.64, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.64, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path
