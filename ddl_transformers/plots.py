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


def plot_comparison_losses(runs: list[dict], path: str) -> str:
    """Validation loss against tokens, one line per variant (mean over seeds), seeds shaded (min to max)."""
    by_preset: dict[str, list[list[tuple[float, float]]]] = {}
    for run in runs:
        if run.get("validation_curve"):
            by_preset.setdefault(run["preset"], []).append(run["validation_curve"])
    figure, axis = plt.subplots(figsize=(7.0, 4.4))
    for preset, curves in by_preset.items():
        length = min(len(curve) for curve in curves)
        tokens = [curves[0][i][0] for i in range(length)]
        losses = [[curve[i][1] for curve in curves] for i in range(length)]
        means = [sum(values) / len(values) for values in losses]
        (line,) = axis.plot(tokens, means, marker="o", markersize=3, label=f"{preset} (n={len(curves)})")
        if len(curves) > 1:
            axis.fill_between(
                tokens, [min(v) for v in losses], [max(v) for v in losses], color=line.get_color(), alpha=0.2
            )
    axis.set_xlabel("training tokens")
    axis.set_ylabel("validation loss (nats/token)")
    axis.set_title("validation loss (line: mean over seeds, band: min-max)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_perplexity_bars(rows: list[dict], references: list[dict], benchmark: str, path: str) -> str:
    """Word perplexity per variant on one benchmark: bars at the mean, error bars one std over seeds."""
    labels, means, errors, hatches = [], [], [], []
    for row in rows:
        entry = row["benchmarks"][benchmark]
        labels.append(row["preset"])
        means.append(entry["word_perplexity_mean"])
        errors.append(entry["word_perplexity_std"] or 0.0)
        hatches.append("")
    for reference in references:
        labels.append(reference["preset"].replace("reference: ", "ref: "))
        means.append(reference["evaluations"][benchmark]["word_perplexity"])
        errors.append(0.0)
        hatches.append("//")
    figure, axis = plt.subplots(figsize=(max(5.0, 1.1 * len(labels)), 4.2))
    bars = axis.bar(range(len(labels)), means, yerr=errors, capsize=4, color="#4c72b0", edgecolor="black")
    for bar, hatch in zip(bars, hatches):
        bar.set_hatch(hatch)
    for index, mean in enumerate(means):
        axis.annotate(
            f"{mean:.1f}",
            (index, mean),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 3),
            textcoords="offset points",
        )
    axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    low = min(m - e for m, e in zip(means, errors))
    high = max(m + e for m, e in zip(means, errors))
    axis.set_ylim(max(0.0, low - 0.15 * (high - low + 1e-9)), high + 0.15 * (high - low + 1e-9))
    axis.set_ylabel(f"word perplexity, {benchmark}")
    axis.set_title("word perplexity (error bars: std over seeds)")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
