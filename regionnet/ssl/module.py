"""The self-supervised LightningModule: a timm backbone learns from two views per radiograph.

Methods (losses, heads and momentum updates from `lightly`):
- `simclr` (Chen et al. 2020): contrastive; the two views of a film attract, every other film
  in the batch (all processes' under DDP) repels. NT-Xent loss with `temperature`.
- `byol` (Grill et al. 2020): an online network predicts a momentum (EMA) copy's projection of
  the other view; no negatives, so small CPU batches work. Momentum rises from
  `momentum[0]` to `momentum[1]` on a cosine schedule.
Only `backbone.state_dict()` is kept for fine-tuning (`backbone.pth`): the same keys as
`timm.create_model(backbone, num_classes=0, in_chans=...)`, loadable by `model.weights_file=`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import lightning as L
import torch
from lightly.loss import NegativeCosineSimilarity, NTXentLoss
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, SimCLRProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import CosineWarmupScheduler, cosine_schedule

from regionnet.model.backbone import create_backbone, feature_dim

log = logging.getLogger(__name__)

METHODS = ("simclr", "byol")


class SelfSupervised(L.LightningModule):
    """Backbone + projection (+ prediction) heads trained on pairs of views."""

    def __init__(
        self,
        method: str = "simclr",
        backbone: str = "resnet18",
        pretrained: bool = False,
        weights_file: str | None = None,
        in_chans: int = 1,
        drop_path_rate: float = 0.0,
        proj_hidden: int = 1024,
        proj_dim: int = 128,
        temperature: float = 0.2,
        momentum: Sequence[float] = (0.99, 1.0),
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_epochs: int = 1,
        channels_last: bool = False,
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"ssl.method={method!r}: choose one of {', '.join(METHODS)}")
        if temperature <= 0 or lr <= 0:
            raise ValueError(f"ssl.temperature={temperature} and ssl.lr={lr} must be > 0")
        self.save_hyperparameters()
        self.backbone = create_backbone(
            backbone, pretrained, weights_file, in_chans, drop_path_rate
        )
        width = feature_dim(self.backbone)
        if method == "simclr":
            self.projection = SimCLRProjectionHead(width, proj_hidden, proj_dim)
            # negatives from every process's batch under DDP: a larger effective batch
            self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)
        else:
            self.projection = BYOLProjectionHead(width, proj_hidden, proj_dim)
            self.prediction = BYOLPredictionHead(proj_dim, proj_hidden, proj_dim)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_momentum = copy.deepcopy(self.projection)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_momentum)
            self.criterion = NegativeCosineSimilarity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, C) of normalised (B, 1, S, S) radiographs."""
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def _momentum_project(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.projection_momentum(self.backbone_momentum(x)).detach()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        for path, reason in batch["errors"]:
            log.warning("skipped unreadable radiograph %s: %s", path, reason)
        if "image" not in batch or len(batch["image"]) < 2:
            return None  # a batch of unreadable files
        x0, x1 = batch["image"][:, 0], batch["image"][:, 1]
        if self.hparams.method == "simclr":
            z0, z1 = self.projection(self(x0)), self.projection(self(x1))
            loss = self.criterion(z0.float(), z1.float())
        else:
            m = cosine_schedule(
                self.global_step,
                max(1, self.trainer.estimated_stepping_batches),
                *self.hparams.momentum,
            )
            update_momentum(self.backbone, self.backbone_momentum, m)
            update_momentum(self.projection, self.projection_momentum, m)
            p0 = self.prediction(self.projection(self(x0)))
            p1 = self.prediction(self.projection(self(x1)))
            t0, t1 = self._momentum_project(x0), self._momentum_project(x1)
            loss = 0.5 * (
                self.criterion(p0.float(), t1.float()) + self.criterion(p1.float(), t0.float())
            )
            self.log("train/momentum", m, on_step=True, on_epoch=False)
        # as the supervised loop (regionnet.model.loop): not on the progress bar (a Python
        # number, so a GPU sync, every step) and no all-reduce per step under DDP; the epoch
        # value is this process's mean
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=h.lr, weight_decay=h.weight_decay)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = max(1, steps // max(1, self.trainer.max_epochs or 1))
        scheduler = CosineWarmupScheduler(
            optimizer, warmup_epochs=min(h.warmup_epochs * per_epoch, steps // 2), max_epochs=steps
        )
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The backbone's weights for `model.weights_file=` (CPU, contiguous)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}
