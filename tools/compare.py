"""Compression report of a recipe's teacher/student pair: AP, params, GFLOPs, CPU latency and the headline ratios.

python tools/compare.py --cfg configs/quickstart.yaml [--ckpt work_dirs/quickstart/student_best.pth]
                        [--teacher-ckpt T] [--threads 1] [--runs 30] [--json OUT]
"""

import argparse
import json

from detkd.cli import add_opts, load_or_exit, run_main
from detkd.cost import compare_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", required=True, help="distillation recipe with teacher and student")
    parser.add_argument("--ckpt", default=None, help="student weights (default: none, cost only)")
    parser.add_argument(
        "--teacher-ckpt", default=None, help="teacher weights (default: the recipe's teacher.checkpoint if present)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the latency runs")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model (>= 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before them")
    parser.add_argument("--json", default=None, help="also write the report as JSON here")
    add_opts(parser)
    args = parser.parse_args()
    cfg = load_or_exit(args.cfg, args.opts)
    report = compare_recipe(cfg, args.ckpt, args.teacher_ckpt, threads=args.threads, runs=args.runs, warmup=args.warmup)
    for name, path in report["checkpoints"].items():
        print(f"{name}: {path or 'no checkpoint (random weights: cost only, no AP)'}")
    print(report["table"])
    print(report["headline"])
    if args.json:
        rows = [row.as_dict() for row in report["rows"]]
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "ratios": report["ratios"], "headline": report["headline"]}, f, indent=2)


if __name__ == "__main__":
    run_main(main)
