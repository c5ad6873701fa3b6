"""Atomic writes, the one checkpoint loader, resume state and DDP unwrapping.

Every file detkd writes (checkpoints, ``config.yaml``, metrics json) goes through :func:`detkd.files.atomic_write`
(re-exported here): a temporary file ``.<name>.tmp.<pid>`` in the same folder, flushed to disk and renamed over the
target, so a crash while saving never corrupts the last good file. A kill in the middle can leave the temporary
file behind; :func:`detkd.files.remove_stale_temporaries` deletes those of dead processes when a run starts or
resumes.

Every checkpoint is read by :func:`read_checkpoint` (``weights_only=True``: a checkpoint holds tensors and plain
Python data only; the RNG states are stored as tensors and lists), and its weights go into a model through
:func:`load_state_dict_checked`. Both raise :class:`~detkd.errors.CheckpointError` with one message naming the file
and the cause: missing, empty or truncated, not a checkpoint, refused for safety (a pickle of arbitrary objects),
or saved from another model (the first mismatching tensors with the shapes found and expected).
"""

from __future__ import annotations

import os
import pickle
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from detkd.errors import CheckpointError, CheckpointMismatchError, CheckpointNotFoundError
from detkd.files import atomic_write, remove_stale_temporaries, temporary_path

__all__ = [
    "atomic_write",
    "load_checkpoint",
    "load_detector_weights",
    "load_state_dict_checked",
    "read_checkpoint",
    "remove_stale_temporaries",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "state_dict_of",
    "temporary_path",
    "unwrap",
]

PathLike = Union[str, os.PathLike]
StateDict = Mapping[str, torch.Tensor]
_ZIP_MAGIC = b"PK\x03\x04"


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def save_checkpoint(state: dict[str, Any], path: PathLike) -> Path:
    """Write ``state`` with ``torch.save`` atomically (temporary file + fsync + rename)."""
    return atomic_write(path, lambda f: torch.save(state, f))


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def read_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with one :class:`CheckpointError` per cause, naming the file.

    Args:
        path: the file.
        map_location: where tensors go.
        mmap: map the file instead of reading it (cheap when only the small entries, e.g. ``"config"``, are used).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist.")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file.")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes): its write was interrupted or it was never written. Use another "
            f"checkpoint (or delete this one and train again)."
        )
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and head == _ZIP_MAGIC)
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower():
            raise _not_a_checkpoint(path, size) from None
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"an object of class {found.group(1)}" if found else "Python objects other than tensors"
        raise CheckpointError(
            f"checkpoint {path} was refused for safety: it holds {what}, and loading arbitrary pickled objects can "
            f"run code. detkd only loads tensors and plain data. If you trust the file, convert it once where its "
            f"classes are importable: load it, save only the weights with torch.save(model.state_dict(), "
            f"'weights.pth'), and give detkd weights.pth."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        if head == _ZIP_MAGIC or isinstance(err, EOFError):
            raise CheckpointError(
                f"checkpoint {path} is truncated or corrupted ({size} bytes; {type(err).__name__}): its write was "
                f"probably interrupted. detkd writes checkpoints atomically, so the last good one of a run is "
                f"intact; use another file, or --resume, which continues from last.pth."
            ) from None
        raise _not_a_checkpoint(path, size) from None
    except Exception:  # noqa: BLE001 - the unpickler's other failures (KeyError, ValueError ...) on non-torch files
        raise _not_a_checkpoint(path, size) from None


def _not_a_checkpoint(path: Path, size: int) -> CheckpointError:
    return CheckpointMismatchError(
        f"checkpoint {path} ({size} bytes) is not a torch.save file: not a detkd or torchvision checkpoint."
    )


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu", mmap: bool = False) -> dict:
    """A checkpoint that is a mapping (detkd's ``{"model": ..., ...}`` or a plain state_dict); see
    :func:`read_checkpoint` for the errors."""
    obj = read_checkpoint(path, map_location, mmap)
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a detkd or torchvision checkpoint (a dict with a "
            f"'model' state_dict, or a state_dict)."
        )
    return obj


def state_dict_of(ckpt: Mapping[str, Any], path: PathLike) -> dict[str, torch.Tensor]:
    """The weights of a loaded checkpoint: its ``"model"`` entry (detkd) or the mapping itself (a plain
    state_dict); a ``"module."`` prefix on every key (a DDP-wrapped model was saved) is stripped."""
    state = ckpt["model"] if isinstance(ckpt.get("model"), Mapping) else ckpt
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = ", ".join(map(str, list(state)[:8]))
        raise CheckpointMismatchError(
            f"checkpoint '{path}' holds neither a state_dict nor a dict with a 'model' state_dict (found keys: "
            f"{keys or 'none'})."
        )
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def load_state_dict_checked(
    model: torch.nn.Module,
    state: StateDict,
    source: str,
    skip_prefixes: Sequence[str] = (),
    expected: Optional[StateDict] = None,
    target: Optional[str] = None,
    load: Optional[Callable[[dict[str, torch.Tensor]], Any]] = None,
    check_missing: bool = True,
) -> list[str]:
    """Load ``state`` into ``model`` after checking names and shapes; return the keys skipped.

    Keys under ``skip_prefixes`` whose shape differs are skipped (class-dependent layers of pretrained detectors);
    any other missing, unexpected or mis-shaped key raises :class:`CheckpointMismatchError` naming the first ones,
    with the shapes found and expected. ``num_batches_tracked`` buffers may be absent on either side
    (``FrozenBatchNorm2d`` has none).

    Args:
        model: what the weights go into.
        state: the weights.
        source: how the message names them, e.g. ``"checkpoint 'a.pth'"``.
        skip_prefixes: class-dependent key prefixes that may differ in shape.
        expected: the state the model expects (default ``model.state_dict()``; a Distiller passes its
            ``trainable_state_dict()``).
        target: how the message names the model (default ``"this <class name>"``).
        load: the loading call (default ``model.load_state_dict(..., strict=False)`` after the check).
        check_missing: report model keys absent from ``state``; off when ``load`` decides which may be absent
            (a Distiller accepts checkpoints from before one of its parts existed).
    """
    own = dict(expected) if expected is not None else model.state_dict()
    nbt = "num_batches_tracked"
    missing = [k for k in own if k not in state and not k.endswith(nbt)] if check_missing else []
    unexpected = [k for k in state if k not in own and not k.endswith(nbt)]
    mismatched = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    skipped = [k for k in mismatched if k.startswith(tuple(skip_prefixes))]
    mismatched = [k for k in mismatched if k not in skipped]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            shown = "; ".join(
                f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:5]
            )
            parts.append(f"{len(mismatched)} tensors differ in shape ({shown})")
        if missing:
            parts.append(f"{len(missing)} model keys are missing from it ({', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} of its keys are not in the model ({', '.join(unexpected[:5])})")
        raise CheckpointMismatchError(
            f"{source} does not fit {target or 'this ' + type(model).__name__}: {'; '.join(parts)}. Was it saved "
            f"from another arch, backbone, fpn_channels, anchor setting or number of classes?"
        )
    kept = {k: v for k, v in state.items() if k not in skipped and k in own}
    if load is not None:
        load(kept)
    else:
        model.load_state_dict(kept, strict=False)
    return skipped


def load_detector_weights(model: torch.nn.Module, path: PathLike) -> None:
    """Load a checkpoint file into a detector strictly (names and shapes must match).

    Args:
        model: the detector.
        path: a file saved with ``torch.save``: a plain state_dict, or a dict with a ``"model"`` state_dict (detkd
            checkpoints). A ``"module."`` prefix on every key (DDP) is stripped. Loaded with ``weights_only=True``.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist (a ``FileNotFoundError``).
        CheckpointMismatchError: the file holds no state_dict, or names/shapes differ (the first mismatching keys
            are named).
        CheckpointError: empty, truncated, not a checkpoint, or refused for safety.
    """
    state = state_dict_of(load_checkpoint(path), path)
    load_state_dict_checked(model, state, f"checkpoint '{path}'")


# ----------------------------------------------------------------------------------------------------------------
# Resume state, DDP
# ----------------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch RNG states in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (or the module itself)."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model
