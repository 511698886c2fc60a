"""Synthetic radiograph-like phantoms: regionnet's embedded, offline default dataset.

Each image is a procedurally drawn cartoon of one anatomical region (bones as polygons and
ellipses with a bright cortex and a slightly darker medulla, a smooth soft-tissue envelope,
random pose, exposure, blur, noise, collimation shutters and burned-in "L"/"R" markers).
They exist so the training pipeline and the tests run on a fresh CPU machine without any
dataset. They are NOT real radiographs: a model's accuracy on phantoms is not evidence of
clinical accuracy, or of accuracy on any real data.

Display convention is MONOCHROME2: bone bright, air dark, soft tissue grey, values in [0, 1].
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PHANTOM_REGIONS: tuple[str, ...] = (
    "shoulder", "elbow", "hand", "pelvis", "knee", "chest", "foot", "skull",
)  # fmt: skip

_SS = 2  # supersampling factor of the drawing canvas
_MED = 170  # medulla grey in the bone layer (cortex is 255)

Shape = tuple[np.ndarray, np.ndarray, np.ndarray]  # (outer, inner, soft envelope) polygons


def _offset(pts: np.ndarray, w: float) -> np.ndarray:
    """Polygon of width ``w`` around a polyline."""
    d = np.empty_like(pts)
    d[1:-1] = pts[2:] - pts[:-2]
    d[0], d[-1] = pts[1] - pts[0], pts[-1] - pts[-2]
    n = d[:, ::-1] * (w / 2 / (np.hypot(d[:, 0], d[:, 1])[:, None] + 1e-9))
    n[:, 0] *= -1
    return np.concatenate([pts + n, (pts - n)[::-1]])


def _curve(pts, w: float, env: float = 2.2) -> Shape:
    """Bone along a polyline: cortex of width ``w``, medulla inside, soft tissue around."""
    pts = np.asarray(pts, dtype=float)
    inner = pts.copy()
    for a, b in ((0, 1), (-1, -2)):  # shorten the medulla so the cortex caps both ends
        d = pts[b] - pts[a]
        length = math.hypot(d[0], d[1]) + 1e-9
        inner[a] = pts[a] + d / length * min(0.35 * w, 0.45 * length)
    return _offset(pts, w), _offset(inner, 0.5 * w), _offset(pts, w * env + 0.02)


def _bar(p0, p1, w: float, env: float = 2.2) -> Shape:
    return _curve([p0, p1], w, env)


def _arc(c, rx: float, ry: float, a0: float, a1: float, n: int = 12) -> np.ndarray:
    """Points on an elliptical arc (angles in degrees, y down)."""
    t = np.radians(np.linspace(a0, a1, n))
    return np.stack([c[0] + rx * np.cos(t), c[1] + ry * np.sin(t)], 1)


def _bez(p0, p1, p2, n: int = 10) -> np.ndarray:
    """Quadratic Bezier curve points."""
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * t * (1 - t) * np.asarray(p1) + t**2 * np.asarray(p2)


_CIRCLE = np.exp(2j * np.pi * np.arange(28) / 28)
_CIRCLE = np.stack([_CIRCLE.real, _CIRCLE.imag], 1)  # (28, 2) unit circle


def _ell(c, rx: float, ry: float, ang: float = 0.0, env: float = 0.05) -> Shape:
    ca, sa = math.cos(math.radians(ang)), math.sin(math.radians(ang))
    radii = np.array([[rx, ry], [0.72 * rx, 0.72 * ry], [rx + env, ry + env]])
    pts = (radii[:, None] * _CIRCLE) @ np.array([[ca, sa], [-sa, ca]]) + c
    return pts[0], pts[1], pts[2]


def _poly(pts, env: float = 1.25) -> Shape:
    p = np.asarray(pts, dtype=float)
    c = p.mean(0)
    return p, c + 0.7 * (p - c), c + env * (p - c)


class _Pen:
    """Two supersampled layers (soft tissue, bone) drawn through one pose transform."""

    def __init__(self, n: int, mat: np.ndarray):
        self.soft, self.bone = Image.new("L", (n, n), 0), Image.new("L", (n, n), 0)
        self._d = {"soft": ImageDraw.Draw(self.soft), "bone": ImageDraw.Draw(self.bone)}
        self.mat = mat  # 2x3, unit square -> canvas pixels

    def _draw(self, jobs: list[tuple[np.ndarray, int, str]]) -> None:
        """Transform all polygons of ``jobs`` at once (fast), then draw them in order."""
        xy = np.concatenate([p for p, _, _ in jobs]) @ self.mat[:, :2].T + self.mat[:, 2]
        flat, i = xy.ravel().tolist(), 0
        for p, value, layer in jobs:
            self._d[layer].polygon(flat[i : i + 2 * len(p)], fill=value)
            i += 2 * len(p)

    def fill(self, pts, value: float, layer: str = "bone") -> None:
        self._draw([(np.asarray(pts, dtype=float), int(value), layer)])

    def bones(self, *shapes: Shape, soft: bool = True, med: int = _MED) -> None:
        """One bone (union of shapes): soft envelope, then all cortex, then all medulla."""
        jobs = [(s[2], 255, "soft") for s in shapes] if soft else []
        jobs += [(s[0], 255, "bone") for s in shapes] + [(s[1], med, "bone") for s in shapes]
        self._draw(jobs)

    def ring(self, c, rx: float, ry: float, w: float, ang: float = 0.0) -> None:
        """Bright outline of an overlapping bone (e.g. AP patella, olecranon)."""
        self.bones(_curve(_ell(c, rx, ry, ang)[0][[*range(28), 0]], w), soft=False, med=255)


def _shoulder(p: _Pen, r: np.random.Generator, j: Callable[..., float]) -> None:
    p.fill(_ell((0.3, 0.75), 0.5, 0.62)[0], 255, "soft")  # trunk, air above-lateral
    p.fill(_ell((0.6, 0.42), 0.26, 0.22)[0], 255, "soft")  # deltoid
    p.fill(_bar((0.64, 0.4), (0.68, 1.3), j(0.42))[0], 255, "soft")  # arm
    p.bones(_poly([(0.45, 0.33), (0.47, 0.5), (0.36, 0.66), (0.2, 0.98), (0.02, 0.6), (0.1, 0.3)]))
    p.bones(_curve(_arc((0.62, 0.43), 0.16, 0.18, 150, 215, 6), 0.05))  # glenoid rim
    p.bones(_curve([(0.38, 0.3), (0.56, 0.23), (0.74, 0.27)], 0.06))  # acromion/spine
    p.bones(_curve([(-0.2, 0.1), (0.2, 0.2), (0.5, 0.16), (0.7, 0.22)], j(0.065)))  # clavicle
    hr = j(0.13)
    p.bones(_bar((0.64, 0.45), (0.67, 1.3), j(0.13)), _ell((0.62, 0.43), hr, hr * 1.05),
            _ell((0.74, 0.42), 0.05, 0.06))  # fmt: skip


def _elbow(p: _Pen, r: np.random.Generator, j: Callable[..., float]) -> None:
    if r.random() < 0.5:  # AP
        p.bones(_bar((0.5, -0.3), (0.5, 0.36), j(0.15)),
                _poly([(0.42, 0.26), (0.58, 0.26), (0.72, 0.42), (0.64, 0.5), (0.36, 0.5),
                       (0.27, 0.42)]))  # fmt: skip
        p.bones(_bar((0.42, 0.56), (0.37, 1.3), j(0.09)), _ell((0.42, 0.56), 0.075, 0.045))
        p.bones(_bar((0.62, 0.6), (0.68, 1.3), j(0.075)), _ell((0.62, 0.57), 0.06, 0.028))
        p.ring((0.45, 0.44), 0.06, 0.07, 0.015)  # olecranon seen through the humerus
    else:  # lateral, ~90 degrees flexion
        p.bones(_bar((0.33, 0.56), (0.46, 0.66), 0.09), _ell((0.33, 0.53), 0.06, 0.07),
                _bar((0.42, 0.67), (1.3, j(0.7)), j(0.09)))  # fmt: skip
        p.bones(_bar((0.62, 0.56), (1.3, j(0.52)), j(0.075)), _ell((0.6, 0.58), 0.04, 0.05))
        p.bones(_bar((0.4, -0.3), (0.45, 0.42), j(0.15)), _ell((0.47, 0.48), j(0.1), 0.09))


def _hand(p: _Pen, r: np.random.Generator, j: Callable[..., float]) -> None:
    p.fill(_ell((0.5, 0.74), 0.22, 0.18)[0], 255, "soft")
    p.bones(_bar((0.57, 0.92), (0.58, 1.3), 0.14), _ell((0.56, 0.91), 0.1, 0.04))  # radius
    p.bones(_bar((0.4, 0.93), (0.38, 1.3), 0.08))  # ulna
    for k in range(8):  # carpus
        p.bones(_ell((0.4 + 0.07 * (k % 4) + r.normal(0, 0.006), 0.84 - 0.07 * (k // 4)),
                     j(0.034), j(0.03), r.uniform(0, 90)))  # fmt: skip
    rays = [(0.34, 0.76, -48, (0.15, 0.1, 0.07))]  # thumb: metacarpal + 2 phalanges
    rays += [(0.4 + 0.075 * f, 0.69, -12 + 8 * f, (0.2, 0.12, 0.08, 0.055)) for f in range(4)]
    for x, y, ang, segs in rays:
        a = math.radians(ang + r.normal(0, 3))
        d, pt, w = np.array([math.sin(a), -math.cos(a)]), np.array([x, y]), 0.045
        for length in segs:
            q = pt + d * j(length)
            p.bones(_bar(pt, q, w), _ell(q - d * w * 0.3, w * 0.6, w * 0.6))
            pt, w = q + d * 0.018, w * 0.88


def _pelvis(p: _Pen, r: np.random.Generator, j: Callable[..., float]) -> None:
    p.fill(_ell((0.5, 0.6), 0.75, 0.62)[0], 255, "soft")
    for s in (-1, 1):

        def x(v: float, s: int = s) -> float:  # mirror about the midline
            return 0.5 + s * v

        p.bones(_ell((x(0.25), 0.33), j(0.2), j(0.15), s * 25), soft=False)  # iliac wing
        p.bones(_bar((x(0.16), 0.4), (x(0.22), 0.58), 0.1), soft=False)  # ilium body
        p.bones(_ell((x(0.13), 0.7), 0.1, 0.08, s * 15), soft=False)  # pubis + ischium ring
        p.fill(_ell((x(0.13), 0.71), j(0.07), j(0.048), s * 15)[0], 0)  # obturator foramen
        hx = x(j(0.25))
        p.bones(_bar((hx, 0.56), (x(0.33), 0.68), 0.07), _ell((hx, 0.56), 0.07, 0.07),
                _ell((x(0.35), 0.68), 0.05, 0.06), _bar((x(0.33), 0.7), (x(0.3), 1.3), 0.11),
                soft=False)  # fmt: skip
    p.bones(_poly([(0.41, 0.24), (0.59, 0.24), (0.5, 0.58)]), soft=False, med=140)  # sacrum
    p.ring((0.5, 0.46), 0.22, 0.15, 0.02)  # pelvic brim


def _knee(p: _Pen, r: np.random.Generator, j: Callable[..., float]) -> None:
    p.fill(_bar((0.5, -0.3), (0.5, 1.3), j(0.6))[0], 255, "soft")  # thigh and leg
    if r.random() < 0.5:  # AP
        p.bones(_bar((0.5, -0.3), (0.5, 0.36), j(0.19)),
                _poly([(0.4, 0.3), (0.6, 0.3), (0.72, 0.44), (0.28, 0.44)]),
                _ell((0.39, 0.46), 0.11, 0.065), _ell((0.61, 0.46), 0.11, 0.065))  # fmt: skip
        p.bones(_poly([(0.26, 0.56), (0.74, 0.56), (0.6, 0.7), (0.4, 0.7)]),
                _bar((0.5, 0.62), (0.51, 1.3), j(0.17)))  # fmt: skip
        p.bones(_bar((0.7, 0.64), (0.68, 1.3), 0.045), _ell((0.7, 0.65), 0.04, 0.035))
        p.ring((0.5, 0.4), j(0.08), 0.1, 0.018)  # patella seen through the femur
    else:  # lateral: patella in front
        p.bones(_bar((0.55, -0.3), (0.52, 0.4), j(0.19)), _ell((0.51, 0.45), j(0.14), 0.11))
        p.bones(_bar((0.62, 0.64), (0.61, 1.3), 0.045), _ell((0.63, 0.63), 0.035, 0.035))
        p.bones(
            _poly([(0.34, 0.58), (0.66, 0.58), (0.58, 0.72), (0.4, 0.72)]),
            _bar((0.49, 0.62), (0.52, 1.3), j(0.17)),
            _ell((0.38, 0.67), 0.04, 0.05),
        )
        p.bones(_ell((0.31, j(0.42)), 0.05, 0.095, 10))


def _chest(p: _Pen, r: np.random.Generator, j: Callable[..., float]) -> None:
    p.fill(_ell((0.5, 0.6), 0.58, 0.75)[0], 255, "soft")
    for s in (-1, 1):
        p.fill(_ell((0.5 + s * j(0.19), 0.5), 0.15, j(0.3))[0], 70, "soft")  # lung field
    p.fill(_ell((0.55, 0.68), j(0.15), 0.12)[0], 235, "soft")  # heart shadow
    for k in range(14):  # vertebral bodies
        y = 0.03 + 0.072 * k
        p.bones(_poly([(0.46, y), (0.54, y), (0.54, y + 0.055), (0.46, y + 0.055)]), soft=False)
    for k in range(10):
        y = 0.13 + j(0.07, 0.05) * k
        for s in (-1, 1):
            p.bones(_curve(_bez((0.5 + s * 0.05, y), (0.5 + s * 0.44, y - 0.07),
                                (0.5 + s * 0.4, y + 0.18)), 0.022), soft=False)  # fmt: skip
    for s in (-1, 1):
        p.bones(_curve([(0.5 + s * 0.05, 0.13), (0.5 + s * 0.2, 0.1), (0.5 + s * 0.4, 0.06)],
                       0.04), soft=False)  # fmt: skip


def _foot(p: _Pen, r: np.random.Generator, j: Callable[..., float]) -> None:
    p.fill(_ell((0.55, 0.58), 0.5, 0.17)[0], 255, "soft")
    p.bones(_bar((0.3, -0.3), (0.32, 0.4), 0.13))  # tibia
    p.bones(_ell((0.22, 0.62), j(0.13), 0.08, 5), _ell((0.33, 0.48), 0.09, 0.07))
    p.bones(_ell((0.45, 0.53), 0.04, 0.055), _ell((0.52, 0.58), 0.045, 0.06))  # tarsals
    for k in range(5):  # metatarsals + toes, fanned slightly
        y0, y1 = 0.52 + 0.02 * k, 0.62 + 0.03 * k
        x1 = j(0.82) - 0.02 * k
        p.bones(_bar((0.57, y0), (x1, y1), 0.035))
        for dx in (0.085, 0.06):
            p.bones(_bar((x1 + 0.02, y1), (x1 + dx, y1 + 0.005), 0.03))
            x1 += dx + 0.015


def _skull(p: _Pen, r: np.random.Generator, j: Callable[..., float]) -> None:
    p.fill(_ell((0.5, 0.5), 0.43, 0.47)[0], 255, "soft")
    vault = _ell((0.5, 0.45), j(0.38), j(0.36))
    p.fill(vault[0], 90)
    p.bones(_curve(vault[0][[*range(28), 0]], 0.035), soft=False, med=255)
    for s in (-1, 1):
        p.fill(_ell((0.5 + s * 0.13, 0.55), 0.07, 0.06)[0], 20)  # orbit
        p.ring((0.5 + s * 0.13, 0.55), 0.075, 0.065, 0.02)
        p.bones(_bar((0.5 + s * 0.36, 0.6), (0.5 + s * 0.12, 0.47), 0.03), soft=False)
    p.fill([(0.5, 0.58), (0.45, 0.7), (0.55, 0.7)], 30)  # nasal cavity
    p.bones(_curve(_arc((0.5, 0.7), 0.26, j(0.2), 5, 175), 0.05), soft=False)  # mandible


_DRAW: dict[str, Callable[[_Pen, np.random.Generator, Callable[..., float]], None]] = {
    "shoulder": _shoulder, "elbow": _elbow, "hand": _hand, "pelvis": _pelvis,
    "knee": _knee, "chest": _chest, "foot": _foot, "skull": _skull,
}  # fmt: skip
_LETTERS = {"L": ["1000", "1000", "1000", "1000", "1111"],
            "R": ["1110", "1001", "1110", "1010", "1001"]}  # fmt: skip


def _pose(r: np.random.Generator, n: int) -> np.ndarray:
    """Affine map unit square -> canvas: flip, scale 0.7-1.15, rotate +-25 deg, translate."""
    a, s = math.radians(r.uniform(-25, 25)), r.uniform(0.7, 1.15)
    f = -1.0 if r.random() < 0.5 else 1.0
    lin = s * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) @ np.diag([f, 1])
    t = np.array([0.5, 0.5]) + r.uniform(-0.1, 0.1, 2) - lin @ np.array([0.5, 0.5])
    return n * np.concatenate([lin, t[:, None]], 1)


def render_phantom(region: str, seed: int, size: int = 128) -> np.ndarray:
    """Deterministic synthetic radiograph of ``region``: float32 (size, size) in [0, 1]."""
    if region not in _DRAW:
        raise ValueError(f"unknown phantom region {region!r}; expected one of {PHANTOM_REGIONS}")
    r = np.random.default_rng([int(seed) % 2**63, zlib.crc32(region.encode())])
    n = size * _SS
    pen = _Pen(n, _pose(r, n))
    _DRAW[region](pen, r, lambda v, a=0.1: v * r.uniform(1 - a, 1 + a))
    soft = pen.soft.reduce(_SS).filter(ImageFilter.GaussianBlur(0.03 * size))
    bone = pen.bone.reduce(_SS).filter(ImageFilter.GaussianBlur(r.uniform(0.2, 1.8)))
    img = (0.42 / 255) * np.asarray(soft, np.float32) + (0.58 / 255) * np.asarray(bone, np.float32)
    # exposure: background fog, contrast, gamma, brightness (identical for all regions)
    img = r.uniform(0.0, 0.12) + r.uniform(0.7, 1.25) * img
    img = np.clip(img, 0, 1) ** r.uniform(0.6, 1.6) + r.uniform(-0.12, 0.12)
    val = r.uniform(0, 0.1) if r.random() < 0.6 else r.uniform(0.85, 1.0)
    for side in np.flatnonzero(r.random(4) < 0.35):  # collimation shutters
        w = max(1, int(r.uniform(0.03, 0.15) * size))
        img[[np.s_[:w, :], np.s_[-w:, :], np.s_[:, :w], np.s_[:, -w:]][side]] = val
    if r.random() < 0.4 and size >= 32:  # burned-in side marker, anywhere in the frame
        k = size // 64
        g = np.pad(np.kron(np.array([list(map(int, s)) for s in _LETTERS[r.choice(["L", "R"])]]),
                           np.ones((k, k))), k)  # fmt: skip
        y, x = r.integers(0, size - g.shape[0]), r.integers(0, size - g.shape[1])
        img[y : y + g.shape[0], x : x + g.shape[1]] = np.where(g > 0, 0.97, 0.05)
    sd = r.uniform(0.004, 0.03) + r.uniform(0.01, 0.04) * np.sqrt(np.clip(img, 0, 1))
    img = img + sd * r.standard_normal((size, size), dtype=np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def phantom_uri(region: str, seed: int) -> str:
    return f"phantom://{region}/{seed}"


def parse_phantom_uri(uri: str) -> tuple[str, int]:
    """Inverse of :func:`phantom_uri`; ``ValueError`` on anything malformed."""
    head, sep, rest = str(uri).partition("phantom://")
    region, slash, seed = rest.partition("/")
    if head or not sep or not slash or not region or not seed.lstrip("-").isdigit():
        raise ValueError(f"malformed phantom URI {uri!r}; expected 'phantom://<region>/<seed>'")
    return region, int(seed)
