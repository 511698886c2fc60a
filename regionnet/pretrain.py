"""`pretrain(cfg)`: self-supervised pretraining of a timm backbone on unlabelled radiographs.

Writes into the run directory (`paths.output_dir`): `backbone.pth` (the backbone's state dict,
the keys of `timm.create_model(model.backbone, num_classes=0, in_chans=model.in_chans)`;
fine-tune with `regionnet-train model.backbone=<same> model.weights_file=.../backbone.pth`),
`metrics.json`, `config.yaml`, `pretrain_images.csv` (every image used, with its origin),
`labelled_split.csv` when a labelled training split was added, `checkpoints/last.ckpt` (resume
with `ckpt_path=`), and the loggers' files.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from regionnet.distributed import DistributedJob
from regionnet.loggers import finish_wandb
from regionnet.model.checkpoint import check_resumable
from regionnet.run import instantiate_list, numbers, prepare_run, speed_up
from regionnet.ssl.data import UnlabeledDataModule
from regionnet.ssl.module import SelfSupervised

log = logging.getLogger(__name__)

PRETRAIN_PROGRAM = "from regionnet.cli import pretrain_main; pretrain_main()"
# the model group's keys that describe the backbone; the rest (heads, loss) is fine-tuning's
BACKBONE_KEYS = ("backbone", "pretrained", "weights_file", "in_chans", "drop_path_rate")


class SaveBackbone(L.Callback):
    """Writes `backbone.pth` when the fit ends (also when `trainer.max_time` stops it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: SelfSupervised) -> None:
        if trainer.is_global_zero:
            torch.save(pl_module.backbone_state(), self.path)
            log.info("backbone weights: %s", self.path)


def build_ssl_datamodule(cfg: DictConfig) -> UnlabeledDataModule:
    try:
        dm = instantiate(cfg.data, _convert_="all")
    except InstantiationException as e:
        raise (e.__cause__ or e) from None  # our errors name the key and the fix
    if not isinstance(dm, UnlabeledDataModule):
        raise ValueError(
            "regionnet-pretrain needs unlabelled data (unlabeled=shared, folder or csv), not "
            f"{type(dm).__name__}"
        )
    return dm


def build_ssl_model(cfg: DictConfig) -> SelfSupervised:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    ssl = OmegaConf.to_container(cfg.ssl, resolve=True)
    kwargs = {k: model[k] for k in BACKBONE_KEYS if k in model}
    return SelfSupervised(**kwargs, **ssl, channels_last=bool(model.get("channels_last")))


def pretrain(cfg: DictConfig) -> dict:
    """Pretrain as configured; return the run's metrics (also in `metrics.json`)."""
    with DistributedJob(PRETRAIN_PROGRAM) as job:
        return _pretrain(cfg, job)


def _pretrain(cfg: DictConfig, job: DistributedJob) -> dict:
    out = prepare_run(cfg)
    dm = build_ssl_datamodule(cfg)
    dm.setup()
    model = build_ssl_model(cfg)
    weights = out / "backbone.pth"
    callbacks = [*instantiate_list(cfg.get("callbacks")), SaveBackbone(weights)]
    loggers = instantiate_list(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    job.track(trainer)
    if trainer.is_global_zero:
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
        dm.write_manifest(out)
    plain = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams(plain)

    speed_up(model, cfg.model.get("channels_last"), cfg.model.get("compile"))
    start = time.perf_counter()
    check_resumable(cfg.get("ckpt_path"))  # tensors and plain values only: never code
    trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    seconds = time.perf_counter() - start
    metrics = numbers(trainer.callback_metrics, ("train/",))
    metrics.update(
        {
            "pretrain/images": len(dm.records),
            # a fractional count when trainer.max_time stopped the fit mid-epoch
            "pretrain/epochs": round(trainer.global_step / max(1, trainer.num_training_batches), 2),
            "pretrain/steps": trainer.global_step,
            "pretrain/seconds": seconds,
            "pretrain/method": cfg.ssl.method,
            "weights_file": str(weights.resolve()),
        }
    )
    if trainer.is_global_zero:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        hint = f"model.backbone={cfg.model.backbone} model.weights_file={weights.resolve()}"
        lab = cfg.data.get("labelled")
        if lab:  # fine-tune on the same labelled data, with the split the pretraining kept to
            key = {"csv": "csv", "folder": "root"}.get(lab.source)
            hint += f" data={lab.source}" + (f" data.{key}={lab[key]}" if key else "")
            if lab.get("regions"):
                hint += f" data.regions=[{','.join(lab.regions)}]"
            hint += f" data.split_file={(out / 'labelled_split.csv').resolve()}"
        log.info("fine-tune from these weights: regionnet-train %s", hint)
    finish_wandb(loggers)
    return metrics
