"""Deploy a trained detector: predict on images, export to ONNX / TorchScript with a parity check, time it.

* :func:`load_detector` -- a recipe's detector with a checkpoint loaded, wrapped as a :class:`DeployableDetector`
  (uint8 or float images in; boxes, scores, category ids out in input-image pixels).
* :func:`export_detector` / :func:`export_and_verify` -- write it to ONNX or TorchScript; parity on val images
  (:class:`ParityReport`) and the latency of eager PyTorch, TorchScript and ONNX Runtime.
* :func:`predict_images` with a backend from :func:`open_backend` -- pictures and ``predictions.json``.
* :func:`deploy_commands` -- the predict and export commands for a finished run.

onnx / onnxruntime are imported only when an ONNX file is written or run (``pip install -e '.[export]'``).
"""

from detkd.deploy.backends import Detections, EagerBackend, OnnxBackend, TorchScriptBackend
from detkd.deploy.categories import Categories, read_categories
from detkd.deploy.commands import deploy_commands
from detkd.deploy.errors import DeployError
from detkd.deploy.export import FORMATS, UNSUPPORTED, check_exportable, export_detector, export_onnx, export_torchscript
from detkd.deploy.inputs import expand_inputs
from detkd.deploy.parity import BOX_TOL_PX, SCORE_TOL, ParityReport, compare_image, compare_runs
from detkd.deploy.predict import PredictSummary, open_backend, predict_images
from detkd.deploy.verify import ExportResult, export_and_verify
from detkd.deploy.wrapper import DeployableDetector, LoadedDetector, load_detector

__all__ = [
    "BOX_TOL_PX",
    "FORMATS",
    "SCORE_TOL",
    "UNSUPPORTED",
    "Categories",
    "DeployError",
    "DeployableDetector",
    "Detections",
    "EagerBackend",
    "ExportResult",
    "LoadedDetector",
    "OnnxBackend",
    "ParityReport",
    "PredictSummary",
    "TorchScriptBackend",
    "check_exportable",
    "compare_image",
    "compare_runs",
    "deploy_commands",
    "expand_inputs",
    "export_and_verify",
    "export_detector",
    "export_onnx",
    "export_torchscript",
    "load_detector",
    "open_backend",
    "predict_images",
    "read_categories",
]
