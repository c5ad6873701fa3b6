"""Argument parsing shared by the ``tools/`` scripts (they stay thin: argparse -> detkd functions)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from detkd.config import Config, ConfigError, load_config


def train_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg", required=True, help="recipe YAML, e.g. configs/quickstart.yaml")
    parser.add_argument("--work-dir", default=None, help="output folder (default: work_dir in the recipe)")
    parser.add_argument("--resume", action="store_true", help="continue from <work-dir>/last.pth")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs still written)")
    add_opts(parser)
    return parser


def add_opts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--opts", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. train.epochs=1 data.batch_size=2"
    )


def load_or_exit(path: str, opts: Optional[list[str]] = None) -> Config:
    """Load a recipe; on a config error print the one-paragraph message and exit with status 2."""
    try:
        return load_config(path, opts)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run_main(main: Callable[[], object]) -> None:
    """Run a tool's main; user-facing errors (bad files, bad data) print one paragraph instead of a traceback."""
    try:
        main()
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
