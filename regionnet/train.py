"""`train(cfg)`: fit a RegionNet, then validate and test its best checkpoint.

Writes into the run directory (`paths.output_dir`, Hydra's run dir): `config.yaml`,
`split.csv`, `checkpoints/best.ckpt` and `last.ckpt`, `metrics.json` (final val/test/external
metrics keyed by their logged names), `test_predictions.csv` (per-image test probabilities,
for pooling k folds), and the loggers' files (`csv/`, `wandb/`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from regionnet.data.datamodule import RegionDataModule
from regionnet.distributed import DistributedJob
from regionnet.loggers import wandb_summary
from regionnet.model.module import RegionNet
from regionnet.model_card import write_model_card
from regionnet.sweep import apply_sweep_group, finished_run, test_predictions

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig) -> RegionDataModule:
    try:
        return instantiate(cfg.data, _convert_="all")
    except InstantiationException as e:
        # Our own errors already name the config key and the fix; Hydra's wrapper hides them.
        raise (e.__cause__ or e) from None


def build_model(cfg: DictConfig, regions) -> RegionNet:
    """The model class named by `model._target_` with plain-value arguments (no Hydra
    objects in the checkpoint's hyperparameters)."""
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    cls = get_class(kwargs.pop("_target_", "regionnet.model.module.RegionNet"))
    return cls(regions=list(regions), **kwargs)


def instantiate_list(group: DictConfig | None) -> list:
    """Instantiate every entry of a config group dict (`callbacks`, `logger`); skip nulls."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if c is not None and "_target_" in c]


def numbers(metrics: dict, prefixes: tuple[str, ...]) -> dict[str, float]:
    """Plain floats of logged metrics whose names start with one of `prefixes`."""
    out = {}
    for k, v in metrics.items():
        if k.startswith(prefixes):
            out[k] = float(v.item() if isinstance(v, torch.Tensor) else v)
    return dict(sorted(out.items()))


def speed_up(model: RegionNet, channels_last: bool = False, compile: bool = False) -> None:
    """`model.channels_last`: weights in channels-last memory format (forward converts the
    batches), faster convolutions on tensor cores. `model.compile`: torch.compile each backbone
    in place (`nn.Module.compile`: checkpoint keys unchanged). Not the whole LightningModule:
    Lightning would then compile the steps too, torchmetrics updates included, which dynamo
    cannot trace."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        backbones = getattr(model, "backbones", None) or {"": model.backbone}
        for backbone in backbones.values():
            backbone.compile()


def print_summary(metrics: dict[str, float], regions, stages=("val", "test", "external")) -> None:
    """A per-region AUROC table on the console."""
    from rich.console import Console
    from rich.table import Table

    shown = [s for s in stages if any(k.startswith(f"{s}/") for k in metrics)]
    table = Table(title="AUROC per region head (one-vs-rest)")
    table.add_column("region")
    for s in shown:
        table.add_column(s, justify="right")
    for r in [*regions, "auroc_mean", "top1_acc"]:
        keys = [f"{s}/auroc/{r}" if r in regions else f"{s}/{r}" for s in shown]
        table.add_row(r, *(f"{metrics[k]:.3f}" if k in metrics else "n/a" for k in keys))
    Console().print(table)


def train(cfg: DictConfig, extra_callbacks: list | None = None) -> dict[str, float]:
    """Train, validate and test as configured; return the final metrics.

    With `skip_if_done`, a run directory that already holds a finished run of this config
    returns its metrics instead (a re-launched sweep skips its finished jobs). Under DDP every
    process runs this; see `regionnet.distributed` for how processes start and end.
    """
    done = finished_run(cfg)
    if done is not None:
        return done
    with DistributedJob() as job:
        return _train(cfg, job, extra_callbacks)


def prepare_run(cfg: DictConfig) -> Path:
    """The run directory (created), the seed, and TF32 matmuls on GPUs; returns the directory."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    return out


def _train(cfg: DictConfig, job: DistributedJob, extra_callbacks: list | None) -> dict[str, float]:
    out = prepare_run(cfg)
    dm = build_datamodule(cfg)
    dm.setup()
    if dm.hparams.source == "phantom":
        log.warning(
            "data=phantom: SYNTHETIC radiographs for trying regionnet, not clinical evidence"
        )
    model = build_model(cfg, dm.regions)
    callbacks = instantiate_list(cfg.get("callbacks")) + list(extra_callbacks or [])
    apply_sweep_group(cfg)
    loggers = instantiate_list(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    job.track(trainer)

    if trainer.is_global_zero:
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
        dm.write_split(out / "split.csv")
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams(plain_cfg)

    speed_up(model, cfg.model.get("channels_last"), cfg.model.get("compile"))
    trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))

    ckpt = trainer.checkpoint_callback
    best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    if best is None:
        log.warning(
            "no best checkpoint (fast_dev_run or no checkpoint callback): using last weights"
        )
    metrics = numbers(trainer.callback_metrics, ("val/auroc_mean_best", "train/images_per_s"))
    metrics["model/params"] = sum(p.numel() for p in model.parameters())
    trainer.validate(model, datamodule=dm, ckpt_path=best, verbose=False)
    metrics.update(numbers(trainer.callback_metrics, ("val/",)))
    if cfg.get("test", True):
        trainer.test(model, datamodule=dm, ckpt_path=best, verbose=False)
        metrics.update(numbers(trainer.callback_metrics, ("test/", "external/")))
    predictions = test_predictions(trainer, model, dm, best) if cfg.get("test", True) else None

    if trainer.is_global_zero:
        if predictions is not None:
            predictions.to_csv(out / "test_predictions.csv", index=False)
        wandb_summary(loggers, metrics, predictions, dm.regions)
        # after the predictions: a run directory with metrics.json is finished (skip_if_done)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_model_card(getattr(ckpt, "dirpath", None) or out / "checkpoints", model, dm, metrics)
        print_summary(metrics, dm.regions)
        log.info("run directory: %s (best checkpoint: %s)", out, best)
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()
    return metrics
