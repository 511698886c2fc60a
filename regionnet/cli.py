"""Console scripts: thin `@hydra.main` wrappers over the plain functions."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from regionnet.config import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    """`regionnet-train`: returns the metric a Hydra sweeper optimises."""
    from regionnet.train import train

    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric") or "", None)
