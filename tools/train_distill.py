"""Distil a trained teacher detector into a student detector from a recipe.

python tools/train_distill.py --cfg configs/quickstart.yaml [--work-dir DIR] [--resume] [--opts k=v ...]
torchrun --nproc_per_node=2 tools/train_distill.py --cfg ...
"""

import time

from detkd.cli import load_or_exit, run_main, train_parser
from detkd.deploy import deploy_commands
from detkd.diagnose import diagnose_run, format_findings
from detkd.engine.runner import format_final_table, resolve_work_dir, train_distill
from detkd.engine.trainer import is_main_process


def main() -> None:
    args = train_parser(__doc__.splitlines()[0]).parse_args()
    cfg = load_or_exit(args.cfg, args.opts)
    start = time.time()
    summary = train_distill(cfg, work_dir=args.work_dir, resume=args.resume, show_progress=not args.no_progress)
    if not is_main_process():
        return
    print()
    print(format_final_table(summary))
    print(f"exported student: {summary['best_checkpoint']} (a plain torchvision state_dict, best val AP)")
    if cfg.report.mask_images > 0:
        from detkd.vis import visualize_recipe  # matplotlib only here, after training

        out = resolve_work_dir(cfg, args.work_dir) / "mask_vis"
        paths = visualize_recipe(cfg, summary["best_checkpoint"], cfg.report.mask_images, "val", str(out))
        pngs = [p for p in paths if str(p).endswith(".png")]
        print(f"mask pictures: {len(pngs)} PNGs, open {out / 'index.html'}")
    run_dir = resolve_work_dir(cfg, args.work_dir)
    print(format_findings(diagnose_run(run_dir)))  # why (no) gain: python tools/diagnose.py RUN_DIR
    print("deploy the student:")
    for command in deploy_commands(args.cfg, summary["best_checkpoint"], run_dir):
        print(f"  {command}")
    print(f"total wall time {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    run_main(main)
