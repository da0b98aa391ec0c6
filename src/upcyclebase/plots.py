"""PNG plots of a training run: loss curves and a layers x 2H map of head usage."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(log_history: list[dict], path: str | Path) -> Path:
    """Plot the train LM loss and the held-out loss against the optimizer step.

    Reads the Trainer's ``log_history``: train entries carry ``lm_loss`` (or ``loss``),
    evaluation entries carry ``eval_loss``.
    """
    plt = _pyplot()
    train = [(entry["step"], entry.get("lm_loss", entry["loss"])) for entry in log_history if "loss" in entry]
    held_out = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]

    figure, axes = plt.subplots(figsize=(7, 4.5))
    if train:
        axes.plot(*zip(*train), marker=".", label="train (LM loss)")
    if held_out:
        axes.plot(*zip(*held_out), marker="o", label="held-out")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats per token)")
    axes.set_title("Loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def plot_head_usage(usage: np.ndarray, path: str | Path, title: str = "Head usage") -> Path:
    """Draw a heatmap of the share of tokens that selected each head: layers down, 2H heads across.

    Columns 0..H-1 are the original heads and H..2H-1 the extra bank; a white line separates them.
    """
    plt = _pyplot()
    layers, heads = usage.shape
    figure, axes = plt.subplots(figsize=(max(4.0, 0.6 * heads + 2), max(3.0, 0.3 * layers + 1.5)))
    image = axes.imshow(usage, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes.axvline(heads / 2 - 0.5, color="white", linewidth=2)
    axes.set_xticks(range(heads), [f"o{h}" if h < heads // 2 else f"x{h - heads // 2}" for h in range(heads)])
    axes.set_yticks(range(layers))
    axes.set_xlabel("head (o: original, x: extra)")
    axes.set_ylabel("layer")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="share of tokens")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)
