"""Logger helpers: W&B that never blocks offline, ROC curves to W&B."""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.loggers import Logger, WandbLogger

log = logging.getLogger(__name__)


def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.environ.get("NETRC", Path.home() / ".netrc")).authenticators(
            "api.wandb.ai"
        )
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return auth is not None


def wandb_logger(
    project: str = "regionnet",
    save_dir: str = ".",
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    offline: bool | None = None,
    log_model: bool = False,
    entity: str | None = None,
    job_type: str = "train",
) -> WandbLogger:
    """A `WandbLogger` that runs offline (writes `wandb/offline-run-*`, sync later with
    `wandb sync`) when no API key is configured, so a run never prompts or waits for a network.

    `offline=None` decides from the environment; `WANDB_MODE=offline|disabled` always wins.
    Checkpoints are not uploaded unless `log_model` (they may embed data-derived statistics).
    """
    if offline is None:
        offline = not _wandb_key_available()
        if offline and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
            log.info(
                "no W&B API key: logging offline to %s/wandb (sync with `wandb sync`)", save_dir
            )
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=project,
        save_dir=save_dir,
        name=name,
        group=group,
        tags=list(tags),
        offline=offline,
        log_model=log_model,
        entity=entity,
        job_type=job_type,
    )


def log_roc_curves(
    loggers: Sequence[Logger],
    stage: str,
    curves: dict[str, tuple[list[float], list[float]]],
    step: int,
) -> None:
    """Per-head ROC curves as one W&B line plot (`<stage>/roc`); other loggers skip it."""
    wandb_loggers = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    if not wandb_loggers or not curves:
        return
    import wandb

    plot = wandb.plot.line_series(
        xs=[fpr for fpr, _ in curves.values()],
        ys=[tpr for _, tpr in curves.values()],
        keys=list(curves),
        title=f"{stage} ROC per region head",
        xname="false positive rate",
    )
    for lg in wandb_loggers:
        lg.experiment.log({f"{stage}/roc": plot, "trainer/global_step": step})


def wandb_summary(
    loggers: Sequence[Logger],
    metrics: dict[str, float],
    predictions=None,
    regions: Sequence[str] = (),
) -> None:
    """Final metrics on each W&B run's summary (the runs table then compares backbones on
    `val/auroc_mean_best`, `test/auroc/<region>`, ...) and the test confusion matrix as a W&B
    plot from the test predictions (true region or `other` x called region or `unknown`;
    `other` and `unknown` share one class, "none"). Rank 0 only; other loggers skip it."""
    wandb_loggers = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    if not wandb_loggers:
        return
    import wandb

    plots = {}
    if predictions is not None and len(predictions) and regions:
        names = [*regions, "none"]
        index = lambda r: names.index(r) if r in regions else len(regions)  # noqa: E731
        plots["test/confusion"] = wandb.plot.confusion_matrix(
            y_true=[index(r) for r in predictions["true_region"]],
            preds=[index(r) for r in predictions["region"]],
            class_names=names,
            title="test: true region x called region",
        )
    for lg in wandb_loggers:
        lg.experiment.summary.update(metrics)
        if plots:
            lg.experiment.log(plots)
