"""The error the deploy tools raise for problems a user can fix (bad inputs, files, unsupported exports)."""

from __future__ import annotations

from detkd.errors import DetkdError


class DeployError(DetkdError, ValueError):
    """A deploy problem; the message is one paragraph naming the file, option, family or format at fault.

    A ``ValueError`` too, so :func:`detkd.cli.run_main` prints it as one paragraph and exits with status 2.
    """

    kind = "deploy error"
