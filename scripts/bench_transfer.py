"""Scratch vs ImageNet weights vs ImageNet weights + recipe, for scripts/benchmark.py.

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
set (never trained on), in-set sensitivity at the operating thresholds, and calibration (ECE).
Once per run: Grad-CAM overlays of the best row's worst test errors, hand across sources (train
on one hand source, test on the other, both ways), and model-only inference speed of the new
default backbone against ResNet-18. `--quick` trains each row for a few batches of 48 px
images on a few patients per source and region (and 24 external films): every code path, no
meaningful number.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_accuracy import (
    ValidationTimeline,
    _manifest,
    _train,
    one_protocol,
    protocol_overrides,
)
from bench_ssl import operating_point

from regionnet.config import compose_config
from regionnet.evaluate import evaluate
from regionnet.regions import OTHER, REGIONS, UNKNOWN

ROWS = ("scratch", "imagenet", "imagenet_recipe")
BEST = "imagenet_recipe"  # the row whose errors get Grad-CAM overlays and a reliability plot
HAND_SOURCES = {"rsna": "rsna_boneage_ajayduraisamy", "dha": "hand_dha"}
ECE_BINS = 15
CAM_SIDE = 256  # px, longest side of the overlays
CAM_MAX_BYTES = 100_000
SPEED_BACKBONES = ("tf_efficientnet_lite0", "resnet18")


def rows_preview(experiment: str, recipe: str, base: list[str]) -> list[str]:
    """The first row's overrides, composable without a run directory (for the settings log)."""
    return [*row_overrides(experiment, recipe, base)[ROWS[0]], "paths.output_dir=."]


def row_overrides(experiment: str, recipe: str, base: list[str]) -> dict[str, list[str]]:
    """regionnet-train overrides of each row (the split file is added after the first)."""
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


def expected_calibration_error(y, p, bins: int = ECE_BINS) -> tuple[float | None, list[dict]]:
    """ECE of one head over `bins` equal-width probability bins (the last bin holds p = 1):
    sum over bins of (images in bin / images) x |share positive - mean probability|. Also the
    reliability curve (bins holding images)."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    if not len(p):
        return None, []
    which = np.minimum((p * bins).astype(int), bins - 1)
    ece, curve = 0.0, []
    for b in range(bins):
        m = which == b
        if not m.any():
            continue
        conf, freq = float(p[m].mean()), float(y[m].mean())
        ece += m.sum() / len(p) * abs(freq - conf)
        curve.append({"bin": b, "images": int(m.sum()), "confidence": conf, "frequency": freq})
    return float(ece), curve


def calibration(pred: pd.DataFrame, regions: list[str]) -> dict:
    """ECE per head on the test split, with the reliability curves."""
    test = pred[pred["split"] == "test"]
    out: dict = {"bins": ECE_BINS, "ece": {}, "curves": {}}
    for r in regions:
        ece, curve = expected_calibration_error(test["true_region"] == r, test[f"p_{r}"])
        out["ece"][r], out["curves"][r] = ece, curve
    return out


def plot_reliability(cal: dict, title: str, path: Path) -> Path:
    """Reliability diagram: observed share positive against mean probability per bin."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls=":", c="0.6", lw=1)
    for r, curve in cal["curves"].items():
        if curve:
            ece = cal["ece"][r]
            ax.plot(
                [c["confidence"] for c in curve],
                [c["frequency"] for c in curve],
                "o-",
                ms=3,
                lw=1,
                label=f"{r} (ECE {ece:.3f})",
            )
    ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", title=title)
    ax.set(xlabel="mean predicted probability", ylabel="share of films showing the region")
    ax.title.set_fontsize(8)
    ax.legend(loc="upper left", fontsize=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


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


# -- Grad-CAM of the worst errors -----------------------------------------------------------
def worst_errors(pred: pd.DataFrame, manifest: pd.DataFrame, regions: list[str], n: int):
    """The test films with the largest error: `n` in-set films whose own head is lowest
    (`missed`) and `n` out-of-set films whose highest head is highest (`false_call`)."""
    test = pred[pred["split"] == "test"].merge(manifest[["path", "anatomy"]], on="path", how="left")
    cols = [f"p_{r}" for r in regions]
    test["highest_head"] = np.asarray(regions)[test[cols].to_numpy().argmax(1)]
    test["highest_p"] = test[cols].max(axis=1)
    inset = test[test["true_region"].isin(regions)].copy()
    inset["own_p"] = [inset.at[i, f"p_{r}"] for i, r in inset["true_region"].items()]
    missed = inset.nsmallest(n, "own_p").assign(kind="missed", error=lambda d: 1 - d["own_p"])
    other = test[test["true_region"] == OTHER]
    called = other.nlargest(n, "highest_p").assign(kind="false_call", own_p=np.nan)
    called = called.assign(error=called["highest_p"])
    return pd.concat([missed, called], ignore_index=True)


def _safe(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:80]


def save_small_png(overlay: np.ndarray, path: Path) -> Path:
    """An overlay scaled to CAM_SIDE px (longest side), under CAM_MAX_BYTES: palette PNG when
    the full-colour one is larger."""
    from PIL import Image

    img = Image.fromarray(overlay)
    img.thumbnail((CAM_SIDE, CAM_SIDE), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=True)
    if path.stat().st_size > CAM_MAX_BYTES:
        img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def cam_errors(ckpt: Path, errors: pd.DataFrame, folder: Path) -> list[dict]:
    """Grad-CAM of the highest head (the one that won, or nearly won) over each error film."""
    from regionnet.cam import cam_for_file
    from regionnet.export import load_checkpoint

    model, norm = load_checkpoint(ckpt)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # this folder holds this section's overlays only
        old.unlink()
    rows = []
    for k, (_, e) in enumerate(errors.iterrows()):
        head = str(e["highest_head"])
        overlay, _, _ = cam_for_file(model, e["path"], region=head, **norm)
        # numbered, not named after the film: some file names are DICOM UIDs of studies
        name = f"{k:02d}_{e['kind']}_{_safe(str(e['anatomy']))}_cam-{head}.png"
        png = save_small_png(overlay, folder / name)
        rows.append(
            {
                "png": str(png.relative_to(folder.parents[2])),
                "bytes": png.stat().st_size,
                "file": e["path"],  # RESULTS.md names it relative to the data folder
                "kind": e["kind"],
                "anatomy": e["anatomy"],
                "true_region": e["true_region"],
                "predicted": e["region"],
                "cam_head": head,
                "cam_head_p": float(e["highest_p"]),
                "own_head_p": None if pd.isna(e["own_p"]) else float(e["own_p"]),
            }
        )
    return rows


# -- hand across sources -------------------------------------------------------------------
def hand_loso_manifest(manifest_csv: Path, split_csv: Path, train: str, test: str, path: Path):
    """The manifest with a `split` column derived from the main split: patients with a
    `test`-source hand go to test whole, `train`-source hands leave test. So train/val hold
    hands of `train` only, and the test split's hands are all of `test`, against every other
    non-hand test film. Paths are written absolute; a fully filled `split` column is the split
    regionnet uses."""
    raw = pd.read_csv(manifest_csv)
    base = manifest_csv.resolve().parent
    raw["path"] = [str(base / p) for p in raw["path"]]  # absolute paths stay as they are
    split = pd.read_csv(split_csv, usecols=["path", "split"])
    df = raw.merge(split, on="path", how="left", validate="one_to_one")
    if df["split"].isna().any():
        raise ValueError(f"{split_csv} misses {int(df['split'].isna().sum())} manifest rows")
    hand = df["region"] == "hand"
    to_test = df["patient_id"].isin(df.loc[hand & (df["source"] == test), "patient_id"])
    df.loc[to_test, "split"] = "test"
    df = df[~(hand & (df["source"] == train) & (df["split"] == "test"))]
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    counts = df[df["region"] == "hand"].groupby(["source", "split"]).size()
    return {f"{s}/{k}": int(v) for (s, k), v in counts.items()}


def hand_across_sources(
    overrides: list[str], out_dir: Path, manifest_csv: Path, split_csv: Path, evals, log
) -> dict:
    """Train the given config on one hand source, test hand AUROC on the other, both ways."""
    root = out_dir / "artifacts" / "transfer"
    out = {}
    for a, b in (("rsna", "dha"), ("dha", "rsna")):
        name = f"hand_{a}_to_{b}"
        run = root / name
        shutil.rmtree(run, ignore_errors=True)
        csv = root / f"{name}_manifest.csv"
        counts = hand_loso_manifest(manifest_csv, split_csv, HAND_SOURCES[a], HAND_SOURCES[b], csv)
        # the derived manifest's split column replaces the split file
        train_overrides = [o for o in overrides if not o.startswith("data.csv=")]
        train_overrides.append(f"data.csv={csv}")
        log(f"transfer[{name}]: training ({' '.join(train_overrides)})")
        metrics, seconds = _train(
            [*train_overrides, f"paths.output_dir={run}"], ValidationTimeline()
        )
        ckpt = run / "checkpoints" / "best.ckpt"
        start = time.perf_counter()
        ev = evaluate(
            compose_config(
                "eval",
                [
                    f"ckpt_path={ckpt}",
                    f"paths.output_dir={run / 'eval'}",
                    "logger=csv",
                    "num_workers=2",
                    *evals,
                ],
            )
        )
        out[name] = {
            "train_source": HAND_SOURCES[a],
            "test_source": HAND_SOURCES[b],
            "manifest": str(csv),
            "checkpoint": str(ckpt),
            "overrides": train_overrides,
            "hands": counts,
            "test_images": ev.get("test/images"),
            "test_hands": ev.get("test/positives/hand"),
            "auroc": ev.get("test/auroc/hand"),
            "ci": ev.get("test/auroc_ci/hand"),
            "sensitivity": ev.get("test/sensitivity/hand"),
            "specificity": ev.get("test/specificity/hand"),
            "threshold": ev.get("test/threshold/hand"),
            "val_auroc_hand": metrics.get("val/auroc/hand"),
            "train_seconds": seconds,
            "eval_seconds": time.perf_counter() - start,
            "met": bool((ev.get("test/auroc/hand") or 0) >= 0.99),
        }
    return out


# -- quick smoke runs ----------------------------------------------------------------------
def quick_subset(data_dir: Path, folder: Path, patients: int = 5, external: int = 24):
    """Small manifests for `--quick`: up to `patients` seeded patients per (source, region),
    all their films, and the first `external` external films; written with absolute paths.
    Every code path runs, in a fraction of the time."""
    raw = pd.read_csv(data_dir / "radiographs" / "manifest.csv")
    raw["path"] = [str((data_dir / "radiographs").resolve() / p) for p in raw["path"]]
    rng = np.random.default_rng(0)
    keep = set()
    for _, group in raw.groupby(["source", "region"]):
        ids = sorted(group["patient_id"].astype(str).unique())
        keep.update(rng.permutation(ids)[:patients])
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "quick_manifest.csv"
    raw[raw["patient_id"].astype(str).isin(keep)].to_csv(manifest, index=False)
    ext_csv = data_dir / "external" / "manifest.csv"
    if not ext_csv.is_file():
        return manifest, None
    ext = pd.read_csv(ext_csv).head(external)
    ext["path"] = [str(ext_csv.resolve().parent / p) for p in ext["path"]]
    ext.to_csv(folder / "quick_external.csv", index=False)
    return manifest, folder / "quick_external.csv"


# -- inference speed -----------------------------------------------------------------------
def inference_speed(sizes: list[int], quick: bool) -> dict:
    """Model-only inference radiographs/s (fp32, no grad) of the new default backbone and
    ResNet-18, both with five heads, same batch and threads; random weights (speed does not
    depend on them)."""
    import torch
    from bench_speed import gflops_per_image, images_per_second

    from regionnet.model.module import RegionNet

    batch = 16
    out: dict = {"batch": batch, "threads": torch.get_num_threads(), "sizes": sizes, "rows": {}}
    for backbone in SPEED_BACKBONES:
        model = RegionNet(regions=list(REGIONS), backbone=backbone).eval()
        out["rows"][backbone] = {
            str(size): {
                "per_s": images_per_second(
                    model,
                    batch,
                    size,
                    repeats=2 if quick else 5,
                    min_seconds=0.2 if quick else 0.6,
                ),
                "gflop_per_image": gflops_per_image(model, size),
            }
            for size in sizes
        }
    return out


# -- the section -----------------------------------------------------------------------------
def transfer_section(
    data_dir: Path,
    out_dir: Path,
    quick: bool,
    precision: str,
    experiment: str,
    recipe: str,
    size: int | None,
    epochs: int | None,
    augment_factor: int | None,
    log,
    accelerator: str = "cpu",
) -> dict:
    manifest = _manifest(data_dir)
    root = out_dir / "artifacts" / "transfer"
    manifest_csv = data_dir / "radiographs" / "manifest.csv"
    external = data_dir / "external" / "manifest.csv"
    external = external if external.is_file() else None
    base = [
        f"trainer.accelerator={accelerator}",
        *protocol_overrides(data_dir, quick, size, epochs, augment_factor, precision),
        "test=false",  # evaluate() tests the best checkpoint, with bootstrap CIs
        "skip_if_done=false",  # wall time is measured: always train
    ]
    evals = []
    if quick:
        manifest_csv, external = quick_subset(data_dir, root)
        base.append(f"data.csv={manifest_csv}")
        evals.append("bootstrap.resamples=100")
    row_evals = [*evals, f"data.external_test={external}"] if external else evals
    used = pd.read_csv(manifest_csv)
    first = compose_config("train", rows_preview(experiment, recipe, base))
    per_epoch = int(first.data.split_fractions[0] * len(used)) * first.data.augment_factor
    log(
        f"transfer: rows train {first.model.backbone} at {first.data.image_size} px for up to "
        f"{first.trainer.max_epochs} epochs, augment factor {first.data.augment_factor}, on "
        f"{first.trainer.accelerator}: about {per_epoch} training radiographs per epoch, "
        "5 trainings (3 rows, 2 hand directions)"
    )
    rows = row_overrides(experiment, recipe, base)
    out: dict = {
        "settings": {
            "experiment": experiment,
            "recipe": recipe,
            "image_size": size,
            "epochs": epochs,
            "augment_factor": augment_factor,
            "precision": precision,
            "accelerator": accelerator,
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
        row = one_protocol(
            f"transfer/{name}", overrides, out_dir, data_dir, manifest, log, row_evals
        )
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
        best["calibration"], f"{BEST}: test split, {ECE_BINS} bins", out_dir / "reliability.png"
    ).name
    log(f"transfer: Grad-CAM of the worst test errors of {BEST}")
    errors = worst_errors(pred, manifest, best["eval"]["regions"], 2 if quick else 3)
    # Overlays of real films stay in the git-ignored artifacts: the shared radiographs' licences
    # allow internal use only (../shared/data/README.md), so they are never committed.
    out["cam_errors"] = cam_errors(
        Path(best["checkpoint"]), errors, out_dir / "artifacts" / "transfer" / "cam_errors"
    )
    hands = manifest[manifest["anatomy"] == "hand"]["source"].unique()
    if set(HAND_SOURCES.values()) <= set(hands):
        out["hand_across_sources"] = hand_across_sources(
            rows[BEST], out_dir, manifest_csv, split, evals, log
        )
    sizes = sorted({224, int(best["settings"]["image_size"])})
    log(f"transfer: inference speed {SPEED_BACKBONES} at {sizes} px")
    out["inference_speed"] = inference_speed(sizes, quick)
    out["wall_seconds"] = time.perf_counter() - start
    (out_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    (out_dir / "artifacts" / "transfer.json").write_text(json.dumps(out, indent=2, default=str))
    return out
