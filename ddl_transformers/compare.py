"""Side-by-side study: train presets x seeds at an equal token budget, evaluate them on the same benchmarks, and
report mean +- std over seeds, the difference to the additive baseline with its standard error, a table and plots.

`run_comparison(CompareArguments(...))` is what `scripts/compare.py` calls.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers

from .data import corpus_documents, load_corpus, train_tokenizer
from .diagnostics import audit_gates, write_audit
from .evaluation import load_causal_lm, resolve_benchmark
from .hub import write_model_card
from .plots import plot_comparison_losses, plot_perplexity_bars
from .presets import PRESETS, preset_config
from .training import (
    DataArguments,
    DDLTrainingArguments,
    ModelArguments,
    describe_hardware,
    parse_config_overrides,
    run_training,
    score_with_block_windows,
)

BASELINE = "baseline"
ARCHITECTURE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "residual_mode",
    "value_channels",
    "state_compressor",
    "embedding_expansion",
    "state_conv_kernel_size",
    "embedding_conv_kernel_size",
    "beta_init",
    "beta_hidden_size",
    "value_activation",
    "use_qk_norm",
)


@dataclass
class CompareArguments:
    """What to train, on how many tokens, and what to evaluate on."""

    presets: str = field(default="baseline,ddl-scalar,ddl-cc", metadata={"help": "Comma-separated presets."})
    seeds: str = field(default="0", metadata={"help": "Comma-separated seeds (same data order per seed)."})
    size: str = field(default="tiny", metadata={"help": "Preset size: tiny, small or medium."})
    config_overrides: str | None = field(default=None, metadata={"help": "DDLConfig overrides for every preset."})
    dataset_name: str = field(default="ptb", metadata={"help": "Training corpus (built-in or Hub)."})
    benchmark: list[str] = field(
        default_factory=list, metadata={"help": "Benchmarks to evaluate (repeatable); default DATASET:test."}
    )
    reference_model: list[str] = field(
        default_factory=list,
        metadata={"help": "Extra rows: trained folders, Hub ids or .gguf files, evaluated on the same benchmarks."},
    )
    output_dir: str = field(default="outputs/compare", metadata={"help": "Results folder (one subfolder per run)."})
    vocab_size: int = field(default=8192, metadata={"help": "Vocabulary of the shared tokenizer."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence (and evaluation window)."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Sequences per step."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps per run (or --train_tokens)."})
    train_tokens: int | None = field(default=None, metadata={"help": "Token budget per run (sets max_steps)."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate (cosine schedule)."})
    warmup_steps: int = field(default=30, metadata={"help": "Linear warm-up steps."})
    eval_points: int = field(default=8, metadata={"help": "Validation evaluations during each run (loss curves)."})
    eval_blocks: int | None = field(default=64, metadata={"help": "Validation blocks per evaluation during training."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation rows."})
    eval_batch_size: int = field(default=16, metadata={"help": "Windows per evaluation batch."})
    reuse_finished_runs: bool = field(default=True, metadata={"help": "Keep finished runs found in output_dir."})
    retain_freed_cpu_memory: bool = field(
        default=True,
        metadata={"help": "Training on the CPU, keep freed memory in the process (as scripts/train.py; see README)."},
    )
    audit_tokens: int = field(
        default=4096, metadata={"help": "Validation tokens for the gate audit of each variant's first seed (0: none)."}
    )

    def __post_init__(self):
        self.preset_list = [name.strip() for name in self.presets.split(",") if name.strip()]
        unknown = [name for name in self.preset_list if name not in PRESETS]
        if unknown or not self.preset_list:
            raise ValueError(f"--presets: unknown {unknown or 'empty list'}; valid presets are {', '.join(PRESETS)}.")
        try:
            self.seed_list = [int(seed) for seed in self.seeds.split(",") if seed.strip()]
        except ValueError as error:
            raise ValueError(f"--seeds {self.seeds!r}: expected comma-separated integers, e.g. 0,1,2.") from error
        if not self.seed_list:
            raise ValueError("--seeds: give at least one seed.")
        tokens_per_step = self.per_device_train_batch_size * self.block_size
        if self.train_tokens is not None:
            self.max_steps = max(1, math.ceil(self.train_tokens / tokens_per_step))
        if self.max_steps is None:
            self.max_steps = 200
        if not self.benchmark:
            self.benchmark = [f"{self.dataset_name}:test"]
        preset_config(self.preset_list[0], self.size, **parse_config_overrides(self.config_overrides))


def run_dir(args: CompareArguments, preset: str, seed: int) -> Path:
    return Path(args.output_dir) / "runs" / f"{preset}-seed{seed}"


def train_one(args: CompareArguments, preset: str, seed: int, tokenizer_dir: str) -> dict[str, Any]:
    """Train one preset with one seed (or reuse the finished run) and return its metrics and loss history."""
    folder = run_dir(args, preset, seed)
    finished = (folder / "train_results.json").is_file() and (folder / "model.safetensors").is_file()
    if finished and args.reuse_finished_runs:
        check_reusable(folder, args, preset, seed)
    else:
        model_args = ModelArguments(
            preset=preset, size=args.size, config_overrides=args.config_overrides, tokenizer_name_or_path=tokenizer_dir
        )
        data_args = DataArguments(
            dataset_name=args.dataset_name,
            block_size=args.block_size,
            max_train_samples=args.max_train_samples,
            max_eval_samples=args.max_eval_samples,
            eval_blocks=args.eval_blocks,
            sample_tokens=0,
        )
        training_args = DDLTrainingArguments(
            output_dir=str(folder),
            seed=seed,
            data_seed=seed,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.per_device_train_batch_size,
            learning_rate=args.learning_rate,
            warmup_steps=min(args.warmup_steps, args.max_steps // 5),
            eval_steps=max(1, args.max_steps // args.eval_points),
            logging_steps=max(1, args.max_steps // (4 * args.eval_points)),
            disable_tqdm=True,
            report_to="none",
            retain_freed_cpu_memory=args.retain_freed_cpu_memory,
        )
        run_training(model_args, data_args, training_args)
    return load_run(folder, preset, seed)


def check_reusable(folder: Path, args: CompareArguments, preset: str, seed: int) -> None:
    """A finished run is reused only if it was trained with this study's settings."""
    record = json.loads((folder / "training_record.json").read_text())
    expected = {
        "preset": preset,
        "size": args.size,
        "seed": seed,
        "max_steps": args.max_steps,
        "block_size": args.block_size,
        "tokens_per_step": args.per_device_train_batch_size * args.block_size,
        "dataset": args.dataset_name,
    }
    different = {key: (record.get(key), value) for key, value in expected.items() if record.get(key) != value}
    saved_config = json.loads((folder / "config.json").read_text())
    wanted_config = preset_config(preset, args.size, **parse_config_overrides(args.config_overrides)).to_dict()
    for key in ARCHITECTURE_KEYS:
        if saved_config.get(key) != wanted_config.get(key):
            different[key] = (saved_config.get(key), wanted_config.get(key))
    if different:
        details = ", ".join(
            f"{key}: found {found!r}, study wants {wanted!r}" for key, (found, wanted) in different.items()
        )
        raise ValueError(
            f"{folder} holds a finished run with other settings ({details}). Use another --output_dir, or "
            "--reuse_finished_runs false to train it again (the old run is then overwritten)."
        )


def load_run(folder: Path, preset: str, seed: int) -> dict[str, Any]:
    """The metrics of a finished run folder."""
    train = json.loads((folder / "train_results.json").read_text())
    record = json.loads((folder / "training_record.json").read_text())
    evaluation = json.loads((folder / "evaluation.json").read_text())["results"]
    state = (
        json.loads((folder / "trainer_state.json").read_text()) if (folder / "trainer_state.json").is_file() else {}
    )
    history = state.get("log_history", [])
    return {
        "preset": preset,
        "seed": seed,
        "folder": str(folder),
        "parameters": train["parameters"],
        "train_tokens": train["train_tokens"],
        "train_tokens_per_second": train["train_tokens_per_second"],
        "tokens_per_step": record["tokens_per_step"],
        "validation_curve": [
            (entry["step"] * record["tokens_per_step"], entry["eval_loss"])
            for entry in history
            if "eval_loss" in entry
        ],
        "evaluations": {r["benchmark"]: r for r in evaluation},
    }


def evaluate_run(run: dict[str, Any], benchmarks: dict[str, list[str]], args: CompareArguments) -> None:
    """Add the benchmarks the training did not already score (same windows: block_size, stride block_size/2)."""
    missing = [name for name in benchmarks if name not in run["evaluations"]]
    if not missing:
        return
    model, tokenizer = load_causal_lm(run["folder"])
    for name in missing:
        run["evaluations"][name] = score_with_block_windows(
            model, tokenizer, benchmarks[name], args.block_size, args.eval_batch_size
        )


def audit_run(run: dict[str, Any], documents: list[str], args: CompareArguments) -> None:
    """Gate audit of a trained run on validation text, written into its folder (and so into its model card)."""
    folder = Path(run["folder"])
    if args.audit_tokens <= 0 or (folder / "gate_audit.json").is_file():
        return
    model, tokenizer = load_causal_lm(str(folder))
    audit = audit_gates(
        model, tokenizer, documents, max_tokens=args.audit_tokens, source=f"{args.dataset_name}:validation"
    )
    write_audit(audit, str(folder))


def evaluate_reference(spec: str, benchmarks: dict[str, list[str]], args: CompareArguments) -> dict[str, Any]:
    """An extra row: any causal LM (folder, Hub id, .gguf) on the same benchmarks and windows."""
    model, tokenizer = load_causal_lm(spec)
    return {
        "preset": f"reference: {Path(spec).name or spec}",
        "source": spec,
        "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "evaluations": {
            name: score_with_block_windows(model, tokenizer, documents, args.block_size, args.eval_batch_size)
            for name, documents in benchmarks.items()
        },
    }


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def paired_difference(values: dict[int, float], baseline: dict[int, float]) -> dict[str, float | int | None]:
    """Mean over shared seeds of (variant - baseline) and its standard error (seeds pair the data order)."""
    shared = sorted(set(values) & set(baseline))
    if not shared:
        return {"difference": None, "standard_error": None, "seeds": 0}
    differences = [values[seed] - baseline[seed] for seed in shared]
    error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else None
    return {"difference": statistics.fmean(differences), "standard_error": error, "seeds": len(differences)}


def summarise(runs: list[dict[str, Any]], benchmarks: list[str]) -> list[dict[str, Any]]:
    """One row per preset: mean +- std over seeds and the paired difference to the baseline per benchmark."""
    by_preset: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_preset.setdefault(run["preset"], []).append(run)
    baseline_runs = by_preset.get(BASELINE, [])
    rows = []
    for preset, preset_runs in by_preset.items():
        row: dict[str, Any] = {
            "preset": preset,
            "seeds": [run["seed"] for run in preset_runs],
            "parameters": preset_runs[0]["parameters"],
            "train_tokens": preset_runs[0]["train_tokens"],
            "train_tokens_per_second": statistics.fmean(run["train_tokens_per_second"] for run in preset_runs),
            "benchmarks": {},
        }
        for name in benchmarks:
            per_seed = {run["seed"]: run["evaluations"][name] for run in preset_runs}
            word_ppl = {seed: r["word_perplexity"] for seed, r in per_seed.items()}
            nll_per_word = {seed: r["nll"] / r["words"] for seed, r in per_seed.items()}
            mean, std = mean_std(list(word_ppl.values()))
            entry = {"word_perplexity_mean": mean, "word_perplexity_std": std, "per_seed": word_ppl}
            bpb_mean, bpb_std = mean_std([r["bits_per_byte"] for r in per_seed.values()])
            entry.update(bits_per_byte_mean=bpb_mean, bits_per_byte_std=bpb_std)
            if baseline_runs and preset != BASELINE:
                base = {run["seed"]: run["evaluations"][name] for run in baseline_runs}
                entry["vs_baseline_word_perplexity"] = paired_difference(
                    word_ppl, {s: r["word_perplexity"] for s, r in base.items()}
                )
                entry["vs_baseline_nll_per_word"] = paired_difference(
                    nll_per_word, {s: r["nll"] / r["words"] for s, r in base.items()}
                )
            row["benchmarks"][name] = entry
        rows.append(row)
    return rows


def _pm(mean: float, std: float | None, digits: int = 2) -> str:
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _difference_text(comparison: dict[str, Any] | None) -> str:
    if not comparison or comparison["difference"] is None:
        return "—"
    difference, error = comparison["difference"], comparison["standard_error"]
    if error is None:
        return f"{difference:+.2f} (1 seed, no SE)"
    z = difference / error if error > 0 else float("inf")
    return f"{difference:+.2f} ± {error:.2f} (z = {z:+.1f})"


def results_table(rows: list[dict[str, Any]], references: list[dict[str, Any]], benchmarks: list[str]) -> str:
    """Markdown: one row per variant (and reference), word perplexity per benchmark."""
    header = ["variant", "params", "tokens seen", "train tok/s"]
    for name in benchmarks:
        header += [f"{name} word ppl (mean ± std)", "Δ vs baseline ± SE"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            f"{row['preset']} (n={len(row['seeds'])})",
            f"{row['parameters']:,}",
            f"{row['train_tokens']:,}",
            f"{row['train_tokens_per_second']:,.0f}",
        ]
        for name in benchmarks:
            entry = row["benchmarks"][name]
            cells += [
                _pm(entry["word_perplexity_mean"], entry["word_perplexity_std"]),
                _difference_text(entry.get("vs_baseline_word_perplexity")),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    for reference in references:
        cells = [reference["preset"], f"{reference['parameters']:,}", "—", "—"]
        for name in benchmarks:
            cells += [f"{reference['evaluations'][name]['word_perplexity']:.2f}", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]], benchmark: str) -> str:
    """Plain statement, per variant, of whether it beat the baseline and by how many standard errors."""
    sentences = []
    for row in rows:
        comparison = row["benchmarks"][benchmark].get("vs_baseline_word_perplexity")
        if row["preset"] == BASELINE or not comparison or comparison["difference"] is None:
            continue
        difference, error = comparison["difference"], comparison["standard_error"]
        better = "lower (better)" if difference < 0 else "higher (worse)"
        if error:
            sentences.append(
                f"- {row['preset']}: word perplexity {better} than the baseline by {abs(difference):.2f} "
                f"({abs(difference) / error:.1f} standard errors over {comparison['seeds']} paired seeds)."
            )
        else:
            sentences.append(
                f"- {row['preset']}: word perplexity {better} than the baseline by {abs(difference):.2f} "
                "(one seed: no standard error, not evidence either way)."
            )
    return "\n".join(sentences)


def command_line() -> str:
    return " ".join([os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "compare"] + sys.argv[1:])


def write_results(
    args: CompareArguments,
    runs: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    references: list[dict[str, Any]],
    seconds: float,
) -> str:
    """results.json, results.md, loss_curves.png, perplexity.png; returns the markdown."""
    output = Path(args.output_dir)
    settings = {k: v for k, v in asdict(args).items() if k not in ("preset_list", "seed_list")}
    environment = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": describe_hardware(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "wall_clock_seconds": round(seconds, 1),
        "command": command_line(),
    }
    table = results_table(rows, references, args.benchmark)
    lines = [
        "# DDL side-by-side comparison",
        "",
        f"Command: `{environment['command']}`  ",
        f"Hardware: {environment['hardware']}, torch {environment['torch']} ({environment['torch_threads']} threads), "
        f"transformers {environment['transformers']}  ",
        f"Date: {environment['date']}; wall clock {seconds / 60:.1f} min  ",
        f"Budget: {args.max_steps} steps x {args.per_device_train_batch_size} x {args.block_size} tokens "
        f"per run, size `{args.size}`, data `{args.dataset_name}`, seeds {args.seeds}",
        "",
        table,
        "",
        "Word perplexity: total negative log-likelihood over the benchmark text divided by its word count (one "
        "end-of-line per line counts as a word), windows of the training block size with half-block stride. "
        "Δ: paired by seed (same data order), mean of per-seed differences to `baseline`, standard error over seeds.",
        "",
        verdict(rows, args.benchmark[0]),
        "",
        "![validation loss](loss_curves.png)",
        "",
        "![word perplexity](perplexity.png)",
        "",
    ]
    markdown = "\n".join(lines)
    (output / "results.md").write_text(markdown)
    payload = {
        "settings": settings,
        "environment": environment,
        "summary": rows,
        "runs": runs,
        "references": references,
    }
    (output / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    plot_comparison_losses(runs, str(output / "loss_curves.png"))
    plot_perplexity_bars(rows, references, args.benchmark[0], str(output / "perplexity.png"))
    return markdown


def attach_comparison(runs: list[dict[str, Any]], table: str) -> None:
    """Give every trained model folder the study table and refresh its model card."""
    for run in runs:
        folder = Path(run["folder"])
        (folder / "comparison.md").write_text(table + "\n")
        write_model_card(folder)


def run_comparison(args: CompareArguments) -> str:
    """Train, evaluate, summarise, plot; returns the markdown report (also written to output_dir/results.md)."""
    started = time.perf_counter()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(args.dataset_name, max_train_samples=args.max_train_samples)
    tokenizer_dir = output / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        train_tokenizer(corpus["train"], vocab_size=args.vocab_size).save_pretrained(tokenizer_dir)
    benchmarks = dict(resolve_benchmark(spec, max_documents=args.max_eval_samples) for spec in args.benchmark)
    audit_text = corpus_documents(corpus["validation"])
    args.benchmark = list(benchmarks)
    runs = []
    for seed in args.seed_list:
        for preset in args.preset_list:
            run = train_one(args, preset, seed, str(tokenizer_dir))
            evaluate_run(run, benchmarks, args)
            if seed == args.seed_list[0]:
                audit_run(run, audit_text, args)
            runs.append(run)
            print(
                f"[compare] {preset} seed {seed}: "
                + ", ".join(
                    f"{name} word ppl {run['evaluations'][name]['word_perplexity']:.2f}" for name in benchmarks
                ),
                flush=True,
            )
    references = [evaluate_reference(spec, benchmarks, args) for spec in args.reference_model]
    rows = summarise(runs, list(benchmarks))
    markdown = write_results(args, runs, rows, references, time.perf_counter() - started)
    attach_comparison(runs, results_table(rows, references, list(benchmarks)))
    return markdown


__all__ = ["CompareArguments", "paired_difference", "run_comparison", "summarise"]
