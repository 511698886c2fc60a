"""Optimizer and scheduler from the `model` config, for every head type's Lightning module.

`optimizer` and `scheduler` are Hydra partials (`_partial_: true`, e.g. AdamW and cosine
annealing in conf/model/*.yaml); `backbone_lr_scale` < 1 lets a pretrained backbone move slower
than the freshly initialised heads (0.1 is usual when fine-tuning ImageNet weights).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3}


def configure_optimizers(
    module: nn.Module,
    heads: Iterable[nn.Parameter],
    optimizer: Mapping | None,
    scheduler: Mapping | None,
    interval: str,
    monitor: str,
    backbone_lr_scale: float = 1.0,
):
    """What `LightningModule.configure_optimizers` returns: the optimizer over `module`'s
    trainable parameters (the `heads` ones at the configured rate, the rest at
    `backbone_lr_scale` x it) and, with a `scheduler`, its Lightning config (`monitor` is what
    a ReduceLROnPlateau follows)."""
    from hydra.utils import instantiate  # only training needs Hydra

    make = instantiate(dict(optimizer or DEFAULT_OPTIMIZER))
    params = [p for p in module.parameters() if p.requires_grad]
    if float(backbone_lr_scale) == 1.0:
        opt = make(params=params)
    else:
        head_ids = {id(p) for p in heads}
        lr = make.keywords.get("lr", DEFAULT_OPTIMIZER["lr"])
        opt = make(
            params=[
                {"params": [p for p in params if id(p) in head_ids], "lr": lr},
                {
                    "params": [p for p in params if id(p) not in head_ids],
                    "lr": lr * float(backbone_lr_scale),
                },
            ]
        )
    if not scheduler:
        return opt
    sched = instantiate(dict(scheduler))(optimizer=opt)
    return {
        "optimizer": opt,
        "lr_scheduler": {"scheduler": sched, "interval": interval, "monitor": monitor},
    }
