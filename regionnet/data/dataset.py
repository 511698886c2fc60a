"""The torch Dataset of radiographs, its error-tolerant collate function, and the choice of
data loader workers and torch threads for inference."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from regionnet.data.phantom import parse_phantom_uri, render_phantom
from regionnet.data.sources import finding_targets, label_columns
from regionnet.io import RadiographReadError, read_radiograph

log = logging.getLogger(__name__)


def load_image(path: str, phantom_size: int = 256, target: int | None = None) -> np.ndarray:
    """Pixels of a file or a `phantom://` record: float32 (H, W) in [0, 1]. `target`: the
    longest side the caller resizes to; files larger than that are decoded or reduced to it
    (`regionnet.io.read_radiograph`), phantoms are rendered as usual."""
    if path.startswith("phantom://"):
        region, seed = parse_phantom_uri(path)
        return render_phantom(region, seed, size=phantom_size)
    return read_radiograph(path, target=target)


class RadiographDataset(Dataset):
    """Radiographs from a record table (see `regionnet.data.sources`).

    A sample is a dict: `image` float32 (1, S, S) normalised, `labels` float32 (R,) with 1 for
    the region shown and 0 for every other head (all 0 for `other`), `path`, `index`; with
    declared `findings` (validated, `regionnet.data.sources.validate_findings`) also
    `finding_labels` float32 (F,) (0 where unlabelled) and `finding_mask` bool (F,) (labelled).
    A file that cannot be read gives `{"path", "index", "error"}` instead; `collate` drops it,
    so one bad file in a batch job costs that file only. Every sample also carries
    `read_seconds`, the time its file took to read and transform (in the worker).

    `target`: the transform's `image_size` when it starts with `resize_pad` (evaluation and
    prediction): files are then decoded at reduced size (`read_radiograph(path, target=)`),
    the same tensor within rounding. Training leaves it None (full decode): its augmentation
    comes after `resize_pad`, so a reduced read would serve it too, but this keeps training's
    pixels bit-identical to what trained the existing checkpoints.
    """

    def __init__(
        self,
        records: pd.DataFrame,
        regions: Sequence[str],
        transform: Callable[[torch.Tensor], torch.Tensor],
        repeat: int = 1,
        phantom_size: int = 256,
        findings: Mapping[str, Mapping] | None = None,
        target: int | None = None,
    ):
        self.target = target
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
        start = time.perf_counter()
        try:
            pixels = load_image(path, self.phantom_size, self.target)
        except RadiographReadError as e:
            log.warning("skipping unreadable radiograph: %s", e)
            took = time.perf_counter() - start
            return {"path": path, "index": i, "error": str(e.reason), "read_seconds": took}
        image = self.transform(torch.from_numpy(pixels)[None])
        took = time.perf_counter() - start
        sample = {
            "image": image, "labels": self.labels[i], "path": path, "index": i,
            "read_seconds": took,
        }  # fmt: skip
        if self.finding_labels is not None:
            sample["finding_labels"] = self.finding_labels[i]
            sample["finding_mask"] = self.finding_mask[i]
        return sample


def collate(samples: list[dict]) -> dict:
    """Stack readable samples; unreadable ones go to `errors` as (path, reason) pairs.
    `read_seconds`: the reading time of all of them, summed."""
    good = [s for s in samples if "error" not in s]
    batch = {
        "path": [s["path"] for s in good],
        "index": torch.as_tensor([s["index"] for s in good], dtype=torch.long),
        "errors": [(s["path"], s["error"]) for s in samples if "error" in s],
        "read_seconds": float(sum(s.get("read_seconds", 0.0) for s in samples)),
    }
    if good:
        batch["image"] = torch.stack([s["image"] for s in good])
        batch["labels"] = torch.stack([s["labels"] for s in good])
        for key in ("finding_labels", "finding_mask"):
            if key in good[0]:
                batch[key] = torch.stack([s[key] for s in good])
    return batch


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's or taskset's
    share), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def _setting(value) -> int | None:
    """An explicit count, or None for null / "auto"."""
    if value is None or str(value).strip().lower() in ("", "auto", "none", "null"):
        return None
    count = int(value)
    if count < 0:
        raise ValueError(f"{value!r}: use a count >= 0, or auto")
    return count


def loader_threads(
    num_workers=None, torch_threads=None, *, cores: int | None = None, gpu: bool = False
) -> tuple[int, int]:
    """(data loader worker processes, torch intra-op threads) for inference, so that readers
    and the model do not fight over the cores. Explicit values win; None or "auto" chooses
    from the usable cores. Workers: under 4 cores one (none on one core); from 4 cores, on a
    GPU all but one core read (the model runs on the GPU), on the CPU half. Torch threads: on
    the CPU all the cores, because a reader sleeps once its prefetch queue is full and costs
    the model little (2 cores, 224 px films: 1 worker + 2 threads 34.4 films/s, 1 + 1 21.9,
    model alone 35.1); on a GPU with 4 or more cores one. Workers run one torch thread each
    (PyTorch sets it in every worker)."""
    cores = max(1, cores or usable_cores())
    workers = _setting(num_workers)
    if workers is None:
        few = cores < 4
        workers = min(1, cores - 1) if few else (cores - 1 if gpu else cores // 2)
    threads = _setting(torch_threads)
    if threads is None:
        threads = 1 if gpu and cores >= 4 else cores
    return workers, max(1, threads)
