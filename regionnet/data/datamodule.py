"""The LightningDataModule: records -> patient-grouped splits -> DataLoaders."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, WeightedRandomSampler

from regionnet.data.dataset import RadiographDataset, collate
from regionnet.data.sources import (
    SPLITS,
    label_columns,
    load_records,
    records_from_path,
    validate_findings,
)
from regionnet.data.splits import (
    STUDY_FRACTIONS,
    assign_splits,
    check_no_patient_leak,
    kfold_splits,
    read_split_file,
)
from regionnet.data.transforms import GRAY_MEAN, GRAY_STD, build_transforms, eval_transform
from regionnet.regions import REGIONS, validate_regions

log = logging.getLogger(__name__)


class RegionDataModule(L.LightningDataModule):
    """Radiographs for one-vs-rest region heads, from phantoms, a folder tree or a CSV.

    Splits come, in order of precedence, from `split_file` (a previous run's `split.csv`), a
    fully filled `split` column of the manifest, k folds (`folds`, `fold`), or a fresh seeded
    patient-grouped stratified split (`split_fractions`, default the study's 64/12/24 %).
    `external_test` (a folder or CSV) is a second test set, reported as `external/...`.
    `batch_size` is per device: under DDP the global batch is batch_size x devices x nodes.
    `balanced_sampling` draws training images (with replacement, as many per epoch as the
    training set holds) so each class of the `region` column, `other` included, comes equally
    often; under DDP Lightning splits the draws between processes.
    `findings` (the model's `model.findings`, passed as `data.findings`): batches then carry
    `finding_labels` and `finding_mask` (B, F) from the records' columns (see
    `regionnet.data.sources.finding_targets`).
    """

    def __init__(
        self,
        source: str = "phantom",
        root: str | None = None,
        csv: str | None = None,
        regions: Sequence[str] | None = None,
        aliases: Mapping[str, str] | None = None,
        unknown_as_other: bool = False,
        phantom: Mapping | None = None,
        image_size: int = 224,
        mean: float = GRAY_MEAN,
        std: float = GRAY_STD,
        augment: Mapping | None = None,
        augment_factor: int = 1,
        split_fractions: Sequence[float] = STUDY_FRACTIONS,
        split_seed: int = 0,
        split_file: str | None = None,
        folds: int | None = None,
        fold: int = 0,
        external_test: str | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        balanced_sampling: bool = False,
        findings: Mapping[str, Mapping] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.regions = validate_regions(regions or REGIONS)  # null in configs = REGIONS
        self.findings = validate_findings(findings, self.regions)
        if batch_size < 1 or augment_factor < 1 or num_workers < 0:
            raise ValueError(
                f"data.batch_size={batch_size}, data.augment_factor={augment_factor} must be >= 1 "
                f"and data.num_workers={num_workers} >= 0"
            )
        self.records: pd.DataFrame | None = None
        self.external: pd.DataFrame | None = None

    # -- records and splits -------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.records is not None:
            self.check_world_size()
            return
        h = self.hparams
        df = load_records(
            h.source, self.regions, h.root, h.csv, h.aliases, h.unknown_as_other, h.phantom
        )
        if h.split_file:
            df["split"] = read_split_file(h.split_file, df)
        elif (df["split"] != "").all():
            log.info("using the manifest's split column")
        elif h.folds:
            df["split"] = kfold_splits(df, h.folds, h.fold, h.split_fractions[1], h.split_seed)
        else:
            df["split"] = assign_splits(df, h.split_fractions, h.split_seed)
        check_no_patient_leak(df)
        for split in ("train", "val"):
            if not (df["split"] == split).any():
                raise ValueError(
                    f"the {split} split is empty ({len(df)} radiographs); add data or change "
                    "data.split_fractions"
                )
        self.records = df
        if h.external_test:
            self.external = records_from_path(
                h.external_test, self.regions, h.aliases, h.unknown_as_other
            )
        log.info("radiographs per split and region:\n%s", self.summary().to_string())
        self.check_world_size()

    def split_frame(self, split: str) -> pd.DataFrame:
        """Records of one split (`train`, `val`, `test`) or `external`."""
        self.setup()
        if split == "external":
            return self.external if self.external is not None else self.records.iloc[:0]
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS} or external")
        return self.records[self.records["split"] == split]

    def summary(self) -> pd.DataFrame:
        """Image counts per region (rows) and split (columns)."""
        return pd.crosstab(self.records["region"], self.records["split"], margins=True)

    def write_split(self, path: str | Path) -> Path:
        """Write the split in use as CSV (feed it back with `data.split_file=`).

        File names that are not UTF-8 (a Latin-1 `\\xe9` on Linux) are written as their bytes
        (surrogateescape), so the `path` column is the real name; read it back with
        `pd.read_csv(..., encoding_errors="surrogateescape")`."""
        self.setup()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = ["path", "split", "region", "patient_id", "source"]
        self.records[keep + [c for c in self.records if c not in keep]].to_csv(
            path, index=False, encoding="utf-8", errors="surrogateescape"
        )
        return path

    def positives(self) -> list[int]:
        """Positive count per head in the training split (for BCE `pos_weight`)."""
        train = self.split_frame("train")
        return [int(train[c].sum()) for c in label_columns(self.regions)]

    def train_size(self) -> int:
        return len(self.split_frame("train"))

    # -- loaders ---------------------------------------------------------------------------
    def _loader(self, frame: pd.DataFrame, train: bool) -> DataLoader:
        h = self.hparams
        if train:
            transform = build_transforms(h.image_size, True, h.augment, h.mean, h.std)
        else:
            transform = eval_transform(h)
        dataset = RadiographDataset(
            frame,
            self.regions,
            transform,
            repeat=h.augment_factor if train else 1,
            phantom_size=h.image_size,
            findings=self.findings,
        )
        sampler = None
        if train and h.balanced_sampling:
            sampler = balanced_sampler(frame, dataset.repeat)
        if not train and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Under DDP Lightning would give val/test a DistributedSampler, which repeats images
            # so every process gets as many; metrics must count each radiograph once.
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=h.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            # a last training batch of one image breaks BatchNorm; the images return next epoch
            drop_last=train and len(dataset) > h.batch_size,
            num_workers=h.num_workers,
            pin_memory=h.pin_memory,
            persistent_workers=h.persistent_workers and h.num_workers > 0,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.split_frame("train"), train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.split_frame("val"), train=False)

    def test_dataloader(self) -> list[DataLoader]:
        """The internal test split, then the external test set when one is configured."""
        loaders = [self._loader(self.split_frame("test"), train=False)]
        if self.external is not None:
            loaders.append(self._loader(self.external, train=False))
        return loaders

    def test_stage_names(self) -> list[str]:
        """Metric prefixes of the test loaders, in order."""
        return ["test"] + (["external"] if self.external is not None else [])

    def world_size(self) -> int:
        """DDP processes: torch.distributed's world, else the attached trainer's, else 1."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        return int(getattr(getattr(self, "trainer", None), "world_size", 1) or 1)

    def check_world_size(self) -> None:
        """Fail at setup, before any training, when an evaluated split (val, test, external)
        holds fewer radiographs than there are DDP processes: each process must evaluate at
        least one (Lightning's unpadded sampler asserts it, after the whole fit for test)."""
        world = self.world_size()
        if world <= 1 or self.records is None:
            return
        sizes = self.records["split"].value_counts()
        sizes["external"] = 0 if self.external is None else len(self.external)
        for split in ("val", "test", "external"):
            n = int(sizes.get(split, 0))
            if 0 < n < world:
                more = "data.external_test" if split == "external" else "data.split_fractions"
                raise ValueError(
                    f"the {split} split holds {n} radiograph(s), fewer than the {world} DDP "
                    "processes (trainer.devices x trainer.num_nodes), and every process must "
                    f"evaluate at least one: add radiographs to it ({more}) or train with at "
                    f"most {n} process(es)"
                )


def balanced_sampler(frame: pd.DataFrame, repeat: int = 1) -> WeightedRandomSampler:
    """Indices into a dataset of `frame`'s rows repeated `repeat` times (index i is row
    i % rows, as in `RadiographDataset`), as many as it holds, drawn with replacement so every
    class of the `region` column is equally likely: each row weighs 1 / (rows of its class).
    Draws come from torch's global generator (seeded by `seed`)."""
    regions = frame["region"].astype(str).to_numpy()
    per_class = pd.Series(regions).value_counts()
    weights = torch.as_tensor(1.0 / per_class.loc[regions].to_numpy(), dtype=torch.double)
    weights = weights.repeat(max(1, int(repeat)))
    return WeightedRandomSampler(weights, num_samples=len(weights), replacement=True)
