"""Landmarks drawn on their radiograph (Pillow), for reading a prediction at a glance.

Predicted points are red, true points green; for "vertebrae" the upper and lower endplate of
every vertebra (TL->TR, BL->BR) is drawn in the points' colour, and the Cobb angles are written
in the top-left corner. Points are [x, y] in the image's own pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from regionnet.landmarks.geometry import COBB_NAMES, check_skeleton, endplate_lines

PRED_COLOUR = (230, 40, 40)
TRUE_COLOUR = (40, 200, 60)


def _gray_uint8(image) -> np.ndarray:
    """(H, W) uint8 from uint8 or float (taken as [0, 1] when its maximum is <= 1)."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"draw_landmarks takes a gray (H, W) image, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    if np.nanmax(a, initial=0.0) <= 1.0:
        a = a * 255
    return np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, points, skeleton: str, colour, r: float, width: int):
    p = np.asarray(points, dtype=np.float64)
    if skeleton == "vertebrae" and len(p) % 4 == 0 and np.isfinite(p).all():
        for plate in endplate_lines(p).reshape(-1, 2, 2):
            draw.line([tuple(plate[0]), tuple(plate[1])], fill=colour, width=width)
    for x, y in p:
        if np.isfinite(x) and np.isfinite(y):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def draw_landmarks(
    image,
    points,
    skeleton: str,
    true_points=None,
    angles: Sequence[float] | None = None,
    path: str | Path = "landmarks.png",
    true_angles: Sequence[float] | None = None,
) -> Path:
    """Save `image` (H, W gray, uint8 or float in [0, 1]) as an RGB PNG of the same size with
    `points` (K, 2) in red, `true_points` in green, endplates for "vertebrae", and `angles`
    ([PT, MT, TL] degrees, predicted; `true_angles` beside them) as text. Returns the path."""
    check_skeleton(skeleton)
    gray = _gray_uint8(image)
    canvas = Image.fromarray(gray).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    size = max(gray.shape)
    r, width = max(1.5, size / 300), max(1, round(size / 500))
    if true_points is not None:
        _draw(draw, np.asarray(true_points), skeleton, TRUE_COLOUR, r, width)
    _draw(draw, np.asarray(points), skeleton, PRED_COLOUR, r, width)
    if angles is not None:
        lines = [
            f"{name.upper()} {a:5.1f}" + ("" if true_angles is None else f" (true {t:5.1f})")
            for name, a, t in zip(
                COBB_NAMES, angles, true_angles if true_angles is not None else angles, strict=True
            )
        ]
        font = ImageFont.load_default(size=max(10, size // 50))
        draw.multiline_text(
            (4, 4), "\n".join(lines), fill=PRED_COLOUR, font=font, stroke_width=1, stroke_fill=0
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
