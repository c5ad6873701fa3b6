"""Generate the deterministic synthetic COCO-format set (the embedded default).

python tools/make_synthetic.py --out data/synthetic --num-train 1500 --num-val 300 --size 128 --seed 0 [--force]
python tools/make_synthetic.py --out data/bench --preset bench     # a named difficulty (detkd.data.synthetic.PRESETS)
"""

import argparse

from detkd.cli import run_main
from detkd.data.synthetic import PRESETS, ensure_synthetic, generate_synthetic_coco, preset_knobs, split_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/synthetic", help="dataset root (images/ and annotations/ go here)")
    parser.add_argument("--num-train", type=int, default=1500)
    parser.add_argument("--num-val", type=int, default=300)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--preset", default="default", choices=sorted(PRESETS), help="named difficulty; the two knobs below override it"
    )
    parser.add_argument("--min-object-size", type=float, default=None, help="smallest object diameter in px")
    parser.add_argument("--clutter", type=float, default=None, help="scale of the background clutter (0: none)")
    parser.add_argument("--force", action="store_true", help="regenerate even if a set with these arguments exists")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    knobs = preset_knobs(args.preset)
    if args.min_object_size is not None:
        knobs["min_object_size"] = args.min_object_size
    if args.clutter is not None:
        knobs["clutter"] = args.clutter
    make = generate_synthetic_coco if args.force else ensure_synthetic
    show_progress = not args.no_progress
    paths = make(
        args.out,
        args.num_train,
        args.num_val,
        size=args.size,
        seed=args.seed,
        show_progress=show_progress,
        **knobs,
    )
    for split, split_paths in paths.items():
        stats = split_stats(split_paths["ann_file"])
        print(
            f"{split}: {stats['images']} images ({stats['empty_images']} empty), {stats['annotations']} boxes"
            f" | ann_file={split_paths['ann_file']} img_dir={split_paths['img_dir']}"
        )


if __name__ == "__main__":
    run_main(main)
