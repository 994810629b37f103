"""What every script in `scripts/` shares: argument parsing (flags, or one JSON/YAML file) and clear errors."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from transformers import HfArgumentParser


def parse_arguments(types: tuple[type, ...], argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parse command-line flags into the dataclasses `types`, or read them all from one `.json`/`.yaml` file."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser(types)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


def run_script(main: Callable[[], Any]) -> None:
    """Run a script's `main`; bad input ends it with `error: ...` and exit status 1 instead of a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
