"""detkd's own error types: the problems a user can fix, each reported by the tools as one paragraph.

``tools/*`` run their ``main`` through :func:`detkd.cli.run_main`, which prints a :class:`DetkdError` as one
paragraph and exits with its ``exit_code``; any other exception is a bug in detkd (or torch) and keeps its full
traceback. With ``DETKD_DEBUG=1`` in the environment the traceback of a detkd error is shown too.

The types subclass the built-in exception that the same condition raised before they existed (``ValueError`` for
config and data problems, ``RuntimeError`` for checkpoints and run conditions, ``FloatingPointError`` for a
non-finite loss), so ``except ValueError`` in existing code keeps working.
"""

from __future__ import annotations


class DetkdError(Exception):
    """Base of every error a user can fix; ``str(err)`` is the whole message, one paragraph."""

    exit_code = 2
    kind = "error"


class ConfigError(DetkdError, ValueError):
    """A recipe problem; the message names the file, the dotted key and what is accepted."""

    kind = "config error"


class DataError(DetkdError, ValueError):
    """A dataset problem: a missing or malformed annotation file or image folder, an empty split."""

    kind = "data error"


class DataNotFoundError(DataError, FileNotFoundError):
    """An annotation file or image that does not exist."""


class CheckpointError(DetkdError, RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, not a checkpoint, unsafe, or another architecture."""

    kind = "checkpoint error"


class RunError(DetkdError, RuntimeError):
    """A known condition that stops a run: a dead teacher, ``device: cuda`` without a GPU, a work dir that holds
    another run, an output path that is a file."""

    exit_code = 1
    kind = "run error"


class NonFiniteLossError(RunError, FloatingPointError):
    """A NaN or infinite loss; the message lists every loss term of that iteration."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The file is a checkpoint, but not of this model (another architecture, width or class count), or holds no
    state_dict."""
