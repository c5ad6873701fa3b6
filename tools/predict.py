"""Detect objects in images with a trained detector: pictures with the boxes drawn, and predictions.json.

python tools/predict.py --cfg RECIPE --ckpt CKPT INPUT... --out DIR [--model student|teacher|model]
                        [--score-thr 0.3] [--onnx FILE | --torchscript FILE] [--device cpu|cuda] [--overwrite]

INPUT: image files, folders and glob patterns (quote globs), any format OpenCV reads.
"""

import argparse
import sys

from detkd.cli import add_opts, load_or_exit, run_main
from detkd.deploy.inputs import expand_inputs
from detkd.deploy.predict import open_backend, predict_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, glob patterns")
    parser.add_argument("--cfg", required=True, help="the recipe (categories, detector)")
    parser.add_argument("--ckpt", default=None, help="checkpoint to run in PyTorch (not needed with --onnx)")
    parser.add_argument("--out", required=True, help="output folder: <name>.jpg per image and predictions.json")
    parser.add_argument("--model", default=None, help="model, student or teacher (default: model, else student)")
    parser.add_argument("--score-thr", type=float, default=0.3, help="draw and write detections above (0.3)")
    exported = parser.add_mutually_exclusive_group()
    exported.add_argument("--onnx", default=None, help="run this ONNX file (onnxruntime) instead of the checkpoint")
    exported.add_argument("--torchscript", default=None, help="run this TorchScript file instead")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs already in --out")
    parser.add_argument("--no-progress", action="store_true")
    add_opts(parser)
    args = parser.parse_args()
    cfg = load_or_exit(args.cfg, args.opts)
    paths, unmatched = expand_inputs(args.inputs)
    for pattern in unmatched:
        print(f"warning: no image matches '{pattern}'", file=sys.stderr)
    backend, categories = open_backend(
        cfg, args.ckpt, args.model, args.onnx, args.torchscript, args.device, args.threads
    )

    def warn(message: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"warning: {message}", file=sys.stderr)

    summary = predict_images(
        backend, paths, args.out, categories, args.score_thr, args.overwrite, warn, not args.no_progress
    )
    print(summary.format())


if __name__ == "__main__":
    run_main(main)
