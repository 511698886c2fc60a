"""Landmark geometry in original-image pixels: vertebra sizes, endplates, Cobb angles, SMAPE.

Conventions: points are [x, y] (x to the right, y down); a spine is 17 vertebrae T1..L5,
head to foot, each as 4 corners in the order top-left, top-right, bottom-left, bottom-right
(`spine_aasce`, 68 points). A skeleton is "vertebrae" (points grouped 4 per vertebra as above)
or "points" (unrelated points such as the 37 hand landmarks of `hand_dha`). Every function takes
numpy arrays or torch tensors (any device, detached) and returns numpy float64.
"""

from __future__ import annotations

import warnings

import numpy as np

SKELETONS = ("vertebrae", "points")
VERTEBRAE = tuple([f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)])  # 17
COBB_NAMES = ("pt", "mt", "tl")  # proximal thoracic, main thoracic, thoracolumbar/lumbar


def check_skeleton(skeleton: str) -> str:
    """`skeleton` itself, or a ValueError naming the valid choices."""
    if skeleton not in SKELETONS:
        raise ValueError(f"unknown skeleton {skeleton!r}; choose one of {', '.join(SKELETONS)}")
    return skeleton


def _numpy(x) -> np.ndarray:
    """float64 array from a list, numpy array or torch tensor (any device, with grad)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x, dtype=np.float64)


def _films(points, per_film: int | None = None) -> np.ndarray:
    """(N, K, 2) float64 from one film (K, 2) or many (N, K, 2); K divisible by `per_film`."""
    p = _numpy(points)
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3 or p.shape[-1] != 2:
        raise ValueError(f"points must be (K, 2) or (N, K, 2) [x, y], got shape {p.shape}")
    if per_film and p.shape[1] % per_film:
        raise ValueError(
            f"{p.shape[1]} points are not whole vertebrae of {per_film} corners (TL, TR, BL, BR)"
        )
    return p


def _corners(points) -> np.ndarray:
    """(N, V, 4, 2): corners TL, TR, BL, BR of each vertebra."""
    p = _films(points, 4)
    return p.reshape(p.shape[0], -1, 4, 2)


def vertebra_sizes(points) -> np.ndarray:
    """(N, V) size of each vertebra in pixels: the mean of its width, mean(|TR-TL|, |BR-BL|),
    and its height, mean(|BL-TL|, |BR-TR|); points (N, V*4, 2) or (V*4, 2)."""
    c = _corners(points)
    tl, tr, bl, br = (c[:, :, i] for i in range(4))
    width = (np.linalg.norm(tr - tl, axis=-1) + np.linalg.norm(br - bl, axis=-1)) / 2
    height = (np.linalg.norm(bl - tl, axis=-1) + np.linalg.norm(br - tr, axis=-1)) / 2
    return (width + height) / 2


def off_level(points_pred, points_gt) -> np.ndarray:
    """(N, V) 1.0 where a vertebra's predicted centre (the mean of its 4 predicted corners) is
    nearer another vertebra's true centre than its own, i.e. the vertebra is placed on another
    level, else 0.0; NaN where one of its true corners is NaN (hidden). Only fully visible
    vertebrae serve as other levels. Step 2 looks only inside crops around step 1's corners,
    so a vertebra step 1 put on the wrong level mostly stays there."""
    pred, true = _corners(points_pred), _corners(points_gt)
    centre_pred, centre_true = pred.mean(2), true.mean(2)  # (N, V, 2); NaN where hidden
    dist = np.linalg.norm(centre_pred[:, :, None] - centre_true[:, None], axis=-1)  # (N, V, V)
    own = np.diagonal(dist, axis1=1, axis2=2)
    others = np.where(np.eye(dist.shape[1], dtype=bool), np.inf, dist)
    others = np.where(np.isnan(others), np.inf, others).min(2)
    return np.where(np.isfinite(own), (others < own).astype(float), np.nan)


def reference_sizes(points_gt, skeleton: str) -> np.ndarray:
    """(N, K) the length each point's error is measured against, from the ground truth:
    its vertebra's size (`vertebra_sizes`) for "vertebrae"; for "points" the width of the
    ground-truth points' bounding box (for a PA hand: thumb tip to little finger, the hand
    width), NaN points ignored."""
    p = _films(points_gt)
    if check_skeleton(skeleton) == "vertebrae":
        return np.repeat(vertebra_sizes(p), 4, axis=1)
    with warnings.catch_warnings():  # a film with every point hidden: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        width = np.nanmax(p[..., 0], axis=1) - np.nanmin(p[..., 0], axis=1)
    return np.repeat(width[:, None], p.shape[1], axis=1)


def endplate_lines(points) -> np.ndarray:
    """(V, 2, 2, 2) the upper (TL->TR) and lower (BL->BR) endplate of each vertebra as
    [vertebra, upper/lower, left/right end, x/y]; points (V*4, 2) of one film."""
    c = _corners(points)
    if c.shape[0] != 1:
        raise ValueError(f"endplate_lines takes one film (V*4, 2), got {c.shape[0]} films")
    return c[0].reshape(-1, 2, 2, 2)


def _angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in degrees between direction vectors a (..., 2) and b (..., 2), as the challenge
    takes it: acos of the cosine rounded to 8 decimals (MATLAB `roundn(c, -8)`)."""
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.degrees(np.arccos(np.clip(np.round(cos, 8), -1.0, 1.0)))


def _is_s(centre: np.ndarray) -> bool:
    """The challenge's S test on the centre line (2V endplate midpoints, head to foot): S when
    the midpoints (all but the last two) lie on both sides of the chord from the first to the
    last. The MATLAB `linefun` divides by the chord's dx and dy; the cross product used here
    has the same sign pattern without dividing by zero on a vertical chord."""
    first, last = centre[0], centre[-1]
    d = first - last
    side = d[0] * (centre[:-2, 1] - last[1]) - d[1] * (centre[:-2, 0] - last[0])
    return bool(side.max() > 0 and side.min() < 0)


def _cobb_one(p: np.ndarray, height: float) -> tuple[float, float, float]:
    if not np.isfinite(p).all():  # a missing corner: no angle rather than a wrong one
        return np.nan, np.nan, np.nan
    c = p.reshape(-1, 4, 2)
    v = len(c)
    # one line per vertebra: midpoint of its left side (TL, BL) to that of its right (TR, BR)
    vec = (c[:, 1] + c[:, 3]) / 2 - (c[:, 0] + c[:, 2]) / 2
    angles = _angle_deg(vec[:, None], vec[None, :])  # (V, V)
    # the centre line: midpoints of the upper (TL, TR) and lower (BL, BR) endplates, 2V points
    centre = np.stack([(c[:, 0] + c[:, 1]) / 2, (c[:, 2] + c[:, 3]) / 2], 1).reshape(-1, 2)
    partner = angles.argmax(0)  # per vertebra the one most tilted against it
    upper = int(angles.max(0).argmax())  # first (upper) vertebra of the most tilted pair
    lower = int(partner[upper])
    pt = float(angles[upper, lower])
    if not _is_s(centre):  # one curve: angles of the pair with the end vertebrae T1 and L5
        return pt, float(angles[0, upper]), float(angles[v - 1, lower])
    mt_row = angles[upper, : upper + 1]  # the curve above the main one
    mt = float(mt_row.max())
    # MATLAB 1-based mid_p_v(pos*2): the lower-endplate midpoint of each vertebra of the pair
    if centre[2 * upper + 1, 1] + centre[2 * lower + 1, 1] < height:  # main curve in upper half
        return pt, mt, float(angles[lower, lower:].max())  # and the curve below it
    top = int(mt_row.argmax())
    return pt, mt, float(angles[top, : top + 1].max())  # and the one above that


def cobb_angles(points, heights=None) -> np.ndarray:
    """(N, 3) Cobb angles [PT, MT, TL] in degrees from the 68 corners of T1..L5, by the AASCE
    2019 challenge rule (the organisers' MATLAB `angleCal`; the Python port is `cobb_evaluate.py`
    of yijingru/Vertebra-Landmark-Detection).

    Each vertebra gives a line from the midpoint of its left side (TL, BL) to that of its right
    side (TR, BR); the largest angle between any two of the 17 lines is the main curve and is
    returned as PT (the challenge's first angle, whatever level it lies at). A centre line that
    stays on one side of its chord is a C curve: MT and TL are then the angles of the main pair's
    upper vertebra with T1 and of its lower vertebra with L5. An S curve: MT is the largest angle
    of the upper vertebra with any above it; if the pair's lower-endplate midpoints lie in the
    upper half of the image (sum of y < `heights`) TL is the largest angle of the lower vertebra
    with any below it, else the largest angle of MT's end vertebra with any above that.
    (The Python port takes the upper-endplate midpoints in that test, a 1-based index carried
    over unchanged; against the organisers' angles that gives SMAPE 0.30 % instead of 0.03 %.)
    `heights` (N,) are the image heights in the points' pixels. Pass them: on the 481
    `spine_aasce` ground-truth films this port then matches the organisers' angles to SMAPE
    0.03 % (MAE 0.015 deg, coordinate rounding). Without them the height is guessed as 1.1 x the
    lowest point's y (L5's bottom lies at a median 93 % of the film's height there), which
    changes 4 of those 481 films' angles (SMAPE 0.14 %); a NaN height is guessed the same way.
    A film with a NaN corner gets NaN angles.
    """
    p = _films(points, 4)
    if p.shape[1] != 68:
        raise ValueError(f"Cobb angles need the 68 corners of T1..L5, got {p.shape[1]} points")
    guess = 1.1 * p[..., 1].max(1)
    if heights is None:
        heights = guess
    heights = np.broadcast_to(_numpy(heights), (len(p),))
    heights = np.where(np.isnan(heights), guess, heights)
    return np.array([_cobb_one(f, h) for f, h in zip(p, heights, strict=True)]).reshape(-1, 3)


def smape(pred, true) -> float:
    """The AASCE challenge's symmetric mean absolute percentage error in %: per film the sum
    over its three angles of |pred - true| over the sum of (pred + true), averaged over films,
    times 100. A film whose angles are all 0 in both counts 0."""
    p, t = _numpy(pred).reshape(-1, 3), _numpy(true).reshape(-1, 3)
    num, den = np.abs(p - t).sum(1), (p + t).sum(1)
    return float(np.mean(np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)) * 100)
