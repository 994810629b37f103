"""Figures written next to training and comparison results (matplotlib, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_history(log_history: list[dict], tokens_per_step: int) -> dict[str, list[tuple[float, float]]]:
    """Training and validation loss as `(tokens, loss)` points from `Trainer.state.log_history`."""
    curves: dict[str, list[tuple[float, float]]] = {"train": [], "validation": []}
    for entry in log_history:
        step = entry.get("step", 0)
        if "loss" in entry:
            curves["train"].append((step * tokens_per_step, entry["loss"]))
        if "eval_loss" in entry:
            curves["validation"].append((step * tokens_per_step, entry["eval_loss"]))
    return curves


def plot_loss_curve(log_history: list[dict], tokens_per_step: int, path: str, title: str | None = None) -> str:
    """Training and validation loss against tokens seen, saved as a PNG."""
    curves = loss_history(log_history, tokens_per_step)
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for label, points in curves.items():
        if points:
            tokens, losses = zip(*points)
            axis.plot(tokens, losses, marker="o" if label == "validation" else None, markersize=3, label=label)
    axis.set_xlabel("training tokens")
    axis.set_ylabel("cross-entropy (nats/token)")
    axis.set_title(title or "loss")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
