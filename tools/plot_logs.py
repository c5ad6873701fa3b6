"""Plot the loss terms and val AP of one or more runs (e.g. a baseline and a distilled student) from metrics.jsonl.

python tools/plot_logs.py work_dirs/student work_dirs/distill_fgd --out curves.png
"""

import argparse
from pathlib import Path

from detkd.cli import run_main
from detkd.errors import DataNotFoundError, RunError
from detkd.vis import plot_logs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders holding metrics.jsonl")
    parser.add_argument("--out", required=True, help="PNG file to write")
    args = parser.parse_args()
    for run in map(Path, args.runs):
        if not (run / "metrics.jsonl" if run.is_dir() else run).is_file():
            raise DataNotFoundError(f"no metrics file at {run} (a run folder holds metrics.jsonl).")
    if Path(args.out).is_dir():
        raise RunError(f"--out {args.out} is a folder; pass the PNG file to write.")
    print(plot_logs(args.runs, args.out))


if __name__ == "__main__":
    run_main(main)
