"""Calibration of a row's heads on the test split: ECE and reliability diagrams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

ECE_BINS = 15


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
