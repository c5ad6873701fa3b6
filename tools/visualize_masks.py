"""See where it distils: mask figures of a distillation recipe, one PNG per image and level, and an index.html.

python tools/visualize_masks.py --cfg configs/distill/fgd.yaml [--ckpt work_dirs/distill_fgd/student_best.pth]
    [--num-images 4] [--split val] [--levels p3 p4] [--out DIR] [--opts key=value ...]

Without --ckpt the student is shown at initialisation (compare with a trained checkpoint to see before/after).
"""

import argparse
from pathlib import Path

from detkd.cli import add_opts, load_or_exit, run_main
from detkd.config import teacher_entries
from detkd.engine.checkpoint import load_checkpoint
from detkd.errors import CheckpointNotFoundError, ConfigError
from detkd.vis import visualize_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", required=True, help="distillation recipe YAML")
    parser.add_argument("--ckpt", default=None, help="student_best.pth, last.pth or a plain student state_dict")
    parser.add_argument("--num-images", "--images", type=int, default=4, help="how many images (the first ones)")
    parser.add_argument("--split", default="val", choices=["val", "train"])
    parser.add_argument("--levels", nargs="*", default=None, help="levels to draw (default: the distilled ones)")
    parser.add_argument("--out", default=None, help="output folder (default: <work_dir>/mask_vis)")
    add_opts(parser)
    args = parser.parse_args()
    cfg = load_or_exit(args.cfg, args.opts)
    if not teacher_entries(cfg) or cfg.student is None:
        raise ConfigError(f"{args.cfg}: not a distillation recipe (mask pictures need 'teacher' and 'student').")
    if args.num_images < 1:
        raise ConfigError(f"--num-images must be >= 1, got {args.num_images}.")
    for _, _, teacher, _ in teacher_entries(cfg):  # several teachers: the pictures show the first
        if teacher.checkpoint is not None and not Path(teacher.checkpoint).is_file():
            how = f"tools/train_distill.py --cfg {args.cfg} trains it" if teacher.train_if_missing else "train it"
            raise CheckpointNotFoundError(f"teacher checkpoint {teacher.checkpoint} does not exist; {how} first.")
    if args.ckpt is not None:
        load_checkpoint(args.ckpt, mmap=True)  # a bad --ckpt: one message naming the file, before any work
    paths = visualize_recipe(cfg, args.ckpt, args.num_images, args.split, args.out, args.levels)
    for path in paths:
        print(path)
    print(f"open {paths[-1]} in a browser")


if __name__ == "__main__":
    run_main(main)
