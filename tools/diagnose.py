"""Why no gain? Diagnose a distillation run: terms that collapsed, dominate or went non-finite, a weak teacher, AP
against a baseline, each with one suggestion; writes a plot of every term's ratio to the task loss.

python tools/diagnose.py work_dirs/quickstart [work_dirs/baseline_run] [--plot FILE]
"""

import argparse
from pathlib import Path

from detkd.cli import run_main
from detkd.diagnose import diagnose_run, format_findings, plot_ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", metavar="RUN_DIR", help="the distillation run's work dir (holds metrics.jsonl)")
    parser.add_argument("baseline", nargs="?", default=None, metavar="BASELINE_RUN_DIR",
                        help="a run of the student alone (default: RUN_DIR/baseline when it exists)")  # fmt: skip
    parser.add_argument("--plot", default=None, help="PNG to write (default: RUN_DIR/diagnose.png)")
    args = parser.parse_args()
    findings = diagnose_run(args.run, args.baseline)
    print(format_findings(findings))
    print(f"plot: {plot_ratios(args.run, args.plot or Path(args.run) / 'diagnose.png')}")


if __name__ == "__main__":
    run_main(main)
