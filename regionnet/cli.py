"""Console scripts: thin `@hydra.main` wrappers over the plain functions."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from regionnet.config import CONF_DIR
from regionnet.sweep import register_resolvers

# before Hydra composes: hparams_search/optuna.yaml's storage uses ${regionnet.sqlite:...}
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    """`regionnet-train`: returns the metric a Hydra sweeper optimises."""
    from regionnet.train import train

    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric") or "", None)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="pretrain")
def pretrain_main(cfg: DictConfig) -> None:
    """`regionnet-pretrain unlabeled=shared|folder|csv ssl=simclr|byol`."""
    from regionnet.pretrain import pretrain

    pretrain(cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def eval_main(cfg: DictConfig) -> None:
    """`regionnet-eval ckpt_path=... [data=...]`."""
    from regionnet.evaluate import evaluate

    evaluate(cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def predict_main(cfg: DictConfig) -> None:
    """`regionnet-predict ckpt_path=... input=PATH output=preds.csv`."""
    from regionnet.predict import predict

    predict(cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def export_main(cfg: DictConfig) -> None:
    """`regionnet-export ckpt_path=... format=onnx|torchscript`."""
    from regionnet.export import export

    export(cfg)
