"""Train one detector (a teacher or a baseline student) from a recipe.

python tools/train.py --cfg configs/teacher_retinanet_r50.yaml [--work-dir DIR] [--resume | --overwrite] [--opts ...]
torchrun --nproc_per_node=2 tools/train.py --cfg ...
"""

from detkd.cli import load_or_exit, run_main, train_parser
from detkd.engine.runner import train_detector
from detkd.engine.trainer import is_main_process


def main() -> None:
    args = train_parser(__doc__.splitlines()[0]).parse_args()
    cfg = load_or_exit(args.cfg, args.opts)
    summary = train_detector(cfg, work_dir=args.work_dir, resume=args.resume, show_progress=not args.no_progress)
    if is_main_process():
        print(
            f"done: best val AP {summary['best_ap']:.4f} (epoch {summary['best_epoch']}), "
            f"{summary['iterations']} iterations in {summary['wall_time_s']:.0f} s; best checkpoint "
            f"{summary['best_checkpoint']}"
        )


if __name__ == "__main__":
    run_main(main)
