"""Sweeps: what a training job does for its sweep, and gathering a sweep into one table.

In a job (called by `train`): `apply_sweep_group` puts the jobs of one Hydra multirun in one
W&B group; `finished_run` lets a re-launched sweep skip jobs whose run directory already holds
a finished run of the same config (`skip_if_done`), resumes an interrupted run of the same
config from its `last.ckpt` (a requeued SLURM job), and moves any other earlier run aside to
`<run dir>/superseded-<time>/` instead of training over it; the per-image test probabilities of
each run (`test_predictions.csv`, `regionnet.evaluate.test_predictions`) let k-fold runs be
pooled. `optuna_seed` seeds an Optuna sampler so that a study extended on the same storage
draws new trials.

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

# Config keys that do not change what a run trains, and so may differ between a finished run
# and a re-launch of the same job (see `finished_run`); a key stands for everything under it.
# Every other key counts, e.g. seed, data (its split, size, augmentation, batch size), model,
# trainer.max_epochs/devices/precision, callbacks.early_stopping, test.
IGNORED_KEYS = (
    # the sweep and resume machinery
    "skip_if_done",
    "ckpt_path",
    "optimized_metric",
    # where files go
    "paths",
    "hydra",
    "trainer.default_root_dir",
    "callbacks.model_checkpoint.dirpath",
    # logging and display
    "logger",
    "tags",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "callbacks.progress_bar",
    "callbacks.model_summary",
    "callbacks.lr_monitor",
    "callbacks.images_per_s",
    # loading and speed options: the same model, sooner
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "model.compile",
    "model.channels_last",
)
DISPLAY_KEYS = IGNORED_KEYS  # the former name
# What `train` writes into a run directory (keep in step with regionnet/train.py): moved aside
# together when a new run takes the directory over. The job's log file (`*.log`) is copied, as
# Hydra has already opened it for the new run; `.hydra/` is already the new job's.
RUN_OUTPUTS = (
    "metrics.json",
    "config.yaml",
    "split.csv",
    "test_predictions.csv",
    "checkpoints",
    "csv",
    "wandb",
    "hpc_ckpt_*.ckpt",
)
SUPERSEDED = "superseded-"
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
    `${regionnet.optuna_seed:SEED,STORAGE,STUDY}`, `${regionnet.fast_precision:}`,
    `${regionnet.input_mean:BACKBONE}` and `input_std`)."""
    from regionnet.model.backbone import input_stats
    from regionnet.precision import fast_precision

    OmegaConf.register_new_resolver("regionnet.sqlite", sqlite_url, replace=True)
    OmegaConf.register_new_resolver("regionnet.optuna_seed", optuna_seed, replace=True)
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


def optuna_seed(seed, storage, study_name) -> int | None:
    """Seed of an Optuna sampler for a sweep on `storage`: `seed` while study `study_name` holds
    no trials, else `seed + 1000003 x trials` (mod 2^31), so a sweep that extends a study (same
    storage) does not redraw the first sweep's parameters (a seeded sampler starts from the
    same random state each time). OmegaConf resolver `regionnet.optuna_seed`, resolved when
    Hydra builds the sweeper, before the study is opened."""
    if seed is None:
        return None
    trials = optuna_trials(storage, study_name)
    if not trials:
        return int(seed)
    derived = (int(seed) + 1_000_003 * trials) % 2**31
    log.info(
        "optuna: study %s already holds %d trials; sampler seed %d (from seed %s)",
        study_name,
        trials,
        derived,
        seed,
    )
    return derived


def optuna_trials(storage, study_name) -> int:
    """Trials (any state) of study `study_name` in `storage`; 0 when either does not exist.
    A missing SQLite file is not created."""
    if not storage or not study_name:
        return 0
    url = str(storage)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        return 0
    import optuna

    try:
        study = optuna.load_study(study_name=str(study_name), storage=url)
    except KeyError:  # no such study yet
        return 0
    return len(study.get_trials(deepcopy=False))


def _flat(node, prefix: str = "") -> dict:
    """`{"a.b.c": value}` for a nested plain container (lists are values)."""
    if isinstance(node, dict) and node:
        out = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS)


def config_diff(old: dict, new: dict) -> list[str]:
    """The keys (dotted) whose values differ between two plain configs, `IGNORED_KEYS` aside;
    a key in only one of them differs."""
    a, b = _flat(old), _flat(new)
    keys = (a.keys() | b.keys()) - {k for k in a.keys() | b.keys() if _ignored(k)}
    return sorted(k for k in keys if a.get(k, ()) != b.get(k, ()))


def _differences(out: Path, cfg: DictConfig) -> list[str] | None:
    """`config_diff` between the run in `out` (its `config.yaml`) and `cfg`; None without one."""
    saved = out / "config.yaml"
    if not saved.is_file():
        return None
    new = OmegaConf.to_container(cfg, resolve=True)
    try:
        old = OmegaConf.to_container(OmegaConf.load(saved))
    except Exception as e:  # a truncated or foreign file: not this config
        return [f"<{saved} unreadable: {type(e).__name__}>"]
    if not isinstance(old, dict):
        return [f"<{saved} is not a config>"]
    return config_diff(old, new)


def _checkpoint_dir(cfg: DictConfig, out: Path) -> Path:
    where = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath", default=None)
    return Path(where) if where else out / "checkpoints"


def resume_checkpoint(cfg: DictConfig, out: Path) -> Path | None:
    """The newest of the run's `last.ckpt` and Lightning's SLURM `hpc_ckpt_*.ckpt` (in
    `trainer.default_root_dir`), or None."""
    found = [_checkpoint_dir(cfg, out) / "last.ckpt"]
    root = OmegaConf.select(cfg, "trainer.default_root_dir", default=None)
    found += Path(root or out).glob("hpc_ckpt_*.ckpt")
    found = [f for f in found if f.is_file()]
    return max(found, key=lambda f: f.stat().st_mtime_ns) if found else None


def _rank() -> int:
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0)


def supersede(out: Path, why: str) -> Path | None:
    """Move the earlier run's files (`RUN_OUTPUTS`) in `out` to `out/superseded-<UTC time>/`
    (log files copied); return that folder, or None when there was nothing to move. Rank 0
    only: other processes of a DDP job return None."""
    if _rank() != 0:
        return None
    moving = [f for pattern in RUN_OUTPUTS for f in sorted(out.glob(pattern))]
    if not moving:
        return None
    from datetime import datetime, timezone

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    archive, n = out / f"{SUPERSEDED}{stamp}", 1
    while archive.exists():
        n += 1
        archive = out / f"{SUPERSEDED}{stamp}-{n}"
    archive.mkdir()
    (archive / "SUPERSEDED.txt").write_text(why + "\n")
    import shutil

    # metrics.json first: from then on no process takes the directory for a finished run
    for f in sorted(moving, key=lambda f: f.name != "metrics.json"):
        shutil.move(str(f), str(archive / f.name))
    for f in out.glob("*.log"):
        shutil.copy2(f, archive / f.name)
    return archive


def _same_config_nearby(out: Path, cfg: DictConfig) -> list[Path]:
    """Sibling job directories of a multirun, or runs moved aside in them, that hold a
    finished run of this config (a re-launched grid in another order)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return []
    found = []
    for job in sorted(out.parent.iterdir(), key=_job_key):
        if job == out or not job.is_dir():
            continue
        for other in [job, *sorted(job.glob(f"{SUPERSEDED}*"))]:
            if (other / "metrics.json").is_file() and _differences(other, cfg) == []:
                found.append(other)
    return found


def finished_run(cfg: DictConfig) -> dict | None:
    """Called where a training job starts: the metrics of a finished run of this config in
    `paths.output_dir`, or None (train then).

    - Same config (`config_diff` empty: only `IGNORED_KEYS` may differ), `metrics.json` there
      (train writes it last) and `skip_if_done`: return its metrics, touch nothing.
    - Same config, unfinished, `skip_if_done`, no `ckpt_path` given, and a `last.ckpt` (or a
      SLURM `hpc_ckpt_*.ckpt`) there: set `cfg.ckpt_path` to it, so a requeued or re-launched
      job resumes its fit instead of starting again.
    - Any other earlier run there (another config, or `skip_if_done=false`): its files are
      moved to `<run dir>/superseded-<UTC time>/` first (`supersede`), never trained over;
      a warning names the folder and the differing keys.

    Under DDP every process calls this; the decision depends only on the run's config, so
    all agree, and only rank 0 moves files.
    """
    out = Path(cfg.paths.output_dir)
    differ = _differences(out, cfg)
    if differ is None:  # no earlier run here
        return None
    done = out / "metrics.json"
    if not differ and cfg.get("skip_if_done"):
        if done.is_file():
            try:
                metrics = json.loads(done.read_text())
            except (OSError, ValueError) as e:
                log.warning("skip_if_done: %s is unreadable (%s): training again", done, e)
            else:
                log.info("skip_if_done: %s holds a finished run of this config; skipping", out)
                return metrics
        elif cfg.get("ckpt_path") is None:
            last = resume_checkpoint(cfg, out)
            if last is not None:
                log.info("skip_if_done: resuming the unfinished run of this config from %s", last)
                OmegaConf.update(cfg, "ckpt_path", str(last), force_add=True)
            return None
        else:
            return None
    if differ:
        shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
        why = f"{out} held a run of another config (differing: {shown})"
    elif cfg.get("skip_if_done"):
        why = f"{out} held a run of this config with an unreadable metrics.json"
    else:
        why = f"{out} held a run of this config and skip_if_done is false"
    archive = supersede(out, why)
    if archive is not None:
        hint = ""
        nearby = _same_config_nearby(out, cfg) if differ else []
        if nearby:
            hint = (
                f"; a finished run of this config is in {nearby[0]} (the sweep's job order "
                "changed: launch it in its first order to skip finished jobs)"
            )
        log.warning(
            "%s: training again; the earlier run is kept in %s (delete that folder to free "
            "the space)%s",
            why,
            archive,
            hint,
        )
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
    # not earlier runs moved aside (`supersede`), nor W&B's own config.yaml files
    found = {
        p
        for p in found
        if not any(
            part.startswith(SUPERSEDED) or part == "wandb" for part in p.relative_to(root).parts
        )
    }
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
    # what the sweep optimised, whatever the head type (val/auroc_mean, val/mre_pct, ...)
    name = None if cfg is None else OmegaConf.select(cfg, "optimized_metric", default=None)
    row["optimized_metric"], row["optimized_value"] = name, metrics.get(name) if name else None
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
