"""Train, evaluate and break down one configuration on the shared data: what the accuracy,
ssl and transfer sections share.

Each fine-tune is `regionnet-train` (`regionnet.train.train`) with the benchmark's overrides
(`protocol_overrides`), evaluated with `regionnet.evaluate.evaluate`, and broken down the ways
the data's README asks: per head, per out-of-set anatomy, within the fracture-film source
(shoulder vs elbow with no source shortcut), on the full-resolution originals, and at the
operating thresholds (in-set sensitivity next to rejection).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import pandas as pd

from regionnet.bench.settings import BenchSettings, FineTune, log
from regionnet.config import compose_config
from regionnet.evaluate import evaluate
from regionnet.regions import REGIONS, UNKNOWN
from regionnet.reporting import auroc, bootstrap_auroc_ci
from regionnet.train import train

FRACTURE_SOURCE = "bonefracture_veda_osteoai"


class ValidationTimeline(L.Callback):
    """Wall time since the fit started and `val/auroc_mean` after each validation pass, for
    time-to-quality."""

    def __init__(self) -> None:
        self.start = 0.0
        self.points: list[dict] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val/auroc_mean" not in trainer.callback_metrics:
            return
        self.points.append(
            {
                "epoch": trainer.current_epoch,
                "seconds": time.perf_counter() - self.start,
                "val/auroc_mean": float(trainer.callback_metrics["val/auroc_mean"]),
            }
        )


def timed_train(overrides: list[str], timeline: ValidationTimeline) -> tuple[dict, float]:
    """`regionnet-train` with these overrides: its metrics and wall seconds."""
    start = time.perf_counter()
    metrics = train(compose_config("train", overrides), extra_callbacks=[timeline])
    return metrics, time.perf_counter() - start


def timed_evaluate(ckpt: Path, out: Path, overrides: Sequence[str] = ()) -> tuple[dict, float]:
    """`regionnet-eval` of a checkpoint into `out`: its results and wall seconds."""
    cfg = compose_config(
        "eval",
        [f"ckpt_path={ckpt}", f"paths.output_dir={out}", "logger=csv", "num_workers=2", *overrides],
    )
    start = time.perf_counter()
    result = evaluate(cfg)
    return result, time.perf_counter() - start


def read_manifest(data_dir: Path) -> pd.DataFrame:
    """The shared manifest with absolute paths (as the CSV source resolves them), its
    `region` column named `anatomy`."""
    path = data_dir / "radiographs" / "manifest.csv"
    df = pd.read_csv(path)
    base = path.resolve().parent
    df["path"] = [str(base / p) for p in df["path"]]
    return df.rename(columns={"region": "anatomy"})


def protocol_overrides(settings: BenchSettings, fine_tune: FineTune) -> list[str]:
    """regionnet-train overrides every benchmark fine-tune on the shared data shares. A
    `None` size, epoch count or augment factor is left to the experiment config."""
    base = [
        "data=shared",
        f"paths.data_dir={settings.data_dir}",
        "logger=csv",
        f"trainer.precision={settings.precision}",
    ]
    for key, value in (
        ("data.image_size", fine_tune.image_size),
        ("trainer.max_epochs", fine_tune.epochs),
        ("data.augment_factor", fine_tune.augment_factor),
    ):
        if value is not None:
            base.append(f"{key}={value}")
    base += ["data.num_workers=2", "callbacks.progress_bar=null", "callbacks.model_summary=null"]
    if settings.quick:
        base += ["trainer.limit_train_batches=4", "trainer.limit_val_batches=2"]
    return base


def breakdown(eval_dir: Path, manifest: pd.DataFrame, seed: int = 0) -> dict:
    """Per-anatomy `unknown` shares and within-fracture-source shoulder/elbow AUROC."""
    pred = pd.read_csv(eval_dir / "predictions.csv")
    pred = pred[pred["split"] == "test"].merge(
        manifest[["path", "anatomy", "source"]], on="path", suffixes=("", "_manifest")
    )
    out: dict = {"unknown_share_by_anatomy": {}, "within_fracture_source": {}}
    for anatomy, group in pred[pred["true_region"] == "other"].groupby("anatomy"):
        out["unknown_share_by_anatomy"][anatomy] = {
            "images": len(group),
            "unknown": int((group["region"] == UNKNOWN).sum()),
            "share": float((group["region"] == UNKNOWN).mean()),
        }
    frac = pred[pred["source_manifest"] == FRACTURE_SOURCE]
    for region in ("shoulder", "elbow"):
        y = (frac["true_region"] == region).to_numpy().astype(int)
        p = frac[f"p_{region}"].to_numpy()
        a = auroc(y, p)
        ci = bootstrap_auroc_ci(y, p, frac["patient_id"].to_numpy(), 1000, seed) if a else None
        out["within_fracture_source"][region] = {
            "auroc": a,
            "ci": ci,
            "positives": int(y.sum()),
            "negatives": int(len(y) - y.sum()),
        }
    return out


def operating_point(eval_dir: Path, thresholds: dict) -> dict:
    """Test-split rejection of out-of-set films (all, and chest) and in-set sensitivity (the
    true region's head fires) at the thresholds chosen on val."""
    pred = pd.read_csv(eval_dir / "predictions.csv")
    pred = pred[pred["split"] == "test"]
    inset = pred[pred["true_region"].isin(REGIONS)]
    fired = [
        inset.at[i, f"p_{region}"] >= thresholds[region]
        for i, region in inset["true_region"].items()
    ]
    other = pred[pred["true_region"] == "other"]
    return {
        "in_set_images": len(inset),
        "in_set_sensitivity": float(sum(fired) / max(1, len(fired))),
        "in_set_top1": float((inset["region"] == inset["true_region"]).mean()),
        "other_images": len(other),
        "other_rejected": float((other["region"] == UNKNOWN).mean()) if len(other) else None,
    }


def fullres_check(ckpt: Path, data_dir: Path) -> dict:
    """Predictions on the full-resolution originals: hands must be `hand`, chests `unknown`."""
    from regionnet.api import load_model

    model = load_model(ckpt)
    expect = {"hand": "hand", "chest": UNKNOWN}
    rows = []
    for folder, want in expect.items():
        paths = sorted((data_dir / "fullres" / folder).glob("*.png"))
        for pred in model.predict([str(p) for p in paths]):
            rows.append({"anatomy": folder, "expected": want, "predicted": pred.region})
    df = pd.DataFrame(rows)
    per = {a: float((g["predicted"] == g["expected"]).mean()) for a, g in df.groupby("anatomy")}
    return {
        "images": len(df),
        "accuracy": float((df["predicted"] == df["expected"]).mean()),
        "accuracy_by_anatomy": per,
        "predicted": df["predicted"].value_counts().to_dict(),
    }


def run_settings(run: Path) -> dict:
    """What a training run resolved to (its `config.yaml`): backbone, weights, input size,
    epochs, augmentation, operating-point method. The experiment config decides these unless
    the benchmark overrides them, so the report states them from the run itself."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / "config.yaml")
    pick = {
        "backbone": "model.backbone",
        "pretrained": "model.pretrained",
        "weights_file": "model.weights_file",
        "backbone_lr_scale": "model.backbone_lr_scale",
        "image_size": "data.image_size",
        "mean": "data.mean",
        "std": "data.std",
        "augment_factor": "data.augment_factor",
        "crop_scale": "data.augment.crop_scale",
        "max_epochs": "trainer.max_epochs",
        "precision": "trainer.precision",
        "threshold_method": "model.threshold_method",
        "tta": "model.tta",
        "label_smoothing": "model.label_smoothing",
        "other_weight": "model.other_weight",
        "ema": "callbacks.ema",
    }
    out = {k: OmegaConf.select(cfg, key, default=None) for k, key in pick.items()}
    out["ema"] = out["ema"] is not None
    for k, v in out.items():
        if OmegaConf.is_config(v):
            out[k] = OmegaConf.to_container(v)
    return out


def one_protocol(
    settings: BenchSettings,
    name: str,
    overrides: list[str],
    manifest: pd.DataFrame,
    eval_overrides: Sequence[str] = (),
) -> dict:
    """Train `overrides` into `<out>/artifacts/<name>`, evaluate its best checkpoint (the test
    split, plus whatever `eval_overrides` add, e.g. `data.external_test=`) and break it down."""
    run = settings.artifacts / name
    timeline = ValidationTimeline()
    log(f"accuracy[{name}]: training ({' '.join(overrides)})")
    metrics, seconds = timed_train([*overrides, f"paths.output_dir={run}"], timeline)
    ckpt = run / "checkpoints" / "best.ckpt"
    log(f"accuracy[{name}]: evaluating {ckpt}")
    result, eval_seconds = timed_evaluate(ckpt, run / "eval", eval_overrides)
    reach = next((p["seconds"] for p in timeline.points if p["val/auroc_mean"] >= 0.99), None)
    return {
        "checkpoint": str(ckpt),
        "overrides": overrides,
        "settings": run_settings(run),
        "train_seconds": seconds,
        "eval_seconds": eval_seconds,
        "val_auroc_mean_best": metrics.get("val/auroc_mean_best"),
        "train_images_per_s": metrics.get("train/images_per_s"),
        "seconds_to_val_auroc_mean_0.99": reach,
        "timeline": timeline.points,
        "eval": {
            k: v
            for k, v in result.items()
            if k.startswith(("test/", "external/"))
            or k in ("thresholds", "threshold_method", "regions")
        },
        "breakdown": breakdown(run / "eval", manifest),
        "fullres": fullres_check(ckpt, settings.data_dir),
    }
