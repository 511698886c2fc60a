"""`evaluate(cfg)`: a trained checkpoint on the test split and on any external test set.

The data are by default those of the training run: a checkpoint lives in
`<run_dir>/checkpoints/`, and `<run_dir>/config.yaml` and `<run_dir>/split.csv` give its data
config and split. The checkpoint decides the heads (`hparams.regions`, in head order), the
input size (`hparams.image_size`) and the operating thresholds (its `thresholds` buffer).

Writes into `paths.output_dir`: `metrics.json` (per stage and head: AUROC with a seeded
bootstrap CI, accuracy/sensitivity/specificity at the threshold, top-1 accuracy, the share of
`other` films called `unknown`, confusion counts), `roc.png`, `confusion.png`,
`predictions.csv` (one row per readable image) and `errors.csv` (unreadable files, skipped).
With finding heads (`model.findings`), `metrics.json` also holds per stage and finding, over
the films that carry its label: `stage/auroc/<finding>` with `stage/auroc_ci/<finding>`,
`sensitivity`/`specificity` at the checkpoint's `finding_thresholds`, `labelled` and
`positives`; `predictions.csv` gets `p_<finding>` for every film. An ordinal finding
(`grades`) has instead `stage/accuracy/<finding>` (exact grade), `stage/mae/<finding>` (grade
index), `stage/kappa/<finding>` (quadratic-weighted Cohen's kappa) with `stage/kappa_ci/<finding>`,
`labelled`, and `stage/confusion/<finding>` (counts, rows = true grade, columns = predicted,
in the order of `grades`), drawn in `grade_confusion.png`; `predictions.csv` gets
`p_<finding>_<grade>` and `<finding>` (the predicted grade).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from regionnet.boxes.evaluate import evaluate_boxes
from regionnet.compose.evaluate import evaluate_multi
from regionnet.data.datamodule import RegionDataModule
from regionnet.data.sources import finding_targets, label_columns
from regionnet.data.transforms import GRAY_MEAN, GRAY_STD
from regionnet.landmarks.evaluate import evaluate_landmarks
from regionnet.model.checkpoint import checkpoint_task
from regionnet.model.module import RegionNet, load_regionnet
from regionnet.model.ordinal import predicted_grade, prob_slices
from regionnet.regions import validate_regions
from regionnet.reporting import (
    RocCurve,
    auroc,
    bootstrap_auroc_ci,
    bootstrap_samples,
    plot_confusion,
    plot_roc,
    predictions_table,
    resampling_unit,
    roc_points,
    stage_metrics,
)
from regionnet.reporting import confusion as confusion_block
from regionnet.run import build_datamodule, eval_trainer, log_eval, print_summary

log = logging.getLogger(__name__)

SPLIT_CHOICES = ("test", "val", "external", "all")


def run_dir_of(ckpt_path: str | Path) -> Path:
    """The training run directory of a checkpoint (`<run_dir>/checkpoints/best.ckpt`)."""
    parent = Path(str(ckpt_path)).expanduser().resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def data_config(cfg: DictConfig, model: RegionNet, run_dir: Path) -> DictConfig:
    """The data config to evaluate on: a chosen data group as is, otherwise the run's data
    with its split.csv and the non-null `data.*` keys of `cfg` on top. Heads, image size and
    normalisation always follow the checkpoint's run."""
    user = cfg.get("data") or OmegaConf.create({})
    run_file = run_dir / "config.yaml"
    run_data = OmegaConf.load(run_file).get("data") if run_file.is_file() else None
    findings = model.hparams.get("findings") or None
    if "_target_" in user:
        data = OmegaConf.create(OmegaConf.to_container(user, resolve=True))
    else:
        if run_data is None:
            raise FileNotFoundError(
                f"{run_file} not found: ckpt_path={cfg.ckpt_path} is not in a regionnet run "
                "directory (<run_dir>/checkpoints/), so its training data are unknown. Name "
                "the data to evaluate on, e.g. data=folder data.root=DIR split=all"
            )
        data = run_data
        if (run_dir / "split.csv").is_file():
            data.split_file = str(run_dir / "split.csv")
        else:
            log.warning("%s has no split.csv: re-splitting with the run's seed", run_dir)
        overrides = {k: v for k, v in OmegaConf.to_container(user).items() if v is not None}
        data = OmegaConf.merge(data, overrides)
    heads = list(model.regions)
    wanted = validate_regions(data.get("regions") or heads)
    if set(wanted) != set(heads):
        raise ValueError(
            f"data.regions {list(wanted)} differ from the heads of ckpt_path={cfg.ckpt_path}: "
            f"{heads}. Evaluate with data.regions=[{','.join(heads)}] (or null), or use a "
            "checkpoint trained on these regions."
        )
    size = int(model.hparams.image_size)
    if data.get("image_size") not in (None, size):
        log.info("data.image_size=%s -> %d: the checkpoint's input size", data.image_size, size)
    data.regions, data.image_size = heads, size
    data.findings = findings  # the checkpoint's finding heads decide the finding labels
    # normalisation belongs to the model: the checkpoint's, as `eval_transform(model)` uses
    h = model.hparams
    data.mean, data.std = float(h.get("mean", GRAY_MEAN)), float(h.get("std", GRAY_STD))
    data.batch_size, data.num_workers = cfg.batch_size, cfg.num_workers
    return data


def stage_frames(dm: RegionDataModule, split: str) -> dict[str, pd.DataFrame]:
    """Record tables to evaluate, keyed by stage (metric prefix)."""
    if split == "all":
        frames = {"all": dm.records}
    elif split in ("test", "val"):
        frames = {split: dm.split_frame(split)}
    else:
        frames = {}
    if dm.external is not None and split != "val":
        frames["external"] = dm.external
    if split == "external" and not frames:
        raise ValueError("split=external needs an external test set: data.external_test=DIR|CSV")
    return frames


def predict_frame(
    trainer: L.Trainer,
    model: RegionNet,
    dm: RegionDataModule,
    frame: pd.DataFrame,
    with_findings: bool = False,
) -> tuple:
    """Probabilities (N, R) for the readable records of `frame` (returned, in order) and the
    (path, reason) of the unreadable ones, through Lightning's predict loop; `with_findings`:
    the finding heads' probabilities (N, P) too, as a fourth item (one column per binary
    finding, one per grade of an ordinal one: `regionnet.model.ordinal.prob_slices`)."""
    outputs = trainer.predict(model, dataloaders=dm._loader(frame, train=False)) or []
    paths = [p for o in outputs for p in o["path"]]
    errors = [tuple(e) for o in outputs for e in o["errors"]]
    probs = [o["probs"] for o in outputs]
    probs = torch.cat(probs).float().numpy() if probs else np.empty((0, len(model.regions)))
    readable = frame[~frame["path"].isin({p for p, _ in errors})].reset_index(drop=True)
    if readable["path"].tolist() != paths:
        raise RuntimeError("predictions came back out of order; evaluate with trainer.devices=1")
    if not with_findings:
        return readable, probs, errors
    found = [o["finding_probs"] for o in outputs if "finding_probs" in o]
    n_findings = sum(p.stop - p.start for p in _finding_columns(model).values())
    found = torch.cat(found).float().numpy() if found else np.empty((len(probs), n_findings))
    return readable, probs, errors, found


def finding_metrics(
    stage: str, model: RegionNet, records: pd.DataFrame, probs: np.ndarray, unit: str, boot
) -> dict:
    """Per finding, over the records that carry its label (`finding_targets`): `labelled`,
    `positives`, AUROC with its bootstrap CI (by patient when `unit` is patient), and
    sensitivity/specificity at the checkpoint's finding threshold."""
    names = list(getattr(model, "findings", []))
    if not names:
        return {}
    targets = finding_targets(records, model.hparams.findings)
    thresholds = model.finding_thresholds.tolist()
    columns = _finding_columns(model)
    out: dict = {}
    for k, f in enumerate(names):
        m = ~np.isnan(targets[:, k])
        if "grades" in model.hparams.findings[f]:
            groups = records["patient_id"].to_numpy()[m] if unit == "patient" else None
            y, p = targets[m, k].astype(int), probs[m][:, columns[f]]
            out.update(grade_metrics(stage, f, y, p, groups, boot))
            continue
        y, p = targets[m, k].astype(int), probs[m, columns[f].start]
        out[f"{stage}/labelled/{f}"] = int(m.sum())
        out[f"{stage}/positives/{f}"] = int(y.sum())
        calls = p >= thresholds[k]
        if y.any():
            out[f"{stage}/sensitivity/{f}"] = float(calls[y == 1].mean())
        if (y == 0).any():
            out[f"{stage}/specificity/{f}"] = float((~calls[y == 0]).mean())
        if (a := auroc(y, p)) is not None:
            out[f"{stage}/auroc/{f}"] = a
            groups = records["patient_id"].to_numpy()[m] if unit == "patient" else None
            ci = bootstrap_auroc_ci(
                y, p, groups, int(boot["resamples"]), int(boot["seed"]), float(boot["ci"])
            )
            if ci is not None:
                out[f"{stage}/auroc_ci/{f}"] = list(ci)
    return out


def _finding_columns(model) -> dict[str, slice]:
    """Finding name -> its columns of the finding probabilities."""
    findings = model.hparams.get("findings") or {}
    return prob_slices(findings) if getattr(model, "findings", None) else {}


def quadratic_kappa(y: np.ndarray, pred: np.ndarray, grades: int) -> float | None:
    """Quadratic-weighted Cohen's kappa of grade indices; None where undefined (every film
    and every prediction the same grade)."""
    observed = np.zeros((grades, grades))
    np.add.at(observed, (y, pred), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / max(len(y), 1)
    index = np.arange(grades)
    weights = (index[:, None] - index[None, :]) ** 2
    chance = (weights * expected).sum()
    return None if chance == 0 else float(1 - (weights * observed).sum() / chance)


def grade_metrics(stage: str, name: str, y: np.ndarray, probs: np.ndarray, groups, boot) -> dict:
    """An ordinal finding's metrics over its labelled films: `labelled`, `accuracy` (exact
    grade), `mae` (grade index), `kappa` (quadratic) with its bootstrap CI (whole patients
    resampled when `groups` is given), `confusion` (rows = true grade). `probs` (N, G)."""
    grades = probs.shape[1]
    pred = predicted_grade(torch.as_tensor(probs)).numpy()
    out: dict = {f"{stage}/labelled/{name}": len(y)}
    if not len(y):
        return out
    out[f"{stage}/accuracy/{name}"] = float((pred == y).mean())
    out[f"{stage}/mae/{name}"] = float(np.abs(pred - y).mean())
    if (kappa := quadratic_kappa(y, pred, grades)) is not None:
        out[f"{stage}/kappa/{name}"] = kappa
        samples = bootstrap_samples(len(y), groups, int(boot["resamples"]), int(boot["seed"]))
        values = [
            v for idx in samples if (v := quadratic_kappa(y[idx], pred[idx], grades)) is not None
        ]
        if values:
            tail = (1 - float(boot["ci"])) / 2 * 100
            out[f"{stage}/kappa_ci/{name}"] = [
                float(np.percentile(values, tail)),
                float(np.percentile(values, 100 - tail)),
            ]
    confusion = np.zeros((grades, grades), dtype=int)
    np.add.at(confusion, (y, pred), 1)
    out[f"{stage}/confusion/{name}"] = confusion.tolist()
    return out


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate `cfg.ckpt_path` as configured (conf/eval.yaml); return the metrics dict."""
    # landmark heads: regionnet/landmarks/evaluate.py (a missing file: the region path's error)
    # box heads (vertebrae): regionnet/boxes/evaluate.py
    task = checkpoint_task(cfg.ckpt_path)
    if task == "landmarks":
        return evaluate_landmarks(cfg, cfg.ckpt_path)
    if task == "boxes":
        return evaluate_boxes(cfg, cfg.ckpt_path)
    if task == "multi":  # region heads with landmark/box parts: regionnet/compose/evaluate.py
        return evaluate_multi(cfg, cfg.ckpt_path)
    out = Path(cfg.paths.output_dir)
    split = cfg.get("split", "test")
    if split not in SPLIT_CHOICES:
        raise ValueError(f"split={split!r}: choose one of {', '.join(SPLIT_CHOICES)}")
    model = load_regionnet(cfg.ckpt_path)
    regions, thresholds = list(model.regions), model.thresholds.tolist()
    run_dir = run_dir_of(cfg.ckpt_path)
    dm = build_datamodule(OmegaConf.create({"data": data_config(cfg, model, run_dir)}))
    dm.setup()
    if dm.hparams.source == "phantom":
        log.warning("data=phantom: SYNTHETIC radiographs; these numbers are no clinical evidence")
    frames = stage_frames(dm, split)
    out.mkdir(parents=True, exist_ok=True)

    trainer = eval_trainer(cfg, out)
    boot = cfg.get("bootstrap") or {}
    boot = {"resamples": 1000, "seed": 0, "ci": 0.95, **boot}
    result: dict = {
        "checkpoint": str(Path(str(cfg.ckpt_path)).expanduser().resolve()),
        "regions": regions,
        "thresholds": dict(zip(regions, thresholds, strict=True)),
        "threshold_method": model.hparams.get("threshold_method", "fixed"),
        "bootstrap": {**boot, "method": "percentile", "unit": {}},
    }
    tables, errors, curves, blocks = [], [], {}, {}
    for stage, frame in frames.items():
        if frame.empty:
            log.warning("%s: no records to evaluate", stage)
            continue
        records, probs, bad, finding_probs = predict_frame(
            trainer, model, dm, frame, with_findings=True
        )
        errors += [{"path": p, "reason": why, "stage": stage} for p, why in bad]
        result[f"{stage}/unreadable"] = len(bad)
        if not len(records):
            log.warning("%s: no readable radiograph among %d records", stage, len(frame))
            continue
        unit = resampling_unit(records["patient_id"], records["path"])
        result["bootstrap"]["unit"][stage] = unit
        labels = records[label_columns(regions)].to_numpy()
        values = stage_metrics(
            stage, probs, labels, records["region"], regions, thresholds,
            groups=records["patient_id"] if unit == "patient" else None,
            resamples=int(boot["resamples"]), seed=int(boot["seed"]), ci=float(boot["ci"]),
        )  # fmt: skip
        result.update(values)
        result.update(per_source_metrics(stage, records, probs, labels, regions, thresholds, boot))
        result.update(finding_metrics(stage, model, records, finding_probs, unit, boot))
        tables.append(predictions_table(stage, records, probs, regions, thresholds))
        for f, cols in _finding_columns(model).items():
            grades = model.hparams.findings[f].get("grades")
            if grades:
                for g, column in zip(grades, finding_probs[:, cols].T, strict=True):
                    tables[-1][f"p_{f}_{g}"] = column
                best = predicted_grade(torch.as_tensor(finding_probs[:, cols])).numpy()
                tables[-1][f] = [grades[j] for j in best]
            else:
                tables[-1][f"p_{f}"] = finding_probs[:, cols.start]
        blocks[stage] = confusion_block(records["region"], tables[-1]["region"], regions)
        curves[stage] = {
            r: RocCurve(
                *roc_points(labels[:, k], probs[:, k]),
                a,
                _ci(values, stage, r),
                int(values[f"{stage}/positives/{r}"]),
            )
            for k, r in enumerate(regions)
            if (a := values.get(f"{stage}/auroc/{r}")) is not None
        }
    result["confusion"] = blocks

    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    predictions = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    predictions.to_csv(out / "predictions.csv", index=False)
    pd.DataFrame(errors, columns=["path", "reason", "stage"]).to_csv(
        out / "errors.csv", index=False
    )
    figures = {"roc": plot_roc(curves, out / "roc.png", boot["ci"])} if curves else {}
    if blocks:
        figures["confusion"] = plot_confusion(blocks, out / "confusion.png")
    if grade_blocks := _grade_blocks(result, model):
        figures["grade_confusion"] = plot_confusion(
            grade_blocks, out / "grade_confusion.png", what="grade"
        )
    if errors:
        log.warning("%d unreadable files skipped; listed in %s", len(errors), out / "errors.csv")
    log_eval(cfg, result, figures, predictions)
    print_summary(result, regions, stages=tuple(blocks), findings=list(model.findings))
    log.info("evaluation of %s written to %s", cfg.ckpt_path, out)
    return result


def _grade_blocks(result: dict, model) -> dict:
    """`plot_confusion` panels of the ordinal findings' confusion matrices, per stage."""
    blocks = {}
    for key, counts in result.items():
        stage, kind, name = (key.split("/") + ["", ""])[:3]
        if kind == "confusion" and name in (getattr(model, "findings", None) or []):
            grades = list(model.hparams.findings[name]["grades"])
            blocks[f"{stage} {name}"] = {"counts": counts, "true": grades, "predicted": grades}
    return blocks


def per_source_metrics(stage, records, probs, labels, regions, thresholds, boot) -> dict:
    """The stage's metrics within each source (`test/source/<source>/auroc/<region>`, ...)
    when it mixes sources: where one source holds one region, the pooled AUROC can reflect
    the source rather than the anatomy."""
    sources = records["source"].astype(str).to_numpy()
    if len(set(sources)) < 2:
        return {}
    out = {}
    for src in sorted(set(sources)):
        m = sources == src
        unit = resampling_unit(records["patient_id"][m], records["path"][m])
        out.update(
            stage_metrics(
                f"{stage}/source/{src}", probs[m], labels[m], records["region"].to_numpy()[m],
                regions, thresholds,
                groups=records["patient_id"].to_numpy()[m] if unit == "patient" else None,
                resamples=int(boot["resamples"]), seed=int(boot["seed"]), ci=float(boot["ci"]),
            )
        )  # fmt: skip
    return out


def _ci(values: dict, stage: str, region: str) -> tuple[float, float] | None:
    ci = values.get(f"{stage}/auroc_ci/{region}")
    return tuple(ci) if ci else None
