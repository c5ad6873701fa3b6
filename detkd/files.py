"""Atomic file writes (torch-free: the config writes its ``config.yaml`` through them too).

:func:`atomic_write` writes to ``.<name>.tmp.<pid>`` beside the target, flushes it to disk and renames it over the
target, so a crash while saving never leaves a half-written file under the real name. A ``kill -9`` in the middle
leaves the temporary file; :func:`remove_stale_temporaries` deletes those whose writer is gone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Union

PathLike = Union[str, os.PathLike]
TMP_INFIX = ".tmp."


def temporary_path(path: PathLike) -> Path:
    """Where :func:`atomic_write` writes ``path`` first: ``.<name>.tmp.<pid>`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}")


def atomic_write(path: PathLike, write: Callable[[Any], None], binary: bool = True) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it and rename it over ``path``.

    The temporary file is removed when ``write`` fails; parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def remove_stale_temporaries(folder: PathLike) -> list[tuple[Path, int]]:
    """Delete the ``.<name>.tmp.<pid>`` files in ``folder`` left by killed writers (their process is gone, or it
    is this one). Returns ``(path, size in bytes)`` of each removed file."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for tmp in folder.glob(f".*{TMP_INFIX}*"):
        match = re.fullmatch(rf"\..+{re.escape(TMP_INFIX)}(\d+)", tmp.name)
        if match is None or not tmp.is_file():
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            continue  # a writer is still at work
        size = tmp.stat().st_size
        tmp.unlink(missing_ok=True)
        removed.append((tmp, size))
    return removed
