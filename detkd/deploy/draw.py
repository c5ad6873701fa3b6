"""Draw detections on an image with OpenCV: a box per detection, labelled ``<category name> <score>``."""

from __future__ import annotations

import cv2
import numpy as np

from detkd.deploy.backends import Detections
from detkd.deploy.categories import Categories

MIN_DRAW_SIDE = 384
"""Images whose shorter side is below this are enlarged by a whole factor (nearest neighbour) so labels stay legible;
boxes are scaled with them."""

# tab10-like colours, RGB
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip


def draw_detections(image_rgb: np.ndarray, detections: Detections, categories: Categories) -> np.ndarray:
    """Boxes and ``name score`` labels on a copy of ``image_rgb``.

    Args:
        image_rgb: ``(H, W, 3)`` uint8 RGB.
        detections: boxes in the pixels of ``image_rgb``, labels as category ids.
        categories: for the names and a colour per category.

    Returns:
        ``(s*H, s*W, 3)`` uint8 **BGR** (ready for ``cv2.imwrite``), ``s = ceil(MIN_DRAW_SIDE / min(H, W))`` for
        small images, else 1.
    """
    h, w = image_rgb.shape[:2]
    scale = max(1, -(-MIN_DRAW_SIDE // max(1, min(h, w))))
    canvas = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    if scale > 1:
        canvas = cv2.resize(canvas, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    side = min(canvas.shape[:2])
    thickness = max(2, round(side / 200))
    font_scale = max(0.35, side / 900)
    order = np.argsort(detections.scores, kind="stable")  # strongest drawn last, on top
    for k in order:
        x0, y0, x1, y1 = (int(round(float(v) * scale)) for v in detections.boxes[k])
        cat = int(detections.labels[k])
        index = categories.ids.index(cat) if cat in categories.ids else len(PALETTE) - 1
        color = tuple(int(c) for c in reversed(PALETTE[index % len(PALETTE)]))  # BGR
        cv2.rectangle(canvas, (x0, y0), (x1, y1), color, thickness, cv2.LINE_AA)
        text = f"{categories.name_of(cat)} {float(detections.scores[k]):.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = y0 - 2 if y0 - th - base - 2 >= 0 else y0 + th + base + 2  # above the box, or inside if no room
        tx = min(max(0, x0), canvas.shape[1] - tw - 2)  # keep the label inside the picture
        cv2.rectangle(canvas, (tx, ty - th - base), (tx + tw + 2, ty + base // 2), color, -1)
        cv2.putText(canvas, text, (tx + 1, ty - base // 2), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), 1,
                    cv2.LINE_AA)  # fmt: skip
    return canvas
