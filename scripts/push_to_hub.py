#!/usr/bin/env python
"""Publish a trained DDL folder (weights, config with auto_map, code, tokenizer, card, plots) to the Hub in one commit.

    python scripts/push_to_hub.py outputs/ddl-tiny-ptb --repo_id me/ddl-tiny-ptb
    python scripts/push_to_hub.py outputs/ddl-tiny-ptb --repo_id me/ddl-tiny-ptb --private --revision dev \
        --commit_message "Retrained with 2x data"

The folder is checked first (code files, auto_map, safetensors weights, no pickles) and nothing is uploaded when
it fails; the model card is rendered for the repo id and uploaded from memory, so the folder is never modified.
The token comes from --token, else HF_TOKEN, else `hf auth login`.
"""

from __future__ import annotations

import argparse
import sys

from ddl_transformers.hub import DEFAULT_IGNORE_PATTERNS, HubPushError, push_folder


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (`folder` may also be given as `--folder`)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=f"Never uploaded: {', '.join(DEFAULT_IGNORE_PATTERNS)} (checkpoints, TensorBoard logs, hidden files).",
    )
    parser.add_argument("folder", nargs="?", help="The Hub-ready folder (the output_dir of scripts/train.py).")
    parser.add_argument("--folder", dest="folder_option", metavar="FOLDER", help="Same as the positional folder.")
    parser.add_argument("--repo_id", required=True, help="Target repo, `namespace/name` (or `name` for your user).")
    parser.add_argument("--private", action="store_true", help="Create the repo private (or make it private).")
    parser.add_argument("--revision", default=None, help="Branch to push to; created when missing (default main).")
    parser.add_argument("--commit_message", default=None, help="Commit message.")
    parser.add_argument("--commit_description", default=None, help="Longer commit description.")
    parser.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN / login).")
    parser.add_argument(
        "--keep_card", action="store_true", help="Upload the folder's README.md as it is instead of re-rendering it."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.folder is None) == (args.folder_option is None):
        parser.error("give the folder once: `push_to_hub.py FOLDER --repo_id ID` (or --folder FOLDER)")
    folder = args.folder or args.folder_option
    try:
        commit = push_folder(
            folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            commit_description=args.commit_description,
            token=args.token,
            refresh_card=not args.keep_card,
        )
    except (ValueError, HubPushError) as err:
        print(f"push_to_hub.py: error: {err}", file=sys.stderr)
        return 1
    print(f"Pushed {folder} to {commit.repo_url.repo_id}: {commit.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
