"""`regionnet-eval` of a landmark checkpoint: `evaluate_landmarks(cfg, ckpt_path)`.

`regionnet.evaluate.evaluate(cfg)` hands a landmark checkpoint here. The data are those of the
training run: `<run_dir>/config.yaml` (its `data` node) with `<run_dir>/split.csv`
(`data.split_file`), where the checkpoint lies in `<run_dir>/checkpoints/`; non-null `data.*`
keys of the eval config that the landmark data module takes go on top, and `data=landmarks`
(a group with `_target_`) replaces it. Input size, normalisation and step 2's detail image
(`detail_size`) always follow the checkpoint. `split`: `test` (default), `val` or `all` (every
film of the run's data).

Writes into `paths.output_dir`:

- `metrics.json`: every `<split>/...` figure of `LandmarkMetrics.compute_all` (`mre_px`,
  `mre_pct`, `err_{x,y}_{median,mean}_pct`, `pck@2`, `pck@5`, and on spines `off_level_pct`
  and the Cobb-angle errors of a full T1..L5 spine) each with `<name>_ci`, a 95 % percentile
  bootstrap interval that resamples whole patients (whole films where the ids are just the
  paths; `report.landmark_report`), the same for step 1 alone as `<split>/step1/...` when the
  model refines (`refine`), `per_level` (mean radial error per vertebra or landmark, and on
  spines the share of films with that vertebra off its level), the films left out as
  unreadable and the annotation-check points hidden from scoring
  (`regionnet.landmarks.data.annotation_issues`);
- `predictions.csv`: one row per readable film: `path`, `patient_id`, `split`, `landmarks`
  (JSON [[x, y], ...] in the film's pixels; `landmarks_step1` with `refine`), `mre_px`,
  `mre_pct`, and for spines the Cobb angles `pt`, `mt`, `tl` and `true_pt`, `true_mt`, `true_tl`
  (the film's labels, or the angles of its true corners where it has none);
- `error_by_level.png`: the radial error (% of the reference size) per vertebra or landmark;
- `overlays/{best,median,worst}_<film>.png`: the films with the lowest, the median and the
  highest mean radial error (%), predicted points red, true points green (hidden ones left out);
- `errors.csv`: unreadable files (path, reason, stage).

Scalars go to the configured loggers (`logger=csv` by default); W&B also gets the figures and
the predictions table (without paths and patient ids unless `logger.wandb.log_paths`).
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from regionnet.boxes.infer import attach_detector
from regionnet.data.transforms import GRAY_MEAN, GRAY_STD
from regionnet.io import read_radiograph
from regionnet.landmarks.data import LandmarkDataModule
from regionnet.landmarks.infer import ANGLES, load_landmark_model, points_json
from regionnet.landmarks.metrics import LandmarkMetrics
from regionnet.landmarks.overlay import draw_landmarks
from regionnet.landmarks.report import landmark_report, plot_error_by_level, print_table
from regionnet.reporting import resampling_unit
from regionnet.run import build_datamodule, eval_trainer, log_eval

log = logging.getLogger(__name__)

SPLITS = ("test", "val", "all")
OVERLAYS = ("best", "median", "worst")


def _run_dir(ckpt_path: str | Path) -> Path:
    """`<run_dir>` of `<run_dir>/checkpoints/best.ckpt` (else the checkpoint's folder)."""
    parent = Path(str(ckpt_path)).expanduser().resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def landmark_data_config(cfg: DictConfig, model, run_dir: Path) -> DictConfig:
    """The landmark data node to evaluate on (see the module docstring)."""
    user = cfg.get("data") or OmegaConf.create({})
    target = f"{LandmarkDataModule.__module__}.{LandmarkDataModule.__name__}"
    known = set(inspect.signature(LandmarkDataModule).parameters) | {"_target_"}
    given = {k: v for k, v in OmegaConf.to_container(user, resolve=True).items() if v is not None}
    ignored = sorted(set(given) - known)  # eval.yaml's region keys (external_test, regions)
    if ignored:
        log.warning("data.%s: not used for landmark data; ignored", ", data.".join(ignored))
    given = {k: v for k, v in given.items() if k in known}
    if "_target_" in given:
        if given["_target_"] != target:
            raise ValueError(
                f"ckpt_path={cfg.ckpt_path} is a landmark model, but data._target_="
                f"{given['_target_']}; evaluate it on its run's data (no data=...) or "
                "data=landmarks"
            )
        data = OmegaConf.create(given)
    else:
        run_file = run_dir / "config.yaml"
        run_data = OmegaConf.load(run_file).get("data") if run_file.is_file() else None
        if run_data is None or run_data.get("_target_") != target:
            raise FileNotFoundError(
                f"{run_file} has no landmark data node: ckpt_path={cfg.ckpt_path} is not in a "
                "regionnet landmark run directory (<run_dir>/checkpoints/), so its data are "
                "unknown. Name them: data=landmarks data.dataset=... data.root=DIR split=all"
            )
        data = run_data
        if (run_dir / "split.csv").is_file():
            data.split_file = str(run_dir / "split.csv")
        else:
            log.warning("%s has no split.csv: re-splitting with the run's seed", run_dir)
        data = OmegaConf.merge(data, given)
    h = model.hparams
    data.image_size = int(h.image_size)
    data.mean, data.std = float(h.get("mean", GRAY_MEAN)), float(h.get("std", GRAY_STD))
    # step 2's detail image as the model was trained with (none for models without one)
    data.detail_size = h.get("detail_size")
    data.detail = h.get("detail_size") is not None
    data.batch_size, data.num_workers = int(cfg.batch_size), int(cfg.num_workers)
    return data


def _frame(dm: LandmarkDataModule, split: str) -> pd.DataFrame:
    if split not in SPLITS:
        raise ValueError(
            f"split={split!r}: landmark data have {', '.join(SPLITS)} (no external test set)"
        )
    return dm.records if split == "all" else dm.split_frame(split)


def predict_films(trainer: L.Trainer, model, dm: LandmarkDataModule, frame: pd.DataFrame):
    """Lightning's predict loop over `frame`: the readable rows (in order), the concatenated
    `predict_step` outputs and the (path, reason) of the unreadable files."""
    outputs = trainer.predict(model, dataloaders=dm._loader(frame, train=False)) or []
    errors = [tuple(e) for o in outputs for e in o["errors"]]
    paths = [p for o in outputs for p in o["path"]]
    readable = frame[~frame["path"].isin({p for p, _ in errors})]
    if readable["path"].tolist() != paths:
        raise RuntimeError("predictions came back out of order; evaluate with trainer.devices=1")
    keys = ("points", "step1_points", "points_px", "visible", "cobb", "size")
    found = {k: torch.cat([o[k] for o in outputs if len(o["path"])]) for k in keys} if paths else {}
    return readable, found, errors


def _films(model, found: dict, which: str) -> dict[str, np.ndarray]:
    """`LandmarkMetrics.per_film` of the predicted `which` points against the truth."""
    metrics = LandmarkMetrics(model.skeleton)
    metrics.update(
        found[which], found["points_px"], found["visible"], found["cobb"], found["size"][:, 1]
    )
    return metrics.per_film()


def predictions_table(
    stage: str, records: pd.DataFrame, found: dict, films: dict, refine: bool
) -> pd.DataFrame:
    """One row per film (see the module docstring)."""
    table = pd.DataFrame({"path": records["path"].to_numpy()})
    table["patient_id"] = records["patient_id"].to_numpy()
    table["split"] = records["split"].to_numpy() if "split" in records else stage
    table["landmarks"] = [points_json(p) for p in found["points"].numpy()]
    if refine:
        table["landmarks_step1"] = [points_json(p) for p in found["step1_points"].numpy()]
    table["mre_px"] = np.round(films["mre_px"], 3)
    table["mre_pct"] = np.round(films["mre_pct"], 3)
    if "cobb_pred" in films:
        for k, a in enumerate(ANGLES):
            table[a] = np.round(films["cobb_pred"][:, k], 2)
        for k, a in enumerate(ANGLES):
            table[f"true_{a}"] = np.round(films["cobb_true"][:, k], 2)
    return table


def pick_films(mre_pct: np.ndarray) -> dict[str, int]:
    """Row of the best, the median and the worst film by mean radial error (NaN left out)."""
    scored = np.flatnonzero(np.isfinite(mre_pct))
    if not len(scored):
        return {}
    order = scored[np.argsort(mre_pct[scored], kind="stable")]
    return {"best": int(order[0]), "median": int(order[len(order) // 2]), "worst": int(order[-1])}


def draw_overlays(
    folder: Path, root: Path, table: pd.DataFrame, found: dict, films: dict, skeleton: str
) -> dict[str, Path]:
    """`overlays/<which>_<film>.png` for the films of `pick_films`."""
    out = {}
    for which, i in pick_films(films["mre_pct"]).items():
        path = table["path"].iloc[i]
        truth = found["points_px"][i].numpy().astype(np.float64)
        truth[~found["visible"][i].numpy().astype(bool)] = np.nan  # hidden: not scored, not drawn
        angles = films["cobb_pred"][i] if "cobb_pred" in films else None
        true_angles = films["cobb_true"][i] if "cobb_pred" in films else None
        out[which] = draw_landmarks(
            read_radiograph(root / path),
            found["points"][i].numpy(),
            skeleton,
            true_points=truth,
            angles=angles,
            true_angles=true_angles,
            path=folder / f"{which}_{Path(path).stem}.png",
        )
    return out


def evaluate_landmarks(cfg: DictConfig, ckpt_path: str | Path) -> dict:
    """Evaluate the landmark checkpoint `ckpt_path` as configured (conf/eval.yaml); return
    the metrics dict written to metrics.json."""
    out = Path(cfg.paths.output_dir)
    split = str(cfg.get("split", "test"))
    if split not in SPLITS:
        raise ValueError(
            f"split={split!r}: landmark data have {', '.join(SPLITS)} (no external test set)"
        )
    model = attach_detector(load_landmark_model(ckpt_path), cfg.get("refine_detector"))
    refine = model.refiner is not None
    dm = build_datamodule(
        OmegaConf.create({"data": landmark_data_config(cfg, model, _run_dir(ckpt_path))})
    )
    dm.setup()
    if dm.landmark_names != list(model.landmark_names):
        raise ValueError(
            f"data.dataset={dm.dataset} has landmarks {dm.landmark_names[:3]}... but "
            f"ckpt_path={ckpt_path} predicts {list(model.landmark_names)[:3]}...: evaluate on "
            f"the checkpoint's data (data.dataset={model.hparams.get('dataset')})"
        )
    if dm.dataset == "phantom":
        log.warning("data.dataset=phantom: SYNTHETIC films; these numbers are no clinical evidence")
    frame = _frame(dm, split)
    out.mkdir(parents=True, exist_ok=True)
    trainer = eval_trainer(cfg, out)
    boot = {"resamples": 1000, "seed": 0, "ci": 0.95, **(cfg.get("bootstrap") or {})}
    if float(boot["ci"]) != 0.95:
        log.warning("bootstrap.ci=%s: landmark intervals are 95 %% ones", boot["ci"])
    names = list(model.landmark_names)
    result: dict = {
        "checkpoint": str(Path(str(ckpt_path)).expanduser().resolve()),
        "task": "landmarks",
        "dataset": dm.dataset,
        "skeleton": model.skeleton,
        "landmarks": names,
        "refine": refine,
        "detail_size": model.detail_size,  # step 2's crop source (None: the input)
        # where step 2's crops are centred: a detector's boxes, or step 1's corners (None)
        "refine_detector": str(cfg.refine_detector) if cfg.get("refine_detector") else None,
        "split": split,
        "bootstrap": {**boot, "ci": 0.95, "method": "percentile"},
        "per_level": {},
    }
    records, found, bad = (
        predict_films(trainer, model, dm, frame) if len(frame) else (frame, {}, [])
    )
    errors = [{"path": p, "reason": why, "stage": split} for p, why in bad]
    result[f"{split}/unreadable"] = len(bad)
    hidden = dm.hidden[records.index.to_numpy()]
    result[f"{split}/hidden_points"] = int(hidden.sum())
    result[f"{split}/hidden_films"] = int(hidden.any(1).sum())
    figures: dict[str, Path] = {}
    table = pd.DataFrame()
    if found:
        unit = resampling_unit(records["patient_id"], records["path"])
        result["bootstrap"]["unit"] = unit
        groups = records["patient_id"].to_numpy() if unit == "patient" else None
        films = _films(model, found, "points")
        steps = [(split, films)]
        if refine:
            steps.append((f"{split}/step1", _films(model, found, "step1_points")))
        for stage, per_film in steps:
            report = landmark_report(
                per_film, names, stage, model.skeleton, int(boot["resamples"]),
                int(boot["seed"]), groups,
            )  # fmt: skip
            result["per_level"][stage] = report.pop("per_level")
            result.update(report)
        table = predictions_table(split, records, found, films, refine)
        figures["error_by_level"] = plot_error_by_level(
            films["radial_pct"], names, model.skeleton, out / "error_by_level.png"
        )
        overlays = draw_overlays(out / "overlays", dm._root, table, found, films, model.skeleton)
        figures.update({f"overlay_{k}": v for k, v in overlays.items()})
        result["overlays"] = {k: str(v.relative_to(out)) for k, v in overlays.items()}
    else:
        log.warning("%s: no readable film among %d records", split, len(frame))

    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    table.to_csv(out / "predictions.csv", index=False)
    pd.DataFrame(errors, columns=["path", "reason", "stage"]).to_csv(
        out / "errors.csv", index=False
    )
    if errors:
        log.warning("%d unreadable files skipped; listed in %s", len(errors), out / "errors.csv")
    log_eval(cfg, result, figures, table)
    _print(result, split, refine)
    log.info("landmark evaluation of %s written to %s", ckpt_path, out)
    return result


def _print(result: dict, split: str, refine: bool) -> None:
    films = int(result.get(f"{split}/films", 0))
    columns = [("final", split)] + ([("step 1", f"{split}/step1")] if refine else [])
    print_table(
        result,
        f"Landmark errors on {split} ({films} films; % = of the vertebra's size or the hand's "
        "width; [95 % bootstrap CI])",
        columns,
    )
