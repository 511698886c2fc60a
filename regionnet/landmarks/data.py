"""Landmark films -> letterboxed, augmented samples -> patient-grouped LightningDataModule.

Sources (`data.dataset`), all read from a landmark folder (`manifest.csv`, `landmarks.json`,
images; see `../shared/data/README.md`):

- `spine_aasce`: 481 AP spine films of adolescents with scoliosis (AASCE 2019 / SpineWeb 16),
  8-bit JPEG, height 973-1024 px, width 236-576 px; 68 landmarks = the top-left, top-right,
  bottom-left and bottom-right corners of T1..L5 (17 vertebrae), head to foot; three Cobb
  angles (proximal thoracic, main thoracic, thoracolumbar/lumbar) in degrees; 248 patients.
  One annotated point lies off its film (`sunhl_1th_25_Jul_2016_49_A_AP.jpg`, L4_bottom_right
  at y = 1049 of 1024, below the L5 corners: an annotation error), so it is never `visible`.
- `hand_dha`: 109 pediatric left-hand PA films (Digital Hand Atlas), 1024 px high, 512-941 px
  wide; 37 landmarks (finger tips, joints, carpals; Payer et al. 2019); no Cobb angles.
- `phantom`: synthetic spine-like films with exact corners (`regionnet.landmarks.phantom`),
  made once into a cache folder; `data.root` is not used.

A sample / batch (B films, K landmarks, S = `image_size`):

- `image` float32 (B, 1, S, S): `resize_pad(S)` letterbox (as the region task), augmented in
  training, normalised with `mean`/`std`;
- `points` float32 (B, K, 2): (x, y) in normalised input coordinates [-1, 1]
  (`regionnet.landmarks.coords`), after augmentation; never NaN;
- `points_px` float32 (B, K, 2): the annotation in pixels of the file as stored (not augmented);
- `visible` bool (B, K): annotated and still on the S x S input after augmentation;
- `scale` float32 (B, 2) and `offset` float32 (B, 2): per axis (x, y), input pixel =
  original pixel * scale + offset (the letterbox; see `coords` for why scale has two axes);
- `size` int64 (B, 2): the file's (width, height); `cobb` float32 (B, 3): pt, mt, tl degrees,
  NaN where unknown; `index` int64 (B,): row in the dataset;
- `path` list[str]: as in the manifest (relative to the landmark folder);
- `errors` list[(path, reason)]: files that could not be read, left out of the batch (a batch
  of only unreadable files has no `image` key).

Horizontal flips: an AP spine mirrored is a spine whose image-left corners are now on the right,
so `flip_pairs` swaps each vertebra's top-left <-> top-right and bottom-left <-> bottom-right.
A mirrored left hand is a right hand whose landmarks keep their anatomical names (no swap), but
every `hand_dha` film is a left hand, so hands are flipped only with `augment.hflip_hands`.
"""

from __future__ import annotations

import json
import logging
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

from regionnet.data.splits import assign_splits, check_no_patient_leak
from regionnet.data.transforms import GRAY_MEAN, GRAY_STD, RandomGamma, resize_pad
from regionnet.io import RadiographReadError, read_radiograph
from regionnet.landmarks.coords import inside, letterbox_params, to_input, to_normalised
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
    own resize and affine use.
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
        photometric: list[torch.nn.Module] = [
            v2.ColorJitter(brightness=a.get("brightness", 0.2), contrast=a.get("contrast", 0.2))
        ]
        if a.get("gamma"):
            photometric.append(RandomGamma(a["gamma"]))
        if a.get("noise"):
            photometric.append(v2.GaussianNoise(sigma=float(a["noise"])))
        self.photometric = v2.Compose(photometric)

    def __call__(
        self, image: torch.Tensor, points: torch.Tensor, visible: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.size
        image, kp = self.geometric(
            tv_tensors.Image(image), tv_tensors.KeyPoints(points, canvas_size=(s, s))
        )
        image, points = image.as_subclass(torch.Tensor), kp.as_subclass(torch.Tensor).clone()
        if self.hflip and float(torch.rand(())) < self.hflip:
            image = image.flip(-1)
            points[:, 0] = s - points[:, 0]
            points, visible = points[self.perm], visible[self.perm]
        return self.photometric(image), points, visible


class LandmarkDataset(Dataset):
    """Films of one landmark set: the rows of `load_table` and their points.

    `augment` (a `LandmarkAugment`) is for training; without it a film is letterboxed and
    normalised only. A file that cannot be read gives `{"path", "index", "error"}`, which
    `collate` reports in `errors` and leaves out.
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
    ):
        if len(records) != len(points):
            raise ValueError(f"{len(records)} records but {len(points)} point sets")
        self.root = Path(root)
        self.paths = records["path"].tolist()
        self.points = torch.as_tensor(points, dtype=torch.float32)
        cobb = records[list(COBB_COLUMNS)].to_numpy(np.float32)
        self.cobb = torch.as_tensor(cobb, dtype=torch.float32)
        self.size = image_size
        self.letterbox = resize_pad(image_size)
        self.mean, self.std = float(mean), float(std)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = self.paths[i]
        try:
            pixels = read_radiograph(self.root / path)
        except RadiographReadError as e:
            log.warning("skipping unreadable landmark film: %s", e)
            return {"path": path, "index": i, "error": str(e.reason)}
        h, w = pixels.shape
        scale, ox, oy = letterbox_params(w, h, self.size)
        scale_t = torch.tensor(scale, dtype=torch.float32)
        offset = torch.tensor([ox, oy], dtype=torch.float32)
        image = self.letterbox(torch.from_numpy(pixels)[None])
        points_px = self.points[i]
        visible = torch.isfinite(points_px).all(-1)
        points = torch.nan_to_num(to_input(points_px, scale_t, offset), nan=0.0)
        if self.augment is not None:
            image, points, visible = self.augment(image, points, visible)
        visible = visible & inside(points, self.size)
        return {
            "image": (image - self.mean) / self.std,
            "points": to_normalised(points, self.size),
            "points_px": points_px,
            "visible": visible,
            "scale": scale_t,
            "offset": offset,
            "size": torch.tensor([w, h], dtype=torch.long),
            "cobb": self.cobb[i],
            "path": path,
            "index": i,
        }


_STACKED = ("image", "points", "points_px", "visible", "scale", "offset", "size", "cobb")


def collate(samples: list[dict]) -> dict:
    """Stack readable samples; unreadable ones go to `errors` as (path, reason) pairs."""
    good = [s for s in samples if "error" not in s]
    batch = {
        "path": [s["path"] for s in good],
        "index": torch.as_tensor([s["index"] for s in good], dtype=torch.long),
        "errors": [(s["path"], s["error"]) for s in samples if "error" in s],
    }
    if good:
        batch.update({k: torch.stack([s[k] for s in good]) for k in _STACKED})
    return batch


class LandmarkDataModule(L.LightningDataModule):
    """Landmark films split by patient (`patient_id`; never one patient in two splits).

    `root` is the landmark folder (`../shared/data/landmarks`); `dataset` one of `DATASETS`;
    `split_fractions` train/val/test shares of films, seeded by `seed` (the grouped splitter
    of `regionnet.data.splits`); `augment` see `LandmarkAugment` (plus `hflip_hands`); `limit`
    keeps the first films of the manifest (tests); `phantom` = {n, size: [height, width],
    vertebrae, cache} for `dataset=phantom`. `batch_size` is per device.
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
        pin_memory: bool = False,
        persistent_workers: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        if dataset not in SKELETONS:
            raise ValueError(f"data.dataset={dataset!r}: choose one of {list(DATASETS)}")
        if image_size < 16:
            raise ValueError(f"data.image_size={image_size} is too small; use 16 or more")
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
        """Write the split in use as CSV: path, patient_id, split, dataset, width, height."""
        self.setup()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = [c for c in ("path", "patient_id", "split", "dataset", "width", "height")
                if c in self.records]  # fmt: skip
        self.records[keep].to_csv(path, index=False, encoding="utf-8", errors="surrogateescape")
        return path

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
        return LandmarkAugment(self.hparams.image_size, a, perm)

    def _loader(self, split: str) -> DataLoader:
        h = self.hparams
        train = split == "train"
        frame = self.split_frame(split)
        dataset = LandmarkDataset(
            frame,
            self.points[frame.index.to_numpy()],
            self._root,
            h.image_size,
            h.mean,
            h.std,
            augment=self._augment() if train else None,
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
