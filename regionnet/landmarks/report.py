"""Landmark evaluation report: the stage's numbers with film-bootstrap 95 % intervals, errors
per landmark and per vertebra level, and a box plot of the error by level.

Intervals resample whole films (or whole patients with `groups`) with
`regionnet.reporting.bootstrap_samples`, the one resampling the region report uses, and take
the percentile interval; a film's points are correlated, so points are never resampled alone.
Figures use matplotlib's object API (`Figure`, Agg canvas): no display, no pyplot state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from regionnet.landmarks.geometry import VERTEBRAE, check_skeleton
from regionnet.landmarks.metrics import LandmarkMetrics, summarize
from regionnet.reporting import bootstrap_samples


def _rows(films: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[idx] for k, v in films.items()}


def bootstrap_ci(
    per_film: Mapping[str, np.ndarray],
    statistic: Callable[[dict[str, np.ndarray]], float],
    n: int = 1000,
    seed: int = 0,
    groups: Sequence | None = None,
    ci: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile interval of `statistic(per_film)` over `n` seeded resamples of the films
    (rows of every array in `per_film`; whole patients when `groups` gives one id per film).
    Resamples where the statistic is NaN are skipped; None when none is left."""
    films = len(next(iter(per_film.values())))
    values = [statistic(_rows(per_film, idx)) for idx in bootstrap_samples(films, groups, n, seed)]
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return None
    lo, hi = np.quantile(values, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return float(lo), float(hi)


def levels(names: Sequence[str], skeleton: str) -> list[str]:
    """Group labels: the vertebra of each 4 corners (`T1_top_left` -> T1, else T1..L5 in
    order) for "vertebrae", the landmark names themselves for "points"."""
    if check_skeleton(skeleton) == "points":
        return list(names)
    v = len(names) // 4
    first = [str(n).split("_")[0] for n in names[::4]]
    return first if all(first) and len(set(first)) == v else list(VERTEBRAE[:v])


def _per_level(films: Mapping[str, np.ndarray], names: Sequence[str], skeleton: str) -> dict:
    """Mean radial error (px, %) and points counted per level, over visible points; for
    vertebrae also `off_level_pct`, the % of films where that vertebra is placed off its level
    (`geometry.off_level`)."""
    seen = np.asarray(films["visible"], bool)
    group = 4 if skeleton == "vertebrae" else 1
    out = {}
    for i, label in enumerate(levels(names, skeleton)):
        cols = slice(i * group, (i + 1) * group)
        mask = seen[:, cols]
        px, pct = films["radial_px"][:, cols][mask], films["radial_pct"][:, cols][mask]
        out[label] = {
            "mre_px": float(px.mean()) if px.size else None,
            "mre_pct": float(np.nanmean(pct)) if px.size else None,
            "points": int(mask.sum()),
        }
        if "off_level" in films and i < films["off_level"].shape[1]:
            off = films["off_level"][:, i]
            off = off[np.isfinite(off)]
            out[label]["off_level_pct"] = float(100 * off.mean()) if off.size else None
    return out


def landmark_report(
    metrics: LandmarkMetrics | Mapping[str, np.ndarray],
    names: Sequence[str],
    stage: str = "test",
    skeleton: str | None = None,
    resamples: int = 1000,
    seed: int = 0,
    groups: Sequence | None = None,
) -> dict:
    """The stage's numbers (`metrics.summarize` names) each with a `<name>_ci` [lo, hi]
    (film bootstrap, one set of resamples for all: paired intervals), plus `per_level`: the
    mean radial error per vertebra (T1..L5) or per landmark. `metrics` is a LandmarkMetrics
    or its `per_film()` arrays (then give `skeleton`)."""
    if isinstance(metrics, LandmarkMetrics):
        skeleton, films = metrics.skeleton, metrics.per_film()
    else:
        films = dict(metrics)
    skeleton = check_skeleton(skeleton or ("vertebrae" if "cobb_pred" in films else "points"))
    point = summarize(films, stage)
    out: dict = dict(point)
    n = len(films["radial_px"])
    if n:
        samples = bootstrap_samples(n, groups, resamples, seed)
        boot = [summarize(_rows(films, idx), stage) for idx in samples]
        for key in point:
            if key.endswith("/films"):
                continue
            values = [b[key] for b in boot if key in b and np.isfinite(b[key])]
            if values:
                lo, hi = np.quantile(values, [0.025, 0.975])
                out[f"{key}_ci"] = [float(lo), float(hi)]
    out["per_level"] = _per_level(films, names, skeleton) if n else {}
    return out


def plot_error_by_level(
    errors: np.ndarray, names: Sequence[str], skeleton: str, path: str | Path, unit: str = "%"
) -> Path:
    """Box plot with the single errors jittered over it, one box per vertebra level (T1..L5,
    head to foot, 4 corners each) or per landmark; `errors` (N films, K points), NaN = hidden.
    `unit` labels the y axis ("%" of the reference size, or "px"); saved as PNG at `path`."""
    from matplotlib.figure import Figure

    e = np.asarray(errors, dtype=np.float64)
    labels = levels(names, skeleton)
    group = 4 if check_skeleton(skeleton) == "vertebrae" else 1
    data = [e[:, i * group : (i + 1) * group].ravel() for i in range(len(labels))]
    data = [d[np.isfinite(d)] for d in data]
    fig = Figure(figsize=(max(6.0, 0.38 * len(labels) + 1.5), 4.2), layout="constrained")
    ax = fig.add_subplot()
    pos = np.arange(1, len(labels) + 1)
    ax.boxplot(data, positions=pos, showfliers=False, widths=0.6)
    rng = np.random.default_rng(0)
    for p, d in zip(pos, data, strict=True):
        ax.scatter(p + rng.uniform(-0.2, 0.2, len(d)), d, s=3, alpha=0.35, color="tab:blue")
    ax.set_xticks(pos, labels, rotation=90 if group == 1 else 0, fontsize=8)
    ax.set_xlabel("vertebra (head to foot)" if group == 4 else "landmark")
    ax.set_ylabel(f"radial error ({unit})")
    ax.set_title(f"Error per {'vertebra' if group == 4 else 'landmark'} ({len(e)} films)")
    ax.grid(axis="y", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


#: the figures the console tables print, in this order (metric names after `stage/`)
FIGURES = (
    "mre_px", "mre_pct", "err_x_median_pct", "err_y_median_pct", "err_x_mean_pct",
    "err_y_mean_pct", "pck@2", "pck@5", "off_level_pct", "cobb_mae_mean", "cobb_smape",
)  # fmt: skip


def print_table(
    values: Mapping[str, object], title: str, columns: Sequence[tuple[str, str]]
) -> None:
    """A rich table of the landmark figures: a row per `FIGURES` name that any column has, a
    column per `(header, prefix)` reading `values[f"{prefix}/{name}"]` (and its `_ci`, shown
    as `[low, high]` where present). Used after a fit and by `regionnet-eval`."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("figure")
    for header, _ in columns:
        table.add_column(header, justify="right")
    for name in FIGURES:
        cells = []
        for _, prefix in columns:
            v, ci = values.get(f"{prefix}/{name}"), values.get(f"{prefix}/{name}_ci")
            cells.append(
                "n/a" if v is None else f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            )
        if any(c != "n/a" for c in cells):
            table.add_row(name, *cells)
    Console().print(table)
