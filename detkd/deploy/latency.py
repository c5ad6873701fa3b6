"""Median CPU latency of backends at batch 1 on the same images, and the table the export tool prints.

Each backend (see :mod:`detkd.deploy.backends`) is called on one image at a time, cycling through the images:
``warmup`` untimed calls, then ``runs`` timed calls (at least :data:`MIN_RUNS`), each timed with
``time.perf_counter`` around the whole call (pre-processing, network, post-processing, output conversion). The
thread count is fixed when the backends are made and stated in the table.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

MIN_RUNS = 20
DEFAULT_WARMUP = 5


@dataclass(frozen=True)
class Latency:
    """Timing of one backend: median and quartiles in milliseconds."""

    backend: str
    median_ms: float
    q1_ms: float
    q3_ms: float
    runs: int
    threads: int


def measure(
    name: str,
    backend: Callable[[torch.Tensor], object],
    images: Sequence[torch.Tensor],
    threads: int,
    runs: int = MIN_RUNS,
    warmup: int = DEFAULT_WARMUP,
) -> Latency:
    """Time ``backend`` on ``images`` (cycled), batch 1.

    Raises:
        ValueError: fewer than :data:`MIN_RUNS` runs, or no images.
    """
    if runs < MIN_RUNS:
        raise ValueError(f"latency needs at least {MIN_RUNS} timed runs; got {runs}")
    if not images:
        raise ValueError("latency needs at least one image")
    times = []
    for k in range(warmup + runs):
        image = images[k % len(images)]
        start = time.perf_counter()
        backend(image)
        if k >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    q1, _, q3 = statistics.quantiles(times, n=4)
    return Latency(name, statistics.median(times), q1, q3, runs, threads)


def format_latency_table(rows: Sequence[Latency], image_desc: str = "") -> str:
    """A markdown table: backend, median ms, quartiles, speed-up over the first row (eager PyTorch)."""
    if not rows:
        return "(no latency measured)"
    base = rows[0].median_ms
    threads = sorted({r.threads for r in rows})
    head = (
        f"CPU latency, batch 1, {'/'.join(map(str, threads))} thread(s), median of {rows[0].runs} timed runs after "
        f"warm-up{', ' + image_desc if image_desc else ''}:"
    )
    lines = [
        head,
        "",
        "| backend | median ms / image | q1 - q3 ms | speed-up vs eager |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.backend} | {r.median_ms:.1f} | {r.q1_ms:.1f} - {r.q3_ms:.1f} | {base / r.median_ms:.2f} x |"
        )
    return "\n".join(lines)
