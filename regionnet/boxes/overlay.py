"""Vertebra boxes drawn on their radiograph (Pillow): predicted boxes red with their label and
score, true boxes green. Boxes are [x1, y1, x2, y2] in the image's own pixels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from regionnet.landmarks.overlay import PRED_COLOUR, TRUE_COLOUR, _gray_uint8


def draw_boxes(
    image, boxes: Sequence[dict], true_boxes=None, path: str | Path = "boxes.png"
) -> Path:
    """Save `image` (H, W gray, uint8 or float in [0, 1]) as an RGB PNG of the same size with
    `boxes` (`{"label", "score", "box"}` dicts, as the API gives them) in red, labelled, and
    `true_boxes` ((N, 4) [x1, y1, x2, y2]) in green. Returns the path."""
    gray = _gray_uint8(image)
    canvas = Image.fromarray(gray).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    size = max(gray.shape)
    width = max(1, round(size / 500))
    font = ImageFont.load_default(size=max(8, size // 80))
    for box in true_boxes if true_boxes is not None else []:
        draw.rectangle([float(v) for v in box], outline=TRUE_COLOUR, width=width)
    for b in boxes:
        x1, y1, x2, y2 = b["box"]
        draw.rectangle([x1, y1, x2, y2], outline=PRED_COLOUR, width=width)
        draw.text((x2 + 2, y1), f"{b['label']} {b['score']:.2f}", fill=PRED_COLOUR, font=font,
                  stroke_width=1, stroke_fill=0)  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
