"""Run a deployable detector one image at a time: eager PyTorch, a TorchScript file, or an ONNX file.

Every backend is a callable ``backend(image) -> Detections`` taking one ``(3, H, W)`` uint8 RGB tensor (what
:func:`detkd.data.coco.load_image_rgb` gives, transposed) and returning numpy arrays, so the predict tool, the
parity check and the latency measurement treat the three alike. Thread counts are fixed when a backend is made
(``torch.set_num_threads`` for PyTorch and TorchScript, ``intra_op_num_threads`` for ONNX Runtime) and reported by
its ``threads`` attribute.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from detkd.deploy.errors import DeployError
from detkd.deploy.wrapper import DeployableDetector

PathLike = Union[str, os.PathLike]
METADATA_KEY = "detkd"
"""Name of the JSON metadata stored in exported files (ONNX ``metadata_props``, TorchScript extra file)."""


@dataclass
class Detections:
    """Detections of one image: ``boxes (M, 4)`` xyxy input pixels, ``scores (M,)``, ``labels (M,)`` category ids."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def above(self, score_thr: float) -> Detections:
        """The detections with ``score >= score_thr``."""
        keep = self.scores >= score_thr
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep])


def _as_detections(outputs) -> Detections:
    boxes, scores, labels = (np.asarray(o.detach().cpu().numpy() if torch.is_tensor(o) else o) for o in outputs[:3])
    return Detections(boxes.reshape(-1, 4).astype(np.float32), scores.astype(np.float32), labels.astype(np.int64))


def _check_image(image: torch.Tensor) -> torch.Tensor:
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected one (3, H, W) uint8 image, got {tuple(image.shape)} {image.dtype}")
    return image


class EagerBackend:
    """The :class:`DeployableDetector` in eager PyTorch, under ``torch.inference_mode``."""

    name = "PyTorch eager"

    def __init__(self, model: DeployableDetector, threads: Optional[int] = None, device: str = "cpu") -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)

    def __call__(self, image: torch.Tensor) -> Detections:
        with torch.inference_mode():
            return _as_detections(self.model(_check_image(image).to(self.device)[None]))


class TorchScriptBackend:
    """A TorchScript file written by :func:`detkd.deploy.export.export_torchscript`, run with ``torch.jit.load``."""

    name = "TorchScript"

    def __init__(self, path: PathLike, threads: Optional[int] = None, device: str = "cpu") -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.device = torch.device(device)
        self.path = str(path)
        extra = {METADATA_KEY: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated" (torch 2.14)
                self.module = torch.jit.load(self.path, map_location=self.device, _extra_files=extra).eval()
        except Exception as err:  # noqa: BLE001 - any load failure is one message naming the file
            raise DeployError(f"TorchScript file '{path}' could not be loaded: {type(err).__name__}: {err}") from None
        self.metadata = json.loads(extra[METADATA_KEY]) if extra[METADATA_KEY] else {}

    def __call__(self, image: torch.Tensor) -> Detections:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "... always returns a (Losses, Detections) tuple in scripting"
            return _as_detections(self.module(_check_image(image).to(self.device)[None]))


class OnnxBackend:
    """An ONNX file written by :func:`detkd.deploy.export.export_onnx`, run by ONNX Runtime on the CPU.

    The session runs sequentially with ``intra_op_num_threads = threads`` and one inter-op thread. The file's input
    type (uint8 or float) is read from the session; float inputs get the image divided by 255.
    """

    name = "ONNX Runtime"

    def __init__(self, path: PathLike, threads: Optional[int] = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise DeployError(
                "running an ONNX file needs onnxruntime: pip install -e '.[export]' (or pip install onnxruntime)."
            ) from None
        self.path = str(path)
        if not Path(path).is_file():
            raise DeployError(f"ONNX file '{path}' does not exist.")
        options = ort.SessionOptions()
        self.threads = threads if threads is not None else torch.get_num_threads()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - any load failure is one message naming the file
            raise DeployError(f"ONNX file '{path}' could not be loaded by onnxruntime: {err}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.float_input = inp.type != "tensor(uint8)"
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}

    def __call__(self, image: torch.Tensor) -> Detections:
        array = _check_image(image).cpu().numpy()[None]
        if self.float_input:
            array = array.astype(np.float32) / np.float32(255.0)
        return _as_detections(self.session.run(None, {self.input_name: array}))
