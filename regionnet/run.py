"""Run helpers every task shares (train, evaluate, pretrain): build the data module and the
model from a composed config, instantiate callbacks and loggers, prepare the run directory,
and print the AUROC table. Nothing here imports a task module, so tasks import it freely."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


def lightning_logs_once() -> None:
    """Route Lightning's log lines through the root logger's handlers only.

    Importing `lightning` gives its `lightning` logger a console handler of its own (and, when
    the root logger has none yet, `lightning.pytorch`/`lightning.fabric` one each with
    propagation off). Under Hydra's job logging, which puts a console and a file handler on the
    root, every Lightning INFO line then printed twice ("INFO: GPU available..." and
    "[...][lightning...][INFO] - GPU available..."), or never reached `<task>.log`. With root
    handlers present this removes those console handlers and lets the records propagate: once
    on the console, once in the log file, in Hydra's format. Without root handlers (a plain
    Python session, the tests) nothing changes."""
    if not logging.getLogger().handlers:
        return
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # not file handlers a user configured
                logger.removeHandler(handler)
        logger.propagate = True


class LightningLogsOnce(Callback):
    """Hydra callback (conf/hydra/default.yaml): `lightning_logs_once` when a job starts, after
    Hydra configured logging and before the task runs (in every job of a multirun)."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        lightning_logs_once()


def build_datamodule(cfg: DictConfig):
    """The data module of `cfg.data` (`_target_`), with our own error messages."""
    try:
        return instantiate(cfg.data, _convert_="all")
    except InstantiationException as e:
        # Our own errors already name the config key and the fix; Hydra's wrapper hides them.
        raise (e.__cause__ or e) from None


def build_model(cfg: DictConfig, data):
    """The model class named by `model._target_` with plain-value arguments (no Hydra
    objects in the checkpoint's hyperparameters). `data`: the region list, or the data module,
    whose label set the model's heads take (regions; landmark names, skeleton and flip
    pairs for a landmark model; box names for a box model)."""
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    target = kwargs.pop("_target_", "regionnet.model.module.RegionNet")
    cls = get_class(target)
    multi = getattr(cls, "task", "regions") == "multi"
    if multi or hasattr(data, "landmark_region"):
        if not (multi and hasattr(data, "landmark_region")):
            raise ValueError(
                f"model._target_={target} and data={type(data).__name__} do not match: region "
                "heads with landmark or box parts need region and landmark films; use task=multi "
                "(it sets both)"
            )
        keys = ("landmark_names", "skeleton", "flip_pairs", "dataset", "landmark_region")
        parts = {k: getattr(data, k) for k in keys}
        return cls(regions=list(data.regions), box_names=data.box_names, **parts, **kwargs)
    if getattr(cls, "task", "regions") == "boxes" or hasattr(data, "box_names"):
        if not (getattr(cls, "task", "regions") == "boxes" and hasattr(data, "box_names")):
            raise ValueError(
                f"model._target_={target} and data={type(data).__name__} do not match: box "
                "heads need box data; use task=boxes (it sets both)"
            )
        return cls(box_names=data.box_names, dataset=data.dataset, **kwargs)
    landmarks = hasattr(data, "landmark_names")
    if getattr(cls, "task", "regions") == "landmarks" and not landmarks:
        raise ValueError(
            f"model._target_={target} is a landmark model, but data={type(data).__name__} has "
            "no landmarks: use task=landmarks (it sets data=landmarks and model=dsnt)"
        )
    if landmarks:
        if getattr(cls, "task", "regions") != "landmarks":
            raise ValueError(
                f"data=landmarks gives landmark targets, but model._target_={target} has region "
                "heads: use task=landmarks (it sets data=landmarks and model=dsnt)"
            )
        keys = ("landmark_names", "skeleton", "flip_pairs", "dataset")
        return cls(**{k: getattr(data, k) for k in keys}, **kwargs)
    return cls(regions=list(getattr(data, "regions", data)), **kwargs)


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


def speed_up(model: torch.nn.Module, channels_last: bool = False, compile: bool = False) -> None:
    """`model.channels_last`: weights in channels-last memory format (forward converts the
    batches), faster convolutions on tensor cores. `model.compile`: torch.compile each backbone
    in place (`nn.Module.compile`: checkpoint keys unchanged). Not the whole LightningModule:
    Lightning would then compile the steps too, torchmetrics updates included, which dynamo
    cannot trace."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        for backbone in _backbones(model):
            backbone.compile()


def _backbones(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every backbone of a model: RegionNet's (`net.unique_backbones`), a landmark model's
    (`net.backbone`, and its step-2 `refiner.backbone`), the SSL module's (`backbone`)."""
    net = getattr(model, "net", None)
    if net is None:
        return [model.backbone]
    if hasattr(net, "unique_backbones"):
        return list(net.unique_backbones())
    refiner = getattr(model, "refiner", None)
    return [net.backbone] + ([refiner.backbone] if refiner is not None else [])


def print_summary(
    metrics: dict[str, float], regions, stages=("val", "test", "external"), findings=()
) -> None:
    """A per-region AUROC table on the console: each head's AUROC with its interval (where
    the metrics have `stage/auroc_ci/<r>`) and its positives (`stage/positives/<r>`, n+);
    finding heads (`findings`) follow the regions, over their labelled films."""
    from rich.console import Console
    from rich.table import Table

    shown = [s for s in stages if any(k.startswith(f"{s}/") for k in metrics)]
    table = Table(title="AUROC per region head (n+ = positives)")
    table.add_column("region")
    for s in shown:
        table.add_column(s, justify="right")

    def cell(stage: str, r: str) -> str:
        if r not in regions and r not in findings:
            return f"{metrics[k]:.3f}" if (k := f"{stage}/{r}") in metrics else "n/a"
        a, ci = metrics.get(f"{stage}/auroc/{r}"), metrics.get(f"{stage}/auroc_ci/{r}")
        if a is None and (kappa := metrics.get(f"{stage}/kappa/{r}")) is not None:
            acc, n = (
                metrics.get(f"{stage}/accuracy/{r}", float("nan")),
                metrics.get(f"{stage}/labelled/{r}", 0),
            )
            return f"kappa {kappa:.3f}, accuracy {acc:.3f}, n={int(n)}"  # an ordinal finding
        text = "n/a" if a is None else f"{a:.3f}"
        if a is not None and ci is not None:
            text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
        if (pos := metrics.get(f"{stage}/positives/{r}")) is not None:
            text += f", n+={int(pos)}"
        return text

    for r in [*regions, *findings, "auroc_mean", "top1_acc"]:
        table.add_row(r, *(cell(s, r) for s in shown))
    Console().print(table)


def prepare_run(cfg: DictConfig) -> Path:
    """The run directory (created), the seed, and TF32 matmuls on GPUs; returns the directory."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    return out


def eval_trainer(cfg: DictConfig, out: Path) -> L.Trainer:
    """The Trainer of `regionnet-eval` (every head type): `cfg.trainer`'s settings, no logger,
    no checkpoints, no model summary, its files under `out`."""
    return L.Trainer(
        **OmegaConf.to_container(cfg.get("trainer") or {}, resolve=True),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=out,
    )


def log_eval(cfg: DictConfig, result: dict, figures: dict, predictions) -> None:
    """An evaluation's results to every logger of `cfg.logger` (regionnet-eval, any head
    type): the numeric `stage/...` values as metrics; with W&B also the figures ({name: PNG
    path}) and the predictions table. Unless `logger.wandb.log_paths`, W&B gets the config with
    paths redacted and the table without its path, patient_id, UID and source columns (file
    names like CR.1.2.840... identify studies; a source is named after its data folder)."""
    from lightning.pytorch.loggers import WandbLogger

    from regionnet.loggers import finish_wandb, loggable_config, private_table

    group = OmegaConf.to_container(cfg.get("logger") or {}, resolve=True)
    for c in group.values():
        if c and str(c.get("_target_", "")).endswith("wandb_logger"):
            c["job_type"] = "eval"
    loggers = instantiate_list(group)
    scalars = {
        k: float(v)
        for k, v in result.items()
        if "/" in k and isinstance(v, int | float) and not isinstance(v, bool)
    }
    for lg in loggers:
        lg.log_hyperparams(loggable_config(lg, OmegaConf.to_container(cfg, resolve=True)))
        lg.log_metrics(scalars)
        if isinstance(lg, WandbLogger):
            for name, path in figures.items():
                lg.log_image(f"eval/{name}", images=[str(path)])
            private = not getattr(lg, "log_paths", False)
            lg.log_table(
                "eval/predictions", dataframe=private_table(predictions) if private else predictions
            )
        lg.finalize("success")
    finish_wandb(loggers)
