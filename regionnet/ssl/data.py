"""Unlabelled radiographs for self-supervised pretraining, as a LightningDataModule.

Sources, any combination: CSV manifests with a `path` column (relative paths resolve against
the CSV's folder; `source` kept when present), folders searched recursively for image and
DICOM files (`regionnet.data.files.list_radiographs`, as for training and prediction), and
the *training* split of a labelled dataset, whose labels are dropped. The labelled set's
validation and test radiographs are never used, and any unlabelled file that is one of them is
removed: pretraining on them would leak the evaluation images into the backbone. Unreadable
files are skipped batch by batch (see `RadiographDataset`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import pandas as pd
from torch.utils.data import DataLoader

from regionnet.data.datamodule import RegionDataModule
from regionnet.data.dataset import RadiographDataset, collate
from regionnet.data.files import SUPPORTED_FORMATS, list_radiographs
from regionnet.data.transforms import GRAY_MEAN, GRAY_STD
from regionnet.ssl.views import TwoViews

log = logging.getLogger(__name__)


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str | Path) else [str(v) for v in value]


def csv_images(csv: str | Path) -> pd.DataFrame:
    """`path`, `source` of the files a manifest lists (files that do not exist are dropped
    with a warning naming them)."""
    path = Path(csv).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"data.csv={str(path)!r} does not exist; give a CSV with a `path` column of "
            "radiograph files (relative paths resolve against the CSV's folder)"
        )
    df = pd.read_csv(path, dtype={"path": str})
    if "path" not in df:
        raise ValueError(f"{path}: no `path` column (columns: {list(df.columns)})")
    base = path.resolve().parent
    df = df.dropna(subset=["path"])
    df["path"] = [str((base / p).resolve()) for p in df["path"]]
    df["source"] = df["source"].fillna(path.stem) if "source" in df else path.stem
    exists = df["path"].map(lambda p: Path(p).is_file())
    if not exists.all():
        missing = df.loc[~exists, "path"].tolist()
        log.warning(
            "%s: %d listed files do not exist, skipped: %s", path, len(missing), missing[:5]
        )
    return df.loc[exists, ["path", "source"]]


def folder_images(root: str | Path) -> pd.DataFrame:
    """`path`, `source` of every radiograph under `root` (`list_radiographs`); a folder
    without any raises, naming it."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data.root={str(root)!r} is not a folder; point it at a folder of radiographs "
            f"(any layout, searched recursively: {SUPPORTED_FORMATS})"
        )
    files = [str(f.resolve()) for f in list_radiographs(root)]
    if not files:
        raise ValueError(
            f"data.root={str(root)!r} holds no radiographs ({SUPPORTED_FORMATS}; hidden files "
            "and symlinked folders are skipped); point data.root at the folder of radiographs, "
            "or drop it and list the files with data.csv=MANIFEST.csv"
        )
    return pd.DataFrame({"path": files, "source": root.name})


class UnlabeledDataModule(L.LightningDataModule):
    """Unlabelled radiographs -> batches of two views each, `image` (B, 2, 1, S, S).

    `labelled` (optional) holds RegionDataModule arguments of the labelled dataset (source,
    csv or root, split settings); its training split is added without labels and its val/test
    files are excluded. Use the split settings the fine-tuning will use (the run writes the
    split it used to `labelled_split.csv`; fine-tune with `data.split_file=` to be certain).
    """

    def __init__(
        self,
        csv: str | Sequence[str] | None = None,
        root: str | Sequence[str] | None = None,
        labelled: Mapping | None = None,
        image_size: int = 96,
        view: Mapping | None = None,
        mean: float = GRAY_MEAN,
        std: float = GRAY_STD,
        max_images: int | None = None,
        batch_size: int = 128,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        if batch_size < 2:
            raise ValueError(f"data.batch_size={batch_size}: contrastive batches need >= 2 images")
        if not (_as_list(csv) or _as_list(root) or labelled):
            raise ValueError(
                "no unlabelled images configured: set data.csv=MANIFEST.csv and/or "
                "data.root=FOLDER (e.g. regionnet-pretrain unlabeled=folder "
                "data.root=/archive)"
            )
        self.transform = TwoViews(image_size, view, mean, std)  # checks image_size and view
        self.records: pd.DataFrame | None = None
        self.labelled: RegionDataModule | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.records is not None:
            return
        h = self.hparams
        parts = [csv_images(c) for c in _as_list(h.csv)]
        parts += [folder_images(r) for r in _as_list(h.root)]
        unlabelled = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        frames = [unlabelled.assign(origin="unlabelled")] if len(unlabelled) else []
        if h.labelled:
            self.labelled = RegionDataModule(**dict(h.labelled))
            self.labelled.setup()
            held_out = set(self.labelled.records.query("split != 'train'")["path"])
            if len(unlabelled):
                leak = unlabelled["path"].isin(held_out)
                if leak.any():
                    log.warning(
                        "%d unlabelled files are val/test radiographs of the labelled set: "
                        "excluded from pretraining",
                        int(leak.sum()),
                    )
                    frames[0] = frames[0][~leak.to_numpy()]
            train = self.labelled.split_frame("train")[["path", "source"]]
            frames.append(train.assign(origin="labelled_train"))
        df = pd.concat(frames, ignore_index=True).drop_duplicates("path")
        if h.max_images:
            df = df.sample(n=min(h.max_images, len(df)), random_state=0)
        if len(df) < h.batch_size:
            raise ValueError(
                f"{len(df)} unlabelled radiographs found, fewer than data.batch_size="
                f"{h.batch_size}; add images or lower data.batch_size"
            )
        self.records = df.reset_index(drop=True)
        log.info(
            "pretraining images by origin and source:\n%s",
            self.records.groupby(["origin", "source"]).size().to_string(),
        )

    def write_manifest(self, out_dir: str | Path) -> None:
        """`pretrain_images.csv` (what was used) and, with `labelled`, `labelled_split.csv`."""
        self.setup()
        out_dir = Path(out_dir)
        self.records.to_csv(
            out_dir / "pretrain_images.csv", index=False, encoding="utf-8", errors="surrogateescape"
        )
        if self.labelled is not None:
            self.labelled.write_split(out_dir / "labelled_split.csv")

    def train_dataloader(self) -> DataLoader:
        self.setup()
        h = self.hparams
        dataset = RadiographDataset(self.records, (), self.transform, phantom_size=h.image_size)
        return DataLoader(
            dataset,
            batch_size=h.batch_size,
            shuffle=True,
            drop_last=True,  # equal-sized batches: the contrastive loss sees the same negatives
            num_workers=h.num_workers,
            pin_memory=h.pin_memory,
            persistent_workers=h.persistent_workers and h.num_workers > 0,
            collate_fn=collate,
        )
