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
import numpy as np
import pandas as pd

from regionnet.bench.settings import BenchSettings, FineTune, log
from regionnet.config import compose_config
from regionnet.evaluate import evaluate
from regionnet.regions import REGIONS, UNKNOWN
from regionnet.reporting import auroc, bootstrap_auroc_ci
from regionnet.train import train

FRACTURE_SOURCE = "bonefracture_veda_osteoai"
QUICK_FULLRES = 2  # --quick: full-resolution files per folder (hand, chest)


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


def timed_evaluate(
    ckpt: Path, out: Path, overrides: Sequence[str] = (), num_workers: int = 2
) -> tuple[dict, float]:
    """`regionnet-eval` of a checkpoint into `out`: its results and wall seconds."""
    cfg = compose_config(
        "eval",
        [
            f"ckpt_path={ckpt}",
            f"paths.output_dir={out}",
            "logger=csv",
            f"num_workers={num_workers}",
            *overrides,
        ],
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


def quick_data(
    settings: BenchSettings, patients: int = 5, external: int = 12
) -> tuple[Path, Path | None]:
    """`--quick`: the small manifests every fine-tune uses (`settings.quick_manifest`, and
    `settings.quick_external` when the data has external films): up to `patients` seeded
    patients per (source, region) with all their films (about 90 films), and the first
    `external` external films; absolute paths. Every code path runs, in a fraction of the
    time. Writing them again gives the same files."""
    data_dir = settings.data_dir
    raw = pd.read_csv(data_dir / "radiographs" / "manifest.csv")
    raw["path"] = [str((data_dir / "radiographs").resolve() / p) for p in raw["path"]]
    rng = np.random.default_rng(0)
    keep = set()
    for _, group in raw.groupby(["source", "region"]):
        ids = sorted(group["patient_id"].astype(str).unique())
        keep.update(rng.permutation(ids)[:patients])
    manifest = settings.quick_manifest
    manifest.parent.mkdir(parents=True, exist_ok=True)
    raw[raw["patient_id"].astype(str).isin(keep)].to_csv(manifest, index=False)
    ext_csv = data_dir / "external" / "manifest.csv"
    if not ext_csv.is_file():
        return manifest, None
    ext = pd.read_csv(ext_csv).head(external)
    ext["path"] = [str(ext_csv.resolve().parent / p) for p in ext["path"]]
    ext.to_csv(settings.quick_external, index=False)
    return manifest, settings.quick_external


def protocol_overrides(settings: BenchSettings, fine_tune: FineTune) -> list[str]:
    """regionnet-train overrides every benchmark fine-tune on the shared data shares. A
    `None` size, epoch count or augment factor is left to the experiment config. With
    `--quick`: the small manifest of `quick_data` (written before the sections run), a few
    batches, and no test after fitting (the benchmark's evaluation tests the checkpoint)."""
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
    base += [
        f"data.num_workers={settings.num_workers}",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
    ]
    if settings.quick:
        base += [
            f"data.csv={settings.quick_manifest}",
            "trainer.limit_train_batches=4",
            "trainer.limit_val_batches=2",
            "test=false",
        ]
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


def fullres_check(ckpt: Path, data_dir: Path, per_folder: int | None = None) -> dict:
    """Predictions on the full-resolution originals: hands must be `hand`, chests `unknown`
    (the first `per_folder` files of each folder; `None`: all)."""
    from regionnet.api import load_model

    model = load_model(ckpt)
    expect = {"hand": "hand", "chest": UNKNOWN}
    rows = []
    for folder, want in expect.items():
        paths = sorted((data_dir / "fullres" / folder).glob("*.png"))[:per_folder]
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
    if settings.quick:  # a smoke test: fewer bootstrap resamples
        eval_overrides = ["bootstrap.resamples=100", *eval_overrides]
    result, eval_seconds = timed_evaluate(ckpt, run / "eval", eval_overrides, settings.num_workers)
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
        "fullres": fullres_check(
            ckpt, settings.data_dir, QUICK_FULLRES if settings.quick else None
        ),
    }
