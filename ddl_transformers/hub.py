"""Model cards for DDL checkpoints, and publishing a trained folder to the Hugging Face Hub.

The card is rendered from `model_cards/ddl_model_card.md` (Jinja, through `huggingface_hub.ModelCard`) with facts read
from the folder: `config.json`, `training_record.json`, `*_results.json` (Trainer), `evaluation.json` (our
perplexity records), `comparison.md` (the side-by-side study) and `gate_audit.json` / `gate_audit.png`.

`push_folder(folder, repo_id)` (and `scripts/push_to_hub.py`) publishes a Hub-ready folder in one commit, after
`check_folder_for_push(folder)` has refused folders that could not be loaded with `trust_remote_code=True` or that
hold pickles. The push never writes into the folder: the card, rendered for the repo id, is uploaded from memory.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    get_token,
)
from huggingface_hub.errors import HfHubHTTPError

logger = logging.getLogger(__name__)

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
            records.append({"benchmark": f"{dataset}:{split}", "token_perplexity": metrics[f"{prefix}_perplexity"]})
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
                        metric_value=float(record[key]),  # as evaluated, not rounded
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


def build_model_card(
    folder: str | os.PathLike, repo_id: str | None = None, template_path: str | None = None
) -> ModelCard:
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
    datasets = sorted(
        {_split_benchmark(r["benchmark"])[0] for r in records} | {(training or {}).get("dataset")} - {None}
    )
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
        gate="linear"
        if config.get("beta_hidden_size") is None
        else f"two-layer tanh, width {config['beta_hidden_size']}",
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


# ------------------------------------------------------------------------------------------- publishing to the Hub

CODE_FILES = ("configuration_ddl.py", "modeling_ddl.py")
"""Code files a DDL folder must hold so that `trust_remote_code=True` finds the architecture."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Suffixes of pickled files (unpickling runs arbitrary code): refused in a folder to push."""

DEFAULT_IGNORE_PATTERNS = (
    "checkpoint-*",  # Trainer's intermediate checkpoints: optimizer / scheduler / RNG pickles, duplicate weights
    "runs",  # TensorBoard event logs: their file names carry the host name; loss_curve.png summarises them
    ".*",  # hidden files and folders: .git, .cache (huggingface_hub's local metadata), .ipynb_checkpoints
    "__pycache__",
    "*.pyc",
)
"""Never uploaded: matched (fnmatch) against every component of a path relative to the folder."""

_RELATIVE_IMPORT_RES = (
    re.compile(r"^\s*import\s+\.(\S+)\s*$", flags=re.M),
    re.compile(r"^\s*from\s+\.(\S+)\s+import", flags=re.M),
)  # the patterns transformers' dynamic module loader follows


class HubPushError(RuntimeError):
    """A push that could not be made (no token, offline, network or Hub failure); the local folder is unchanged."""


def _ignored(relative: str, ignore_patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in relative.split("/") for pattern in ignore_patterns)


def _folder_files(folder: Path, ignore_patterns: Sequence[str]) -> list[str]:
    files = []
    for root, dirs, names in os.walk(folder):
        base = Path(root).relative_to(folder)
        dirs[:] = sorted(d for d in dirs if not _ignored((base / d).as_posix(), ignore_patterns))
        files += [(base / n).as_posix() for n in names if not _ignored((base / n).as_posix(), ignore_patterns)]
    return sorted(files)


def _auto_map_modules(auto_map: dict[str, Any]) -> set[str]:
    """Local `.py` files named by `auto_map` (entries of another repo, `repo--module.Class`, are skipped)."""
    modules = set()
    for value in auto_map.values():
        for reference in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(reference, str) and "--" not in reference and "." in reference:
                modules.add(reference.rsplit(".", 1)[0].replace(".", "/") + ".py")
    return modules


def _code_closure(folder: Path, roots: set[str]) -> set[str]:
    """`roots` and the files they import relatively (recursively), as transformers will fetch them."""
    needed, todo = set(), sorted(roots)
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        path = folder / name
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            parent = Path(name).parent
            for pattern in _RELATIVE_IMPORT_RES:
                todo += [(parent / (m.replace(".", "/") + ".py")).as_posix() for m in pattern.findall(text)]
    return needed


def check_folder_for_push(
    folder: str | os.PathLike, ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS
) -> list[str]:
    """The files of `folder` to upload (relative POSIX paths), or a `ValueError` naming everything that is wrong.

    A model folder needs `config.json` with an `auto_map`, the code files it names (`configuration_ddl.py`,
    `modeling_ddl.py` and what they import relatively, e.g. `delta_ops.py`) and safetensors weights (every shard of
    an index). A LoRA folder needs `adapter_config.json` and `adapter_model.safetensors` instead (its base model
    holds the code). Pickled files (`*.bin`, `*.pt`, `*.pth`, `*.pkl`, `*.pickle`, `*.ckpt`) are refused. Paths
    matching `ignore_patterns` (default `DEFAULT_IGNORE_PATTERNS`) are neither checked nor uploaded.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Refusing to push {folder}: no such folder (give the output_dir of a training run).")
    files = _folder_files(folder, ignore_patterns)
    present = set(files)
    problems = []
    pickles = [name for name in files if name.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        problems.append(
            f"pickled files {pickles}: loading a pickle runs arbitrary code, so the Hub copy holds safetensors only. "
            "Re-save the model with `model.save_pretrained(folder, safe_serialization=True)` and delete these files "
            "(training_args.bin is Trainer's pickled arguments: training_args.json holds the same)."
        )
    top_level_weights = [name for name in files if "/" not in name and name.endswith(".safetensors")]
    if "adapter_config.json" in present:
        if "adapter_model.safetensors" not in present:
            problems.append(
                "adapter_model.safetensors (the adapter weights) is missing; save with peft's save_pretrained."
            )
        base = (_read_json(folder, "adapter_config.json") or {}).get("base_model_name_or_path")
        if base and Path(base).exists():
            logger.warning(
                "The adapter's base_model_name_or_path (%s) is a local path: others cannot load it until it names a "
                "Hub repo (push the base model and edit adapter_config.json).",
                base,
            )
    else:
        config = _read_json(folder, "config.json")
        if config is None:
            problems.append(
                "config.json is missing: this is not a saved model folder (model.save_pretrained(folder))."
            )
        elif not config.get("auto_map"):
            problems.append(
                "config.json has no auto_map, so `trust_remote_code=True` cannot find the model code; save the model "
                "with DDLForCausalLM.save_pretrained, which writes auto_map and the code files."
            )
        modules = set(CODE_FILES) | _auto_map_modules((config or {}).get("auto_map") or {})
        missing_code = sorted(_code_closure(folder, modules) - present)
        if missing_code:
            problems.append(
                f"code files {missing_code} are missing: `trust_remote_code=True` loads the architecture from them "
                "(DDLForCausalLM.save_pretrained copies them into the folder)."
            )
        if not top_level_weights:
            problems.append(
                "no safetensors weights (model.safetensors or shards): save with "
                "`model.save_pretrained(folder, safe_serialization=True)`."
            )
        index = _read_json(folder, "model.safetensors.index.json")
        if index:
            shards = sorted(set(index.get("weight_map", {}).values()) - present)
            if shards:
                problems.append(f"weight shards {shards} named in model.safetensors.index.json are missing.")
    if problems:
        raise ValueError(f"Refusing to push {folder}:\n" + "\n".join(f"  - {p}" for p in problems))
    return files


def _client_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises for network and HTTP failures (httpx2 in huggingface_hub 2.x, httpx in 1.x)."""
    errors: list[type[BaseException]] = [OSError, HfHubHTTPError]
    for name in ("httpx2", "httpx"):  # already imported by huggingface_hub when it uses them
        error = getattr(sys.modules.get(name), "HTTPError", None)
        if isinstance(error, type) and issubclass(error, BaseException):
            errors.append(error)
    return tuple(errors)


def _push_failure(err: BaseException, folder: Path, repo_id: str, endpoint: str) -> HubPushError:
    status = getattr(getattr(err, "response", None), "status_code", None)
    detail = " ".join(str(err).split())
    if status in (401, 403):
        what = (
            f"the Hub at {endpoint} refused the token (HTTP {status}: {detail}); check that it may write to "
            f"{repo_id.split('/')[0]} (`hf auth whoami`)"
        )
    elif status is not None:
        what = f"the Hub at {endpoint} answered HTTP {status}: {detail}"
    else:
        what = (
            f"could not reach the Hub at {endpoint} ({type(err).__name__}: {detail}); check the network connection "
            "(and HF_ENDPOINT)"
        )
    return HubPushError(
        f"Pushing {folder} to {repo_id} failed: {what}. No commit was made and the local folder is unchanged; "
        f"push it again with `python scripts/push_to_hub.py {folder} --repo_id {repo_id}`."
    )


def _is_weights(name: str) -> bool:
    return "/" not in name and name.endswith((".safetensors", ".safetensors.index.json"))


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    create_branch: bool = True,
    commit_description: str | None = None,
    refresh_card: bool = True,
    ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS,
) -> CommitInfo:
    """Publish a Hub-ready folder to `repo_id` in one commit; returns the `CommitInfo` (a `str`: the commit URL).

    Checks the folder (`check_folder_for_push`) and the token before anything is sent, creates the repo if needed
    (`private=True` also makes an existing repo private; `False` keeps the Hub's default), creates branch `revision`
    if it is missing (unless `create_branch=False`), and commits every file with the model card rendered for
    `repo_id` (`refresh_card=False` uploads the folder's README.md as it is). Re-pushing adds a commit to the same
    repo; files already there stay, except top-level safetensors weights this push does not contain (stale shards
    would shadow the new weights). Nothing is ever written to `folder`. Failures raise `ValueError` (bad folder) or
    `HubPushError` (no token, offline, network or Hub errors).
    """
    from huggingface_hub import constants

    folder = Path(folder)
    files = check_folder_for_push(folder, ignore_patterns)
    token = token or get_token()
    if not token:
        raise HubPushError(
            f"No Hugging Face token found, so {folder} was not pushed to {repo_id}: log in with `hf auth login`, or "
            "set the HF_TOKEN environment variable, or pass a token (--token / --hub_token). Nothing was uploaded."
        )
    if constants.HF_HUB_OFFLINE:
        raise HubPushError(f"HF_HUB_OFFLINE is set: unset it to push {folder} to {repo_id}. Nothing was uploaded.")
    api = HfApi(token=token)
    errors = _client_errors()
    try:
        if "/" not in repo_id:
            repo_id = f"{api.whoami()['name']}/{repo_id}"
    except errors as err:
        raise _push_failure(err, folder, repo_id, api.endpoint) from err
    readme = None
    if refresh_card or "README.md" not in files:  # rendered in memory: the folder's README.md is left as it is
        readme = str(build_model_card(folder, repo_id=repo_id)).encode()
    operations: list[CommitOperationAdd | CommitOperationDelete] = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
        for name in files
        if not (readme is not None and name == "README.md")
    ]
    if readme is not None:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme))
    try:
        repo_id = api.create_repo(repo_id, private=private or None, exist_ok=True).repo_id
        if private and not api.repo_info(repo_id).private:
            api.update_repo_settings(repo_id, private=True)
        if revision is not None and not api.revision_exists(repo_id, revision=revision):
            if not create_branch:
                raise HubPushError(f"{repo_id} has no revision {revision!r} (and create_branch=False).")
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations += [
            CommitOperationDelete(path_in_repo=name)
            for name in api.list_repo_files(repo_id, revision=revision)
            if _is_weights(name) and name not in files
        ]
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload DDL model {folder.name} with ddl-transformers",
            commit_description=commit_description,
            revision=revision,
        )
    except errors as err:
        raise _push_failure(err, folder, repo_id, api.endpoint) from err
    logger.info("Pushed %s to %s: %s", folder, repo_id, info.commit_url)
    return info
