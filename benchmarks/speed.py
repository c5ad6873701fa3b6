"""Speed and memory of distillation: what does each method cost per training step?

For a pair of detectors and every method, in a fresh process each (so peak memory is the method's own):

    (a) a student training step alone (forward + backward + SGD step)
    (b) a teacher forward alone (no grad, eval mode; backbone+FPN, plus the head when the method needs it)
    (c) a distillation step (the Distiller: student step + teacher forward + masks + losses)

and reports the median and spread (IQR) of each over ``--reps`` repetitions after ``--warmup``, the overhead
ratio ``c / (a + b)``, the share of (c) spent computing masks and losses (measured inside the Distiller with
``time.perf_counter`` around the loss section, forward only), and the peak memory of (c) vs (a) (on CPU the
process's peak RSS, on CUDA ``torch.cuda.max_memory_allocated``).

    python benchmarks/speed.py                    # both pairs, every method -> benchmarks/results/speed.{json,md}
    python benchmarks/speed.py --pairs retinanet --methods fgd pkd --reps 10
    python benchmarks/speed.py --pairs retinanet --methods pkd --teachers 2   # K teachers -> speed_teachers2.*

With ``--teachers K`` the distillation step has K heterogeneous teachers (the pair's teacher, then the pair's
``extra_teachers`` in turn, fixed weighting), (b) is the sum of the K teachers' forwards, and the target is
``c / (a + b) <= 1.10``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

PAIRS: dict[str, dict[str, Any]] = {
    "retinanet": {
        "teacher": {"arch": "retinanet", "backbone": "resnet50", "fpn_channels": 256},
        "student": {"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 64},
        # more teachers for --teachers K: another family and width than the first
        "extra_teachers": [{"arch": "fcos", "backbone": "resnet34", "fpn_channels": 128}],
        "methods": [
            "mse",
            "fgfi",
            "defeat",
            "gid",
            "attention",
            "fgd",
            "pkd",
            "cwd",
            "relation",
            "pseudo_label",
            "logit_kd",
            "cross_kd",
        ],
    },
    "faster_rcnn": {
        "teacher": {"arch": "faster_rcnn", "backbone": "resnet50", "fpn_channels": 256},
        "student": {"arch": "faster_rcnn", "backbone": "resnet18", "fpn_channels": 64},
        "extra_teachers": [{"arch": "retinanet", "backbone": "resnet34", "fpn_channels": 128}],
        "methods": ["mse", "fgfi", "defeat", "gid", "attention", "fgd", "pkd", "cwd", "pseudo_label", "roi_kd"],
        "extra_methods": ["roi_kd_all", "roi_kd_256", "roi_kd_64", "roi_kd_32"],  # with --methods only
    },
}
FEATURE_METHODS = {"mse", "fgfi", "defeat", "gid", "attention", "fgd", "pkd", "cwd", "relation"}
HEAD_METHODS = {
    "pseudo_label": {"score_thr": 0.3},
    "logit_kd": {},
    "cross_kd": {},
    "roi_kd": {},
    "dkd": {"loss": "dkd"},
    # roi_kd's max_rois budget (default 128 per image): every sampled ROI, and smaller budgets
    "roi_kd_all": {"max_rois": None},
    "roi_kd_256": {"max_rois": 256},
    "roi_kd_64": {"max_rois": 64},
    "roi_kd_32": {"max_rois": 32},
}
HEAD_LOSS_TYPE = {"dkd": "roi_kd", "roi_kd_all": "roi_kd", "roi_kd_256": "roi_kd", "roi_kd_64": "roi_kd",
                  "roi_kd_32": "roi_kd"}  # fmt: skip


def make_batch(batch: int, size: int, num_classes: int, seed: int = 0):
    """A fixed batch of textured images with 4 random boxes each (speed does not depend on content)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=g) * size * 0.6
        wh = 8 + torch.rand(4, 2, generator=g) * size * 0.35
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1)
        labels = torch.randint(1, num_classes, (4,), generator=g)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed(fn, warmup: int, reps: int, device) -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), statistics.median(times), max(times)]
    return {"median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2], "n": len(times)}


def measure(pair: str, method: str, part: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one measurement in this process: part is 'student', 'teacher' or 'distill'."""
    import torch

    from detkd.distiller import Distiller, LossSpec, TeacherSpec
    from detkd.losses import HEAD_LOSSES, build_feature_loss
    from detkd.models.build import build_detector

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = PAIRS[pair]
    common = {"num_classes": args.num_classes, "min_size": args.size, "max_size": args.size}
    pool = [spec["teacher"], *spec.get("extra_teachers", [])]
    teachers = [build_detector(**pool[k % len(pool)], **common).to(device) for k in range(args.teachers)]
    teacher = teachers[0]
    student = build_detector(**spec["student"], **common).to(device)
    images, targets = make_batch(args.batch, args.size, args.num_classes)
    images = [i.to(device) for i in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]

    feature, head, pseudo = [], [], None
    if method in FEATURE_METHODS:
        feature = [LossSpec(method, build_feature_loss(method), 1.0, "all")]
    elif method in HEAD_METHODS:
        module = HEAD_LOSSES[HEAD_LOSS_TYPE.get(method, method)](**HEAD_METHODS[method])
        if module.makes_targets:
            module.set_category_map({i: i for i in range(1, args.num_classes)})
            pseudo = module
        else:
            head = [LossSpec(method, module, 1.0)]
    if args.teachers == 1:
        distiller = Distiller(teacher, student, feature, head, pseudo, probe_size=args.size).to(device)
    else:
        specs = [TeacherSpec(f"t{k}", t) for k, t in enumerate(teachers)]
        distiller = Distiller(specs, student, feature, head, pseudo, probe_size=args.size).to(device)
    distiller.train()
    params = [p for p in distiller.parameters() if p.requires_grad]
    # lr 0: every repetition does the full step (backward + optimizer update) on unchanged weights. With real
    # updates the steps drift apart: e.g. a large distillation gradient lowers a Faster R-CNN RPN's objectness below
    # its score threshold within a few steps, and the ROI head then sees 10x fewer proposals (and runs 4x faster)
    opt = torch.optim.SGD(params, lr=0.0, momentum=0.9)

    def student_step():
        losses = student(images, targets)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    def teacher_forward():
        """What the distillation step adds on the teacher side (the Distiller's own calls), for every teacher."""
        with torch.no_grad():
            for teacher in teachers:
                if pseudo is not None:
                    teacher(images)  # full detection for the pseudo labels
                if not feature and not head:
                    continue  # a pseudo-label-only recipe runs no second teacher pass
                feats = teacher.backbone(student.transform(images)[0].tensors)
                if "teacher_head" in distiller.needs and hasattr(teacher, "head"):
                    teacher.head(list(feats.values()))

    def distill_step():
        losses = distiller(images, targets)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    fn = {"student": student_step, "teacher": teacher_forward, "distill": distill_step}[part]
    distiller.timings.clear()
    times = timed(fn, args.warmup, args.reps, device)
    out = {"pair": pair, "method": method, "part": part, **summary(times), "peak_mb": peak_memory_mb(device)}
    if part == "distill":
        loss_times = list(distiller.timings.get("losses", []))[-args.reps :]
        out["loss_median_s"] = statistics.median(loss_times) if loss_times else 0.0
    return out


def run_isolated(pair: str, method: str, part: str, args: argparse.Namespace) -> dict[str, Any]:
    """Each measurement in its own interpreter, so the peak RSS is that measurement's."""
    cmd = [sys.executable, __file__, "--worker", pair, method, part, "--reps", str(args.reps),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--size", str(args.size),
           "--threads", str(args.threads), "--device", args.device, "--teachers", str(args.teachers)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{pair}/{method}/{part} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def to_markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"Measured by `python benchmarks/speed.py` on {meta['machine']} ({meta['threads']} threads, device "
        f"{meta['device']}), batch {meta['batch']} at {meta['size']} px, median of {meta['reps']} steps after "
        f"{meta['warmup']} warm-up steps (IQR in brackets)"
        + (
            f", {meta['teachers']} teachers (teacher fwd = the sum of their forwards)."
            if meta.get("teachers", 1) > 1
            else "."
        ),
        "",
        "| pair | method | student step (a) | teacher fwd (b) | distill step (c) | overhead c/(a+b) | masks+losses "
        "share of (c) | peak mem (c) / (a) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['pair']} | {row['method']} | {_ms(row['student'])} | {_ms(row['teacher'])} | "
            f"{_ms(row['distill'])} | {row['overhead']:.2f} | {100 * row['loss_share']:.1f} % | "
            f"{row['distill']['peak_mb']:.0f} / {row['student']['peak_mb']:.0f} MB |"
        )
    return "\n".join(lines) + "\n"


def _ms(m: dict[str, float]) -> str:
    return f"{1000 * m['median_s']:.0f} ms [{1000 * m['q1_s']:.0f}-{1000 * m['q3_s']:.0f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="*", default=list(PAIRS))
    parser.add_argument("--methods", nargs="*", default=None, help="default: every method of each pair")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=9)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--teachers", type=int, default=1, help="K teachers in the distillation step")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/speed (speed_teachers<K> for K > 1)")
    parser.add_argument("--worker", nargs=3, metavar=("PAIR", "METHOD", "PART"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(*args.worker, args)))
        return

    rows = []
    for pair in args.pairs:
        methods = args.methods or PAIRS[pair]["methods"]
        base = {part: run_isolated(pair, "none", part, args) for part in ("student",)}
        for method in methods:
            if method not in PAIRS[pair]["methods"] + PAIRS[pair].get("extra_methods", []):
                continue
            m = {part: run_isolated(pair, method, part, args) for part in ("teacher", "distill")}
            m["student"] = base["student"]
            a, b, c = m["student"]["median_s"], m["teacher"]["median_s"], m["distill"]["median_s"]
            row = {"pair": pair, "method": method, **m, "overhead": c / (a + b),
                   "loss_share": m["distill"]["loss_median_s"] / c}  # fmt: skip
            rows.append(row)
            print(f"{pair:12s} {method:13s} a={a * 1000:6.0f} ms b={b * 1000:6.0f} ms c={c * 1000:6.0f} ms "
                  f"overhead={row['overhead']:.2f} masks+losses={100 * row['loss_share']:.1f}% "
                  f"mem={m['distill']['peak_mb']:.0f}/{m['student']['peak_mb']:.0f} MB", flush=True)  # fmt: skip
    import torch

    from detkd.cost import machine_description

    meta = {"machine": machine_description(), "threads": args.threads,
            "device": args.device, "batch": args.batch, "size": args.size, "reps": args.reps,
            "warmup": args.warmup, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "teachers": args.teachers}  # fmt: skip
    results = {"meta": meta, "rows": rows}
    out = Path(args.out or RESULTS / ("speed" if args.teachers == 1 else f"speed_teachers{args.teachers}"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(to_markdown(results))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
