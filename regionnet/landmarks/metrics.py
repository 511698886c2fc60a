"""Landmark metrics for one stage (torchmetrics, DDP-synced): radial error, Cina's relative
errors, PCK and, for spines, Cobb-angle errors.

Errors are measured in original-image pixels and relative to a reference size per point
(`geometry.reference_sizes`: the point's vertebra for "vertebrae", the ground-truth bounding-box
width, i.e. the hand width, for "points"), in %. Cina et al. 2021 report |dx| and |dy| that
way (median and mean, % of the vertebra size). Only visible points count. Names:
`stage/mre_px`, `stage/mre_pct`, `stage/err_{x,y}_{median,mean}_pct`, `stage/pck@2`,
`stage/pck@5` (share of visible points within 2 % / 5 % of the reference size), `stage/films`,
and for "vertebrae" `stage/off_level_pct` (% of fully visible vertebrae whose predicted centre
is nearer another vertebra's true centre than its own: `geometry.off_level`),
`stage/cobb_mae/{pt,mt,tl}`, `stage/cobb_mae_mean` (degrees) and
`stage/cobb_smape` (%, the AASCE challenge's) from `geometry.cobb_angles` of the predicted
corners against the film's labelled angles, or against the angles of its true corners where
no label is given.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from regionnet.landmarks.geometry import (
    COBB_NAMES,
    check_skeleton,
    cobb_angles,
    off_level,
    reference_sizes,
    smape,
)

PCK_PCT = (2, 5)


# Cobb angles need the whole T1..L5 column (17 vertebrae x 4 corners); shorter synthetic
# spines (phantoms with fewer vertebrae) get the point errors only
COBB_POINTS = 68


class LandmarkMetrics(Metric):
    """Predicted and true points of every film of a stage, gathered from all processes
    ("cat" list states), and the numbers computed from them on the whole stage at once.

    `update(pred_px (B, K, 2), true_px (B, K, 2), visible (B, K) bool, cobb_true (B, 3) | None,
    heights (B,) | None)`: points [x, y] in original-image pixels; `cobb_true` the labelled
    [PT, MT, TL] in degrees (NaN or absent: taken from the true corners); `heights` the films'
    heights in the same pixels, for the Cobb rule's upper-half test (absent: guessed, see
    `geometry.cobb_angles`). Every update appends one row per film to every state, so the
    concatenated states stay aligned film by film across processes.
    """

    full_state_update = False

    def __init__(self, skeleton: str):
        super().__init__()
        self.skeleton = check_skeleton(skeleton)
        for name in ("pred", "true", "visible", "cobb_true", "heights"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(
        self,
        pred_px: torch.Tensor,
        true_px: torch.Tensor,
        visible: torch.Tensor | None = None,
        cobb_true: torch.Tensor | None = None,
        heights: torch.Tensor | None = None,
    ) -> None:
        pred = torch.as_tensor(pred_px).detach().to(self.device, torch.float64)
        true = torch.as_tensor(true_px).detach().to(self.device, torch.float64)
        if pred.shape != true.shape or pred.ndim != 3 or pred.shape[-1] != 2:
            raise ValueError(
                f"pred_px and true_px must both be (B, K, 2), got {tuple(pred.shape)} "
                f"and {tuple(true.shape)}"
            )
        b, k = pred.shape[:2]
        vis = torch.ones(b, k) if visible is None else torch.as_tensor(visible)
        self.pred.append(pred)
        self.true.append(true)
        self.visible.append(vis.detach().to(self.device, torch.float64).reshape(b, k))
        self.cobb_true.append(self._rows(cobb_true, (b, 3)))
        self.heights.append(self._rows(heights, (b,)))

    def _gathered(self, name: str) -> np.ndarray:
        """A state as a new float64 array, films first; an empty stage gives 0 rows."""
        state = getattr(self, name)
        if isinstance(state, list) and not state:
            shape = {"pred": (0, 0, 2), "true": (0, 0, 2), "visible": (0, 0), "cobb_true": (0, 3)}
            return np.zeros(shape.get(name, (0,)))
        return dim_zero_cat(state).cpu().numpy().astype(np.float64, copy=True)

    def _rows(self, value, shape: tuple[int, ...]) -> torch.Tensor:
        """`value` as float64 of `shape`, or NaN (= not given) of that shape."""
        if value is None:
            return torch.full(shape, torch.nan, dtype=torch.float64, device=self.device)
        return torch.as_tensor(value).detach().to(self.device, torch.float64).reshape(shape)

    def compute(self) -> dict[str, np.ndarray]:
        """Per film arrays (see `per_film`), from the states of all processes."""
        s = {n: self._gathered(n) for n in ("pred", "true", "visible", "cobb_true", "heights")}
        pred, true, vis = s["pred"], s["true"], s["visible"] > 0.5
        if not len(pred):  # an empty stage
            empty = np.zeros((0, pred.shape[1]))
            out = dict.fromkeys(("radial_px", "radial_pct", "err_x_pct", "err_y_pct"), empty)
            out |= {"reference_px": empty, "visible": vis}
            out |= {"mre_px": np.zeros(0), "mre_pct": np.zeros(0)}
            if self.skeleton == "vertebrae":
                out["off_level"] = np.zeros((0, pred.shape[1] // 4))
            if self.skeleton == "vertebrae" and pred.shape[1] == COBB_POINTS:
                out |= {"cobb_pred": np.zeros((0, 3)), "cobb_true": np.zeros((0, 3))}
            return out
        truth = np.where(vis[..., None], true, np.nan)
        ref = reference_sizes(truth, self.skeleton)
        if self.skeleton == "vertebrae":  # a vertebra with a hidden corner: the film's median
            ref = np.where(np.isnan(ref), np.nanmedian(ref, axis=1, keepdims=True), ref)
        d = np.where(vis[..., None], pred - true, np.nan)
        radial = np.linalg.norm(d, axis=-1)
        out = {
            "radial_px": radial,
            "radial_pct": radial / ref * 100,
            "err_x_pct": np.abs(d[..., 0]) / ref * 100,
            "err_y_pct": np.abs(d[..., 1]) / ref * 100,
            "reference_px": ref,
            "visible": vis,
        }
        with warnings.catch_warnings():  # a film with no visible point: NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            out["mre_px"] = np.nanmean(radial, axis=1)
            out["mre_pct"] = np.nanmean(out["radial_pct"], axis=1)
        if self.skeleton == "vertebrae":
            out["off_level"] = off_level(pred, truth)
        if self.skeleton == "vertebrae" and pred.shape[1] == COBB_POINTS:
            out["cobb_pred"] = cobb_angles(pred, s["heights"]) if len(pred) else np.zeros((0, 3))
            label = s["cobb_true"]
            missing = np.isnan(label).any(1)
            if missing.any():
                label[missing] = cobb_angles(true[missing], s["heights"][missing])
            out["cobb_true"] = label
        return out

    def per_film(self) -> dict[str, np.ndarray]:
        """Arrays with one row per film, for bootstrapping and plots: `radial_px`,
        `radial_pct`, `err_x_pct`, `err_y_pct` (|dx|, |dy|), `reference_px`, `visible` (N, K;
        NaN where a point is hidden), `mre_px`, `mre_pct` (N,), and for "vertebrae"
        `off_level` (N, V; 1.0 off its level, NaN partly hidden) and `cobb_pred`, `cobb_true`
        (N, 3) degrees [PT, MT, TL]."""
        return self.compute()

    def compute_all(self, stage: str) -> dict[str, float]:
        """Plain floats keyed by logged name (see the module docstring); an empty stage gives
        `stage/films` 0 only. Every process must call it (the states are gathered)."""
        return summarize(self.per_film(), stage)


def summarize(films: dict[str, np.ndarray], stage: str) -> dict[str, float]:
    """The stage's numbers from `LandmarkMetrics.per_film` arrays (or a bootstrap resample of
    their rows): point errors pooled over every visible point of every film."""
    n = len(films["radial_px"])
    out: dict[str, float] = {f"{stage}/films": float(n)}
    seen = films["visible"] & np.isfinite(films["radial_pct"])
    if seen.any():
        rel = films["radial_pct"][seen]
        ex, ey = films["err_x_pct"][seen], films["err_y_pct"][seen]
        out[f"{stage}/mre_px"] = float(films["radial_px"][seen].mean())
        out[f"{stage}/mre_pct"] = float(rel.mean())
        out[f"{stage}/err_x_median_pct"] = float(np.median(ex))
        out[f"{stage}/err_y_median_pct"] = float(np.median(ey))
        out[f"{stage}/err_x_mean_pct"] = float(ex.mean())
        out[f"{stage}/err_y_mean_pct"] = float(ey.mean())
        for pct in PCK_PCT:
            out[f"{stage}/pck@{pct}"] = float((rel <= pct).mean())
    if "off_level" in films:
        off = films["off_level"][np.isfinite(films["off_level"])]
        if off.size:
            out[f"{stage}/off_level_pct"] = float(100 * off.mean())
    if "cobb_pred" in films:
        pred, true = films["cobb_pred"], films["cobb_true"]
        ok = np.isfinite(pred).all(1) & np.isfinite(true).all(1)
        if ok.any():
            mae = np.abs(pred[ok] - true[ok]).mean(0)
            for name, value in zip(COBB_NAMES, mae, strict=True):
                out[f"{stage}/cobb_mae/{name}"] = float(value)
            out[f"{stage}/cobb_mae_mean"] = float(mae.mean())
            out[f"{stage}/cobb_smape"] = smape(pred[ok], true[ok])
    return out
