"""MultiDataModule: region films and a landmark set in one table, for `MultiNet`.

Every film carries what it has. Region films (`regions`: a `RegionDataModule`, e.g. the shared
radiographs or phantoms) have region labels and, where declared, finding labels; landmark films
(`landmarks`: a `LandmarkDataModule`, e.g. hand_dha or spine_aasce) have points (on spines
also vertebra boxes from their corners, as `BoxDataModule` makes them) and the region labels
of their set: one-hot for `landmark_region` (hand_dha films are hands: `hand`), all 0 when it
is null (spines are `other` for the five region heads, a true negative for each). Absent
targets are masked: a region film's points are NaN and never `visible` (`has_points` false: no
landmark or box loss), a landmark film's findings are unlabelled (`finding_mask` false).

Each sub-module keeps its own records and patient-grouped split; the splits are stacked, and a
film both hold is kept once in its patient's region split (`join_same_films`), so no patient
crosses splits. Every film goes through the landmark pipeline (`LandmarkDataset`: the region
task's letterbox and mean/std; augmentation that moves points with the pixels: the landmark
set's settings on its films, the region data's settings, flips included, on the others), so
both kinds share one input frame: `image_size`, `mean` and `std` must agree
(conf/data/multi.yaml sets them once). Batches are the landmark collate's (`image`, `points`,
`points_px`, `visible`, `scale`, `offset`, `size`, `cobb`; on spines the box collate's
`boxes`, `box_labels`, `boxes_px`, `box_labels_px`) plus `labels` (B, R), `has_points` (B,),
and `finding_labels`/`finding_mask` (B, F) with findings. Not carried over
from the region task: balanced sampling, `augment_factor` and the external test set.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from regionnet.boxes.data import BoxCollate, vertebra_groups
from regionnet.data.datamodule import RegionDataModule
from regionnet.data.dataset import load_image
from regionnet.data.sources import SPLITS, finding_targets, label_columns
from regionnet.data.splits import check_no_patient_leak, read_split_file
from regionnet.landmarks.data import (
    COBB_COLUMNS,
    LandmarkAugment,
    LandmarkDataModule,
    LandmarkDataset,
    collate,
)

log = logging.getLogger(__name__)

#: what a film of each kind is called in `split.csv`'s `kind` column
KINDS = ("regions", "landmarks")


class MultiDataset(LandmarkDataset):
    """`LandmarkDataset` over region and landmark films: paths are absolute (or phantom
    records), and each sample adds `labels`, `has_points` and, with findings, `finding_labels`
    and `finding_mask`."""

    def __init__(
        self,
        records: pd.DataFrame,
        points: np.ndarray,
        labels: np.ndarray,
        findings: np.ndarray,
        region_augment: LandmarkAugment | None = None,
        **kwargs,
    ):
        super().__init__(records, points, "/", **kwargs)
        self.region_augment = region_augment
        self.labels = torch.as_tensor(labels, dtype=torch.float32)
        self.has_points = torch.as_tensor(np.isfinite(points).all(-1).any(-1))
        targets = torch.as_tensor(findings, dtype=torch.float32)
        self.finding_mask = torch.isfinite(targets)
        self.finding_labels = torch.nan_to_num(targets, nan=0.0)

    def read(self, i: int) -> np.ndarray:
        """Film `i`'s pixels (phantom:// region films too): a landmark film at full size (its
        points are in its pixels), a film without points decoded at reduced size for the
        input, as the region task reads it (`regionnet.io.read_radiograph(target=)`: several
        times faster on large films). Its `scale`, `offset` and `size` are then those of the
        reduced image: no point of it is scored."""
        target = None if self.has_points[i] else self.size
        return load_image(self.paths[i], phantom_size=self.size, target=target)

    def augment_of(self, i: int) -> LandmarkAugment | None:
        """A landmark film's augmentation is its set's (`augment`: flips only where the set
        has left/right pairs), any other film's the region data's settings (`region_augment`:
        e.g. the region task's horizontal flips; its points are none)."""
        if self.augment is None or self.has_points[i] or self.region_augment is None:
            return self.augment
        return self.region_augment

    def __getitem__(self, i: int) -> dict:
        sample = super().__getitem__(i)
        if "error" not in sample:
            sample["labels"] = self.labels[i]
            sample["has_points"] = self.has_points[i]
            if self.finding_labels.shape[1]:
                sample["finding_labels"] = self.finding_labels[i]
                sample["finding_mask"] = self.finding_mask[i]
        return sample


def join_same_films(
    regions: pd.DataFrame, lm: pd.DataFrame, dataset: str, cols: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Region records and landmark records without a film twice or a patient in two splits.

    A region manifest may hold copies of a landmark set's films (../shared/data's radiographs
    hold hand_dha's 109 hands and spine_aasce's 481 spines as PNGs): a region record of source
    `dataset` whose file stem is a landmark film's is that film. It is kept once, as the
    landmark record (its file is the one the points are in), with the region record's region,
    labels, patient and split, and the region record's path in `same_film`. Every other
    landmark film of a patient the region records hold takes that patient's region split, so
    the region split (the one `task=regions` uses) stays as it is."""
    own = regions["source"].astype(str) == dataset
    by_stem = {Path(p).stem: i for i, p in regions.loc[own, "path"].items()}
    split_of = regions.groupby(regions["patient_id"].astype(str))["split"].first()
    lm = lm.copy()
    matched = []
    for j, p in lm["path"].items():
        i = by_stem.get(Path(p).stem)
        if i is None:
            continue
        matched.append(i)
        for c in ("region", *cols, "patient_id", "split"):
            lm.at[j, c] = regions.at[i, c]
        lm.at[j, "same_film"] = regions.at[i, "path"]
    regions = regions.drop(index=matched)
    theirs = lm["patient_id"].astype(str).map(split_of)
    moved = int((theirs.notna() & (theirs != lm["split"]) & (lm["same_film"] == "")).sum())
    lm["split"] = theirs.fillna(lm["split"])
    if matched or moved:
        log.info(
            "%d %s films are region films too (joined: one film, its region split); %d more "
            "films of their patients follow the patients' region split",
            len(matched), dataset, moved,
        )  # fmt: skip
    return regions, lm


class MultiCollate:
    """The landmark collate (the box collate with `groups`), then the multi-task keys."""

    def __init__(self, groups: torch.Tensor | None, size: int):
        self.base = collate if groups is None else BoxCollate(groups, size)

    def __call__(self, samples: list[dict]) -> dict:
        batch = self.base(samples)
        good = [s for s in samples if "error" not in s]
        if good:
            for key in ("labels", "has_points", "finding_labels", "finding_mask"):
                if key in good[0]:
                    batch[key] = torch.stack([s[key] for s in good])
        return batch


class MultiDataModule(L.LightningDataModule):
    """Region films and landmark films for one composed model (module docstring).

    `regions`: a RegionDataModule; `landmarks`: a LandmarkDataModule; `landmark_region`: the
    region head the landmark films show, or null; `batch_size`, `num_workers`, `pin_memory`,
    `persistent_workers`: the combined loaders' (the sub-modules' own are unused);
    `split_file`: a previous run's split.csv, whose split every film then keeps (matched by
    path; both kinds); `landmark_repeat` k: each landmark film k times per training epoch
    (a landmark set is small beside the region films: 80 training hands among ~1,330 films;
    they are region films too, so their region is drawn more often as well)."""

    def __init__(
        self,
        regions: RegionDataModule,
        landmarks: LandmarkDataModule,
        landmark_region: str | None = None,
        batch_size: int = 16,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        split_file: str | None = None,
        landmark_repeat: int = 1,
        **_: object,
    ):
        super().__init__()
        if not isinstance(regions, RegionDataModule) or not isinstance(
            landmarks, LandmarkDataModule
        ):
            raise ValueError(
                "data=multi needs data.regions (a region data config, e.g. shared or phantom) "
                "and data.landmarks (a landmark data config); see conf/data/multi.yaml"
            )
        if batch_size < 1 or num_workers < 0 or int(landmark_repeat) < 1:
            raise ValueError(
                f"data.batch_size={batch_size} and data.landmark_repeat={landmark_repeat} must "
                f"be >= 1, data.num_workers={num_workers} >= 0"
            )
        self.landmark_repeat = int(landmark_repeat)
        self.region_data, self.landmark_data = regions, landmarks
        self.regions = list(regions.regions)
        if landmark_region is not None and landmark_region not in self.regions:
            raise ValueError(
                f"data.landmark_region={landmark_region!r}: name one of the region heads "
                f"{self.regions}, or null (the landmark films show none of them, e.g. spines)"
            )
        rh, lh = regions.hparams, landmarks.hparams
        mine = (int(rh.image_size), float(rh.mean), float(rh.std))
        theirs = (int(lh.image_size), float(lh.mean), float(lh.std))
        if mine != theirs:
            raise ValueError(
                f"data.regions (image_size, mean, std) {mine} differ from data.landmarks' "
                f"{theirs}: one model reads both, so give them one input (data.image_size)"
            )
        self.landmark_region = landmark_region
        self.image_size, self.mean, self.std = mine
        self.settings = {
            "batch_size": int(batch_size),
            "num_workers": int(num_workers),
            "pin_memory": bool(pin_memory),
            "persistent_workers": bool(persistent_workers),
        }
        # what the region model card and run helpers read from a data module's hparams: the
        # region data's (its source and split rule), with the combined loaders' settings
        self.hparams.update(
            {**dict(rh), **self.settings, "dataset": lh.dataset,
             "landmark_region": landmark_region}
        )  # fmt: skip
        self.split_file = split_file
        self.records: pd.DataFrame | None = None
        self.points: np.ndarray | None = None
        self.external = None  # no external test set (module docstring)
        # the films the test loader gives (regionnet-eval's split=val: the val films, through
        # the test pass; their metrics are computed from its outputs under the split's name)
        self.test_split = "test"

    # -- what the model reads ----------------------------------------------------------------
    @property
    def findings(self) -> dict:
        return self.region_data.findings

    @property
    def landmark_names(self) -> list[str]:
        return self.landmark_data.landmark_names

    @property
    def skeleton(self) -> str:
        return self.landmark_data.skeleton

    @property
    def flip_pairs(self):
        return self.landmark_data.flip_pairs

    @property
    def dataset(self) -> str:
        return self.landmark_data.dataset

    @property
    def box_names(self) -> list[str]:
        """The vertebra levels of a spine set, head to foot (box label k is `box_names[k-1]`);
        [] for other point sets (no boxes)."""
        if self.skeleton != "vertebrae":
            return []
        return vertebra_groups(self.landmark_names)[0]

    # -- records and splits ------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.records is not None:
            return
        rd, ld = self.region_data, self.landmark_data
        rd.setup()
        ld.setup()
        cols = label_columns(self.regions)
        regions = rd.records.copy()
        regions["kind"] = "regions"
        regions["same_film"] = ""
        lm = ld.records.copy()
        lm["path"] = [str(Path(ld._root) / p) for p in lm["path"]]
        lm["region"] = self.landmark_region or "other"
        for r, c in zip(self.regions, cols, strict=True):
            lm[c] = int(r == self.landmark_region)
        lm["kind"] = "landmarks"
        lm["source"] = ld.dataset
        lm["same_film"] = ""
        regions, lm = join_same_films(regions, lm, ld.dataset, cols)
        keep = ["path", "region", *cols, "patient_id", "split", "source", "kind", "same_film"]
        extra = [c for c in regions if c not in keep]  # finding columns and the like
        frame = pd.concat(
            [regions[keep + extra], lm[[*keep, *(c for c in COBB_COLUMNS if c in lm)]]],
            ignore_index=True,
        )
        k = len(ld.landmark_names)
        nan = np.full((len(regions), k, 2), np.nan, dtype=np.float32)
        self.points = np.concatenate([nan, ld.points.astype(np.float32)])
        self.hidden = np.concatenate([np.zeros((len(regions), k), bool), ld.hidden])
        for c in COBB_COLUMNS:
            if c not in frame:
                frame[c] = np.nan
        if self.split_file:  # a previous run's split.csv (both kinds, matched by path)
            frame["split"] = read_split_file(self.split_file, frame).to_numpy()
        check_no_patient_leak(frame)
        self.records = frame
        log.info("films per split and kind:\n%s", self.summary().to_string())

    def split_frame(self, split: str) -> pd.DataFrame:
        """Records of one split (`train`, `val`, `test`), region films first."""
        self.setup()
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
        return self.records[self.records["split"] == split]

    def summary(self) -> pd.DataFrame:
        return self.records.groupby(["split", "kind"]).size().unstack(fill_value=0)

    def write_split(self, path: str | Path) -> Path:
        """The split in use as CSV: path, region, patient_id, split, source, kind, same_film
        (the region manifest's copy of a landmark film, `join_same_films`); and the landmark
        set's annotation check beside it (`annotation_issues.csv`)."""
        self.setup()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cols = ["path", "region", "patient_id", "split", "source", "kind", "same_film"]
        self.records[cols].to_csv(path, index=False, encoding="utf-8", errors="surrogateescape")
        self.landmark_data.write_issues(path)  # as task=landmarks writes it
        return path

    def positives(self) -> list[int]:
        """Positive count per region head in the training split (BCE `pos_weight`)."""
        train = self.split_frame("train")
        return [int(train[c].sum()) for c in label_columns(self.regions)]

    def train_size(self) -> int:
        return len(self.split_frame("train"))

    def test_stage_names(self) -> list[str]:
        """Metric prefixes of the test loader: `test`, whichever split it gives."""
        return ["test"]

    # -- loaders -----------------------------------------------------------------------------
    def _loader(self, split: str) -> DataLoader:
        frame, train, s = self.split_frame(split), split == "train", self.settings
        if train and self.landmark_repeat > 1:  # the scarce landmark films, k times an epoch
            own = frame[frame["kind"] == "landmarks"]
            frame = pd.concat([frame, *[own] * (self.landmark_repeat - 1)])
        rows = frame.index.to_numpy()
        findings = (
            finding_targets(frame, self.findings) if self.findings else np.zeros((len(frame), 0))
        )
        dataset = MultiDataset(
            frame,
            self.points[rows],
            frame[label_columns(self.regions)].to_numpy(np.float32),
            findings,
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
            augment=self.landmark_data._augment() if train else None,
            hidden=self.hidden[rows],
            region_augment=self._region_augment() if train else None,
        )
        sampler = None
        if not train and torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)  # each film once
        groups = vertebra_groups(self.landmark_names)[1] if self.box_names else None
        return DataLoader(
            dataset,
            batch_size=s["batch_size"],
            shuffle=train,
            sampler=sampler,
            drop_last=train and len(dataset) > s["batch_size"],  # no one-film BatchNorm batch
            num_workers=s["num_workers"],
            pin_memory=s["pin_memory"],
            persistent_workers=s["persistent_workers"] and s["num_workers"] > 0,
            collate_fn=MultiCollate(groups, self.image_size),
        )

    def _region_augment(self) -> LandmarkAugment | None:
        """The region data's augmentation settings (`data.regions.augment`: the region task's,
        horizontal flips included) as a `LandmarkAugment` for the films without points."""
        a = dict(self.region_data.hparams.augment or {})
        k = len(self.landmark_names)
        return LandmarkAugment(self.image_size, a, np.arange(k)) if a else None

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split)
