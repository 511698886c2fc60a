"""The transfer section: scratch vs ImageNet weights vs ImageNet weights + recipe.

One run, one split: the study protocol (`experiment=yi2019`: EfficientNet-Lite0 with the
ImageNet weights of an installed package) is trained three ways on ../shared/data, the first
row's `split.csv` reused by the others through `data.split_file`:

  scratch          experiment=yi2019 model.pretrained=false   (random init)
  imagenet         experiment=yi2019 model.pretrained=true    (ImageNet weights)
  imagenet_recipe  experiment=recipe model.pretrained=true    (plus the tuned recipe knobs)

The experiment configs decide backbone, input size, epochs and augmentation; the benchmark adds
only what a CPU run needs (and `--transfer-*` knobs where asked). Each row is evaluated as the
accuracy section does (per head with bootstrap CIs by patient, within the fracture-film source,
per out-of-set anatomy, on the full-resolution originals), plus the external shoulder-implant
set (never trained on), in-set sensitivity at the operating thresholds, and calibration (ECE,
`regionnet.bench.calibration`). Once per run: Grad-CAM overlays of the best row's worst test
errors (`regionnet.bench.cam_errors`), hand across sources (`regionnet.bench.hands`), and
model-only inference speed of the new default backbone against ResNet-18. `--quick` trains each
row for a few batches of 32 px images on a few patients per source and region (and 12 external
films; `regionnet.bench.protocol.quick_data`), and the hand part one way only: every code path,
no meaningful number.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from regionnet.bench.calibration import ECE_BINS, calibration, plot_reliability
from regionnet.bench.cam_errors import cam_errors, worst_errors
from regionnet.bench.hands import HAND_SOURCES, hand_across_sources
from regionnet.bench.protocol import (
    one_protocol,
    operating_point,
    protocol_overrides,
    read_manifest,
)
from regionnet.bench.settings import BenchSettings, log
from regionnet.bench.speed import build, gflops_per_image, images_per_second
from regionnet.config import compose_config
from regionnet.regions import UNKNOWN

ROWS = ("scratch", "imagenet", "imagenet_recipe")
BEST = "imagenet_recipe"  # the row whose errors get Grad-CAM overlays and a reliability plot
SPEED_BACKBONES = ("tf_efficientnet_lite0", "resnet18")


def row_overrides(settings: BenchSettings, base: list[str]) -> dict[str, list[str]]:
    """regionnet-train overrides of each row (the split file is added after the first)."""
    experiment, recipe = settings.transfer_experiment, settings.recipe
    return {
        "scratch": [f"experiment={experiment}", "model.pretrained=false", *base],
        "imagenet": [f"experiment={experiment}", "model.pretrained=true", *base],
        "imagenet_recipe": [f"experiment={recipe}", "model.pretrained=true", *base],
    }


# -- per-row measures from the evaluation's predictions.csv ---------------------------------
def external_summary(pred: pd.DataFrame, regions: list[str], thresholds: dict) -> dict:
    """Where the external shoulder films go. `top region` is the predicted region: the head
    with the highest probability among those above their thresholds, `unknown` when none is;
    `highest head` is the most probable head, thresholds ignored."""
    ext = pred[pred["split"] == "external"]
    if ext.empty:
        return {"images": 0}
    probs = ext[[f"p_{r}" for r in regions]].to_numpy()
    highest = np.asarray(regions)[probs.argmax(1)]
    return {
        "images": len(ext),
        "top_region_shoulder": float((ext["region"] == "shoulder").mean()),
        "highest_head_shoulder": float((highest == "shoulder").mean()),
        "shoulder_head_fires": float((ext["p_shoulder"] >= thresholds["shoulder"]).mean()),
        "unknown": float((ext["region"] == UNKNOWN).mean()),
        "predicted": {str(k): int(v) for k, v in ext["region"].value_counts().items()},
    }


def row_targets(row: dict) -> list[dict]:
    """The agreed targets of one row, each with the measured value and met / missed."""
    wf, ev = row["breakdown"]["within_fracture_source"], row["eval"]
    shares, op = row["breakdown"]["unknown_share_by_anatomy"], row["operating_point"]

    def at_least(key, label, value, bound, text=None):
        met = value is not None and value >= bound
        return {
            "key": key,
            "label": label,
            "value": value,
            "target": text or f"≥ {bound:g}",
            "met": bool(met),
        }

    out = [
        at_least(
            f"within_fracture_{r}",
            f"within fracture source, {r} AUROC",
            wf.get(r, {}).get("auroc"),
            0.99,
        )
        for r in ("shoulder", "elbow")
    ]
    out.append(at_least("knee", "test AUROC knee", ev.get("test/auroc/knee"), 0.99))
    ext = row["external"].get("top_region_shoulder")
    out.append(at_least("external_shoulder", "external films: top region shoulder", ext, 0.95))
    for a in ("chest", "spine"):
        share = shares.get(a, {}).get("share")
        out.append(at_least(f"{a}_unknown", f"{a} films called `unknown`", share, 1.0, "100 %"))
    rej, sens = op["other_rejected"], op["in_set_sensitivity"]
    both = rej is not None and rej >= 0.9 and sens >= 0.95
    out.append(
        {
            "key": "rejection",
            "label": "all out-of-set `unknown` at in-set sensitivity",
            "value": [rej, sens],
            "target": "≥ 0.90 at ≥ 0.95",
            "met": bool(both),
        }
    )
    return out


# -- inference speed -----------------------------------------------------------------------
def inference_speed(sizes: list[int], quick: bool) -> dict:
    """Model-only inference radiographs/s (fp32, no grad) of the new default backbone and
    ResNet-18, both with five heads, same batch and threads; random weights (speed does not
    depend on them)."""
    batch = 16
    out: dict = {"batch": batch, "threads": torch.get_num_threads(), "sizes": sizes, "rows": {}}
    for backbone in SPEED_BACKBONES:
        model = build(True, backbone)
        out["rows"][backbone] = {
            str(size): {
                "per_s": images_per_second(model, batch, size, min_run_time=0.05 if quick else 3.0),
                "gflop_per_image": gflops_per_image(model, size),
            }
            for size in sizes
        }
    return out


# -- the section -----------------------------------------------------------------------------
def transfer_section(settings: BenchSettings) -> dict:
    s = settings
    manifest = read_manifest(s.data_dir)
    root = s.artifacts / "transfer"
    manifest_csv = s.manifest_csv
    external = s.data_dir / "external" / "manifest.csv"
    external = external if external.is_file() else None
    base = [
        f"trainer.accelerator={s.transfer_accelerator}",
        *protocol_overrides(s, s.transfer),
        "test=false",  # evaluate() tests the best checkpoint, with bootstrap CIs
        "skip_if_done=false",  # wall time is measured: always train
    ]
    evals = []  # evaluations of the hand trainings (one_protocol adds the quick one itself)
    if s.quick:  # protocol_overrides trains on this manifest
        manifest_csv = s.quick_manifest
        external = s.quick_external if external else None
        evals.append("bootstrap.resamples=100")
    row_evals = [f"data.external_test={external}"] if external else []
    used = pd.read_csv(manifest_csv)
    rows = row_overrides(s, base)
    # the first row's config, composable without a run directory, for the settings log
    first = compose_config("train", [*rows[ROWS[0]], "paths.output_dir=."])
    per_epoch = int(first.data.split_fractions[0] * len(used)) * first.data.augment_factor
    log(
        f"transfer: rows train {first.model.backbone} at {first.data.image_size} px for up to "
        f"{first.trainer.max_epochs} epochs, augment factor {first.data.augment_factor}, on "
        f"{first.trainer.accelerator}: about {per_epoch} training radiographs per epoch, "
        "5 trainings (3 rows, 2 hand directions)"
    )
    out: dict = {
        "settings": {
            "experiment": s.transfer_experiment,
            "recipe": s.recipe,
            "image_size": s.transfer.image_size,
            "epochs": s.transfer.epochs,
            "augment_factor": s.transfer.augment_factor,
            "precision": s.precision,
            "accelerator": s.transfer_accelerator,
            "external_test": str(external) if external else None,
            "ece_bins": ECE_BINS,
            "best_row": BEST,
        },
        "data": {
            "manifest": str(manifest_csv),
            "images": len(used),
            "by_anatomy": used["region"].value_counts().to_dict(),
        },
        "rows": {},
    }
    start = time.perf_counter()
    split = None
    for name in ROWS:
        overrides = rows[name] + ([f"data.split_file={split}"] if split else [])
        shutil.rmtree(root / name, ignore_errors=True)
        row = one_protocol(s, f"transfer/{name}", overrides, manifest, row_evals)
        split = split or root / name / "split.csv"
        pred = pd.read_csv(root / name / "eval" / "predictions.csv")
        regions, thresholds = row["eval"]["regions"], row["eval"]["thresholds"]
        row["operating_point"] = operating_point(root / name / "eval", thresholds)
        row["external"] = external_summary(pred, regions, thresholds)
        row["calibration"] = calibration(pred, regions)
        row["targets"] = row_targets(row)
        out["rows"][name] = row
        log(
            f"transfer[{name}]: "
            + ", ".join(
                f"{t['label']} {t['value']} {'met' if t['met'] else 'missed'}"
                for t in row["targets"]
            )
        )

    best = out["rows"][BEST]
    pred = pd.read_csv(root / BEST / "eval" / "predictions.csv")
    out["reliability_png"] = plot_reliability(
        best["calibration"], f"{BEST}: test split, {ECE_BINS} bins", s.out_dir / "reliability.png"
    ).name
    log(f"transfer: Grad-CAM of the worst test errors of {BEST}")
    errors = worst_errors(pred, manifest, best["eval"]["regions"], 2 if s.quick else 3)
    # Overlays of real films stay in the git-ignored artifacts: the shared radiographs' licences
    # allow internal use only (../shared/data/README.md), so they are never committed.
    out["cam_errors"] = cam_errors(Path(best["checkpoint"]), errors, root / "cam_errors")
    hands = manifest[manifest["anatomy"] == "hand"]["source"].unique()
    if set(HAND_SOURCES.values()) <= set(hands):
        out["hand_across_sources"] = hand_across_sources(s, rows[BEST], manifest_csv, split, evals)
    # --quick: the rows' size only (timing at 224 px is no smoke test)
    sizes = sorted({int(best["settings"]["image_size"])} | (set() if s.quick else {224}))
    log(f"transfer: inference speed {SPEED_BACKBONES} at {sizes} px")
    out["inference_speed"] = inference_speed(sizes, s.quick)
    out["wall_seconds"] = time.perf_counter() - start
    s.artifacts.mkdir(parents=True, exist_ok=True)
    (s.artifacts / "transfer.json").write_text(json.dumps(out, indent=2, default=str))
    return out
