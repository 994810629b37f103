"""Helpers of the `ptb_ddl` lm-evaluation-harness task (loaded by lm-eval through `!function utils.NAME`).

Self-contained on purpose (no `ddl_transformers` import): an exported task folder runs wherever lm-eval does.
"""

from __future__ import annotations


def count_words(text: str) -> int:
    """Whitespace-separated words plus one end-of-line (PTB's convention, as `ddl_transformers.data.count_words`)."""
    return len(text.split()) + 1


def count_bytes(text: str) -> int:
    """UTF-8 bytes plus one newline byte (as `ddl_transformers.data.count_bytes`)."""
    return len(text.encode("utf-8")) + 1


def process_results(doc: dict, results: list[float]) -> dict[str, tuple[float, int]]:
    """Per-document `(loglikelihood, weight)` pairs for lm-eval's weighted perplexity and bits-per-byte."""
    (loglikelihood,) = results
    words, num_bytes = count_words(doc["text"]), count_bytes(doc["text"])
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, num_bytes),
        "bits_per_byte": (loglikelihood, num_bytes),
    }
