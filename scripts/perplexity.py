#!/usr/bin/env python
"""Sliding-window perplexity of one or more causal LMs on one or more benchmarks, as one table.

    python scripts/perplexity.py --model out/ddl-cc --model out/baseline --benchmark ptb:test \
        --benchmark shakespeare:test --output results/perplexity.json

`--model`: a folder written by `save_pretrained`, a Hub id (custom code trusted) or a `.gguf` file (or a folder plus
`--gguf_file`, which then applies to every model). `--benchmark`: `ptb[:SPLIT]`, `shakespeare[:SPLIT]`, a local
`.txt`/`.jsonl`/`.parquet` file or `hub:DATASET[:CONFIG]:SPLIT`. Prints a markdown table; `--output` writes JSON.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from ddl_transformers.allocator import retain_freed_memory_on
from ddl_transformers.cli import parse_arguments, run_script
from ddl_transformers.evaluation import (
    check_window,
    evaluate_perplexity,
    format_results_table,
    load_causal_lm,
    resolve_benchmark,
    save_results,
)


@dataclass
class PerplexityArguments:
    model: list[str] = field(
        metadata={"action": "extend", "help": "Model folder, Hub id or .gguf file; repeat for several models."}
    )
    benchmark: list[str] = field(
        default_factory=list,
        metadata={
            "action": "extend",
            "help": "ptb[:SPLIT], shakespeare[:SPLIT], a local file or hub:DATASET[:CONFIG]:SPLIT; repeatable; "
            "none given means ptb:test.",
        },
    )
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name inside each --model folder."})
    max_length: int | None = field(
        default=None, metadata={"help": "Window length in tokens (default and cap: the model's context length)."}
    )
    stride: int | None = field(
        default=None, metadata={"help": "Tokens the window advances by (default: max_length, as lm-eval)."}
    )
    batch_size: int = field(default=4, metadata={"help": "Windows per forward pass."})
    per_document: bool = field(
        default=False, metadata={"help": "Score each document on its own, as lm-eval's loglikelihood_rolling."}
    )
    max_documents: int | None = field(default=None, metadata={"help": "Keep the first N documents of each benchmark."})
    text_column: str = field(default="text", metadata={"help": "Text column of json/parquet/Hub benchmarks."})
    output: str | None = field(default=None, metadata={"help": "JSON file for the results (one record per pair)."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda when available)."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16 or auto."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar (--no_progress to hide it)."})
    retain_freed_cpu_memory: bool = field(
        default=True,
        metadata={
            "help": "On the CPU, keep freed memory in the process (`ddl_transformers.allocator`, glibc): each batch's "
            "logits reuse the last batch's pages instead of faulting fresh ones in."
        },
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the evaluation grid, print the markdown table and return the records."""
    (args,) = parse_arguments((PerplexityArguments,), argv)
    if args.max_length is not None and args.stride is not None:
        check_window(args.max_length, args.stride)
    benchmarks = [
        resolve_benchmark(spec, args.max_documents, args.text_column) for spec in args.benchmark or ["ptb:test"]
    ]
    settings = {k: v for k, v in asdict(args).items() if k not in ("model", "benchmark", "output", "progress")}
    records = []
    for name in args.model:
        model, tokenizer = load_causal_lm(name, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device)
        if args.retain_freed_cpu_memory:
            retain_freed_memory_on(model.device)
        display = f"{name} ({args.gguf_file})" if args.gguf_file else name
        for benchmark, documents in benchmarks:
            result = evaluate_perplexity(
                model,
                tokenizer,
                documents,
                max_length=args.max_length,
                stride=args.stride,
                batch_size=args.batch_size,
                per_document=args.per_document,
                progress=args.progress,
            )
            records.append({"model": display, "benchmark": benchmark, **result})
        del model
    print(format_results_table(records))
    if args.output:
        path = save_results(records, args.output, settings=settings)
        print(f"Results written to {path}", file=sys.stderr)
    return records


if __name__ == "__main__":
    run_script(main)
