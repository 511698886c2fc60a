"""Logger helpers: W&B that stays on this machine unless asked, redacts paths and identifiers,
never blocks without a network; ROC curves to W&B."""

from __future__ import annotations

import logging
import netrc
import os
import re
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import Logger, WandbLogger

log = logging.getLogger(__name__)

# W&B modes, strictest first; WANDB_MODE's other spellings
MODES = ("disabled", "offline", "online")
MODE_ALIASES = {"dryrun": "offline", "run": "online", "shared": "online"}
REDACTED = "<redacted>"
# config keys (at any depth) whose values are paths, URLs or identifiers; `paths` wholly
PATH_KEYS = frozenset(
    {
        "root", "csv", "split_file", "external_test", "ckpt_path", "weights_file", "output_dir",
        "log_dir", "data_dir", "save_dir", "dirpath", "dir", "cam_dir", "input", "output",
        "write_body_part", "url", "sr_url", "ca_bundle", "storage", "study_uid", "patient_id",
        "filename", "manifest", "labelled_split",
    }
)  # fmt: skip
REDACTED_GROUPS = frozenset({"paths", "hydra"})
# table columns that name files, patients or studies (file names like CR.1.2.840... do too);
# `source` defaults to the data folder's or CSV's name
IDENTIFYING_COLUMNS = frozenset(
    {"path", "patient_id", "study_uid", "series_uid", "sop_uid", "accession_number", "cam_path"}
    | {"source"}
)
_PATH_LIKE = re.compile(r"^(/|~|\.{1,2}[/\\]|[A-Za-z]:[/\\]|\\\\)|://")
_probed: dict[tuple[str, int], bool] = {}
_warned: set[str] = set()


def _warn_once(message: str, *args) -> None:
    """One warning per process (rank 0): a sweep's jobs do not repeat it."""
    text = message % args if args else message
    if text not in _warned and rank_zero_only.rank == 0:
        _warned.add(text)
        log.warning(text)


def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.environ.get("NETRC", Path.home() / ".netrc")).authenticators(
            urlsplit(_base_url()).hostname or "api.wandb.ai"
        )
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return auth is not None


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"


def _normalise(mode: str | None, what: str) -> str | None:
    if mode is None or str(mode).strip() == "":
        return None
    m = MODE_ALIASES.get(str(mode).strip().lower(), str(mode).strip().lower())
    if m not in MODES:
        _warn_once("%s=%r is no W&B mode (online, offline, disabled): logging offline", what, mode)
        return "offline"
    return m


def wandb_mode(mode: str | None = None, offline: bool | None = None) -> str:
    """The mode asked for: `mode` (logger.wandb.mode; `offline` is the older switch), else
    offline. WANDB_MODE may only make it stricter (disabled > offline > online), except that
    WANDB_MODE=online asks for online when the config asks for nothing."""
    asked = _normalise(mode, "logger.wandb.mode")
    if asked is None and offline is not None:
        asked = "offline" if offline else "online"
    env = _normalise(os.environ.get("WANDB_MODE"), "WANDB_MODE")
    if asked is None:
        return env or "offline"
    return asked if env is None else min(asked, env, key=MODES.index)


def server_reachable(url: str | None = None, timeout: float = 3.0) -> bool:
    """One TCP connect to the W&B server (WANDB_BASE_URL, else api.wandb.ai:443), cached per
    process: an air-gapped host learns it in `timeout` seconds, not after W&B's retries."""
    parts = urlsplit(url or _base_url())
    host = parts.hostname or "api.wandb.ai"
    try:
        port = parts.port or (80 if parts.scheme == "http" else 443)
    except ValueError:
        port = 443
    if (host, port) not in _probed:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _probed[(host, port)] = True
        except OSError:
            _probed[(host, port)] = False
    return _probed[(host, port)]


def resolve_wandb_mode(
    mode: str | None = None, offline: bool | None = None, probe_timeout: float = 3.0
) -> str:
    """`wandb_mode`, then online only with an API key and a server that answers; otherwise
    offline, with one warning."""
    chosen = wandb_mode(mode, offline)
    if chosen != "online":
        return chosen
    if not _wandb_key_available():
        _warn_once("W&B online was asked but no API key is set (WANDB_API_KEY or `wandb "
                   "login`): logging offline; upload later with `wandb sync`")  # fmt: skip
        return "offline"
    if not server_reachable(timeout=probe_timeout):
        _warn_once("W&B online was asked but %s cannot be reached: logging offline; upload "
                   "later with `wandb sync`", _base_url())  # fmt: skip
        return "offline"
    return "online"


def _path_like(value: str) -> bool:
    return bool(_PATH_LIKE.search(value))


def redact_config(params: Any, key: str | None = None) -> Any:
    """`params` with every path, URL and identifier replaced by "<redacted>": the values of
    PATH_KEYS at any depth, everything under `paths` and `hydra`, and any other string that
    looks like an absolute or relative path or a URL. None stays None."""
    if isinstance(params, Mapping):
        if key in REDACTED_GROUPS:
            return {k: (None if v is None else REDACTED) for k, v in params.items()}
        return {k: redact_config(v, str(k)) for k, v in params.items()}
    if isinstance(params, list | tuple):
        return type(params)(redact_config(v, key) for v in params)
    if params is None:
        return None
    if key in PATH_KEYS or key in REDACTED_GROUPS:
        return REDACTED
    if isinstance(params, str) and _path_like(params):
        return REDACTED
    return params


def private_table(dataframe):
    """A predictions table without the columns that name files, patients or studies."""
    drop = [c for c in dataframe.columns if str(c).lower() in IDENTIFYING_COLUMNS]
    return dataframe.drop(columns=drop)


def _private_settings(log_paths: bool) -> dict:
    """wandb.Settings that keep paths off W&B: no console log (it holds the paths of skipped
    radiographs), no metadata (command line, program path, working directory, git remote),
    no host name, no code. Only the fields this wandb version knows."""
    if log_paths:
        return {}
    import wandb

    wanted = {
        "console": "off",
        "x_disable_meta": True,
        "disable_git": True,
        "disable_code": True,
        "save_code": False,
        "host": "<redacted>",  # the run record's machine name
        "quiet": True,  # no 30-line run summary after regionnet's own AUROC table
    }
    fields = getattr(wandb.Settings, "model_fields", None)
    if fields is None:  # wandb < 0.19, before pydantic settings: the meta switch was private
        wanted["_disable_meta"] = wanted.pop("x_disable_meta")
    else:
        wanted = {k: v for k, v in wanted.items() if k in fields}
    return {"settings": wandb.Settings(**wanted)}


class RegionnetWandbLogger(WandbLogger):
    """Lightning's `WandbLogger` that, unless `log_paths`, redacts paths and identifiers from
    every config it logs (Lightning's own hyperparameter logging of the model and data module
    included) and drops identifying columns from every table."""

    def __init__(self, *args, log_paths: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_paths = bool(log_paths)

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        from lightning.fabric.utilities.logger import _convert_params

        params = _convert_params(params)
        super().log_hyperparams(params if self.log_paths else redact_config(params))

    @rank_zero_only
    def log_table(self, key, columns=None, data=None, dataframe=None, step=None) -> None:
        if not self.log_paths:
            if dataframe is not None:
                dataframe = private_table(dataframe)
            elif columns is not None:
                keep = [
                    i for i, c in enumerate(columns) if str(c).lower() not in IDENTIFYING_COLUMNS
                ]
                columns = [columns[i] for i in keep]
                data = [[row[i] for i in keep] for row in data or []]
        super().log_table(key, columns=columns, data=data, dataframe=dataframe, step=step)


def loggable_config(logger: Logger, params: dict) -> dict:
    """The config to log with `logger`: redacted for W&B unless its `log_paths` (a plain
    Lightning WandbLogger too); local loggers (CSV) get it whole."""
    if isinstance(logger, WandbLogger) and not getattr(logger, "log_paths", False):
        return redact_config(params)
    return params


def finish_wandb(loggers: Sequence[Logger]) -> None:
    """End the W&B run, if one of `loggers` is W&B's (the next run in this process then
    starts its own)."""
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()


def wandb_logger(
    project: str = "regionnet",
    save_dir: str = ".",
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    mode: str | None = None,
    log_paths: bool = False,
    probe_timeout: float = 3.0,
    offline: bool | None = None,
    log_model: bool = False,
    entity: str | None = None,
    job_type: str = "train",
) -> RegionnetWandbLogger:
    """A W&B logger that uploads nothing unless asked.

    `mode`: offline (default) writes `<save_dir>/wandb/offline-run-*` (upload later with
    `wandb sync`); online uploads as it runs, only when asked here or by WANDB_MODE=online
    (the stricter of the two wins), with an API key and a server that answers within
    `probe_timeout` s, else offline with one warning; disabled logs nothing. `offline`: the
    older switch, used when `mode` is unset. `log_paths=false` (default): no paths or
    identifiers reach W&B (`RegionnetWandbLogger`, `_private_settings`). Checkpoints are not
    uploaded unless `log_model` (online only).
    """
    chosen = resolve_wandb_mode(mode, offline, probe_timeout)
    if chosen == "offline" and os.environ.get("WANDB_MODE") not in ("offline", "dryrun"):
        log.info("W&B logs offline to %s/wandb (upload with `wandb sync`)", save_dir)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return RegionnetWandbLogger(
        project=project,
        save_dir=save_dir,
        name=name,
        group=group,
        tags=list(tags),
        offline=chosen == "offline",
        mode=chosen,
        log_model=log_model and chosen == "online",
        entity=entity,
        job_type=job_type,
        log_paths=log_paths,
        **_private_settings(log_paths),
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


def log_grade_confusion(
    loggers: Sequence[Logger],
    stage: str,
    confusion: Mapping[str, Sequence[Sequence[int]]],
    grades: Mapping[str, Sequence[str]],
    step: int,
) -> None:
    """Each ordinal finding's confusion counts (rows = true grade) as a W&B confusion matrix
    (`<stage>/confusion/<finding>`); other loggers skip it (regionnet-eval writes the matrix
    into metrics.json and a PNG)."""
    wandb_loggers = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    if not wandb_loggers or not confusion:
        return
    import wandb

    plots = {}
    for f, counts in confusion.items():
        pairs = [
            (i, j) for i, row in enumerate(counts) for j, n in enumerate(row) for _ in range(n)
        ]
        plots[f"{stage}/confusion/{f}"] = wandb.plot.confusion_matrix(
            y_true=[i for i, _ in pairs],
            preds=[j for _, j in pairs],
            class_names=list(grades[f]),
            title=f"{stage}: true {f} x predicted",
        )
    for lg in wandb_loggers:
        lg.experiment.log({**plots, "trainer/global_step": step})


def wandb_summary(
    loggers: Sequence[Logger],
    metrics: dict[str, float],
    predictions=None,
    regions: Sequence[str] = (),
) -> None:
    """Final metrics on each W&B run's summary (the runs table then compares backbones on
    `val/auroc_mean_best`, `test/auroc/<region>`, ...) and the test confusion matrix as a W&B
    plot from the test predictions (true region or `other` x called region or `unknown`;
    `other` and `unknown` share one class, "none"): only the true and called regions of the
    predictions reach W&B, never their paths or patient ids. Rank 0 only; other loggers skip
    it."""
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
