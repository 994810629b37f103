"""Export a built-in corpus as a local lm-evaluation-harness task (word perplexity with `loglikelihood_rolling`).

`export_lm_eval_task(DIR)` writes the folder `DIR/ptb_ddl/` holding

* `validation.jsonl` and `test.jsonl`: one `{"text": line}` object per document of the built-in corpus (the very
  strings `data.corpus_documents(data.load_corpus("ptb")[split])` returns, so both tools score the same text);
* `ptb_word_perplexity.yaml`: the packaged task template (`ddl_transformers/lm_eval_tasks/`) with `data_files`
  rewritten to the absolute paths of those files, so `lm_eval` finds them from any working directory (re-export
  after moving the folder);
* `utils.py`: the task's `process_results`, which counts words (PTB convention, `data.count_words`) and bytes
  (`data.count_bytes`) exactly as `ddl_transformers.evaluation` does.

Run it offline with the returned folder as `--include_path`:

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf \
        --model_args pretrained=MODEL_DIR,trust_remote_code=True,dtype=float32 \
        --tasks ptb_ddl --include_path DIR/ptb_ddl --batch_size 1 --device cpu --output_path results/

lm-eval scores the test split when it is exported, else the validation split.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from . import data

TEMPLATE_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TEMPLATE_NAME = "ptb_word_perplexity.yaml"
TASK_SPLITS = ("validation", "test")
_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}


class _Function(str):
    """A `!function module.name` reference of an lm-eval task YAML, kept as text."""


class _TemplateLoader(yaml.SafeLoader):
    pass


class _TaskDumper(yaml.SafeDumper):
    pass


_TemplateLoader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
_TaskDumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def task_name(corpus: str) -> str:
    """The lm-eval task name of an exported corpus: `ptb_ddl`, `shakespeare_ddl`."""
    return f"{corpus}_ddl"


def load_task_template() -> dict[str, Any]:
    """The packaged task YAML as a dict (`!function` references kept as strings)."""
    with open(TEMPLATE_DIR / TEMPLATE_NAME, encoding="utf-8") as handle:
        return yaml.load(handle, Loader=_TemplateLoader)  # noqa: S506 (a SafeLoader with one extra tag)


def _check_splits(splits: tuple[str, ...] | list[str] | str) -> list[str]:
    if isinstance(splits, str):
        splits = [part for part in splits.replace(",", " ").split() if part]
    chosen = []
    for split in splits:
        split = _SPLIT_ALIASES.get(split.strip().lower(), split.strip().lower())
        if split not in TASK_SPLITS:
            raise ValueError(f"Unknown split {split!r} for an lm-eval task; use {' and/or '.join(TASK_SPLITS)}.")
        if split not in chosen:
            chosen.append(split)
    if not chosen:
        raise ValueError(f"No split given; export at least one of {', '.join(TASK_SPLITS)}.")
    return chosen


def export_lm_eval_task(
    output_dir: str | os.PathLike[str],
    corpus: str = "ptb",
    splits: tuple[str, ...] | list[str] = ("validation", "test"),
    max_documents: int | None = None,
) -> Path:
    """Write the JSONL data and a ready-to-use lm-eval task folder for a built-in corpus; return the folder.

    The folder is `output_dir/<corpus>_ddl` (task name `<corpus>_ddl`); pass it to `lm_eval --include_path`.
    `max_documents` keeps the first documents of each split. Existing files of an earlier export are replaced.
    """
    corpus = corpus.strip().lower()
    if corpus not in data.BUILTIN_CORPORA:
        raise ValueError(f"Unknown corpus {corpus!r}; built-in corpora: {', '.join(data.BUILTIN_CORPORA)}.")
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be positive (got {max_documents}).")
    chosen = _check_splits(splits)
    name = task_name(corpus)
    folder = Path(output_dir).expanduser().resolve() / name
    folder.mkdir(parents=True, exist_ok=True)

    dataset = data.load_corpus(corpus)
    data_files = {}
    for split in chosen:
        documents = data.corpus_documents(dataset[split])
        if max_documents is not None:
            documents = documents[:max_documents]
        path = folder / f"{split}.jsonl"
        with open(path, "w", encoding="utf-8") as handle:
            for document in documents:
                handle.write(json.dumps({"text": document}, ensure_ascii=False) + "\n")
        data_files[split] = str(path)

    config = load_task_template()
    config["task"] = name
    config["dataset_kwargs"] = {"data_files": data_files}
    for split in TASK_SPLITS:
        if split in data_files:
            config[f"{split}_split"] = split
        else:
            config.pop(f"{split}_split", None)
    header = (
        f"# lm-evaluation-harness task {name}: word perplexity of the built-in corpus '{corpus}' "
        f"({', '.join(chosen)}; max_documents={max_documents}), one document per line, loglikelihood_rolling.\n"
        f"# Written by ddl_transformers.lm_eval_export from {TEMPLATE_NAME}; data_files are absolute paths: "
        f"re-export after moving this folder.\n"
    )
    body = yaml.dump(config, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True)
    (folder / f"{corpus}_word_perplexity.yaml").write_text(header + body, encoding="utf-8")
    shutil.copyfile(TEMPLATE_DIR / "utils.py", folder / "utils.py")
    return folder


__all__ = ["export_lm_eval_task", "load_task_template", "task_name"]
