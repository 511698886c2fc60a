"""The torch Dataset of radiographs and its error-tolerant collate function."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from regionnet.data.phantom import parse_phantom_uri, render_phantom
from regionnet.data.sources import finding_targets, label_columns
from regionnet.io import RadiographReadError, read_radiograph

log = logging.getLogger(__name__)


def load_image(path: str, phantom_size: int = 256) -> np.ndarray:
    """Pixels of a file or a `phantom://` record: float32 (H, W) in [0, 1]."""
    if path.startswith("phantom://"):
        region, seed = parse_phantom_uri(path)
        return render_phantom(region, seed, size=phantom_size)
    return read_radiograph(path)


class RadiographDataset(Dataset):
    """Radiographs from a record table (see `regionnet.data.sources`).

    A sample is a dict: `image` float32 (1, S, S) normalised, `labels` float32 (R,) with 1 for
    the region shown and 0 for every other head (all 0 for `other`), `path`, `index`; with
    declared `findings` (validated, `regionnet.data.sources.validate_findings`) also
    `finding_labels` float32 (F,) (0 where unlabelled) and `finding_mask` bool (F,) (labelled).
    A file that cannot be read gives `{"path", "index", "error"}` instead; `collate` drops it,
    so one bad file in a batch job costs that file only.
    """

    def __init__(
        self,
        records: pd.DataFrame,
        regions: Sequence[str],
        transform: Callable[[torch.Tensor], torch.Tensor],
        repeat: int = 1,
        phantom_size: int = 256,
        findings: Mapping[str, Mapping] | None = None,
    ):
        self.paths = records["path"].tolist()
        cols = label_columns(regions)
        present = all(c in records for c in cols)
        labels = (
            records[cols].to_numpy(np.float32) if present else np.zeros((len(records), len(cols)))
        )
        self.labels = torch.as_tensor(labels, dtype=torch.float32)
        self.finding_labels = self.finding_mask = None
        if findings:
            targets = torch.as_tensor(finding_targets(records, findings))
            self.finding_mask = ~torch.isnan(targets)
            self.finding_labels = torch.nan_to_num(targets, nan=0.0)
        self.transform = transform
        self.repeat = max(1, int(repeat))
        self.phantom_size = phantom_size

    def __len__(self) -> int:
        return len(self.paths) * self.repeat

    def __getitem__(self, i: int) -> dict:
        i = i % len(self.paths)
        path = self.paths[i]
        try:
            pixels = load_image(path, self.phantom_size)
        except RadiographReadError as e:
            log.warning("skipping unreadable radiograph: %s", e)
            return {"path": path, "index": i, "error": str(e.reason)}
        image = self.transform(torch.from_numpy(pixels)[None])
        sample = {"image": image, "labels": self.labels[i], "path": path, "index": i}
        if self.finding_labels is not None:
            sample["finding_labels"] = self.finding_labels[i]
            sample["finding_mask"] = self.finding_mask[i]
        return sample


def collate(samples: list[dict]) -> dict:
    """Stack readable samples; unreadable ones go to `errors` as (path, reason) pairs."""
    good = [s for s in samples if "error" not in s]
    batch = {
        "path": [s["path"] for s in good],
        "index": torch.as_tensor([s["index"] for s in good], dtype=torch.long),
        "errors": [(s["path"], s["error"]) for s in samples if "error" in s],
    }
    if good:
        batch["image"] = torch.stack([s["image"] for s in good])
        batch["labels"] = torch.stack([s["labels"] for s in good])
        for key in ("finding_labels", "finding_mask"):
            if key in good[0]:
                batch[key] = torch.stack([s[key] for s in good])
    return batch
