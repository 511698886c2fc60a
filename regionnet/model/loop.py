"""HeadLoop: the one Lightning training loop every head type runs on.

Region (`regionnet.model.module.RegionNet`, with its finding heads), landmark
(`regionnet.landmarks.module.LandmarkNet`) and box (`regionnet.boxes.module.BoxNet`) models
are HeadLoops: the loop owns the steps, what is logged and when, the best-so-far tracker of
the monitored validation metric, the test stages, the predict step's film bookkeeping and the
optimizer; a head type gives only what differs between them:

- `training_loss(batch)`: the loss of a batch, and named terms logged per epoch
  (`train/<name>`);
- `update_metrics(batch, stage)`: one evaluated batch into its metrics; it returns what
  `predict_batch` would for the batch (from the same forward pass), which the loop keeps for
  the test stage (`test_outputs`: the run's `test_predictions.csv`, without a second pass);
- `end_stage(stage)`: the stage's metric values (`stage/metric[/name]`; none where no batch
  reached the stage), its metrics reset;
- `predict_batch(batch)` / `empty_prediction()`: what predict returns for a batch's readable
  films, and for a batch where none was readable;
- `reset_metrics()`, `head_parameters()` (the parameters at the full learning rate;
  everything else trains at `backbone_lr_scale` x it), and the class attributes `task`,
  `monitor`, `monitor_mode` and `stages`. A model may set its own `monitor` (an instance
  attribute, e.g. RegionNet's `model.monitor`); `<class monitor>_best` is logged beside it.

Batches (`regionnet.data.dataset.collate_readable` and its landmark/box twins) hold the
readable films under `image` and the unreadable ones under `errors` ((path, reason) pairs):
a batch of only unreadable films has no `image`, and the loop skips it after logging why.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torchmetrics import MaxMetric, MinMetric

from regionnet.io import INTENSITY
from regionnet.model.optim import configure_optimizers

log = logging.getLogger(__name__)


def check_intensity(intensity: str) -> None:
    """Refuse a checkpoint whose films were read by another pixel intensity rule
    (`regionnet.io.INTENSITY`): its weights would see other numbers than in training."""
    if intensity != INTENSITY:
        raise ValueError(
            f"model.intensity={intensity!r}: this regionnet reads pixels by the "
            f"{INTENSITY!r} rule only (regionnet.io); use the regionnet version the "
            "checkpoint was trained with"
        )


class HeadLoop(L.LightningModule):
    """The training, evaluation and predict loop of every head type (module docstring)."""

    #: the head type (checkpoints, predict and eval dispatch on it)
    task = "regions"
    #: the validation metric the best checkpoint, early stopping and a plateau scheduler follow
    monitor = "val/auroc_mean"
    #: "max" or "min": whether a higher `monitor` is better
    monitor_mode = "max"
    #: the evaluation stages with metrics: validation first, then the test stages
    stages = ("val", "test")

    def __init__(self):
        super().__init__()
        # best-so-far of the head type's own (class) monitor and of the model's `monitor` where
        # that is another metric (`tracked`), logged as `<metric>_best`: sweeps, dashboards and
        # the benchmark read `val/auroc_mean_best` etc. whichever metric the checkpoint follows
        best = MaxMetric if self.monitor_mode == "max" else MinMetric
        self.val_best, self.monitor_best = best(), best()
        # the test stage's per-film outputs, every process's after the stage (`test_outputs`),
        # and the test stages' unreadable films as (path, reason) (`test_errors`)
        self._test_outputs: list[dict] = []
        self._test_errors: list[tuple[str, str]] = []

    # -- what a head type gives -------------------------------------------------------------
    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def update_metrics(self, batch: dict, stage: str) -> dict:
        raise NotImplementedError

    def end_stage(self, stage: str) -> dict[str, float]:
        raise NotImplementedError

    def predict_batch(self, batch: dict) -> dict:
        raise NotImplementedError

    def empty_prediction(self) -> dict:
        raise NotImplementedError

    def reset_metrics(self) -> None:
        raise NotImplementedError

    def head_parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    # -- the loop ---------------------------------------------------------------------------
    def _warn_errors(self, batch: dict) -> None:
        for path, why in batch.get("errors", []):
            log.warning("skipped unreadable radiograph %s: %s", path, why)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        self._warn_errors(batch)
        if "image" not in batch:
            return None
        loss, terms = self.training_loss(batch)
        n = len(batch["image"])
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=n)
        # Not on the progress bar: Lightning turns a step's progress-bar values into Python
        # numbers after every batch (`.item()`, a GPU sync per step); the loggers read
        # train/loss_step every trainer.log_every_n_steps and train/loss_epoch once per epoch.
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=n)
        return loss

    def on_train_start(self) -> None:
        # the sanity check's validation must not leak into the metrics or the best-so-far
        self.reset_metrics()
        self.val_best.reset()
        self.monitor_best.reset()

    def _eval_step(self, batch: dict, stage: str) -> None:
        self._warn_errors(batch)
        if stage != "val":  # a test stage's unreadable films, kept for its reports
            self._test_errors += list(batch.get("errors", []))
        if "image" not in batch:
            return
        found = self.update_metrics(batch, stage)
        if stage == "test":
            self._test_outputs.append({"path": list(batch["path"]), **found})

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self._test_stage(dataloader_idx))

    def _test_stage(self, dataloader_idx: int) -> str:
        """The stage of a test loader: the data module's names in order (`test`, then
        `external` where it has an external test set)."""
        dm = getattr(self.trainer, "datamodule", None)
        names = dm.test_stage_names() if hasattr(dm, "test_stage_names") else ["test"]
        return names[dataloader_idx] if dataloader_idx < len(names) else f"test{dataloader_idx}"

    def _log_stage(self, stage: str) -> dict[str, float]:
        values = self.end_stage(stage)
        self.log_dict(values, sync_dist=False)  # torchmetrics already synced across processes
        return values

    def on_validation_epoch_end(self) -> None:
        values = self._log_stage("val")
        if self.trainer.sanity_checking:
            return
        for name, best in self.tracked().items():
            if name in values:
                best.update(torch.tensor(values[name]))
                self.log(f"{name}_best", best.compute(), prog_bar=True)

    def tracked(self) -> dict[str, MaxMetric | MinMetric]:
        """The validation metrics whose best-so-far is logged as `<metric>_best`, each with its
        tracker: the head type's own monitor, and the model's `monitor` where it is another."""
        out = {type(self).monitor: self.val_best}
        if self.monitor != type(self).monitor:
            out[self.monitor] = self.monitor_best
        return out

    def on_test_epoch_start(self) -> None:
        self._test_outputs, self._test_errors = [], []

    def on_test_epoch_end(self) -> None:
        for stage in self.stages[1:]:  # a stage no batch reached gives no values
            self._log_stage(stage)
        # every process's test films, on every process (a collective: all of them call it)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, (self._test_outputs, self._test_errors))
            self._test_outputs = [out for part, _ in parts for out in part]
            self._test_errors = [e for _, part in parts for e in part]

    @property
    def test_outputs(self) -> list[dict]:
        """The last test stage's outputs per batch, `predict_step`'s form ({"path": [...], ...}
        of the readable films), gathered from every process; a film the distributed sampler
        gave two processes appears twice (readers keep the first)."""
        return self._test_outputs

    @property
    def test_errors(self) -> list[tuple[str, str]]:
        """The last test pass's unreadable films, (path, reason), from every process."""
        return self._test_errors

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """{"path": [...] of the readable films, "errors": [(path, reason)]} and the head
        type's outputs (`predict_batch`; `empty_prediction` when no film was readable)."""
        out = {"path": batch["path"], "errors": batch.get("errors", [])}
        found = self.predict_batch(batch) if "image" in batch else self.empty_prediction()
        return {**out, **found}

    def configure_optimizers(self):
        h = self.hparams
        return configure_optimizers(
            self,
            self.head_parameters(),
            h.optimizer,
            h.scheduler,
            h.scheduler_interval,
            self.monitor,
            h.get("backbone_lr_scale", 1.0),
        )
