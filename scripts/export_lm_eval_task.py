#!/usr/bin/env python
"""Write a built-in corpus as a local lm-evaluation-harness task (word perplexity, loglikelihood_rolling).

    python scripts/export_lm_eval_task.py --output_dir lm_eval_data
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf \
        --model_args pretrained=out/ddl-cc,trust_remote_code=True,dtype=float32 \
        --tasks ptb_ddl --include_path lm_eval_data/ptb_ddl --batch_size 1 --output_path results/

Prints the task folder to pass to `--include_path` (see `ddl_transformers.lm_eval_export`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ddl_transformers.cli import parse_arguments, run_script
from ddl_transformers.lm_eval_export import TASK_SPLITS, export_lm_eval_task, task_name


@dataclass
class ExportArguments:
    output_dir: str = field(metadata={"help": "Folder that receives <corpus>_ddl/ (JSONL data, task YAML, utils.py)."})
    corpus: str = field(default="ptb", metadata={"help": "Built-in corpus: ptb or shakespeare."})
    splits: list[str] = field(
        default_factory=lambda: list(TASK_SPLITS),
        metadata={"help": "Splits to export (lm-eval scores test when present, else validation)."},
    )
    max_documents: int | None = field(default=None, metadata={"help": "Keep the first N documents of each split."})


def main(argv: list[str] | None = None) -> Path:
    """Export the task and print the folder for `lm_eval --include_path`."""
    (args,) = parse_arguments((ExportArguments,), argv)
    folder = export_lm_eval_task(args.output_dir, args.corpus, args.splits, args.max_documents)
    print(
        f"Task {task_name(args.corpus.strip().lower())} written to {folder}; run lm_eval with --include_path {folder}"
    )
    return folder


if __name__ == "__main__":
    run_script(main)
