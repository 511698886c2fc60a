"""Evaluation numbers and figures from plain arrays: region decisions, AUROC with bootstrap
confidence intervals, operating-point metrics, confusion matrices, ROC and confusion plots.

Conventions: `probs` (N, R) per-head probabilities in head order, `labels` (N, R) 0/1 targets,
`true_region` (N,) names from the region set or `other`, `thresholds` (R,) operating points.
A head calls its region present when its probability is >= its threshold (as in training);
when no head does, the radiograph is `unknown`. AUROC comes from torchmetrics, ROC points from
scikit-learn. Figures use matplotlib's object API (`Figure`, Agg canvas): no display, no pyplot
state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_curve
from torchmetrics.functional.classification import binary_auroc

from regionnet.data.sources import label_columns
from regionnet.decision import decide
from regionnet.regions import OTHER, UNKNOWN


# -- decisions -------------------------------------------------------------------------------
def decide_all(
    probs: np.ndarray, thresholds: Sequence[float], regions: Sequence[str]
) -> tuple[list[str], list[str]]:
    """`regionnet.decision.decide` for every row of `probs`: the predicted region per image
    (`unknown` when no head calls) and every calling head, head order, `;`-joined."""
    out = [decide(row, list(thresholds), list(regions)) for row in np.asarray(probs).tolist()]
    return [region for region, _ in out], [";".join(calls) for _, calls in out]


# -- AUROC and its bootstrap CI ----------------------------------------------------------------
def auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    """Area under the ROC curve; None unless `y` holds both classes."""
    y = np.asarray(y).astype(int)
    if len(y) == 0 or y.min() == y.max():
        return None
    value = binary_auroc(torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(y))
    # torchmetrics integrates in float32: drop its last-bit noise (a perfect head reads 1.0)
    return round(float(value), 6)


def bootstrap_samples(
    n: int, groups: Sequence | None = None, resamples: int = 1000, seed: int = 0
) -> list[np.ndarray]:
    """Image indices of `resamples` bootstrap resamples of `n` images, seeded.

    With `groups` (a patient id per image) whole patients are drawn with replacement and bring
    all their images: a patient's films are correlated, so this is the honest interval. One
    set of resamples serves every head of a stage (paired intervals).
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        return [rng.integers(0, n, n) for _ in range(resamples)]
    _, codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    members = [np.flatnonzero(codes == g) for g in range(codes.max(initial=-1) + 1)]
    return [
        np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        for _ in range(resamples)
    ]


def auroc_ci(
    y: np.ndarray, p: np.ndarray, samples: Sequence[np.ndarray], ci: float = 0.95
) -> tuple[float, float] | None:
    """Percentile interval of AUROC over bootstrap `samples`; resamples holding one class
    only are skipped. None when no resample holds both classes."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    values = [a for idx in samples if (a := auroc(y[idx], p[idx])) is not None]
    if not values:
        return None
    lo, hi = np.quantile(values, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return float(lo), float(hi)


def bootstrap_auroc_ci(
    y: np.ndarray,
    p: np.ndarray,
    groups: Sequence | None = None,
    resamples: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> tuple[float, float] | None:
    """`auroc_ci` over fresh seeded resamples (by patient when `groups` is given)."""
    return auroc_ci(y, p, bootstrap_samples(len(y), groups, resamples, seed), ci)


def auroc_text(
    value: float, ci: Sequence[float] | None = None, positives: float | None = None, digits: int = 2
) -> str:
    """`AUC 1.00 [1.00, 1.00], n+=1`: an AUROC with its interval and the number of positives it
    rests on (one positive gives a perfect-looking AUROC and interval that say little)."""
    text = f"AUC {value:.{digits}f}"
    if ci is not None:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    if positives is not None:
        text += f", n+={int(positives)}"
    return text


def auroc_summary(metrics: Mapping, stages: Sequence[str], regions: Sequence[str]) -> dict:
    """{stage: {region: {auroc, ci (when known), positives, text}}} from flat metrics
    (`stage/auroc/<r>`, `stage/auroc_ci/<r>`, `stage/positives/<r>`); heads without an AUROC
    are listed with their positives only."""
    out: dict[str, dict] = {}
    for stage in stages:
        heads = {}
        for r in regions:
            a = metrics.get(f"{stage}/auroc/{r}")
            ci = metrics.get(f"{stage}/auroc_ci/{r}")
            pos = metrics.get(f"{stage}/positives/{r}")
            if a is None and pos is None:
                continue
            head: dict = {"auroc": a}
            if ci is not None:
                head["ci"] = list(ci)
            if pos is not None:
                head["positives"] = int(pos)
            head["text"] = auroc_text(a, ci, pos) if a is not None else f"no AUC, n+={int(pos)}"
            heads[r] = head
        if heads:
            out[stage] = heads
    return out


def resampling_unit(patient_ids: Sequence[str], paths: Sequence[str]) -> str:
    """`patient` when patient ids were given, `image` when every id is just the image's path
    (regionnet's fill-in for records without one)."""
    same = all(str(a) == str(b) for a, b in zip(patient_ids, paths, strict=True))
    return "image" if same else "patient"


# -- confusion and stage metrics ------------------------------------------------------------
def confusion(true_region: Sequence[str], predicted: Sequence[str], regions: Sequence[str]) -> dict:
    """Counts of true region (heads, then `other`) x predicted region (heads, then `unknown`)."""
    rows, cols = [*regions, OTHER], [*regions, UNKNOWN]
    counts = np.zeros((len(rows), len(cols)), dtype=int)
    for t, p in zip(true_region, predicted, strict=True):
        counts[rows.index(t), cols.index(p)] += 1
    return {"true": rows, "predicted": cols, "counts": counts.tolist()}


def unknown_rate_other(true_region: Sequence[str], predicted: Sequence[str]) -> float | None:
    """Share of `other` radiographs that no head claims; None without `other` images."""
    calls = [p for t, p in zip(true_region, predicted, strict=True) if t == OTHER]
    return sum(p == UNKNOWN for p in calls) / len(calls) if calls else None


def stage_metrics(
    stage: str,
    probs: np.ndarray,
    labels: np.ndarray,
    true_region: Sequence[str],
    regions: Sequence[str],
    thresholds: Sequence[float],
    groups: Sequence | None = None,
    resamples: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict:
    """Flat metrics of one stage keyed by logged name (`test/auroc/knee`, ...).

    Per head: `auroc`, `auroc_ci` [lo, hi] (bootstrap, seeded), and at the head's threshold
    `acc`, `sensitivity` (needs positives), `specificity` (needs negatives), `threshold`,
    `positives`. Heads without positives or negatives get no AUROC and are listed under
    `heads_without_positives` / `heads_without_negatives`. Summaries: `auroc_mean`,
    `auroc_min`, `top1_acc` (argmax over heads, images whose true region is a head),
    `unknown_rate_other`, `images` and `images/<region or other>`.
    """
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels).astype(int)
    thresholds = np.asarray(thresholds, dtype=float)
    true_region = np.asarray(true_region, dtype=str)
    predicted, _ = decide_all(probs, thresholds, regions)
    samples = bootstrap_samples(len(probs), groups, resamples, seed)
    calls = probs >= thresholds[None, :]
    out: dict = {}
    aurocs, no_pos, no_neg = [], [], []
    for k, r in enumerate(regions):
        y, p, c = labels[:, k], probs[:, k], calls[:, k]
        pos = int(y.sum())
        if pos == 0:
            no_pos.append(r)
        if pos == len(y):
            no_neg.append(r)
        a = auroc(y, p)
        if a is not None:
            aurocs.append(a)
            out[f"{stage}/auroc/{r}"] = a
            interval = auroc_ci(y, p, samples, ci)
            if interval is not None:
                out[f"{stage}/auroc_ci/{r}"] = list(interval)
        out[f"{stage}/acc/{r}"] = float((c == y).mean()) if len(y) else None
        if pos:
            out[f"{stage}/sensitivity/{r}"] = float(c[y == 1].mean())
        if pos < len(y):
            out[f"{stage}/specificity/{r}"] = float((~c[y == 0]).mean())
        out[f"{stage}/threshold/{r}"] = float(thresholds[k])
        out[f"{stage}/positives/{r}"] = pos
    if aurocs:
        out[f"{stage}/auroc_mean"] = float(np.mean(aurocs))
        out[f"{stage}/auroc_min"] = float(np.min(aurocs))
    in_set = np.isin(true_region, list(regions))
    if in_set.any():
        truth = np.array([list(regions).index(t) for t in true_region[in_set]])
        out[f"{stage}/top1_acc"] = float((probs[in_set].argmax(1) == truth).mean())
    rate = unknown_rate_other(true_region, predicted)
    if rate is not None:
        out[f"{stage}/unknown_rate_other"] = rate
    out[f"{stage}/images"] = len(probs)
    for r in [*regions, OTHER]:
        out[f"{stage}/images/{r}"] = int((true_region == r).sum())
    if no_pos:
        out[f"{stage}/heads_without_positives"] = no_pos
    if no_neg:
        out[f"{stage}/heads_without_negatives"] = no_neg
    return {k: v for k, v in out.items() if v is not None}


# -- figures -------------------------------------------------------------------------------
class RocCurve(NamedTuple):
    """One head's ROC curve with its AUROC, CI and number of positives, for `plot_roc`."""

    fpr: np.ndarray
    tpr: np.ndarray
    auroc: float
    ci: tuple[float, float] | None = None
    positives: int | None = None


def roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates (scikit-learn's `roc_curve`)."""
    fpr, tpr, _ = roc_curve(np.asarray(y).astype(int), np.asarray(p, dtype=float))
    return fpr, tpr


def plot_roc(
    panels: Mapping[str, Mapping[str, RocCurve]], path: str | Path, ci: float = 0.95
) -> Path:
    """One panel per stage, one curve per head, `AUC 0.95 [0.91, 0.98], n+=12` in the legend
    (`ci`: the level of the intervals, for the legend's title; n+: the head's positives)."""
    from matplotlib.figure import Figure

    n = max(1, len(panels))
    fig = Figure(figsize=(4.6 * n, 4.6), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (stage, curves) in zip(axes, panels.items(), strict=False):
        ax.plot([0, 1], [0, 1], ls=":", c="0.6", lw=1)
        for region, c in curves.items():
            label = f"{region}: {auroc_text(c.auroc, c.ci, c.positives)}"
            ax.plot(c.fpr, c.tpr, lw=1.5, label=label)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal", title=f"{stage}: ROC per head")
        ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity")
        if curves:
            title = f"one-vs-rest, AUC [{ci:.0%} CI]"
            if any(c.positives is not None for c in curves.values()):
                title += ", n+ positives"
            ax.legend(loc="lower right", fontsize=7.5, title=title, title_fontsize=7.5)
        else:
            ax.text(0.5, 0.5, "no head with both classes", ha="center", va="center")
    return _save(fig, path)


def plot_confusion(blocks: Mapping[str, Mapping], path: str | Path, what: str = "region") -> Path:
    """One panel per stage: counts of true x predicted `what` (region, or an ordinal finding's
    grade), shaded by row share."""
    from matplotlib.figure import Figure

    n = max(1, len(blocks))
    fig = Figure(figsize=(4.8 * n, 4.4), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (stage, b) in zip(axes, blocks.items(), strict=False):
        counts = np.asarray(b["counts"], dtype=float)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(counts):
            color = "white" if share[i, j] > 0.6 else "black"
            ax.text(j, i, int(v), ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(len(b["predicted"])), b["predicted"], rotation=45, ha="right")
        ax.set_yticks(range(len(b["true"])), b["true"])
        title = f"{stage}: confusion ({int(counts.sum())} images)"
        ax.set(xlabel=f"predicted {what}", ylabel=f"true {what}", title=title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def predictions_table(
    stage: str, records: pd.DataFrame, probs: np.ndarray, regions, thresholds
) -> pd.DataFrame:
    """One row per image: path, true region, p_<region> per head, decisions, provenance."""
    table = pd.DataFrame({"path": records["path"], "true_region": records["region"]})
    for k, r in enumerate(regions):
        table[f"p_{r}"] = probs[:, k]
    table["region"], table["regions"] = decide_all(probs, thresholds, regions)
    split = records["split"].astype(str)
    table["split"] = split.where(split != "", stage)  # external records carry no split
    table["source"] = records["source"]
    table["patient_id"] = records["patient_id"]
    return table


def test_predictions(trainer, model, datamodule, split: str = "test") -> pd.DataFrame | None:
    """Per-image test-split probabilities of the model `trainer.test` just tested (its best
    checkpoint; `HeadLoop.test_outputs`, every process's films): the columns of
    `regionnet-eval`'s predictions.csv plus the true label per head (`label_<region>`).
    Returned on rank 0, None on the other processes and without a test split. `split`: the
    records the test loader gave (a data module's `test_split`)."""
    frame = datamodule.split_frame(split)
    if frame.empty or not trainer.is_global_zero:
        return None
    rows = [(p, q) for o in model.test_outputs
            for p, q in zip(o["path"], o["probs"].tolist(), strict=True)]  # fmt: skip
    probs = dict(rows)
    kept = frame[frame["path"].isin(probs)].reset_index(drop=True)  # unreadable files dropped
    regions = list(model.regions)
    matrix = np.array([probs[p] for p in kept["path"]], dtype=float).reshape(-1, len(regions))
    table = predictions_table(split, kept, matrix, regions, model.thresholds.tolist())
    for column in label_columns(regions):
        table[column] = kept[column].to_numpy()
    return table
