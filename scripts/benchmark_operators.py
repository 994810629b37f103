"""The DDL operators (rewrite, token convolution) timed alone per implementation, against the bytes they must move.

Example: `python scripts/benchmark_operators.py --device cuda --dtype bfloat16 --batch_size 16 --seq_len 1024 \
--hidden_size 768 --output outputs/operators.json`
"""

from transformers import HfArgumentParser

from ddl_transformers.operator_benchmark import (
    OperatorBenchmarkArguments,
    run_operator_benchmark,
    write_operator_report,
)


def main() -> None:
    (args,) = HfArgumentParser(OperatorBenchmarkArguments).parse_args_into_dataclasses()
    print(write_operator_report(run_operator_benchmark(args), args))


if __name__ == "__main__":
    main()
