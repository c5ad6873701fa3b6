"""COCO-evaluate a saved detector on the recipe's val split.

python tools/eval.py --cfg CFG --ckpt work_dirs/<run>/best.pth [--out DIR] [--model student]
"""

import argparse

from detkd.cli import add_opts, load_or_exit, run_main
from detkd.engine.evaluator import format_metrics_table
from detkd.engine.runner import evaluate_detector_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", required=True)
    parser.add_argument("--ckpt", required=True, help="best.pth / student_best.pth / a plain state_dict")
    parser.add_argument("--out", default=None, help="where results.json and metrics.json go")
    parser.add_argument(
        "--model",
        default=None,
        choices=["model", "student", "teacher"],
        help="which detector of the recipe the checkpoint holds (default: model, or student for distillation)",
    )
    parser.add_argument("--no-progress", action="store_true")
    add_opts(parser)
    args = parser.parse_args()
    cfg = load_or_exit(args.cfg, args.opts)
    key = args.model or ("model" if cfg.model is not None else "student")
    metrics = evaluate_detector_checkpoint(cfg, args.ckpt, args.out, model_key=key, show_progress=not args.no_progress)
    print(format_metrics_table(metrics, title=f"{args.ckpt} on {cfg.data.val.ann_file}"))


if __name__ == "__main__":
    run_main(main)
