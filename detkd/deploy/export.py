"""Write a :class:`~detkd.deploy.wrapper.DeployableDetector` to a file that runs without detkd.

Which of torch's exporters handles torchvision detectors (torch 2.14, torchvision 0.29, measured in this project):

* **TorchScript: ``torch.jit.script``.** Scripting keeps the detector's control flow (per-image loops, the score
  threshold, NMS), so any image size and any image count work. ``torch.jit.trace`` is not used: it records one
  image size and one detection count into the graph.
* **ONNX: the TorchScript-based exporter, ``torch.onnx.export(..., dynamo=False)``**, which traces the model with
  torchvision's ONNX-aware code paths (``torchvision._is_tracing()``: dynamic resize, ONNX ``NonMaxSuppression``
  and ``RoiAlign``). The default exporter of torch 2.14, ``dynamo=True`` (``torch.export``), fails on every
  torchvision detector: the number of boxes that pass the score threshold is data-dependent, and
  ``torchvision.ops.batched_nms`` branches on it (``boxes.numel() > 4000``), a guard on a data-dependent value that
  ``torch.export`` cannot trace (it also takes minutes to fail). Height and width are dynamic; the **image count
  is fixed to 1**, because tracing unrolls the detector's per-image loops for the example's image count: the ONNX
  input is ``images (1, 3, H, W)``. Opsets 11 to 20 (the exporter's range; default 17).

Both files take ``uint8`` images (``0..255``) by default; ``input_dtype="float32"`` makes the ONNX input float in
``0..1`` (the TorchScript file takes either). They store the recipe, the detector, the categories (ids and names)
and the input/output contract as JSON under the key ``detkd`` (ONNX ``metadata_props``; TorchScript extra file).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch

from detkd.deploy.backends import METADATA_KEY
from detkd.deploy.errors import DeployError
from detkd.deploy.wrapper import DeployableDetector, LoadedDetector

PathLike = Union[str, os.PathLike]
FORMATS = ("onnx", "torchscript")
INPUT_DTYPES = ("uint8", "float32")
DEFAULT_OPSET = 17
OPSET_RANGE = (11, 20)
"""Opsets of torch's TorchScript-based ONNX exporter that torchvision's detection ops (NMS, RoiAlign) support."""

UNSUPPORTED: dict[tuple[str, str], str] = {}
"""``(arch, format) -> reason`` for the combinations that cannot be exported (none of the registered families at
present; the README's "Deploy the student" section lists what cannot be exported and why)."""

OUTPUT_NAMES = ("boxes", "scores", "labels", "image_index")


def check_exportable(arch: str, fmt: str, opset: Optional[int] = None, input_dtype: str = "uint8") -> None:
    """Raise one clear paragraph when ``arch`` cannot be written in ``fmt`` (with ``opset`` / ``input_dtype``).

    Raises:
        DeployError: unknown format, a known unsupported family/format pair, an opset outside
            :data:`OPSET_RANGE`, or an unknown input dtype.
    """
    if fmt not in FORMATS:
        raise DeployError(
            f"cannot export the {arch} detector to '{fmt}': unknown format; detkd exports {' and '.join(FORMATS)} "
            f"(other runtimes, e.g. TensorRT or OpenVINO, read the ONNX file)."
        )
    if (arch, fmt) in UNSUPPORTED:
        raise DeployError(f"cannot export the {arch} detector to {fmt}: {UNSUPPORTED[(arch, fmt)]}")
    if fmt == "onnx" and opset is not None and not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise DeployError(
            f"cannot export the {arch} detector to onnx with --opset {opset}: torch's TorchScript-based ONNX "
            f"exporter (the one that handles torchvision detectors) writes opsets {OPSET_RANGE[0]} to "
            f"{OPSET_RANGE[1]}, and torchvision's NMS needs at least 11; the default is {DEFAULT_OPSET}."
        )
    if input_dtype not in INPUT_DTYPES:
        raise DeployError(f"--input-dtype must be one of {', '.join(INPUT_DTYPES)}; got '{input_dtype}'.")


def export_metadata(loaded: LoadedDetector, fmt: str, cfg_name: str, **extra: Any) -> dict[str, Any]:
    """The JSON stored in an exported file: what it is, its categories and its input/output contract."""
    return {
        "detkd_export_version": 1,
        "format": fmt,
        "recipe": cfg_name,
        "model": loaded.model_key,
        "arch": loaded.arch,
        "description": loaded.description,
        "checkpoint": loaded.checkpoint,
        "score_thresh": loaded.model_cfg.score_thresh,
        "nms_thresh": loaded.model_cfg.nms_thresh,
        "detections_per_img": loaded.model_cfg.detections_per_img,
        "categories": [{"id": i, "name": n} for i, n in zip(loaded.categories.ids, loaded.categories.names)],
        "outputs": "boxes (M, 4) float32 xyxy input pixels; scores (M,) float32; labels (M,) int64 category ids; "
        "image_index (M,) int64",
        **extra,
    }


def _replace_atomically(write, out: Path) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``out`` (no half-written file on failure)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def export_torchscript(model: DeployableDetector, out: PathLike, metadata: Optional[dict] = None) -> Path:
    """Script ``model`` with ``torch.jit.script`` and save it (``metadata`` as the extra file ``detkd``).

    The file's ``forward(images)`` takes ``(N, 3, H, W)`` uint8 or float images, any N, H, W.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model.eval())
    extra = {METADATA_KEY: json.dumps(metadata or {})}

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.save is deprecated" (torch 2.14)
            torch.jit.save(scripted, tmp, _extra_files=extra)

    return _replace_atomically(write, Path(out))


def export_onnx(
    model: DeployableDetector,
    out: PathLike,
    example: torch.Tensor,
    opset: int = DEFAULT_OPSET,
    input_dtype: str = "uint8",
    metadata: Optional[dict] = None,
) -> Path:
    """Trace ``model`` on ``example`` with torch's TorchScript-based ONNX exporter and save it.

    Args:
        model: the deployable detector.
        out: the ``.onnx`` file.
        example: one ``(3, H, W)`` uint8 image (a real one: tracing follows its data path).
        opset: ONNX opset (:data:`OPSET_RANGE`).
        input_dtype: ``uint8`` (0..255) or ``float32`` (0..1) input.
        metadata: stored as ``metadata_props["detkd"]``.

    Returns:
        The path written. Input ``images (1, 3, height, width)``; outputs :data:`OUTPUT_NAMES` of dynamic length.
    """
    import onnx

    x = example[None] if input_dtype == "uint8" else example[None].float() / 255.0
    dynamic = {"images": {2: "height", 3: "width"}, **{name: {0: "num_detections"} for name in OUTPUT_NAMES}}

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.eval(),
                (x,),
                tmp,
                dynamo=False,
                opset_version=opset,
                input_names=["images"],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic,
                do_constant_folding=True,
            )
        proto = onnx.load(tmp)
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata or {})
        onnx.save(proto, tmp)

    return _replace_atomically(write, Path(out))


def export_detector(
    loaded: LoadedDetector,
    fmt: str,
    out: PathLike,
    example: torch.Tensor,
    cfg_name: str = "",
    opset: int = DEFAULT_OPSET,
    input_dtype: str = "uint8",
) -> Path:
    """Check that ``loaded`` can be exported to ``fmt`` and write it to ``out``.

    Raises:
        DeployError: an unsupported family/format/opset, or an exporter failure (its message in one paragraph).
    """
    check_exportable(loaded.arch, fmt, opset, input_dtype)
    try:
        if fmt == "torchscript":
            meta = export_metadata(loaded, fmt, cfg_name, input="images (N, 3, H, W) uint8 0..255 or float 0..1")
            return export_torchscript(loaded.model, out, meta)
        shape = "images (1, 3, H, W) " + ("uint8 0..255" if input_dtype == "uint8" else "float32 0..1")
        meta = export_metadata(loaded, fmt, cfg_name, input=shape, opset=opset)
        return export_onnx(loaded.model, out, example, opset, input_dtype, meta)
    except ImportError as err:
        raise DeployError(
            f"exporting to {fmt} needs the export extra ({err.name} is missing): pip install -e '.[export]'."
        ) from None
    except DeployError:
        raise
    except Exception as err:  # noqa: BLE001 - an exporter failure becomes one paragraph naming family and format
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DeployError(
            f"exporting the {loaded.arch} detector ({loaded.description}) to {fmt} failed: {type(err).__name__}: "
            f"{first}. This family/format pair is not known to fail; please report it with this message."
        ) from err
