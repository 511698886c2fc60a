"""Hand across sources: train on one hand source, test hand AUROC on the other, both ways."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from regionnet.bench.protocol import ValidationTimeline, timed_evaluate, timed_train
from regionnet.bench.settings import BenchSettings, log

HAND_SOURCES = {"rsna": "rsna_boneage_ajayduraisamy", "dha": "hand_dha"}


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
    settings: BenchSettings,
    overrides: list[str],
    manifest_csv: Path,
    split_csv: Path,
    eval_overrides: list[str],
) -> dict:
    """Train `overrides` on one hand source of `manifest_csv` (split as `split_csv`, see
    `hand_loso_manifest`), test hand AUROC on the other, both ways (`--quick`: one way)."""
    root = settings.artifacts / "transfer"
    out = {}
    ways = (("rsna", "dha"), ("dha", "rsna"))
    for a, b in ways[:1] if settings.quick else ways:
        name = f"hand_{a}_to_{b}"
        run = root / name
        shutil.rmtree(run, ignore_errors=True)
        csv = root / f"{name}_manifest.csv"
        counts = hand_loso_manifest(manifest_csv, split_csv, HAND_SOURCES[a], HAND_SOURCES[b], csv)
        # the derived manifest's split column replaces the split file
        train_overrides = [o for o in overrides if not o.startswith("data.csv=")]
        train_overrides.append(f"data.csv={csv}")
        log(f"transfer[{name}]: training ({' '.join(train_overrides)})")
        metrics, seconds = timed_train(
            [*train_overrides, f"paths.output_dir={run}"], ValidationTimeline()
        )
        ckpt = run / "checkpoints" / "best.ckpt"
        ev, eval_seconds = timed_evaluate(ckpt, run / "eval", eval_overrides, settings.num_workers)
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
            "eval_seconds": eval_seconds,
            "met": bool((ev.get("test/auroc/hand") or 0) >= 0.99),
        }
    return out
