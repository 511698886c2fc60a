"""Sweeps: what a training job does for its sweep, and gathering a sweep into one table.

In a job (called by `train`): `apply_sweep_group` puts the jobs of one Hydra multirun in one
W&B group; `finished_run` lets a re-launched sweep skip jobs whose run directory already holds
a finished run of the same config (`skip_if_done`); the per-image test probabilities of each run
(`test_predictions.csv`, `regionnet.evaluate.test_predictions`) let k-fold runs be pooled.

After the sweep: `gather(sweep_dir)` reads every job's `config.yaml` and `metrics.json` into
one row per job (backbone, image size, LR, fold, AUROC mean/min, parameters, radiographs/s);
`cross_validation(runs)` summarises k-fold jobs as mean ± sd over folds and as the AUROC of
all folds' test predictions pooled (each radiograph is in exactly one fold's test split).
`python scripts/gather_sweep.py SWEEP_DIR` prints both and writes them as CSV and Markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# config keys a re-run may change without changing the result (see `finished_run`)
DISPLAY_KEYS = (
    "skip_if_done",
    "logger",
    "callbacks.progress_bar",
    "callbacks.model_summary",
    "callbacks.lr_monitor",
    "callbacks.images_per_s",
)
CONFIG_COLUMNS = {
    "backbone": "model.backbone",
    "image_size": "data.image_size",
    "lr": "model.optimizer.lr",
    "batch_size": "data.batch_size",
    "seed": "seed",
    "folds": "data.folds",
    "fold": "data.fold",
}
METRIC_COLUMNS = {
    "val_auroc_mean": "val/auroc_mean",
    "val_auroc_min": "val/auroc_min",
    "test_auroc_mean": "test/auroc_mean",
    "test_auroc_min": "test/auroc_min",
    "params": "model/params",
    "images_per_s": "train/images_per_s",
}
SETTING_COLUMNS = ["backbone", "image_size", "lr", "batch_size", "folds"]


# -- in a job --------------------------------------------------------------------------------
def sqlite_url(path: str) -> str:
    """`sqlite:///<absolute path>` with its folder created: Optuna opens its storage before
    Hydra creates the sweep directory. OmegaConf resolver `regionnet.sqlite`."""
    file = Path(path).expanduser().resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"


def register_resolvers() -> None:
    """OmegaConf resolvers the configs use (`${regionnet.sqlite:PATH}`,
    `${regionnet.fast_precision:}`, `${regionnet.input_mean:BACKBONE}` and `input_std`)."""
    from regionnet.model.backbone import input_stats
    from regionnet.precision import fast_precision

    OmegaConf.register_new_resolver("regionnet.sqlite", sqlite_url, replace=True)
    OmegaConf.register_new_resolver("regionnet.fast_precision", fast_precision, replace=True)
    # the intensity statistics the backbone's ImageNet weights expect, averaged to gray
    OmegaConf.register_new_resolver(
        "regionnet.input_mean", lambda name: input_stats(str(name))[0], replace=True
    )
    OmegaConf.register_new_resolver(
        "regionnet.input_std", lambda name: input_stats(str(name))[1], replace=True
    )


def sweep_group() -> str | None:
    """`<hparams_search>-<sweep dir name>` for a job of a Hydra multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    name = Path(str(hc.sweep.dir)).name
    search = hc.runtime.choices.get("hparams_search")
    return f"{search}-{name}" if search and search != "null" else name


def apply_sweep_group(cfg: DictConfig) -> None:
    """Set `logger.wandb.group` to `sweep_group()` where the config leaves it null."""
    wandb = (cfg.get("logger") or {}).get("wandb")
    if wandb is not None and wandb.get("group") is None:
        wandb.group = sweep_group()


def _without(container: dict, keys: Sequence[str]) -> dict:
    for key in keys:
        *parents, last = key.split(".")
        node = container
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return container


def finished_run(cfg: DictConfig) -> dict | None:
    """The metrics of a finished run of this config in `paths.output_dir`, or None.

    Only with `skip_if_done`. Finished = `metrics.json` exists (train writes it last); same
    config = its `config.yaml` equals `cfg` resolved, display keys aside. A finished run of
    another config is trained again: its `metrics.json` is removed first, so that no process
    of the new run can mistake the old one for finished.
    """
    if not cfg.get("skip_if_done"):
        return None
    out = Path(cfg.paths.output_dir)
    done, saved = out / "metrics.json", out / "config.yaml"
    if not done.is_file():
        return None
    try:
        old = OmegaConf.to_container(OmegaConf.load(saved))
        new = OmegaConf.to_container(cfg, resolve=True)
        if _without(old, DISPLAY_KEYS) == _without(new, DISPLAY_KEYS):
            metrics = json.loads(done.read_text())
            log.info("skip_if_done: %s holds a finished run of this config; skipping it", out)
            return metrics
    except (OSError, ValueError):
        pass
    log.warning(
        "%s holds a finished run of another config: training again, over it (skip_if_done "
        "only skips identical configs)",
        out,
    )
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        done.unlink(missing_ok=True)
    return None


# -- gathering a sweep -----------------------------------------------------------------------
def _job_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def job_dirs(sweep_dir: str | Path) -> list[Path]:
    """Run directories under `sweep_dir` (started jobs have `.hydra/`, finished `config.yaml`),
    in job order."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {root} does not exist")
    found = {p.parent for p in root.rglob("config.yaml") if p.parent.name != ".hydra"}
    found |= {p.parent.parent for p in root.rglob(".hydra/config.yaml")}
    found.discard(root)  # the sweep's own multirun.yaml sits beside no config.yaml
    return sorted(found, key=lambda p: _job_key(p.relative_to(root)))


def _config(run: Path) -> DictConfig | None:
    for file in (run / "config.yaml", run / ".hydra" / "config.yaml"):
        if file.is_file():
            return OmegaConf.load(file)
    return None


def run_row(run: Path, sweep_dir: Path) -> dict:
    """One job: its settings (`CONFIG_COLUMNS`), metrics (`METRIC_COLUMNS`) and status."""
    row: dict = {"run": str(run.relative_to(sweep_dir))}
    cfg = _config(run)
    for column, key in CONFIG_COLUMNS.items():
        value = None
        if cfg is not None:
            value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        row[column] = value
    if row["folds"] is None:
        row["fold"] = None  # data.fold means nothing without data.folds
    file = run / "metrics.json"
    metrics = json.loads(file.read_text()) if file.is_file() else {}
    row["status"] = "done" if metrics else "unfinished"
    for column, key in METRIC_COLUMNS.items():
        row[column] = metrics.get(key)
    return row


def gather(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per job of the sweep (see `run_row`)."""
    root = Path(sweep_dir)
    runs = job_dirs(root)
    if not runs:
        raise FileNotFoundError(
            f"no run directories under {root}: give a Hydra sweep directory, e.g. "
            "outputs/train/multiruns/<date>_<time>"
        )
    return pd.DataFrame([run_row(r, root) for r in runs])


def pooled_auroc(predictions: pd.DataFrame) -> dict[str, float]:
    """AUROC per head over the pooled rows of test_predictions.csv files, their mean and min."""
    from regionnet.reporting import auroc

    heads = [c[2:] for c in predictions.columns if c.startswith("p_")]
    out = {}
    for r in heads:
        label = f"label_{r}"
        y = predictions[label] if label in predictions else predictions["true_region"] == r
        value = auroc(np.array(y, dtype=int), np.array(predictions[f"p_{r}"], dtype=float))
        if value is not None:
            out[f"pooled_auroc/{r}"] = value
    if out:
        out["pooled_auroc_mean"] = float(np.mean(list(out.values())))
        out["pooled_auroc_min"] = float(min(out.values()))
    return out


def cross_validation(runs: pd.DataFrame, sweep_dir: str | Path) -> pd.DataFrame:
    """Per setting of k-fold jobs: folds done, test and val AUROC mean ± sd over folds, and the
    AUROC of the pooled test predictions. Empty when no job has `data.folds`."""
    done = runs[(runs["status"] == "done") & runs["folds"].notna()]
    rows = []
    for setting, group in done.groupby(SETTING_COLUMNS, dropna=False, sort=False):
        row = dict(zip(SETTING_COLUMNS, setting, strict=True))
        row["folds_done"] = len(group)
        for metric in ("test_auroc_mean", "val_auroc_mean"):
            values = group[metric].dropna().astype(float)
            row[f"{metric}_mean"] = values.mean() if len(values) else None
            row[f"{metric}_sd"] = values.std(ddof=1) if len(values) > 1 else None
        files = [Path(sweep_dir) / r / "test_predictions.csv" for r in group["run"]]
        found = [pd.read_csv(f) for f in files if f.is_file()]
        if found:
            row.update(pooled_auroc(pd.concat(found, ignore_index=True)))
            row["pooled_images"] = sum(len(f) for f in found)
        rows.append(row)
    return pd.DataFrame(rows)


# -- output ----------------------------------------------------------------------------------
def _cell(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _shown(table: pd.DataFrame) -> pd.DataFrame:
    """Columns with at least one value (a sweep without folds shows no fold column)."""
    return table[[c for c in table if table[c].notna().any()]]


def markdown(table: pd.DataFrame) -> str:
    table = _shown(table)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.itertuples(False)]
    return "\n".join(lines) + "\n"


def print_table(table: pd.DataFrame, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = _shown(table)
    cells = [[_cell(v) for v in row] for row in table.itertuples(False)]
    out = Table(title=title)
    widths = []
    for k, column in enumerate(table.columns):
        widths.append(max([len(column)] + [len(row[k]) for row in cells]))
        out.add_column(column, justify="left" if k == 0 else "right", min_width=widths[-1])
    for row in cells:
        out.add_row(*row)
    Console(width=max(80, sum(w + 3 for w in widths) + 1)).print(out)


def write(table: pd.DataFrame, prefix: Path) -> list[Path]:
    """`<prefix>.csv` and `<prefix>.md`."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    csv, md = prefix.with_suffix(".csv"), prefix.with_suffix(".md")
    table.to_csv(csv, index=False)
    md.write_text(markdown(table))
    return [csv, md]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Gather a regionnet sweep into one table.")
    parser.add_argument("sweep_dir", type=Path, help="a Hydra sweep (multirun) directory")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for sweep_runs.csv/.md and cross_validation.csv/.md (default: sweep_dir)",
    )
    args = parser.parse_args(argv)
    runs = gather(args.sweep_dir)
    out = args.out or args.sweep_dir
    print_table(runs, f"sweep {args.sweep_dir}: one row per job")
    written = write(runs, out / "sweep_runs")
    cv = cross_validation(runs, args.sweep_dir)
    if not cv.empty:
        print_table(cv, "cross-validation: mean ± sd over folds, and pooled test predictions")
        written += write(cv, out / "cross_validation")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
