"""Landmark films -> letterboxed, augmented samples -> patient-grouped LightningDataModule.

Sources (`data.dataset`), all read from a landmark folder (`manifest.csv`, `landmarks.json`,
images; see `../shared/data/README.md`):

- `spine_aasce`: 481 AP spine films of adolescents with scoliosis (AASCE 2019 / SpineWeb 16),
  8-bit JPEG, height 973-1024 px, width 236-576 px; 68 landmarks = the top-left, top-right,
  bottom-left and bottom-right corners of T1..L5 (17 vertebrae), head to foot; three Cobb
  angles (proximal thoracic, main thoracic, thoracolumbar/lumbar) in degrees; 248 patients.
  Some annotations are off by a vertebra or have their corners swapped; `annotation_issues`
  finds them at setup (see "Annotation check" below).
- `hand_dha`: 109 pediatric left-hand PA films (Digital Hand Atlas), 1024 px high, 512-941 px
  wide; 37 landmarks (finger tips, joints, carpals; Payer et al. 2019); no Cobb angles.
- `phantom`: synthetic spine-like films with exact corners (`regionnet.landmarks.phantom`),
  made once into a cache folder; `data.root` is not used.

A sample / batch (B films, K landmarks, S = `image_size`):

- `image` float32 (B, 1, S, S): `resize_pad(S)` letterbox (as the region task), augmented in
  training, normalised with `mean`/`std`;
- `detail` float32 (B, 1, D, D), only with `detail_size` D (two-step models): the same film
  through the same letterbox rule and augmentation at D (e.g. 1024, the stored films' longest
  side), normalised alike; `image` is then `detail` average-pooled to S, so the two share one
  frame (`regionnet.landmarks.coords`, "detail"): step 2 cuts its vertebra crops from `detail`
  (a vertebra is ~44 px tall at 1024, ~11 px at 256);
- `points` float32 (B, K, 2): (x, y) in normalised input coordinates [-1, 1]
  (`regionnet.landmarks.coords`), after augmentation; never NaN;
- `points_px` float32 (B, K, 2): the annotation in pixels of the file as stored (not augmented);
- `visible` bool (B, K): annotated and still on the S x S input after augmentation;
- `scale` float32 (B, 2) and `offset` float32 (B, 2): per axis (x, y), input pixel =
  original pixel * scale + offset (the letterbox; see `coords` for why scale has two axes;
  with `detail`, the detail letterbox times S/D, `coords.input_letterbox`);
- `size` int64 (B, 2): the file's (width, height); `cobb` float32 (B, 3): pt, mt, tl degrees,
  NaN where unknown; `index` int64 (B,): row in the dataset;
- `path` list[str]: as in the manifest (relative to the landmark folder);
- `errors` list[(path, reason)]: files that could not be read, left out of the batch (a batch
  of only unreadable files has no `image` key).

Horizontal flips: an AP spine mirrored is a spine whose image-left corners are now on the right,
so `flip_pairs` swaps each vertebra's top-left <-> top-right and bottom-left <-> bottom-right.
A mirrored left hand is a right hand whose landmarks keep their anatomical names (no swap), but
every `hand_dha` film is a left hand, so hands are flipped only with `augment.hflip_hands`.

Annotation check (`annotation_issues`, run once when the table is loaded; the data are never
edited): on an AP spine, the vertebra centres go head to foot, each top corner lies above its
bottom corner and each left corner left of its right corner, and every point lies on its film.
A film breaking a rule keeps its image, but the four corners of each offending vertebra (or the
offending point of a `points` skeleton) get `visible=False` in every split, so they neither
train nor score. The data module logs one warning line and `write_split` writes the list
(`path`, `vertebra`, `reason`) to `annotation_issues.csv` beside `split.csv`. On `spine_aasce`
(481 films) it hides 38 vertebrae (152 points) on 30 films: the L5 slot at the top of the film
beside T1 (18 films, e.g. `sunhl_1th_05_Jan_2017_169_A_AP.jpg`; one more L5 spans the film,
`..._06_Jan_2017_182_A_AP.jpg`), one vertebra annotated twice, the two centres within 3 px
(L4 = L5 on 4 films, T6 = T7, T1 over T2: both of each pair hidden), L5 on L2 with L4 running
off the film (`..._25_Jul_2016_49_A_AP.jpg`), and corners upside down, scrambled or collapsed
(5 vertebrae). `hand_dha`: none.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from regionnet.data.splits import assign_splits, check_no_patient_leak, read_split_file
from regionnet.data.transforms import GRAY_MEAN, GRAY_STD, RandomGamma, resize_pad
from regionnet.io import RadiographReadError, read_radiograph
from regionnet.landmarks.coords import (
    detail_factor,
    detail_to_input,
    inside,
    letterbox_params,
    to_input,
    to_normalised,
)
from regionnet.landmarks.phantom import phantom_folder

log = logging.getLogger(__name__)

SKELETONS = {"spine_aasce": "vertebrae", "hand_dha": "points", "phantom": "vertebrae"}
DATASETS = tuple(SKELETONS)
COBB_COLUMNS = ("cobb_pt", "cobb_mt", "cobb_tl")
SPLITS = ("train", "val", "test")
LANDMARK_FRACTIONS = (0.7, 0.15, 0.15)


def flip_pairs_for(names: Sequence[str], skeleton: str) -> list[tuple[int, int]]:
    """Index pairs swapped by a horizontal flip: `<v>_top_left` <-> `<v>_top_right` and
    `<v>_bottom_left` <-> `<v>_bottom_right` for vertebrae; none for hand points."""
    if skeleton != "vertebrae":
        return []
    where = {n: i for i, n in enumerate(names)}
    pairs = []
    for i, n in enumerate(names):
        if n.endswith("_left") and n[: -len("left")] + "right" in where:
            pairs.append((i, where[n[: -len("left")] + "right"]))
    return pairs


def flip_permutation(k: int, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """`new = old[perm]` reorders landmarks after a mirror: pairs swap, the rest stay."""
    perm = np.arange(k)
    for i, j in pairs:
        perm[i], perm[j] = j, i
    return perm


# Annotation check tolerances, as shares of the film's median vertebra height / width (robust
# to the few bad vertebrae). On spine_aasce, good centre steps are >= 0.40 heights (bad <= 0.07),
# good corner heights >= 0.15 (bad <= 0.02) and good widths >= 0.44 (bad <= -0.01).
ORDER_MARGIN = 0.2  # a centre lies at least this far below the previous vertebra's
MIN_HEIGHT = 0.1  # a bottom corner at least this far below its top corner
MIN_WIDTH = 0.2  # a right corner at least this far right of its left corner
ISSUE_COLUMNS = ("path", "vertebra", "reason")


def _vertebra_corners(names: Sequence[str]) -> list[tuple[str, list[int]]] | None:
    """[(vertebra, [TL, TR, BL, BR indices])] head to foot when every name is
    `<vertebra>_<corner>` with all four corners; None otherwise (a `points` skeleton)."""
    corners = ("top_left", "top_right", "bottom_left", "bottom_right")
    where = {str(n): i for i, n in enumerate(names)}
    groups: dict[str, list[int]] = {}
    for n in where:
        stem, _, corner = n.partition("_")
        if corner not in corners:
            return None
        groups.setdefault(stem, [])
    out = []
    for v in groups:
        idx = [where.get(f"{v}_{c}") for c in corners]
        if None in idx:
            return None
        out.append((v, idx))
    return sorted(out, key=lambda g: min(g[1]))


def _out_of_order(centre_y: np.ndarray, margin: float) -> np.ndarray:
    """Bool (V,): vertebrae left out of some longest head-to-foot chain of centres (each at
    least `margin` below the one before). A vertebra out of place is in no longest chain; of
    two that tie (one annotated twice) either could be the wrong one, so both are flagged.
    NaN centres are never flagged."""
    y = np.asarray(centre_y, np.float64)
    ok = np.isfinite(y)
    n = len(y)
    ends, starts = np.zeros(n, int), np.zeros(n, int)  # longest chain ending / starting at i
    for i in range(n):
        if ok[i]:
            before = [ends[j] for j in range(i) if ok[j] and y[i] - y[j] > margin]
            ends[i] = 1 + max(before, default=0)
    for i in reversed(range(n)):
        if ok[i]:
            after = [starts[j] for j in range(i + 1, n) if ok[j] and y[j] - y[i] > margin]
            starts[i] = 1 + max(after, default=0)
    longest = ends.max(initial=0)
    on_some = ok & (ends + starts - 1 == longest)
    # on every longest chain: on some, and the only one at its place in the chain
    places = np.bincount(ends[on_some], minlength=n + 1)
    return ok & ~(on_some & (places[ends] == 1))


def annotation_issues(
    points: Mapping[str, np.ndarray],
    names: Sequence[str],
    sizes: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, dict[str, str]]:
    """Annotations that break the anatomy: `{path: {vertebra: reason}}` for the films with any.

    `points`: path -> (K, 2) [x, y] in the film's pixels (NaN = missing, never an issue);
    `names`: the K landmark names; `sizes`: path -> (width, height) for the on-film test.
    For `<vertebra>_<corner>` names (AP spines, head to foot): vertebra centres go head to foot
    (`ORDER_MARGIN`), top corners above bottom ones (`MIN_HEIGHT`), left corners left of right
    ones (`MIN_WIDTH`); tolerances are shares of the film's median vertebra height and width.
    Every skeleton: each point lies on its film, [0, width] x [0, height]; for other names the
    key is the landmark name.
    """
    groups = _vertebra_corners(names)
    found: dict[str, dict[str, str]] = {}
    for path, pts in points.items():
        p = np.asarray(pts, np.float64).reshape(len(names), 2)
        issues: dict[str, list[str]] = {}
        if groups is not None:
            v = np.stack([p[idx] for _, idx in groups])  # (V, 4, 2): TL, TR, BL, BR
            heights = v[:, 2:, 1] - v[:, :2, 1]  # (V, 2): left, right side
            widths = v[:, [1, 3], 0] - v[:, [0, 2], 0]  # (V, 2): top, bottom edge
            with warnings.catch_warnings():  # a film with no complete vertebra: NaN medians
                warnings.simplefilter("ignore", RuntimeWarning)
                h_ref, w_ref = np.nanmedian(np.abs(heights)), np.nanmedian(np.abs(widths))
                centre = v.mean(1)
            bad_order = _out_of_order(centre[:, 1], ORDER_MARGIN * h_ref)
            for k, (vert, _) in enumerate(groups):
                why = issues.setdefault(vert, [])
                if bad_order[k]:
                    near = [f"{groups[j][0]} y={centre[j, 1]:.0f}" for j in (k - 1, k + 1)
                            if 0 <= j < len(groups) and np.isfinite(centre[j, 1])]  # fmt: skip
                    why.append(f"out of head-to-foot order: centre y={centre[k, 1]:.0f} "
                               f"({', '.join(near)})")  # fmt: skip
                for s, side in enumerate(("left", "right")):
                    if heights[k, s] < MIN_HEIGHT * h_ref:  # NaN compares False
                        why.append(f"top_{side} y={v[k, s, 1]:.0f} not above bottom_{side} "
                                   f"y={v[k, s + 2, 1]:.0f}")  # fmt: skip
                for s, edge in enumerate(("top", "bottom")):
                    if widths[k, s] < MIN_WIDTH * w_ref:
                        why.append(f"{edge}_left x={v[k, 2 * s, 0]:.0f} not left of "
                                   f"{edge}_right x={v[k, 2 * s + 1, 0]:.0f}")  # fmt: skip
        if sizes is not None and path in sizes:
            w, h = (float(a) for a in sizes[path])
            off = np.isfinite(p).all(-1) & ~(
                (p[:, 0] >= 0) & (p[:, 0] <= w) & (p[:, 1] >= 0) & (p[:, 1] <= h)
            )
            owner = {i: g for g, idx in (groups or []) for i in idx}
            for i in np.flatnonzero(off):
                name = str(names[i])
                where = name[len(owner[i]) + 1 :] if i in owner else "point"
                issues.setdefault(owner.get(i, name), []).append(
                    f"{where} ({p[i, 0]:.0f}, {p[i, 1]:.0f}) off the {w:.0f} x {h:.0f} film"
                )
        issues = {k: "; ".join(r) for k, r in issues.items() if r}
        if issues:
            found[str(path)] = issues
    return found


def hidden_points(
    issues: Mapping[str, Mapping[str, str]], paths: Sequence[str], names: Sequence[str]
) -> np.ndarray:
    """Bool (N, K): the points of each film's offending vertebrae (or landmarks) in `issues`."""
    names = [str(n) for n in names]
    hide = np.zeros((len(paths), len(names)), bool)
    for i, path in enumerate(paths):
        for part in issues.get(str(path), {}):
            hide[i] = hide[i] | np.array([n == part or n.startswith(f"{part}_") for n in names])
    return hide


def issues_table(issues: Mapping[str, Mapping[str, str]]) -> pd.DataFrame:
    """One row per (path, vertebra) of `annotation_issues`: path, vertebra, reason."""
    rows = [(p, v, why) for p, parts in issues.items() for v, why in parts.items()]
    return pd.DataFrame(rows, columns=list(ISSUE_COLUMNS))


def load_table(
    root: str | Path, dataset: str, limit: int | None = None
) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Manifest rows of `dataset` (manifest order, the first `limit`), their points (N, K, 2)
    float32 in stored-image pixels (NaN where a point is missing) and the K landmark names."""
    root = Path(root).expanduser()
    fix = "set data.root=... to the folder holding manifest.csv and landmarks.json"
    if not root.is_dir():
        raise FileNotFoundError(f"landmark folder {str(root)!r} does not exist; {fix}")
    manifest, table = root / "manifest.csv", root / "landmarks.json"
    for f in (manifest, table):
        if not f.is_file():
            raise FileNotFoundError(f"{str(f)!r} is missing; {fix}")
    df = pd.read_csv(manifest, dtype={"path": str, "patient_id": str, "dataset": str})
    missing = {"path", "dataset", "patient_id"} - set(df.columns)
    if missing:
        raise ValueError(f"{manifest}: columns {sorted(missing)} are missing")
    with table.open(encoding="utf-8") as fh:
        annotations = json.load(fh)
    names = annotations.get("landmark_names", {}).get(dataset)
    if names is None:
        known = sorted(annotations.get("landmark_names", {}))
        raise ValueError(f"{table}: no landmark_names for data.dataset={dataset!r}; has {known}")
    df = df[df["dataset"] == dataset].reset_index(drop=True)
    if limit is not None:
        df = df.iloc[: int(limit)].reset_index(drop=True)
    if df.empty:
        raise ValueError(f"{manifest}: no films of data.dataset={dataset!r}")
    for col in COBB_COLUMNS:
        if col not in df:
            df[col] = np.nan
    points = np.full((len(df), len(names), 2), np.nan, np.float32)
    absent = []
    for i, path in enumerate(df["path"]):
        pts = annotations["points"].get(path)
        if pts is None:
            absent.append(path)
            continue
        if len(pts) != len(names):
            raise ValueError(f"{table}: {path} has {len(pts)} points, expected {len(names)}")
        points[i] = np.array([[np.nan, np.nan] if p is None else p for p in pts], np.float64)
    if absent:
        raise ValueError(
            f"{table}: {len(absent)} films of {manifest.name} have no points (e.g. {absent[0]})"
        )
    return df, points, list(names)


class LandmarkAugment:
    """Training augmentation of a letterboxed (1, S, S) image in [0, 1] and its input-pixel
    points (K, 2), moved together (torchvision v2 with `tv_tensors.KeyPoints`).

    `augment` keys (all optional): `crop_scale` [lo, hi] area share of a random resized crop
    inside the letterbox (off by default), `rotation` degrees, `translate` fraction, `scale`
    range (RandomAffine, bilinear, black fill), `hflip` probability (with `perm` reordering the
    landmarks; None: no flips), `brightness`, `contrast`, `gamma` range, `noise` sigma.
    The flip is done here, not by `v2.RandomHorizontalFlip`: torchvision 0.29 flips KeyPoints
    as x -> W - 1 - x (pixel indices), one pixel off the corner convention (x -> W - x) that its
    own resize and affine use. With a detail image (`LandmarkDataset`, `detail_size`) the
    augmentation is made at the detail size D: `move` and `light` on the D x D image, which is
    then pooled to the input, and `noise` on each of the two (the input's noise stays `noise`
    per input pixel, as without detail).
    """

    def __init__(self, size: int, augment: Mapping | None, perm: np.ndarray | None):
        a = dict(augment or {})
        self.size = size
        geometric: list[torch.nn.Module] = []
        if a.get("crop_scale"):
            geometric.append(
                v2.RandomResizedCrop(size, scale=tuple(a["crop_scale"]), antialias=True)
            )
        geometric.append(
            v2.RandomAffine(
                degrees=a.get("rotation", 10),
                translate=(a.get("translate", 0.05),) * 2,
                scale=tuple(a.get("scale", (0.9, 1.1))),
                interpolation=v2.InterpolationMode.BILINEAR,
            )
        )
        self.geometric = v2.Compose(geometric)
        self.hflip = float(a.get("hflip", 0.5)) if perm is not None else 0.0
        self.perm = None if perm is None else torch.as_tensor(perm)
        light: list[torch.nn.Module] = [
            v2.ColorJitter(brightness=a.get("brightness", 0.2), contrast=a.get("contrast", 0.2))
        ]
        if a.get("gamma"):
            light.append(RandomGamma(a["gamma"]))
        self.light = v2.Compose(light)
        self.noise = (
            v2.GaussianNoise(sigma=float(a["noise"])) if a.get("noise") else torch.nn.Identity()
        )

    def __call__(
        self, image: torch.Tensor, points: torch.Tensor, visible: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Geometry (`move`), then brightness, contrast and gamma (`light`), then `noise`."""
        image, points, visible = self.move(image, points, visible)
        return self.noise(self.light(image)), points, visible

    def move(
        self, image: torch.Tensor, points: torch.Tensor, visible: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The geometric part: crop, affine and flip of the image and its points together."""
        s = self.size
        image, kp = self.geometric(
            tv_tensors.Image(image), tv_tensors.KeyPoints(points, canvas_size=(s, s))
        )
        image, points = image.as_subclass(torch.Tensor), kp.as_subclass(torch.Tensor).clone()
        if self.hflip and float(torch.rand(())) < self.hflip:
            image = image.flip(-1)
            points[:, 0] = s - points[:, 0]
            points, visible = points[self.perm], visible[self.perm]
        return image, points, visible


class LandmarkDataset(Dataset):
    """Films of one landmark set: the rows of `load_table` and their points.

    `augment` (a `LandmarkAugment`) is for training; without it a film is letterboxed and
    normalised only. `hidden` (N, K) bool: points never `visible` (`annotation_issues`). A
    file that cannot be read gives `{"path", "index", "error"}`, which
    `collate` reports in `errors` and leaves out. `detail_size` D (a multiple of `image_size`):
    the film is letterboxed and augmented at D x D (`augment` made at size D), given as
    `detail`, and `image` is `detail` average-pooled to S (`coords.detail_to_input`), so both
    share one frame; `points` and `visible` are of that frame, `scale`/`offset` in input pixels.
    """

    def __init__(
        self,
        records: pd.DataFrame,
        points: np.ndarray,
        root: str | Path,
        image_size: int,
        mean: float = GRAY_MEAN,
        std: float = GRAY_STD,
        augment: LandmarkAugment | None = None,
        hidden: np.ndarray | None = None,
        detail_size: int | None = None,
    ):
        if len(records) != len(points):
            raise ValueError(f"{len(records)} records but {len(points)} point sets")
        self.root = Path(root)
        self.paths = records["path"].tolist()
        self.points = torch.as_tensor(points, dtype=torch.float32)
        shown = np.ones(points.shape[:2], bool) if hidden is None else ~np.asarray(hidden, bool)
        self.shown = torch.as_tensor(shown)
        cobb = records[list(COBB_COLUMNS)].to_numpy(np.float32)
        self.cobb = torch.tensor(cobb, dtype=torch.float32)  # a copy: to_numpy may be read-only
        self.size = image_size
        self.detail = None if detail_size is None else int(detail_size)
        detail_factor(self.detail, image_size)  # a whole multiple, or ValueError
        self.frame = self.detail or image_size  # the size letterboxed and augmented
        self.letterbox = resize_pad(self.frame)
        self.mean, self.std = float(mean), float(std)
        self.augment = augment
        if augment is not None and augment.size != self.frame:
            raise ValueError(f"augmentation made for {augment.size} px, images are {self.frame}")

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> np.ndarray:
        """Film `i`'s pixels, float32 (H, W) in [0, 1] (`regionnet.io.read_radiograph`), at
        full size: the points are in its pixels."""
        return read_radiograph(self.root / self.paths[i])

    def augment_of(self, i: int) -> LandmarkAugment | None:
        """Film `i`'s training augmentation: `augment` for every film."""
        return self.augment

    def __getitem__(self, i: int) -> dict:
        path = self.paths[i]
        try:
            pixels = self.read(i)
        except RadiographReadError as e:
            log.warning("skipping unreadable landmark film: %s", e)
            return {"path": path, "index": i, "error": str(e.reason)}
        h, w = pixels.shape
        frame = self.frame  # S, or D with a detail image
        scale, ox, oy = letterbox_params(w, h, frame)
        scale_t = torch.tensor(scale, dtype=torch.float32)
        offset = torch.tensor([ox, oy], dtype=torch.float32)
        image = self.letterbox(torch.from_numpy(pixels)[None])
        points_px = self.points[i]
        visible = torch.isfinite(points_px).all(-1) & self.shown[i]
        points = torch.nan_to_num(to_input(points_px, scale_t, offset), nan=0.0)
        aug = self.augment_of(i)
        if self.detail is None:
            if aug is not None:
                image, points, visible = aug(image, points, visible)
            detail = None
        else:
            if aug is not None:
                image, points, visible = aug.move(image, points, visible)
                image = aug.light(image)
            detail, image = image, detail_to_input(image, self.size)
            if aug is not None:
                detail, image = aug.noise(detail), aug.noise(image)
            k = frame / self.size  # the letterbox in input pixels (`coords.input_letterbox`)
            scale_t, offset = scale_t / k, offset / k
        visible = visible & inside(points, frame)
        sample = {
            "image": (image - self.mean) / self.std,
            "points": to_normalised(points, frame),
            "points_px": points_px,
            "visible": visible,
            "scale": scale_t,
            "offset": offset,
            "size": torch.tensor([w, h], dtype=torch.long),
            "cobb": self.cobb[i],
            "path": path,
            "index": i,
        }
        if detail is not None:
            sample["detail"] = (detail - self.mean) / self.std
        return sample


_STACKED = ("image", "points", "points_px", "visible", "scale", "offset", "size", "cobb")
_OPTIONAL = ("detail",)  # stacked where the samples have it


def collate(samples: list[dict]) -> dict:
    """Stack readable samples; unreadable ones go to `errors` as (path, reason) pairs."""
    good = [s for s in samples if "error" not in s]
    batch = {
        "path": [s["path"] for s in good],
        "index": torch.as_tensor([s["index"] for s in good], dtype=torch.long),
        "errors": [(s["path"], s["error"]) for s in samples if "error" in s],
    }
    if good:
        keys = (*_STACKED, *(k for k in _OPTIONAL if k in good[0]))
        batch.update({k: torch.stack([s[k] for s in good]) for k in keys})
    return batch


class LandmarkDataModule(L.LightningDataModule):
    """Landmark films split by patient (`patient_id`; never one patient in two splits).

    `root` is the landmark folder (`../shared/data/landmarks`); `dataset` one of `DATASETS`;
    `split_fractions` train/val/test shares of films, seeded by `seed` (the grouped splitter
    of `regionnet.data.splits`), or read from a previous run's `split_file` (its split.csv);
    `augment` see `LandmarkAugment` (plus `hflip_hands`); `limit`
    keeps the first films of the manifest (tests); `phantom` = {n, size: [height, width],
    vertebrae, cache} for `dataset=phantom`. `batch_size` is per device. `detail_size` D and
    `detail`: with `detail` true and D set, batches also carry `detail`, the films at D x D in
    the frame of `image` (`LandmarkDataset`): step 2 of a two-step model cuts its crops from
    it (`conf/data/landmarks.yaml` makes it for models with `model.refine=true`).
    The model reads `landmark_names`, `skeleton` ("vertebrae": 4 corners per vertebra, head to
    foot; "points": independent points), `flip_pairs` and `dataset`.
    """

    def __init__(
        self,
        root: str | None = None,
        dataset: str = "spine_aasce",
        image_size: int = 256,
        batch_size: int = 8,
        num_workers: int = 2,
        split_fractions: Sequence[float] = LANDMARK_FRACTIONS,
        seed: int = 0,
        mean: float = GRAY_MEAN,
        std: float = GRAY_STD,
        augment: Mapping | None = None,
        limit: int | None = None,
        phantom: Mapping | None = None,
        split_file: str | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        detail_size: int | None = None,
        detail: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        if dataset not in SKELETONS:
            raise ValueError(f"data.dataset={dataset!r}: choose one of {list(DATASETS)}")
        if image_size < 16:
            raise ValueError(f"data.image_size={image_size} is too small; use 16 or more")
        self.detail_size = int(detail_size) if detail and detail_size else None
        if self.detail_size == image_size:
            self.detail_size = None  # the input itself: the frame of the input alone
        if self.detail_size is not None and (
            self.detail_size < image_size or self.detail_size % image_size
        ):
            raise ValueError(
                f"data.detail_size={detail_size} must be a multiple of data.image_size="
                f"{image_size} (e.g. {4 * image_size}), or null: the input is the detail image "
                "average-pooled by a whole factor"
            )
        if batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"data.batch_size={batch_size} must be >= 1, data.num_workers={num_workers} >= 0"
            )
        if dataset != "phantom" and not root:
            raise ValueError(
                f"data.dataset={dataset} needs data.root=... (the landmark folder holding "
                "manifest.csv and landmarks.json, e.g. ../shared/data/landmarks)"
            )
        self.dataset = dataset
        self.skeleton = SKELETONS[dataset]
        self.records: pd.DataFrame | None = None
        self.points: np.ndarray | None = None
        self._names: list[str] | None = None
        self.issues: dict[str, dict[str, str]] = {}
        self.hidden: np.ndarray | None = None

    # -- records, names and splits ---------------------------------------------------------
    @property
    def root(self) -> Path:
        """The landmark folder: `data.root`, or the phantom cache folder (made on first use)."""
        h = self.hparams
        if self.dataset == "phantom":
            p = dict(h.phantom or {})
            return phantom_folder(
                p.get("cache"),
                n=int(p.get("n", 64)),
                size=tuple(p.get("size", (256, 128))),
                vertebrae=int(p.get("vertebrae", 17)),
                seed=int(p.get("seed", h.seed)),
            )
        return Path(h.root).expanduser()

    def _load(self) -> None:
        if self.records is None:
            self._root = self.root
            df, self.points, self._names = load_table(self._root, self.dataset, self.hparams.limit)
            self.records = df
            self._check_annotations()

    def _check_annotations(self) -> None:
        """`annotation_issues` of the loaded films: hide their offending points, warn once."""
        df = self.records
        sizes = None
        if {"width", "height"} <= set(df.columns):
            sizes = dict(zip(df["path"], zip(df["width"], df["height"], strict=True), strict=True))
        self.issues = annotation_issues(dict(zip(df["path"], self.points, strict=True)),
                                        self._names, sizes)  # fmt: skip
        self.hidden = hidden_points(self.issues, df["path"].tolist(), self._names)
        if self.issues:
            parts = sum(len(v) for v in self.issues.values())
            log.warning(
                "annotation check (data.dataset=%s): %d of %d films have %d %s out of order, "
                "upside down, mirrored or off the film; their %d points are hidden "
                "(visible=False) in every split; listed in annotation_issues.csv beside split.csv",
                self.dataset, len(self.issues), len(df), parts,
                "vertebrae" if self.skeleton == "vertebrae" else "landmarks",
                int(self.hidden.sum()),
            )  # fmt: skip

    @property
    def landmark_names(self) -> list[str]:
        self._load()
        return list(self._names)

    @property
    def flip_pairs(self) -> list[tuple[int, int]]:
        return flip_pairs_for(self.landmark_names, self.skeleton)

    def setup(self, stage: str | None = None) -> None:
        self._load()
        if "split" in self.records:
            return
        h, df = self.hparams, self.records
        if h.split_file:
            df["split"] = read_split_file(h.split_file, df).to_numpy()
        else:
            df["split"] = assign_splits(df.assign(region=self.dataset), h.split_fractions, h.seed)
        check_no_patient_leak(df)
        for split in ("train", "val"):
            if not (df["split"] == split).any():
                raise ValueError(
                    f"the {split} split is empty ({len(df)} films of {df['patient_id'].nunique()} "
                    "patients); add films (data.limit) or change data.split_fractions"
                )
        log.info("landmark films per split: %s", df["split"].value_counts().to_dict())

    def split_frame(self, split: str) -> pd.DataFrame:
        """Records of one split (`train`, `val`, `test`)."""
        self.setup()
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
        return self.records[self.records["split"] == split]

    def summary(self) -> pd.DataFrame:
        """Films and patients per split."""
        self.setup()
        g = self.records.groupby("split")
        return pd.DataFrame({"films": g.size(), "patients": g["patient_id"].nunique()})

    def write_split(self, path: str | Path) -> Path:
        """Write the split in use as CSV: path, patient_id, split, dataset, width, height; and
        the annotation check's findings beside it (`annotation_issues.csv`: path, vertebra,
        reason; only the header when none)."""
        self.setup()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = [c for c in ("path", "patient_id", "split", "dataset", "width", "height")
                if c in self.records]  # fmt: skip
        self.records[keep].to_csv(path, index=False, encoding="utf-8", errors="surrogateescape")
        self.write_issues(path)
        return path

    def write_issues(self, split_csv: str | Path) -> Path:
        """The annotation check's findings as `annotation_issues.csv` beside `split_csv`
        (path, vertebra, reason; only the header when none)."""
        out = Path(split_csv).with_name("annotation_issues.csv")
        issues_table(self.issues).to_csv(
            out, index=False, encoding="utf-8", errors="surrogateescape"
        )
        return out

    def train_size(self) -> int:
        return len(self.split_frame("train"))

    def test_stage_names(self) -> list[str]:
        """Metric prefixes of the test loaders, in order."""
        return ["test"]

    # -- loaders ---------------------------------------------------------------------------
    def _augment(self) -> LandmarkAugment | None:
        a = dict(self.hparams.augment or {})
        if not a:
            return None
        pairs = self.flip_pairs
        perm = flip_permutation(len(self.landmark_names), pairs)
        if self.skeleton == "points" and not a.get("hflip_hands"):
            if a.get("hflip"):
                log.info("data.dataset=%s: no flips (all left hands); augment.hflip_hands=true "
                         "flips them into right hands", self.dataset)  # fmt: skip
            perm = None
        return LandmarkAugment(self.detail_size or self.hparams.image_size, a, perm)

    def _loader(self, split: str | pd.DataFrame, train: bool | None = None) -> DataLoader:
        """The loader of a split (`train` augments and shuffles), or of any rows of `records`
        (a DataFrame, e.g. all of them for evaluation)."""
        h = self.hparams
        if isinstance(split, pd.DataFrame):
            self.setup()
            frame, train = split, bool(train)
        else:
            frame, train = self.split_frame(split), split == "train" if train is None else train
        dataset = LandmarkDataset(
            frame,
            self.points[frame.index.to_numpy()],
            self._root,
            h.image_size,
            h.mean,
            h.std,
            augment=self._augment() if train else None,
            hidden=self.hidden[frame.index.to_numpy()],
            detail_size=self.detail_size,
        )
        sampler = None
        if not train and torch.distributed.is_available() and torch.distributed.is_initialized():
            # val/test: each film once over all processes (Lightning's sampler would pad)
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=h.batch_size,
            shuffle=train,
            sampler=sampler,
            drop_last=train and len(dataset) > h.batch_size,  # no one-film BatchNorm batch
            num_workers=h.num_workers,
            pin_memory=h.pin_memory,
            persistent_workers=h.persistent_workers and h.num_workers > 0,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
