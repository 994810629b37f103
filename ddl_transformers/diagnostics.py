"""Gate audit: how a DDL model uses its gate `beta = 2 sigmoid(g(c))`, per layer and sublayer, on a text sample.

For every residual rewrite `X_next = X + beta * k (v^T - k^T X)` (DESIGN.md, section 2) the audit records, over all
token positions of the sample:

* the distribution of `beta`: quantiles (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99), mean, std, min, max and a histogram
  of 40 equal bins over `[0, 2]`;
* the share of positions in each regime. The four regimes are disjoint bins that cover every `beta`, so their shares
  sum to 1:

  - `skip`:         `beta < 0.1`               (the update is close to the identity);
  - `partial`:      `0.1 <= beta < 0.9`        (moves the reading part of the way to the target);
  - `match`:        `0.9 <= beta <= 1.1`       (target-match: `|beta - 1| <= 0.1`, the reading lands on `v`);
  - `over_relaxed`: `beta > 1.1`               (the reading crosses the target; `beta = 2` is a reflection).

  The share of `beta > 1` (over-relaxation in the strict sense, overlapping `match` on `(1, 1.1]`) is reported
  separately as `share_beta_gt_1`;
* the mean reading error `|k^T X - v|` over positions and value channels, before the update (`X` entering the
  sublayer) and after it (`X_next`, with the same `k` and `v`). For the delta rule `e_after = (1 - beta) e_before`
  per position, so at `beta = 1` the after-error is 0; for the write-only control the after-error is still the
  distance of the new reading from the target, and is reported too;
* the mean Frobenius norm per position of the state entering and leaving the sublayer (the state is `(B, T, d)` or
  `(B, T, d, d_v)`), and across depth: entering each layer and after the last one.

The text is tokenized as one stream (an end-of-text token first and after each document), cut after `max_tokens`
tokens, and fed in windows of the model's context length without padding, so every position is a real token.

The residual modules are found by duck typing (modules with `gate`, `target` and `residual_mode` attributes, named
`...layers.N.<sublayer>_residual`) and observed with forward hooks, so the audit works on a model loaded with
`trust_remote_code` and this file imports only torch, numpy, matplotlib and the standard library. A model whose
residuals are all `additive` (the baseline) has no gate: the audit then says so (`has_gate: false` and a `message`)
and reports only the state norms; its heatmap is a placeholder image that carries the message.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

SKIP_BELOW = 0.1
MATCH_TOLERANCE = 0.1
REGIMES = ("skip", "partial", "match", "over_relaxed")
REGIME_LABELS = {
    "skip": "skip\nβ < 0.1",
    "partial": "partial\n0.1 ≤ β < 0.9",
    "match": "match\n|β − 1| ≤ 0.1",
    "over_relaxed": "over-relaxed\nβ > 1.1",
}
QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
HISTOGRAM_BINS = 40
HISTOGRAM_RANGE = (0.0, 2.0)
NO_GATE_MESSAGE = (
    "This model's residuals are additive (x + F(c), the baseline): there is no gate to audit. "
    "Only the state norm across depth is reported."
)
_SUBLAYER_NAME = re.compile(r"(?:^|\.)(\d+)\.([A-Za-z0-9_]+)$")
_SUBLAYER_ORDER = {"attn": 0, "mlp": 1}


def thresholds() -> dict[str, Any]:
    """The regime definitions, histogram and quantiles used by the audit (stored in its JSON)."""
    low, high = 1.0 - MATCH_TOLERANCE, 1.0 + MATCH_TOLERANCE
    return {
        "regimes": {
            "skip": f"beta < {SKIP_BELOW:g}",
            "partial": f"{SKIP_BELOW:g} <= beta < {low:g}",
            "match": f"{low:g} <= beta <= {high:g} (|beta - 1| <= {MATCH_TOLERANCE:g})",
            "over_relaxed": f"beta > {high:g}",
        },
        "disjoint": True,
        "note": "The four regimes are disjoint and cover (0, 2), so their shares sum to 1; share_beta_gt_1 is the "
        "share of beta > 1 and overlaps match on (1, 1.1].",
        "skip_below": SKIP_BELOW,
        "match_tolerance": MATCH_TOLERANCE,
        "quantiles": list(QUANTILES),
        "histogram": {"bins": HISTOGRAM_BINS, "range": list(HISTOGRAM_RANGE)},
        "reading_error": "mean over positions and value channels of |k^T X - v|, with "
        "k = h / sqrt(||h||^2 + eps^2); before: X entering the sublayer, after: the updated state",
        "state_norm": "mean over positions of the Frobenius norm of the state (d or d x d_v entries)",
    }


def regime_shares(beta: np.ndarray) -> dict[str, float]:
    """The share of `beta` values in each disjoint regime, plus `share_beta_gt_1`."""
    beta = np.asarray(beta, dtype=np.float64).ravel()
    if beta.size == 0:
        raise ValueError("No gate values to classify.")
    low, high = 1.0 - MATCH_TOLERANCE, 1.0 + MATCH_TOLERANCE
    masks = {
        "skip": beta < SKIP_BELOW,
        "partial": (beta >= SKIP_BELOW) & (beta < low),
        "match": (beta >= low) & (beta <= high),
        "over_relaxed": beta > high,
    }
    shares = {name: float(mask.mean()) for name, mask in masks.items()}
    shares["share_beta_gt_1"] = float((beta > 1.0).mean())
    return shares


def find_residual_modules(model: nn.Module) -> list[tuple[str, int, str, nn.Module]]:
    """`(name, layer, sublayer, module)` of every DDL residual (duck-typed), in depth order."""
    found = []
    for name, module in model.named_modules():
        if not all(hasattr(module, attr) for attr in ("gate", "target", "residual_mode")):
            continue
        match = _SUBLAYER_NAME.search(name)
        if match is None:
            layer, sublayer = len(found), name.rsplit(".", 1)[-1]
        else:
            layer, sublayer = int(match.group(1)), match.group(2)
        sublayer = sublayer.removesuffix("_residual")
        found.append((name, layer, sublayer, module))
    order = {name: i for i, (name, *_) in enumerate(found)}
    found.sort(key=lambda item: (item[1], _SUBLAYER_ORDER.get(item[2], 2), order[item[0]]))
    return found


def _unit_direction(h: torch.Tensor, eps: float) -> torch.Tensor:
    """`k = h / sqrt(||h||^2 + eps^2)` in float32 (DESIGN.md, section 2)."""
    h = h.float()
    return h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + eps * eps)


def _state_norms(state: torch.Tensor, positions_dims: int) -> torch.Tensor:
    """Frobenius norm per position of a `(B, T, d)` or `(B, T, d, d_v)` state, shape `(B, T)`."""
    return state.float().flatten(positions_dims).norm(dim=-1)


class _Accumulator:
    """Running sums of one residual module's statistics."""

    def __init__(self) -> None:
        self.betas: list[torch.Tensor] = []
        self.positions = 0
        self.channels = 0
        self.error_before = 0.0
        self.error_after = 0.0
        self.reading = 0.0
        self.target = 0.0
        self.norm_before = 0.0
        self.norm_after = 0.0


def _hook(record: _Accumulator, has_gate: bool) -> Callable[..., None]:
    def observe(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        values = list(args) + [kwargs[key] for key in ("state", "sublayer_output", "context")[len(args) :]]
        state, sublayer_output, context = values[:3]
        lead = sublayer_output.dim() - 1  # the position axes (B, T)
        record.positions += sublayer_output.shape[:-1].numel()
        record.norm_before += _state_norms(state, lead).double().sum().item()
        record.norm_after += _state_norms(output, lead).double().sum().item()
        if not has_gate:
            return
        beta = module.gate(context).float()
        target = module.target(context).float()  # (..., d_v)
        k = _unit_direction(sublayer_output, float(module.eps))  # (..., d)
        before = state.float() if state.dim() > k.dim() else state.float().unsqueeze(-1)
        after = output.float() if output.dim() > k.dim() else output.float().unsqueeze(-1)
        read_before = torch.einsum("...d,...dv->...v", k, before)
        read_after = torch.einsum("...d,...dv->...v", k, after)
        record.betas.append(beta.reshape(-1).detach().cpu())
        record.channels += target.numel()
        record.error_before += (read_before - target).abs().double().sum().item()
        record.error_after += (read_after - target).abs().double().sum().item()
        record.reading += read_before.abs().double().sum().item()
        record.target += target.abs().double().sum().item()

    return observe


def _context_length(model: nn.Module, tokenizer: Any) -> int:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < 1e29:
        return int(limit)
    return 2048


def _token_stream(tokenizer: Any, documents: list[str], max_tokens: int) -> list[int]:
    """End-of-text, then each document's tokens followed by end-of-text, cut after `max_tokens` tokens."""
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    stream: list[int] = [] if separator is None else [separator]
    content = 0
    for start in range(0, len(documents), 256):
        encoded = tokenizer(list(documents[start : start + 256]), add_special_tokens=False)["input_ids"]
        for ids in encoded:
            stream.extend(ids)
            content += len(ids)
            if separator is not None:
                stream.append(separator)
        if len(stream) >= max_tokens:
            break
    if content == 0:
        raise ValueError(f"The text sample is empty ({len(documents)} document(s), no tokens); give a non-empty text.")
    return stream[:max_tokens]


def _summary(record: _Accumulator, has_gate: bool) -> dict[str, Any]:
    positions = max(record.positions, 1)
    stats: dict[str, Any] = {
        "positions": record.positions,
        "state_norm_before": record.norm_before / positions,
        "state_norm_after": record.norm_after / positions,
    }
    if not has_gate:
        return stats
    beta = torch.cat(record.betas).double().numpy()
    channels = max(record.channels, 1)
    counts, edges = np.histogram(beta, bins=HISTOGRAM_BINS, range=HISTOGRAM_RANGE)
    stats.update(
        {
            "beta_mean": float(beta.mean()),
            "beta_std": float(beta.std()),
            "beta_min": float(beta.min()),
            "beta_max": float(beta.max()),
            "beta_quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(beta, QUANTILES))},
            "beta_histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
            "regimes": regime_shares(beta),
            "reading_error_before": record.error_before / channels,
            "reading_error_after": record.error_after / channels,
            "mean_abs_reading": record.reading / channels,
            "mean_abs_target": record.target / channels,
        }
    )
    return stats


def _percent(share: float) -> str:
    return f"{100 * share:.1f}%"


def summary_markdown(audit: dict[str, Any]) -> str:
    """A short markdown paragraph and table of an audit, for model cards."""
    info = audit["model"]
    source = f" of {audit['source']}" if audit.get("source") else ""
    head = f"**Gate audit** ({audit['tokens']:,} tokens{source}, {info['residual_mode']} residuals)."
    depth = ", ".join(f"{value:.2f}" for value in audit["state_norm_across_depth"])
    if not audit["has_gate"]:
        return f"{head} {audit['message']}\n\nState norm entering each layer, then after the last: {depth}."
    overall = audit["overall"]["regimes"]
    lines = [
        f"{head} Regimes of β = 2σ(g(c)): skip β < {SKIP_BELOW:g}, partial, target-match |β − 1| ≤ "
        f"{MATCH_TOLERANCE:g}, over-relaxed β > {1 + MATCH_TOLERANCE:g} (disjoint). Over all sublayers: "
        + ", ".join(f"{name.replace('_', '-')} {_percent(overall[name])}" for name in REGIMES)
        + f"; β > 1: {_percent(overall['share_beta_gt_1'])}.",
        "",
        "| Layer | Sublayer | β median [p10, p90] | skip | partial | match | over-relaxed | β > 1 "
        "| reading error before → after | state norm in |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in audit["sublayers"]:
        if "regimes" not in row:
            continue
        q, shares = row["beta_quantiles"], row["regimes"]
        lines.append(
            f"| {row['layer']} | {row['sublayer']} | {q['0.5']:.3f} [{q['0.1']:.3f}, {q['0.9']:.3f}] | "
            + " | ".join(_percent(shares[name]) for name in (*REGIMES, "share_beta_gt_1"))
            + f" | {row['reading_error_before']:.3f} → {row['reading_error_after']:.3f} | "
            f"{row['state_norm_before']:.2f} |"
        )
    lines += ["", f"State norm entering each layer, then after the last: {depth}."]
    return "\n".join(lines)


def audit_gates(
    model: nn.Module,
    tokenizer: Any,
    documents: list[str],
    max_tokens: int = 4096,
    window: int | None = None,
    batch_size: int = 4,
    source: str | None = None,
) -> dict[str, Any]:
    """Audit the gates of `model` on the first `max_tokens` tokens of `documents` (a JSON-serialisable dict).

    `window` is the number of tokens per forward pass (default: the model's context length, at most `max_tokens`);
    `batch_size` windows of equal length run together (the sample is cut into windows, never padded). `source`
    names the text sample in the summary. See the module docstring for what is measured.
    """
    if max_tokens < 1 or batch_size < 1 or (window is not None and window < 1):
        raise ValueError(
            f"max_tokens, window and batch_size must be positive (got {max_tokens}, {window}, {batch_size})."
        )
    modules = find_residual_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no DDL residual modules (modules with `gate`, `target` and "
            "`residual_mode`); the gate audit applies to DDL models."
        )
    stream = _token_stream(tokenizer, list(documents), max_tokens)
    window = min(window or _context_length(model, tokenizer), len(stream))
    modes = sorted({str(module.residual_mode) for *_, module in modules})
    has_gate = any(module.residual_mode != "additive" for *_, module in modules)

    records = [_Accumulator() for _ in modules]
    handles = [
        module.register_forward_hook(_hook(record, module.residual_mode != "additive"), with_kwargs=True)
        for (*_, module), record in zip(modules, records)
    ]
    chunks = [stream[i : i + window] for i in range(0, len(stream), window)]
    full = chunks if len(chunks[-1]) == window else chunks[:-1]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    if len(full) < len(chunks):
        batches.append(chunks[-1:])  # the short last window runs alone: no padding
    runner = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                runner(input_ids=torch.tensor(batch, dtype=torch.long, device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    sublayers = []
    for (name, layer, sublayer, module), record in zip(modules, records):
        gated = module.residual_mode != "additive"
        row = {"module": name, "layer": layer, "sublayer": sublayer, "residual_mode": str(module.residual_mode)}
        sublayers.append({**row, "has_gate": gated, **_summary(record, gated)})
    entering: dict[int, float] = {}
    for row in sublayers:  # depth order: the first sublayer of each layer sees the state entering it
        entering.setdefault(row["layer"], row["state_norm_before"])
    depth = [*entering.values(), sublayers[-1]["state_norm_after"]]

    config = getattr(model, "config", None)
    audit: dict[str, Any] = {
        "has_gate": has_gate,
        "model": {
            "class": type(model).__name__,
            "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
            "model_type": getattr(config, "model_type", None),
            "residual_mode": "/".join(modes),
            "value_channels": getattr(config, "value_channels", None),
            "state_compressor": getattr(config, "state_compressor", None),
            "num_layers": len({row["layer"] for row in sublayers}),
            "num_sublayers": len(sublayers),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        },
        "source": source,
        "tokens": len(stream),
        "windows": len(chunks),
        "window": window,
        "thresholds": thresholds(),
        "state_norm_across_depth": depth,
        "sublayers": sublayers,
    }
    if has_gate:
        gated_rows = [row for row in sublayers if row["has_gate"]]
        all_betas = torch.cat([torch.cat(r.betas) for r, row in zip(records, sublayers) if row["has_gate"]])
        audit["overall"] = {
            "beta_mean": float(all_betas.double().mean()),
            "regimes": regime_shares(all_betas.double().numpy()),
            "reading_error_before": float(np.mean([row["reading_error_before"] for row in gated_rows])),
            "reading_error_after": float(np.mean([row["reading_error_after"] for row in gated_rows])),
        }
    else:
        audit["message"] = NO_GATE_MESSAGE
    audit["summary_markdown"] = summary_markdown(audit)
    return audit


def plot_gate_heatmap(audit: dict[str, Any], path: str) -> str:
    """Save the heatmap of regime shares (rows: layer and sublayer; columns: regimes) as a PNG and return `path`.

    For a model without a gate the PNG is a placeholder that shows the audit's message."""
    from matplotlib.figure import Figure

    if not audit["has_gate"]:
        figure = Figure(figsize=(6.4, 2.0))
        figure.text(0.5, 0.5, "Gate audit: no gate\n" + audit["message"], ha="center", va="center", wrap=True)
        figure.savefig(path, dpi=120)
        return path
    rows = [row for row in audit["sublayers"] if row["has_gate"]]
    shares = np.array([[row["regimes"][name] for name in REGIMES] for row in rows])
    labels = [f"L{row['layer']} {row['sublayer']}" for row in rows]
    figure = Figure(figsize=(6.4, 1.6 + 0.32 * len(rows)))
    axis = figure.add_subplot()
    image = axis.imshow(shares, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i, j in np.ndindex(shares.shape):
        axis.text(
            j, i, f"{shares[i, j]:.2f}", ha="center", va="center", fontsize=8,
            color="black" if shares[i, j] > 0.6 else "white",
        )  # fmt: skip
    axis.set_xticks(range(len(REGIMES)), [REGIME_LABELS[name] for name in REGIMES], fontsize=8)
    axis.set_yticks(range(len(rows)), labels, fontsize=8)
    axis.xaxis.tick_top()
    source = f" on {audit['source']}" if audit.get("source") else ""
    axis.set_title(f"Share of positions per gate regime ({audit['tokens']:,} tokens{source})", fontsize=9, pad=6)
    figure.colorbar(image, ax=axis, fraction=0.04, pad=0.02, label="share")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def write_audit(audit: dict[str, Any], output_dir: str) -> dict[str, str]:
    """Write `gate_audit.json` and `gate_audit.png` into `output_dir`; return their paths (`json`, `png`)."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {"json": os.path.join(output_dir, "gate_audit.json"), "png": os.path.join(output_dir, "gate_audit.png")}
    with open(paths["json"], "w", encoding="utf-8") as handle:
        json.dump(audit, handle, indent=2)
        handle.write("\n")
    plot_gate_heatmap(audit, paths["png"])
    return paths


__all__ = [
    "MATCH_TOLERANCE",
    "QUANTILES",
    "REGIMES",
    "SKIP_BELOW",
    "audit_gates",
    "find_residual_modules",
    "plot_gate_heatmap",
    "regime_shares",
    "summary_markdown",
    "thresholds",
    "write_audit",
]
