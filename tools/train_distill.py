"""Distil a trained teacher detector into a student detector from a recipe.

python tools/train_distill.py --cfg configs/quickstart.yaml [--work-dir DIR] [--resume] [--opts k=v ...]
torchrun --nproc_per_node=2 tools/train_distill.py --cfg ...
"""

from detkd.cli import load_or_exit, run_main, train_parser
from detkd.engine.runner import train_distill
from detkd.engine.trainer import is_main_process


def main() -> None:
    args = train_parser(__doc__.splitlines()[0]).parse_args()
    cfg = load_or_exit(args.cfg, args.opts)
    summary = train_distill(cfg, work_dir=args.work_dir, resume=args.resume, show_progress=not args.no_progress)
    if is_main_process():
        print(
            f"done: teacher AP {summary['teacher_ap']:.4f} | student best AP {summary['best_ap']:.4f} "
            f"(epoch {summary['best_epoch']}) | {summary['iterations']} iterations in {summary['wall_time_s']:.0f} s"
            f" | exported student: {summary['best_checkpoint']}"
        )


if __name__ == "__main__":
    run_main(main)
