"""Argument parsing shared by the ``tools/`` scripts (they stay thin: argparse -> detkd functions), and
:func:`run_main`, which turns detkd's own errors into one-paragraph messages."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, Optional

from detkd.config import Config, load_config
from detkd.errors import ConfigError, DetkdError

DEBUG_ENV = "DETKD_DEBUG"


def train_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg", required=True, help="recipe YAML, e.g. configs/quickstart.yaml")
    parser.add_argument("--work-dir", default=None, help="output folder (default: work_dir in the recipe)")
    # --resume and --overwrite share args.resume (False, True or "overwrite"), so every tool that passes
    # resume=args.resume to the runner (detkd.engine.runner.split_resume_mode) gets both
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument(
        "--resume", action="store_const", const=True, default=False, help="continue from <work-dir>/last.pth"
    )
    runs.add_argument(
        "--overwrite",
        dest="resume",
        action="store_const",
        const="overwrite",
        help="start over in a work dir that holds another run (its checkpoints and logs are deleted first)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs still written)")
    add_opts(parser)
    return parser


def add_opts(parser: argparse.ArgumentParser) -> None:
    """``--opts KEY=VALUE ...`` and ``--plugin MODULE`` (every tool that reads a recipe has both)."""
    parser.add_argument(
        "--opts", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. train.epochs=1 data.batch_size=2"
    )
    parser.add_argument(
        "--plugin",
        action=_PluginAction,
        default=[],
        metavar="MODULE",
        help="a .py file or dotted module imported before the recipe loads, to register your own losses or "
        "detector families (repeatable)",
    )


class _PluginAction(argparse.Action):
    """Import each ``--plugin`` as it is parsed, so what it registers exists before the recipe is validated."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        from detkd.plugins import load_plugins

        load_plugins([value])
        setattr(namespace, self.dest, [*getattr(namespace, self.dest, []), value])


def debug_enabled() -> bool:
    """``DETKD_DEBUG=1`` (any value but empty/0/false) shows tracebacks of detkd errors too."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def report_error(err: DetkdError) -> int:
    """Print ``err`` as one paragraph on stderr (its traceback first under ``DETKD_DEBUG=1``); returns the exit
    status."""
    if debug_enabled():
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    message = " ".join(str(err).split())  # one paragraph, whatever newlines a message carries
    print(f"{err.kind}: {message}", file=sys.stderr)
    return err.exit_code


def load_or_exit(path: str, opts: Optional[list[str]] = None) -> Config:
    """Load a recipe; on a config error print the one-paragraph message and exit with status 2."""
    try:
        return load_config(path, opts)
    except ConfigError as err:
        raise SystemExit(report_error(err)) from None


def run_main(main: Callable[[], object]) -> None:
    """Run a tool's main. A :class:`~detkd.errors.DetkdError` (a problem the user can fix: config, data,
    checkpoint, a known run condition) prints one paragraph and exits non-zero; anything else is a bug and keeps
    its traceback."""
    try:
        main()
    except DetkdError as err:
        raise SystemExit(report_error(err)) from None
