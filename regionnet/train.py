"""`train(cfg)`: fit a model (region heads; landmark heads with `task=landmarks`; box heads
with `task=boxes`; region heads with landmark and box parts on one backbone with
`task=multi`), then validate and test its best checkpoint.

Writes into the run directory (`paths.output_dir`, Hydra's run dir): `config.yaml`,
`split.csv`, `checkpoints/best.ckpt` and `last.ckpt`, `metrics.json` (final val/test/external
metrics keyed by their logged names), `test_predictions.csv` (per-image test probabilities,
for pooling k folds), and the loggers' files (`csv/`, `wandb/`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from regionnet.boxes import run as box_run
from regionnet.compose import run as multi_run
from regionnet.distributed import DistributedJob
from regionnet.landmarks import run as landmark_run
from regionnet.loggers import finish_wandb, loggable_config, wandb_summary
from regionnet.model.checkpoint import (
    check_resumable,
    inference_checkpoint,
    init_from,
    load_plain,
)
from regionnet.model_card import write_model_card
from regionnet.reporting import test_predictions
from regionnet.run import (
    build_datamodule,
    build_model,
    instantiate_list,
    numbers,
    prepare_run,
    print_summary,
    speed_up,
)
from regionnet.sweep import apply_sweep_group, finished_run

log = logging.getLogger(__name__)

# each head type's outputs after a fit: test_predictions, model_card, print_summary
# (the region task's are this module's own imports)
TASK_RUNS = {"landmarks": landmark_run, "boxes": box_run, "multi": multi_run}


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


def _train(cfg: DictConfig, job: DistributedJob, extra_callbacks: list | None) -> dict[str, float]:
    out = prepare_run(cfg)
    dm = build_datamodule(cfg)
    dm.setup()
    if "phantom" in (dm.hparams.get("source"), dm.hparams.get("dataset")):
        log.warning(
            "data=phantom: SYNTHETIC radiographs for trying regionnet, not clinical evidence"
        )
    model = build_model(cfg, dm)
    start_from(model, cfg)
    task_run = TASK_RUNS.get(getattr(model, "task", "regions"))
    callbacks = instantiate_list(cfg.get("callbacks")) + list(extra_callbacks or [])
    apply_sweep_group(cfg)
    loggers = instantiate_list(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    job.track(trainer)

    if trainer.is_global_zero:
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
        dm.write_split(out / "split.csv")
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:  # W&B gets no paths unless logger.wandb.log_paths
        lg.log_hyperparams(loggable_config(lg, plain_cfg))

    speed_up(model, cfg.model.get("channels_last"), cfg.model.get("compile"))
    resume = cfg.get("ckpt_path")
    check_resumable(resume)
    # weights_only=True everywhere a checkpoint is read: tensors and plain values, never code
    trainer.fit(model, datamodule=dm, ckpt_path=resume, weights_only=True)

    ckpt = trainer.checkpoint_callback
    best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    if best is None:
        log.warning(
            "no best checkpoint (fast_dev_run or no checkpoint callback): using last weights"
        )
    # the best-so-far values the loop logs (HeadLoop.tracked), and the training throughput
    best_keys = (*(f"{name}_best" for name in model.tracked()), "train/images_per_s")
    metrics = numbers(trainer.callback_metrics, best_keys)
    metrics["model/params"] = sum(p.numel() for p in model.parameters())
    trainer.validate(model, datamodule=dm, ckpt_path=best, verbose=False, weights_only=True)
    metrics.update(numbers(trainer.callback_metrics, ("val/",)))
    if cfg.get("test", True):
        trainer.test(model, datamodule=dm, ckpt_path=best, verbose=False, weights_only=True)
        metrics.update(numbers(trainer.callback_metrics, ("test/", "external/")))
    predictions = None
    if cfg.get("test", True):
        # from the test pass just run (HeadLoop.test_outputs): no second pass over the films
        tested = task_run.test_predictions if task_run else test_predictions
        predictions = tested(trainer, model, dm)

    if trainer.is_global_zero:
        if predictions is not None:
            predictions.to_csv(out / "test_predictions.csv", index=False)
        wandb_summary(loggers, metrics, predictions, list(getattr(model, "regions", [])))
        if best is not None:
            strip_for_inference(Path(best))
        card_dir = getattr(ckpt, "dirpath", None) or out / "checkpoints"
        write_model_card(card_dir, model, dm, metrics, getattr(task_run, "model_card", None))
        # after the predictions and the card: a run directory with metrics.json is finished
        # (skip_if_done), so a run that failed before them is trained again
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if task_run:
            task_run.print_summary(metrics, model)
        else:
            print_summary(metrics, dm.regions, findings=list(getattr(model, "findings", [])))
        log.info("run directory: %s (best checkpoint: %s)", out, best)
    finish_wandb(loggers)
    return metrics


def start_from(model: L.LightningModule, cfg: DictConfig) -> None:
    """`init_from=<checkpoint>`: the new model starts from that run's weights where names and
    shapes match (`regionnet.model.checkpoint.init_from`); a resume (`ckpt_path`) restores
    everything instead, so the two together are refused."""
    source = cfg.get("init_from")
    if not source:
        return
    if cfg.get("ckpt_path"):
        raise ValueError(
            "init_from= and ckpt_path= together: ckpt_path resumes a run (weights, optimizer, "
            "epoch), init_from starts a new one from another run's weights; give one"
        )
    counts = init_from(model, source)
    log.info(
        "init_from %s: %d tensors copied, %d of another shape and %d not in it keep their "
        "initialisation",
        Path(str(source)).name,
        counts["copied"],
        counts["shape_differs"],
        counts["not_in_checkpoint"],
    )


def strip_for_inference(best: Path) -> None:
    """Rewrite best.ckpt once, atomically, with only what inference needs (weights,
    hyperparameters, versions; `inference_checkpoint`): no data root, run directory, optimizer
    or loop state. last.ckpt keeps everything a resume needs."""
    kept = inference_checkpoint(load_plain(best, "best checkpoint"))
    tmp = best.with_name(f".{best.name}.{os.getpid()}.tmp")
    try:
        torch.save(kept, tmp)
        os.replace(tmp, best)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("best checkpoint kept for inference only (weights, hyperparameters): %s", best)
