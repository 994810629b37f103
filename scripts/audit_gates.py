#!/usr/bin/env python
"""Gate audit of a trained DDL model on a text sample: `gate_audit.json` and `gate_audit.png` in `--output_dir`.

    python scripts/audit_gates.py --model out/ddl-cc --benchmark ptb:validation --output_dir out/ddl-cc/audit

`--model`: a folder written by `save_pretrained` (loaded with `trust_remote_code`) or a Hub id. `--benchmark`:
`ptb[:SPLIT]`, `shakespeare[:SPLIT]`, a local `.txt`/`.jsonl`/`.parquet` file or `hub:DATASET[:CONFIG]:SPLIT`; its
first `--max_tokens` tokens are audited. Per layer and sublayer: the distribution of the gate `beta`, the share of
positions in the skip / partial / target-match / over-relaxed regimes, the reading error `|k^T X - v|` before and
after the update, and the state norm across depth (see `ddl_transformers.diagnostics`). Prints the markdown summary.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from ddl_transformers.cli import parse_arguments, run_script
from ddl_transformers.diagnostics import audit_gates, write_audit
from ddl_transformers.evaluation import load_causal_lm, resolve_benchmark


@dataclass
class AuditArguments:
    model: str = field(metadata={"help": "Model folder written by save_pretrained, or a Hub id."})
    output_dir: str = field(metadata={"help": "Folder that receives gate_audit.json and gate_audit.png."})
    benchmark: str = field(
        default="ptb:validation",
        metadata={
            "help": "The text sample: ptb[:SPLIT], shakespeare[:SPLIT], a local file or hub:DATASET[:CONFIG]:SPLIT."
        },
    )
    max_tokens: int = field(default=4096, metadata={"help": "Tokens of the sample to audit."})
    window: int | None = field(
        default=None, metadata={"help": "Tokens per forward pass (default: the model's context length)."}
    )
    batch_size: int = field(default=4, metadata={"help": "Windows per forward pass."})
    text_column: str = field(default="text", metadata={"help": "Text column of json/parquet/Hub benchmarks."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda when available)."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16 or auto."})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the audit, write its files, print the summary and return the audit."""
    (args,) = parse_arguments((AuditArguments,), argv)
    if args.max_tokens < 1 or args.batch_size < 1 or (args.window is not None and args.window < 1):
        raise ValueError("--max_tokens, --window and --batch_size must be positive.")
    benchmark, documents = resolve_benchmark(args.benchmark, text_column=args.text_column)
    model, tokenizer = load_causal_lm(args.model, dtype=args.dtype, device=args.device)
    audit = audit_gates(model, tokenizer, documents, args.max_tokens, args.window, args.batch_size, source=benchmark)
    paths = write_audit(audit, args.output_dir)
    print(audit["summary_markdown"])
    print(f"Gate audit written to {paths['json']} and {paths['png']}", file=sys.stderr)
    return audit


if __name__ == "__main__":
    run_script(main)
