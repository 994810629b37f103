"""Sliding-window perplexity of any causal LM on built-in corpora, local files or Hub datasets.

Scores are reported three ways from one total negative log-likelihood `nll` (nats):

* token perplexity `exp(nll / tokens)` (depends on the tokenizer);
* word perplexity `exp(nll / words)` with PTB's convention: whitespace words plus one end-of-line per line
  (document), see `data.count_words`;
* bits per byte `nll / (bytes * ln 2)` with one separator byte per document, see `data.count_bytes`.

Windows (`sliding_windows`): the token stream gets a start token prepended, `S = [start] + tokens`, so the first
token is scored too. Window `i` feeds `S[begin:end]` to the model (at most `max_length` tokens); `end` advances by
`stride` (`max_length` for the first window) and only the predictions of the last `end - prev_end` tokens are
kept, so every token is scored exactly once, with between `max_length - stride + 1` (`1` in the first window) and
`max_length` tokens of context. All windows but a lone short one have the same length: batches never need padding.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from . import data

logger = logging.getLogger(__name__)

RESULT_KEYS = ("token_perplexity", "word_perplexity", "bits_per_byte", "nll", "tokens", "words", "bytes")
DEFAULT_MAX_LENGTH = 2048
_FILE_SUFFIXES = (".txt", ".text", ".json", ".jsonl", ".parquet")
_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}
_TOKENIZER_INFINITY = int(1e29)


# ---------------------------------------------------------------------------------------------------------------
# Models and benchmarks


def _torch_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto.")
    return value


def load_causal_lm(
    name_or_path: str,
    gguf_file: str | None = None,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a folder, a Hub id or a GGUF file, in eval mode on `device`.

    `trust_remote_code=True` is passed so that folders and Hub repos with custom code load. A GGUF checkpoint is
    given as `name_or_path=DIR, gguf_file=NAME` or as the path of the `.gguf` file itself; it is de-quantized to
    `dtype` (float32 unless asked otherwise). `device=None` picks CUDA when available. Failures raise `ValueError`.
    """
    name_or_path = os.path.expanduser(str(name_or_path))
    if gguf_file is None and name_or_path.endswith(".gguf") and os.path.isfile(name_or_path):
        name_or_path, gguf_file = os.path.split(os.path.abspath(name_or_path))
    where = f"{name_or_path!r}" + (f" (GGUF file {gguf_file!r})" if gguf_file else "")
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith(".") or name_or_path.count("/") > 1
    if looks_local and not os.path.isdir(name_or_path):
        raise ValueError(f"Model path {where} does not exist; check the path given to --model.")
    if os.path.isdir(name_or_path):
        if gguf_file is not None and not os.path.isfile(os.path.join(name_or_path, gguf_file)):
            raise ValueError(f"GGUF file {gguf_file!r} not found in {name_or_path!r}; check --gguf_file.")
        if gguf_file is None and not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise ValueError(
                f"Model folder {where} has no config.json, so it was not written by save_pretrained. Fix: point "
                f"--model at a saved model folder (a training run's output_dir), or name its .gguf file."
            )
    kwargs: dict[str, Any] = {"trust_remote_code": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_torch_dtype(dtype), **kwargs)
    except Exception as err:
        hint = (
            "a GGUF checkpoint needs the `gguf` package (pip install gguf) and a file name in --gguf_file"
            if gguf_file
            else "expected a folder written by save_pretrained (config.json, weights and tokenizer files), "
            "a GGUF checkpoint (--gguf_file), or a Hub id (needs network access)"
        )
        raise ValueError(
            f"Could not load a causal LM from {where}: {type(err).__name__}: {err}. Fix: {hint}."
        ) from err
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def model_context_length(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None, default: int = DEFAULT_MAX_LENGTH
) -> int:
    """The model's context length, looked up as lm-evaluation-harness does (`resolve_max_length`).

    Config `n_positions`, `max_position_embeddings`, `n_ctx` (of `text_config` when nested), then the tokenizer's
    `model_max_length`, then `default`.
    """
    config = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < _TOKENIZER_INFINITY:
        return int(limit)
    return default


def _unknown_benchmark(spec: str, reason: str) -> ValueError:
    builtins = ", ".join(f"{name}:{{train,validation,test}}" for name in data.BUILTIN_CORPORA)
    return ValueError(
        f"Unknown benchmark {spec!r} ({reason}). Built-in corpora: {builtins} (split defaults to test); "
        f"or a local file ({', '.join(_FILE_SUFFIXES)}; one document per line for text files); "
        f"or a Hub dataset written hub:DATASET[:CONFIG]:SPLIT (needs network access)."
    )


def resolve_benchmark(spec: str, max_documents: int | None = None, text_column: str = "text") -> tuple[str, list[str]]:
    """A benchmark's display name and its documents.

    `spec` is `NAME[:SPLIT]` for a built-in corpus (`ptb:test`, `ptb:validation`, `shakespeare:test`; split
    `test` by default), the path of a local `.txt`/`.json`/`.jsonl`/`.parquet` file (a text file gives one document
    per non-empty line), or `hub:DATASET[:CONFIG]:SPLIT`. `max_documents` keeps the first documents only.
    """
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be positive (got {max_documents}).")
    spec = spec.strip()
    if spec.startswith("hub:"):
        parts = spec[len("hub:") :].split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise _unknown_benchmark(spec, "Hub datasets need hub:DATASET[:CONFIG]:SPLIT")
        name, config, split = parts[0], parts[1] if len(parts) == 3 else None, parts[-1]
        try:
            import datasets

            dataset = datasets.load_dataset(name, config, split=split)
        except Exception as err:
            raise ValueError(
                f"Could not load benchmark {spec!r} from the Hub ({type(err).__name__}: {err}); without network "
                f"access use a built-in corpus ({', '.join(data.BUILTIN_CORPORA)}) or a local file."
            ) from err
        if text_column not in dataset.column_names:
            raise ValueError(f"Benchmark {spec!r} has no column {text_column!r} (columns: {dataset.column_names}).")
        documents = [text for text in dataset[text_column] if isinstance(text, str) and text.strip()]
        display = spec[len("hub:") :]
    elif spec.lower().endswith(_FILE_SUFFIXES) or os.path.isfile(spec):
        if not os.path.isfile(spec):
            raise ValueError(f"Benchmark file {spec!r} does not exist; check the path given to --benchmark.")
        if not spec.lower().endswith(_FILE_SUFFIXES):
            raise ValueError(f"Benchmark file {spec!r} has an unsupported extension; use {', '.join(_FILE_SUFFIXES)}.")
        corpus = data.load_corpus(train_file=spec, validation_file=spec, test_file=spec, text_column=text_column)
        documents = data.corpus_documents(corpus["test"])
        display = os.path.basename(spec)
    else:
        name, _, split = spec.partition(":")
        name = name.lower()
        if name not in data.BUILTIN_CORPORA:
            raise _unknown_benchmark(spec, "not a built-in corpus, a local file or hub:...")
        split = _SPLIT_ALIASES.get(split.lower(), split.lower()) or "test"
        if split not in ("train", "validation", "test"):
            raise _unknown_benchmark(spec, f"split {split!r}; use train, validation or test")
        documents = data.corpus_documents(data.load_corpus(name)[split])
        display = f"{name}:{split}"
    if max_documents is not None and len(documents) > max_documents:
        documents = documents[:max_documents]
        display += f"[:{max_documents}]"
    return display, documents


# ---------------------------------------------------------------------------------------------------------------
# Windows and scoring


def check_window(max_length: int, stride: int) -> None:
    """Raise `ValueError` unless `1 <= stride <= max_length`."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1 (got {max_length}).")
    if not 1 <= stride <= max_length:
        raise ValueError(
            f"stride ({stride}) must be between 1 and max_length ({max_length}): a stride larger than the window "
            f"would leave tokens unscored. Lower --stride or raise --max_length (capped at the model's context)."
        )


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """`(begin, end, scored)` for each window over `S = [start] + tokens` (`len(S) = num_tokens + 1`).

    The window feeds `S[begin:end]` and keeps the predictions of its last `scored` targets `S[end-scored+1:end+1]`.
    The `scored` values sum to `num_tokens`.
    """
    check_window(max_length, stride)
    if num_tokens < 1:
        raise ValueError("The text is shorter than one token; nothing to score.")
    windows = []
    prev_end = 0
    while prev_end < num_tokens:
        end = min(prev_end + stride if prev_end else max_length, num_tokens)
        windows.append((max(0, end - max_length), end, end - prev_end))
        prev_end = end
    return windows


def _start_token(model: PreTrainedModel, bos_token_id: int | None) -> int:
    if bos_token_id is None:
        bos_token_id = model.config.bos_token_id
        if bos_token_id is None:
            bos_token_id = model.config.eos_token_id
    if isinstance(bos_token_id, (list, tuple)):
        bos_token_id = bos_token_id[0]
    if bos_token_id is None:
        raise ValueError("No start token: pass bos_token_id (the model config has neither bos nor eos).")
    return int(bos_token_id)


def _windows_of(token_ids: list[int], start: int, max_length: int, stride: int) -> list[tuple[list[int], int]]:
    """`(S[begin:end+1], scored)` per window: inputs are all but the last id, targets all but the first."""
    stream = [start, *token_ids]
    return [(stream[b : e + 1], n) for b, e, n in sliding_windows(len(token_ids), max_length, stride)]


def score_windows(
    model: PreTrainedModel,
    windows: list[tuple[list[int], int]],
    batch_size: int = 1,
    progress: bool = False,
    desc: str = "Scoring",
) -> list[float]:
    """Summed NLL (nats) of the last `scored` targets of each `(ids, scored)` window (inputs `ids[:-1]`).

    Windows of equal length are batched together (longest first), so no padding ever enters a forward pass.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size}).")
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and len(windows[batches[-1][0]][0]) == len(windows[i][0]):
            batches[-1].append(i)
        else:
            batches.append([i])
    params = inspect.signature(model.forward).parameters
    keep_logits = "logits_to_keep" in params
    device = next(model.parameters()).device
    nlls = [0.0] * len(windows)
    bar = tqdm(total=sum(n for _, n in windows), desc=desc, unit="tok", disable=not progress, file=sys.stderr)
    with torch.inference_mode():
        for batch in batches:
            ids = torch.tensor([windows[i][0] for i in batch], dtype=torch.long, device=device)
            keep = max(windows[i][1] for i in batch)
            extra = {"logits_to_keep": keep} if keep_logits else {}
            logits = model(input_ids=ids[:, :-1], use_cache=False, **extra).logits[:, -keep:].float()
            targets = ids[:, -keep:]
            token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            for row, i in enumerate(batch):
                scored = windows[i][1]
                nlls[i] = token_nll[row, keep - scored :].double().sum().item()
                bar.update(scored)
    bar.close()
    return nlls


def sliding_window_nll(
    model: PreTrainedModel,
    token_ids: list[int],
    max_length: int,
    stride: int,
    batch_size: int = 1,
    bos_token_id: int | None = None,
    progress: bool = False,
) -> tuple[float, int]:
    """Total NLL (nats) of `token_ids` and the number of tokens scored (`len(token_ids)`).

    The stream is preceded by `bos_token_id` (default: the config's bos, else eos) so its first token is scored;
    see `sliding_windows` for the windows.
    """
    windows = _windows_of(list(token_ids), _start_token(model, bos_token_id), max_length, stride)
    return math.fsum(score_windows(model, windows, batch_size, progress)), len(token_ids)


def lm_eval_prefix_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token lm-evaluation-harness puts before each document: bos when the tokenizer has one, else eos."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("The tokenizer has neither a bos nor an eos token to condition the first token on.")
    return token


def document_nlls(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: list[str],
    max_length: int,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> list[tuple[float, int]]:
    """`(nll, tokens)` of each document scored on its own, as lm-evaluation-harness's `loglikelihood_rolling`.

    lm-eval (`HFLM.loglikelihood_rolling`) encodes each document with the tokenizer's default special tokens
    (`tok_encode`), then takes `utils.get_rolling_token_windows(tokens, prefix_token_id, max_seq_len=max_length,
    context_len=1)` through `make_disjoint_window`, with `prefix_token_id` bos if the tokenizer has one, else eos.
    With `context_len=1` its first window feeds `[prefix] + tokens[:L-1]` and predicts `tokens[:L]`; each later
    window predicts the next (at most) `L` tokens from the `L` tokens before each target, i.e. exactly our
    `sliding_windows` over `[prefix] + tokens` with `stride = max_length = L` (the default here), and its
    `_loglikelihood_tokens` feeds `(context + continuation)[-(L+1):][:-1]`, our `S[begin:end]`. The NLL summed over
    windows is minus the loglikelihood lm-eval returns per document. A smaller `stride` gives more context.
    """
    stride = max_length if stride is None else stride
    check_window(max_length, stride)
    prefix = lm_eval_prefix_token_id(tokenizer)
    encoded = tokenizer(list(documents), verbose=False)["input_ids"] if documents else []
    windows: list[tuple[list[int], int]] = []
    owners: list[int] = []
    for index, ids in enumerate(encoded):
        if ids:
            doc_windows = _windows_of(ids, prefix, max_length, stride)
            windows += doc_windows
            owners += [index] * len(doc_windows)
    results = [[0.0, len(ids)] for ids in encoded]
    for owner, nll in zip(owners, score_windows(model, windows, batch_size, progress), strict=True):
        results[owner][0] += nll
    return [(nll, count) for nll, count in results]


def _safe_exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


def evaluate_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: list[str],
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    per_document: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Token perplexity, word perplexity and bits per byte of `documents`, with the counts and settings.

    By default the documents form one stream exactly as training packs them (`data.tokenize_documents`: each
    document's tokens then eos, so each end-of-line is scored as the eos token), preceded by eos, and scored with
    sliding windows. `per_document=True` scores each document on its own like lm-eval (see `document_nlls`): no
    end-of-line token is scored then, though `words` still counts one per document.
    `max_length` defaults to the model's context length and is capped by it; `stride` defaults to `max_length`.
    """
    limit = model_context_length(model, tokenizer)
    if max_length is not None and max_length > limit:
        logger.warning("max_length %d exceeds the model's context length %d; using %d.", max_length, limit, limit)
    max_length = limit if max_length is None else min(max_length, limit)
    stride = max_length if stride is None else stride
    check_window(max_length, stride)
    documents = list(documents)
    if per_document:
        scores = document_nlls(model, tokenizer, documents, max_length, stride, batch_size, progress)
        nll, tokens = math.fsum(s[0] for s in scores), sum(s[1] for s in scores)
        start = lm_eval_prefix_token_id(tokenizer) if documents else None
        content_tokens = tokens
    else:
        stream = data.tokenize_documents(documents, tokenizer) if documents else []
        start = tokenizer.eos_token_id
        content_tokens = len(stream) - len(documents)
        if content_tokens >= 1:
            nll, tokens = sliding_window_nll(model, stream, max_length, stride, batch_size, start, progress)
    if content_tokens < 1:
        raise ValueError(
            f"The text is shorter than one token ({len(documents)} document(s), no tokens); give a non-empty text."
        )
    words, num_bytes = data.count_words(documents), data.count_bytes(documents)
    return {
        "token_perplexity": _safe_exp(nll / tokens),
        "word_perplexity": _safe_exp(nll / words),
        "bits_per_byte": nll / (num_bytes * math.log(2)),
        "nll": nll,
        "tokens": tokens,
        "words": words,
        "bytes": num_bytes,
        "documents": len(documents),
        "max_length": max_length,
        "stride": stride,
        "batch_size": batch_size,
        "per_document": per_document,
        "start_token_id": start,
    }


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def format_results_table(records: list[dict[str, Any]]) -> str:
    """A markdown table with one row per `(model, benchmark)` record."""
    header = "| Model | Benchmark | Token PPL | Word PPL | Bits/byte | Tokens | Words | Bytes |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(
            f"| {r.get('model', '')} | {r.get('benchmark', '')} | {r['token_perplexity']:.3f} | "
            f"{r['word_perplexity']:.3f} | {r['bits_per_byte']:.4f} | {r['tokens']:,} | {r['words']:,} | "
            f"{r['bytes']:,} |"
        )
    return "\n".join(lines)


def save_results(records: list[dict[str, Any]], path: str, **metadata: Any) -> str:
    """Write `{"results": records, **metadata}` plus run metadata (time, git commit, versions) as JSON.

    Uses `evaluate.save` (local only: it runs `git rev-parse`, no network); a `path` without a suffix is a folder
    that receives `result-<timestamp>.json`. Returns the file written.
    """
    try:
        import evaluate

        return str(evaluate.save(path, results=records, **metadata))
    except (ImportError, OSError) as err:
        logger.warning("evaluate.save unavailable (%s); writing plain JSON.", err)
    target = Path(path)
    now = datetime.now()
    if not target.suffix:
        target = target / f"result-{now.strftime('%Y_%m_%d-%H_%M_%S')}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {"results": records, **metadata, "_timestamp": now.isoformat(), "_python_version": sys.version}
    target.write_text(json.dumps(payload, indent=2))
    return str(target)


__all__ = [
    "RESULT_KEYS",
    "check_window",
    "document_nlls",
    "evaluate_perplexity",
    "format_results_table",
    "lm_eval_prefix_token_id",
    "load_causal_lm",
    "model_context_length",
    "resolve_benchmark",
    "save_results",
    "score_windows",
    "sliding_window_nll",
    "sliding_windows",
]
