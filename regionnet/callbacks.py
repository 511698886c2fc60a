"""Lightning callbacks of regionnet's training."""

from __future__ import annotations

import time

import lightning as L


class ImagesPerSecond(L.Callback):
    """Training throughput, `train/images_per_s`: radiographs per second over the fit so far,
    all processes together (a sum over DDP processes), logged at each training epoch's end.

    Time runs from each training epoch's start to its last batch, so data loading counts and
    validation does not. Lightning's `ThroughputMonitor` logs per step over a window of 100
    batches and needs FLOPs; one number per run is what a sweep table compares.
    """

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._mark = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.images, self.seconds = 0, 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.seconds += now - self._mark
        self._mark = now
        # every head type's batches carry `image` (a batch of unreadable files has none)
        self.images += len(batch["image"]) if "image" in batch else 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.seconds > 0:
            pl_module.log(
                "train/images_per_s",
                self.images / self.seconds,
                sync_dist=True,
                reduce_fx="sum",
            )
