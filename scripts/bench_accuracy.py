"""Accuracy on real radiographs for scripts/benchmark.py: the study's protocol on ../shared/data.

Trains `experiment=yi2019` on the shared manifest (patient-grouped 64/12/24 split, one-vs-rest
heads, other regions as negatives), evaluates the best checkpoint with `evaluate(cfg)`, and
breaks the result down the ways the data's README asks: per head, per out-of-set anatomy,
within the fracture-film source (shoulder vs elbow with no source shortcut), on the
full-resolution originals, and with augmentation that hides image size and crop style.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import pandas as pd

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


def _train(overrides: list[str], timeline: ValidationTimeline) -> tuple[dict, float]:
    start = time.perf_counter()
    metrics = train(compose_config("train", overrides), extra_callbacks=[timeline])
    return metrics, time.perf_counter() - start


def _manifest(data_dir: Path) -> pd.DataFrame:
    """The shared manifest with absolute paths (as the CSV source resolves them)."""
    path = data_dir / "radiographs" / "manifest.csv"
    df = pd.read_csv(path)
    base = path.resolve().parent
    df["path"] = [str(base / p) for p in df["path"]]
    return df.rename(columns={"region": "anatomy"})


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


def leave_one_source_out(manifest: pd.DataFrame) -> dict:
    """Regions with at least two sources can be trained on one and tested on the other."""
    sources = manifest.groupby("anatomy")["source"].nunique()
    ready = sorted(r for r in REGIONS if sources.get(r, 0) >= 2)
    return {
        "regions_with_two_sources": ready,
        "note": (
            "measured in the transfer section (scripts/bench_transfer.py) for"
            if ready
            else "not possible yet: every target region comes from one source"
        ),
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


def one_protocol(name, overrides, out_dir, data_dir, manifest, log, eval_overrides=()) -> dict:
    """Train, evaluate (the test split, plus whatever `eval_overrides` add, e.g.
    `data.external_test=`) and break down one configuration."""
    run = out_dir / "artifacts" / name
    timeline = ValidationTimeline()
    log(f"accuracy[{name}]: training ({' '.join(overrides)})")
    metrics, seconds = _train([*overrides, f"paths.output_dir={run}"], timeline)
    ckpt = run / "checkpoints" / "best.ckpt"
    log(f"accuracy[{name}]: evaluating {ckpt}")
    ecfg = compose_config(
        "eval",
        [
            f"ckpt_path={ckpt}",
            f"paths.output_dir={run / 'eval'}",
            "logger=csv",
            "num_workers=2",
            *eval_overrides,
        ],
    )
    start = time.perf_counter()
    result = evaluate(ecfg)
    eval_seconds = time.perf_counter() - start
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
        "fullres": fullres_check(ckpt, data_dir),
    }


def protocol_overrides(
    data_dir: Path,
    quick: bool,
    size: int | None,
    epochs: int | None,
    augment_factor: int | None,
    precision: str,
) -> list[str]:
    """regionnet-train overrides every benchmark fine-tune on the shared data shares. A
    `None` size, epoch count or augment factor is left to the experiment config."""
    base = [
        "data=shared",
        f"paths.data_dir={data_dir}",
        "logger=csv",
        f"trainer.precision={precision}",
    ]
    for key, value in (
        ("data.image_size", size),
        ("trainer.max_epochs", epochs),
        ("data.augment_factor", augment_factor),
    ):
        if value is not None:
            base.append(f"{key}={value}")
    base += ["data.num_workers=2", "callbacks.progress_bar=null", "callbacks.model_summary=null"]
    if quick:
        base += ["trainer.limit_train_batches=4", "trainer.limit_val_batches=2"]
    return base


def accuracy_section(
    data_dir: Path,
    out_dir: Path,
    quick: bool,
    size: int,
    epochs: int,
    augment_factor: int,
    precision: str,
    log,
) -> dict:
    manifest = _manifest(data_dir)
    base = [
        "experiment=yi2019",
        "trainer.accelerator=cpu",
        *protocol_overrides(data_dir, quick, size, epochs, augment_factor, precision),
    ]
    out = {
        "data": {
            "images": len(manifest),
            "by_anatomy": manifest["anatomy"].value_counts().to_dict(),
        },
        "settings": {
            "image_size": size,
            "epochs": epochs,
            "augment_factor": augment_factor,
            "precision": precision,
        },
        "leave_one_source_out": leave_one_source_out(manifest),
    }
    start = time.perf_counter()
    out["yi2019"] = one_protocol("yi2019", base, out_dir, data_dir, manifest, log)
    if not quick:
        crop = [*base, "data.augment.crop_scale=[0.35,1.0]"]
        out["yi2019_crop"] = one_protocol("yi2019_crop", crop, out_dir, data_dir, manifest, log)
    out["wall_seconds"] = time.perf_counter() - start
    (out_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    (out_dir / "artifacts" / "accuracy.json").write_text(json.dumps(out, indent=2, default=str))
    return out
