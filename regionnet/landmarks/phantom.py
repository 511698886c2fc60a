"""Synthetic spine-like landmark films: a column of bright vertebrae with exact corners.

Each film is a dark, noisy portrait image (default 256 x 128, height x width) with V (default 17,
like T1..L5 of `spine_aasce`) bright quadrilateral "vertebral bodies" stacked head to foot
along a smooth lateral curve (a random sine, amplitude up to about 12 % of the width: a
scoliosis-like S or C curve). Each body is tilted along the curve's tangent, so its endplates are
perpendicular to the column, and its width and height vary slightly and grow caudally like real
vertebrae. Landmarks are the four corners of every body in `spine_aasce` order (top-left,
top-right, bottom-left, bottom-right; head to foot), exact in the continuous pixel convention of
`regionnet.landmarks.coords` ((0, 0) = the top-left corner of the top-left pixel): the quads
are sampled 8 x 8 per pixel, so a pixel's value is the covered area fraction.

Cobb angles are NaN: `regionnet.landmarks` geometry computes them from the corners. Films are
deterministic per (seed, index) and cached as an ordinary landmark folder (`manifest.csv`,
`landmarks.json`, `phantom/*.png`, 8-bit), so they load through the same code as real data.
They are NOT radiographs: accuracy on phantoms is evidence that the pipeline works, nothing more.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

log = logging.getLogger(__name__)

_SS = 8  # sub-samples per pixel side
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
_DRAW_SEED = 1  # part of every film's random stream; change it only to redraw all films
CACHE_VERSION = 2  # in the cache folder's name: bump when films or files change


def vertebra_names(vertebrae: int) -> list[str]:
    """T1..T12, L1..L5 for 17 (the `spine_aasce` set); V1..Vn for any other count."""
    if vertebrae == 17:
        return [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]
    return [f"V{i}" for i in range(1, vertebrae + 1)]


def landmark_names(vertebrae: int = 17) -> list[str]:
    """`<vertebra>_<corner>`, four corners per vertebra, head to foot (as `spine_aasce`)."""
    return [f"{v}_{c}" for v in vertebra_names(vertebrae) for c in CORNERS]


def spine_corners(
    rng: np.random.Generator, height: int, width: int, vertebrae: int = 17
) -> np.ndarray:
    """Corners (V, 4, 2) in pixels (x, y), order TL, TR, BL, BR, head to foot."""
    top, bottom = rng.uniform(0.04, 0.09) * height, rng.uniform(0.9, 0.96) * height
    pitch = (bottom - top) / vertebrae
    amp = rng.uniform(0.0, 0.12) * width * rng.choice([-1, 1])
    freq, phase = rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi)
    cx = width * (0.5 + rng.uniform(-0.06, 0.06))

    def x_of(y: np.ndarray) -> np.ndarray:
        return cx + amp * np.sin(2 * np.pi * freq * (y - top) / (bottom - top) + phase)

    def slope(y: np.ndarray) -> np.ndarray:  # dx/dy
        return (
            amp
            * 2
            * np.pi
            * freq
            / (bottom - top)
            * np.cos(2 * np.pi * freq * (y - top) / (bottom - top) + phase)
        )

    yc = top + pitch * (np.arange(vertebrae) + 0.5)
    centre = np.stack([x_of(yc), yc], 1)
    down = np.stack([slope(yc), np.ones(vertebrae)], 1)
    down /= np.linalg.norm(down, axis=1, keepdims=True)  # column tangent, head -> foot
    right = np.stack([down[:, 1], -down[:, 0]], 1)  # perpendicular, towards image right
    grow = np.linspace(0.0, 1.0, vertebrae)
    w = width * (0.13 + 0.07 * grow) * rng.uniform(0.92, 1.08, vertebrae)
    h = pitch * (0.62 + 0.1 * grow) * rng.uniform(0.92, 1.06, vertebrae)
    signs = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]], dtype=float)  # TL, TR, BL, BR
    return (
        centre[:, None]
        + signs[None, :, :1] * (w / 2)[:, None, None] * right[:, None]
        + signs[None, :, 1:] * (h / 2)[:, None, None] * down[:, None]
    )


def _fill_quad(image: np.ndarray, ring: np.ndarray) -> None:
    """Add the area fraction of a convex quad (4, 2; clockwise on screen) to each pixel.

    Sampled at SS x SS sub-pixel centres ((k + 0.5) / SS): exact to 1/SS^2 of a pixel, with no
    rasteriser rounding (PIL's polygon fill floors vertices and includes both edges, which
    shifted a quad's centroid by 0.13 px in a check).
    """
    h, w = image.shape
    x0, y0 = np.floor(ring.min(0)).astype(int).clip(0, [w, h])
    x1, y1 = np.ceil(ring.max(0)).astype(int).clip(0, [w, h])
    if x1 <= x0 or y1 <= y0:
        return
    sub = (np.arange(_SS) + 0.5) / _SS
    xs = (np.arange(x0, x1)[:, None] + sub).ravel()
    ys = (np.arange(y0, y1)[:, None] + sub).ravel()
    px, py = np.meshgrid(xs, ys)
    ok = np.ones(px.shape, bool)
    for a, b in zip(ring, np.roll(ring, -1, axis=0), strict=True):  # inside = right of each edge
        ok &= (b[0] - a[0]) * (py - a[1]) - (b[1] - a[1]) * (px - a[0]) >= 0
    frac = ok.reshape(y1 - y0, _SS, x1 - x0, _SS).mean((1, 3))
    image[y0:y1, x0:x1] = np.maximum(image[y0:y1, x0:x1], frac)


def render_spine(
    seed: int, index: int = 0, size: Sequence[int] = (256, 128), vertebrae: int = 17
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: pixels float32 (H, W) in [0, 1] and corners (4 V, 2) in pixels.

    `size` is (height, width). Deterministic for (seed, index, size, vertebrae).
    """
    height, width = int(size[0]), int(size[1])
    if height < 32 or width < 16 or vertebrae < 1:
        raise ValueError(
            f"data.phantom.size={list(size)}, vertebrae={vertebrae}: need height >= 32, "
            "width >= 16 and at least one vertebra"
        )
    rng = np.random.default_rng([int(seed) % 2**63, int(index), _DRAW_SEED])
    corners = spine_corners(rng, height, width, vertebrae)
    bone = np.zeros((height, width), np.float32)
    for quad in corners:
        _fill_quad(bone, quad[[0, 1, 3, 2]])  # TL, TR, BR, BL: around the quad
    soft = Image.fromarray((bone * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(6))
    img = (
        rng.uniform(0.05, 0.15)
        + rng.uniform(0.55, 0.75) * bone
        + 0.25 * np.asarray(soft, np.float32) / 255
    )
    img = img + rng.uniform(0.01, 0.03) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0, 1).astype(np.float32), corners.reshape(-1, 2)


def phantom_folder(
    cache: str | Path | None = None,
    n: int = 64,
    size: Sequence[int] = (256, 128),
    vertebrae: int = 17,
    seed: int = 0,
) -> Path:
    """A landmark folder of `n` phantoms (made once, then reused): the path to pass as `root`.

    Layout as `../shared/data/landmarks`: `manifest.csv` (path, dataset=`phantom`, patient_id =
    the film id `spine_<index>`, one film per patient; width, height, view, cobb_* NaN),
    `landmarks.json` (`landmark_names.phantom`, `points`), `phantom/<id>.png`. The folder name
    holds every parameter (and `CACHE_VERSION`), so changed settings get a new folder; it is
    written to a temporary sibling and renamed, so parallel processes (DDP ranks, test workers)
    never see half a cache. `cache` defaults to
    `$REGIONNET_CACHE/landmark_phantoms`, else `~/.cache/regionnet/landmark_phantoms`.
    """
    if cache is None:
        base = os.environ.get("REGIONNET_CACHE") or Path.home() / ".cache" / "regionnet"
        cache = Path(base) / "landmark_phantoms"
    height, width = int(size[0]), int(size[1])
    folder = Path(cache).expanduser() / (
        f"v{CACHE_VERSION}-n{int(n)}-{height}x{width}-V{int(vertebrae)}-seed{int(seed)}"
    )
    if (folder / "landmarks.json").is_file():
        return folder
    if n < 1:
        raise ValueError(f"data.phantom.n={n}: need at least one film")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        (tmp / "phantom").mkdir()
        rows, points = [], {}
        for i in range(int(n)):
            pixels, corners = render_spine(seed, i, (height, width), vertebrae)
            film = f"spine_{i:05d}"
            rel = f"phantom/{film}.png"
            Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(tmp / rel)
            points[rel] = np.round(corners, 4).tolist()
            rows.append({"path": rel, "dataset": "phantom", "patient_id": film,
                         "width": width, "height": height, "view": "AP", "cobb_pt": np.nan,
                         "cobb_mt": np.nan, "cobb_tl": np.nan, "original_split": "",
                         "licence": "synthetic (regionnet.landmarks.phantom)"})  # fmt: skip
        pd.DataFrame(rows).to_csv(tmp / "manifest.csv", index=False)
        names = {"phantom": landmark_names(vertebrae)}
        (tmp / "landmarks.json").write_text(json.dumps({"landmark_names": names, "points": points}))
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first: keep its copy
            if not (folder / "landmarks.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %d landmark phantoms to %s", n, folder)
    return folder
