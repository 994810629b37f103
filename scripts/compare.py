#!/usr/bin/env python
"""Train DDL variants and the additive baseline at an equal token budget and compare them side by side.

    python scripts/compare.py                       # the README's main job: baseline, ddl-scalar, ddl-cc on PTB
    python scripts/compare.py --presets baseline,ddl-scalar,ddl-cc,ddl-cc-noec,ddl-tc,ddl-tc-noec,write-only \\
        --seeds 0,1,2 --train_tokens 2000000 --output_dir outputs/study
"""

from ddl_transformers.cli import parse_arguments, run_script
from ddl_transformers.compare import CompareArguments, run_comparison


def main() -> None:
    (args,) = parse_arguments((CompareArguments,))
    print(run_comparison(args))
    print(f"\nResults, plots and every trained model (Hub-ready folders) are in {args.output_dir}")


if __name__ == "__main__":
    run_script(main)
