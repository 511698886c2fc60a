"""Grad-CAM overlays of a row's worst test errors (small PNGs in the git-ignored artifacts)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from regionnet.regions import OTHER

CAM_SIDE = 256  # px, longest side of the overlays
CAM_MAX_BYTES = 100_000


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
    """Grad-CAM of the highest head (the one that won, or nearly won) over each error film,
    into `folder` (`<out>/artifacts/transfer/cam_errors`; the rows name the PNGs relative to
    `<out>`)."""
    from regionnet.api import load_model
    from regionnet.cam import cam_for_file

    model = load_model(ckpt).model
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # this folder holds this section's overlays only
        old.unlink()
    rows = []
    for k, (_, e) in enumerate(errors.iterrows()):
        head = str(e["highest_head"])
        overlay, _, _ = cam_for_file(model, e["path"], region=head)
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
