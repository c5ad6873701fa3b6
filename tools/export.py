"""Export a trained detector to ONNX or TorchScript, check parity with PyTorch on val images, and time it.

python tools/export.py --cfg RECIPE --ckpt CKPT --format onnx|torchscript --out FILE [--model student]
                       [--num-images N] [--opset K] [--threads T] [--runs R] [--no-latency]

Exit status: 0 when parity holds, 1 when it fails (the differences are printed), 2 for a bad input.
"""

import argparse

from detkd.cli import add_opts, load_or_exit, run_main
from detkd.deploy.export import DEFAULT_OPSET, INPUT_DTYPES
from detkd.deploy.latency import MIN_RUNS, format_latency_table
from detkd.deploy.verify import export_and_verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", required=True, help="the recipe the checkpoint was trained with")
    parser.add_argument("--ckpt", required=True, help="student_best.pth / best.pth / a plain state_dict")
    parser.add_argument("--format", required=True, help="onnx or torchscript")
    parser.add_argument("--out", required=True, help="the file to write, e.g. student.onnx / student.pt")
    parser.add_argument("--model", default=None, help="model, student or teacher (default: model, else student)")
    parser.add_argument("--num-images", type=int, default=8, help="val images for the parity check (default 8)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--input-dtype", default="uint8", choices=INPUT_DTYPES, help="ONNX input type (uint8)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for parity and latency (default 1)")
    parser.add_argument("--runs", type=int, default=MIN_RUNS, help=f"timed runs per backend (>= {MIN_RUNS})")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    add_opts(parser)
    args = parser.parse_args()
    cfg = load_or_exit(args.cfg, args.opts)
    result = export_and_verify(
        cfg,
        args.ckpt,
        args.format,
        args.out,
        model_key=args.model,
        num_images=args.num_images,
        opset=args.opset,
        input_dtype=args.input_dtype,
        threads=args.threads,
        latency_runs=None if args.no_latency else args.runs,
    )
    print(f"exported {result.loaded.description} ({result.loaded.model_key} of {cfg.name}) to {result.path}")
    print(result.parity.format())
    if result.latency:
        print()
        print(format_latency_table(result.latency, f"{len(result.parity.images)} val images cycled"))
    for note in result.notes:
        print(note)
    if not result.parity.passed:
        raise SystemExit(1)


if __name__ == "__main__":
    run_main(main)
