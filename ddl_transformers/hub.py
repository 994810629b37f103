"""Model cards for DDL checkpoints, and publishing a trained folder to the Hugging Face Hub.

The card is rendered from `model_cards/ddl_model_card.md` (Jinja, through `huggingface_hub.ModelCard`) with facts read
from the folder: `config.json`, `training_record.json`, `*_results.json` (Trainer), `evaluation.json` (our
perplexity records), `comparison.md` (the side-by-side study) and `gate_audit.json` / `gate_audit.png`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "model_cards" / "ddl_model_card.md"
LICENSE = "apache-2.0"


def _read_json(folder: Path, name: str) -> Any:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def evaluation_records(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Perplexity records of the folder: `evaluation.json` when present, else Trainer's eval/test losses."""
    folder = Path(folder)
    saved = _read_json(folder, "evaluation.json")
    records = saved.get("results") if isinstance(saved, dict) else saved
    if records:
        return [dict(r) for r in records]
    training = _read_json(folder, "training_record.json") or {}
    dataset = training.get("dataset") or "unknown"
    records = []
    for prefix, split in (("eval", "validation"), ("test", "test")):
        metrics = _read_json(folder, f"{prefix}_results.json") or {}
        if f"{prefix}_perplexity" in metrics:
            records.append(
                {"benchmark": f"{dataset}:{split}", "token_perplexity": metrics[f"{prefix}_perplexity"]}
            )
    return records


def _split_benchmark(name: str) -> tuple[str, str]:
    dataset, _, split = name.partition(":")
    return dataset, split or "test"


def card_eval_results(records: list[dict[str, Any]], model_name: str) -> list[EvalResult]:
    """`model-index` entries: token and word perplexity and bits per byte per benchmark and split."""
    results = []
    for record in records:
        dataset, split = _split_benchmark(record["benchmark"])
        for key, metric_name in (
            ("word_perplexity", "word perplexity"),
            ("token_perplexity", "token perplexity"),
            ("bits_per_byte", "bits per byte"),
        ):
            if record.get(key) is not None:
                results.append(
                    EvalResult(
                        task_type="text-generation",
                        task_name="Language modelling",
                        dataset_type=dataset,
                        dataset_name=dataset,
                        dataset_split=split,
                        metric_type=key,
                        metric_name=metric_name,
                        metric_value=round(float(record[key]), 4),
                    )
                )
    return results


def _format_count(value: Any) -> str:
    return f"{int(value):,}" if value is not None else "-"


def _format_float(value: Any, digits: int = 3) -> str:
    return f"{float(value):.{digits}f}" if value is not None else "-"


def model_config(folder: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The model's config as a dict, and the LoRA adapter config when the folder holds an adapter."""
    config = _read_json(folder, "config.json")
    adapter = _read_json(folder, "adapter_config.json")
    if config is None and adapter is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(adapter["base_model_name_or_path"], trust_remote_code=True).to_dict()
    if config is None:
        raise FileNotFoundError(f"{folder} has no config.json (or adapter_config.json); is it a saved model folder?")
    return config, adapter


def build_model_card(folder: str | os.PathLike, repo_id: str | None = None, template_path: str | None = None) -> ModelCard:
    """Render the DDL model card for a trained folder (nothing typed by hand: every figure comes from a file)."""
    folder = Path(folder)
    config, adapter = model_config(folder)
    training = _read_json(folder, "training_record.json")
    train_metrics = _read_json(folder, "train_results.json") or {}
    records = evaluation_records(folder)
    repo_id = repo_id or folder.name
    preset = (training or {}).get("preset")
    expanded = config.get("value_channels", 1) > 1
    rows = []
    for record in records:
        dataset, split = _split_benchmark(record["benchmark"])
        rows.append(
            {
                **record,
                "benchmark": dataset,
                "split": split,
                "word_perplexity_text": _format_float(record.get("word_perplexity")),
                "bits_per_byte_text": _format_float(record.get("bits_per_byte"), 4),
                "tokens_text": _format_count(record.get("tokens")),
                "words_text": _format_count(record.get("words")),
            }
        )
    datasets = sorted({_split_benchmark(r["benchmark"])[0] for r in records} | {(training or {}).get("dataset")} - {None})
    card_data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        license=LICENSE,
        tags=["deep-delta-learning", "custom_code", preset or "ddl-custom"],
        datasets=[d for d in datasets if "/" not in d and os.path.sep not in d] or None,
        base_model=(training or {}).get("base_model"),
        model_name=repo_id,
        eval_results=card_eval_results(records, repo_id) or None,
    )
    comparison = (folder / "comparison.md").read_text() if (folder / "comparison.md").is_file() else None
    audit = _read_json(folder, "gate_audit.json")
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path or TEMPLATE_PATH),
        model_name=repo_id,
        repo_id=repo_id,
        preset=preset,
        config=config,
        compressor=config.get("state_compressor") if expanded else "none (scalar state)",
        expansion=("on" if config.get("embedding_expansion") else "off") if expanded else "n/a (scalar state)",
        gate="linear" if config.get("beta_hidden_size") is None else f"two-layer tanh, width {config['beta_hidden_size']}",
        target=(
            f"{config.get('value_scale')} * sigmoid(W_v c + b)"
            if config.get("value_activation") == "sigmoid"
            else "W_v c (linear)"
        ),
        parameters=_format_count(train_metrics.get("parameters")) if train_metrics.get("parameters") else "see files",
        training=training,
        results=rows,
        comparison=comparison,
        audit=audit.get("summary_markdown") if isinstance(audit, dict) else None,
        audit_plot="gate_audit.png" if (folder / "gate_audit.png").is_file() else None,
        loss_plot="loss_curve.png" if (folder / "loss_curve.png").is_file() else None,
    )


def write_model_card(folder: str | os.PathLike, repo_id: str | None = None) -> Path:
    """Write `README.md` (the model card) into the folder and return its path."""
    card = build_model_card(folder, repo_id=repo_id)
    path = Path(folder) / "README.md"
    card.save(path)
    return path
