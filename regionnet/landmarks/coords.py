"""Landmark coordinate frames: original pixels, letterboxed input pixels, normalised [-1, 1].

All three are continuous coordinates with (0, 0) at the top-left *corner* of the top-left pixel,
x to the right, y down, so pixel (row i, column j) covers [j, j + 1) x [i, i + 1) and its centre
is (j + 0.5, i + 0.5).

- **original**: pixels of the file as stored (`landmarks.json`, `points_px` of a batch).
- **input**: pixels of the S x S letterboxed network input made by
  `regionnet.data.transforms.resize_pad` (torchvision `Resize(max_size=S)`: the longest side
  becomes S and the other `int(S * short / long)`, rounded *down*; then `CenterCrop(S)` pads
  `(S - new) // 2` before and the rest after): `x_in = x_orig * scale_x + offset_x`. The short
  side is rounded, so `scale_x` and `scale_y` differ by up to one input pixel over the image
  (up to 4 original pixels for 1024 -> 256); a single scale would put points that far off.
  `scale` is therefore the pair `(scale_x, scale_y)`; every function also accepts one number
  per film (isotropic).
- **normalised**: `x_n = 2 * x_in / S - 1`, the `align_corners=False` convention of
  `torch.nn.functional.grid_sample` and of DSNT: -1 is the left edge of the input, +1 the right.

- **detail** (two-step models with a `detail_size` D): the film letterboxed to D x D by the same
  rule, the image step 2 cuts its crops from. The S x S input is then the detail image
  average-pooled by D/S (`detail_to_input`; D a multiple of S), not `resize_pad(S)` of the
  film, so both are one frame at two scales: normalised coordinates are the same in both,
  an input pixel is D/S detail pixels, and the film -> input letterbox is the detail one times
  S/D (`scale`, `offset` of such a batch). `letterbox_params(w, h, D)` x S/D can differ from
  `letterbox_params(w, h, S)` by a fraction of an input pixel (the short side is rounded at D).

Functions take torch tensors or numpy arrays of points (..., K, 2) (a batch is (B, K, 2)) and
return the same kind. `scale` and `offset` per film broadcast as (B,) or (B, 2) against (B, K, 2).
"""

from __future__ import annotations

import numpy as np
import torch

Array = torch.Tensor | np.ndarray


def letterbox_params(
    width: int, height: int, size: int
) -> tuple[tuple[float, float], float, float]:
    """`((scale_x, scale_y), offset_x, offset_y)` of `resize_pad(size)` on a width x height film.

    Matches torchvision 0.29 exactly: the longer side goes to `size`, the shorter to
    `int(size * short / long)`; the pad before is `(size - new) // 2` (CenterCrop's left/top).
    A square film gives scale size/width on both axes and no offset.
    """
    width, height, size = int(width), int(height), int(size)
    if width < 1 or height < 1 or size < 1:
        raise ValueError(f"letterbox of a {width}x{height} film to {size}: sizes must be >= 1")
    short, long = (width, height) if width <= height else (height, width)
    new_short = int(size * short / long)
    new_w, new_h = (new_short, size) if width <= height else (size, new_short)
    scale = (new_w / width, new_h / height)
    return scale, float((size - new_w) // 2), float((size - new_h) // 2)


def input_letterbox(
    width: int, height: int, size: int, detail_size: int | None = None
) -> tuple[tuple[float, float], float, float]:
    """`letterbox_params` of the S x S input: of `resize_pad(size)`, or, with a detail image,
    the detail letterbox (`resize_pad(detail_size)`) scaled by size / detail_size (the input
    is the detail image pooled; see "detail" above)."""
    if detail_size is None:
        return letterbox_params(width, height, size)
    k = detail_factor(detail_size, size)
    (sx, sy), ox, oy = letterbox_params(width, height, detail_size)
    return (sx / k, sy / k), ox / k, oy / k


def _like(value, points: Array) -> Array:
    """`value` (number, (B,), (2,), (B, 2)) as an array of `points`' kind broadcasting to it."""
    if isinstance(points, torch.Tensor):
        v = torch.as_tensor(value, dtype=points.dtype, device=points.device)
    else:
        v = np.asarray(value, dtype=points.dtype if points.dtype.kind == "f" else np.float64)
    if v.ndim == 0:
        return v
    if v.ndim == 1 and v.shape[0] == 2 and points.ndim == 2:  # one film (K, 2), per-axis value
        return v
    if v.ndim == 1:  # one number per film: (B,) -> (B, 1, 1)
        return v.reshape((-1,) + (1,) * (points.ndim - 1))
    if v.ndim == 2 and v.shape[-1] == 2:  # per film and axis: (B, 2) -> (B, 1, 2)
        return v.reshape((v.shape[0],) + (1,) * (points.ndim - 2) + (2,))
    raise ValueError(f"cannot broadcast a value of shape {tuple(v.shape)} against points "
                     f"{tuple(points.shape)}; use a number, (B,), (2,) or (B, 2)")  # fmt: skip


def _float(points: Array) -> Array:
    if isinstance(points, torch.Tensor):
        return points if points.is_floating_point() else points.float()
    points = np.asarray(points)
    return points if points.dtype.kind == "f" else points.astype(np.float64)


def to_input(points_orig: Array, scale, offset) -> Array:
    """Original pixels -> input pixels: `p * scale + offset` (per axis)."""
    p = _float(points_orig)
    return p * _like(scale, p) + _like(offset, p)


def to_original(points_in: Array, scale, offset) -> Array:
    """Input pixels -> original pixels: `(p - offset) / scale`, the inverse of `to_input`."""
    p = _float(points_in)
    return (p - _like(offset, p)) / _like(scale, p)


def to_normalised(points_in: Array, size: int) -> Array:
    """Input pixels of an S x S input -> [-1, 1] (`2 * p / S - 1`; edges, not pixel centres)."""
    return 2.0 * _float(points_in) / float(size) - 1.0


def from_normalised(points_n: Array, size: int) -> Array:
    """[-1, 1] -> input pixels of an S x S input: `(p + 1) * S / 2`."""
    return (_float(points_n) + 1.0) * float(size) / 2.0


def inside(points_in: Array, size: int) -> Array:
    """Bool (..., K): the point lies on the S x S input, [0, S) on both axes, and is finite."""
    p = _float(points_in)
    ok = (p >= 0) & (p < size)
    return ok.all(-1) if isinstance(ok, torch.Tensor) else ok.all(axis=-1)


def detail_factor(detail_size: int | None, size: int) -> int:
    """How many detail pixels a side of one input pixel spans (`detail_size // size`); 1
    without a detail image. ValueError unless `detail_size` is a multiple of `size`."""
    if detail_size is None:
        return 1
    detail_size, size = int(detail_size), int(size)
    if detail_size < size or detail_size % size:
        raise ValueError(
            f"detail_size={detail_size} must be a multiple of image_size={size} (e.g. "
            f"{4 * size}): the input is the detail image average-pooled by a whole factor"
        )
    return detail_size // size


def detail_to_input(detail: torch.Tensor, size: int) -> torch.Tensor:
    """The S x S input ((B,) C, S, S) of a D x D detail image ((B,) C, D, D) in the same
    frame: average pooling over D/S x D/S blocks, so input pixel j covers detail pixels
    [j D/S, (j + 1) D/S) exactly and normalised coordinates are shared (ONNX: AveragePool)."""
    k = detail_factor(int(detail.shape[-1]), size)
    return detail if k == 1 else torch.nn.functional.avg_pool2d(detail, k)
