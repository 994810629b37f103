"""Training, prefill and decode throughput and peak training memory of DDL presets against the baseline.

Example: `python scripts/benchmark.py --presets baseline ddl-scalar ddl-cc ddl-tc --output outputs/benchmark.json`
"""

from transformers import HfArgumentParser

from ddl_transformers.benchmark import BenchmarkArguments, run_benchmark, write_report


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    report = run_benchmark(args)
    print(write_report(report, args))


if __name__ == "__main__":
    main()
