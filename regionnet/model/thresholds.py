"""Operating thresholds per head, chosen on the validation split.

A head calls its region present when its probability is >= its threshold; when no head does,
the radiograph is `unknown`. Methods: `youden` (maximise sensitivity + specificity - 1, the
default), `specificity@X` (the most sensitive threshold whose specificity is >= X, e.g.
`specificity@0.95` to reject more out-of-set films), `sensitivity@X`, `rejection@X` (all heads
together reject at least X of the validation films of no target region, the `other` films,
e.g. `rejection@0.9`; see `rejection_thresholds`) and `fixed` (keep them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

METHODS = ("youden", "fixed", "specificity@X", "sensitivity@X", "rejection@X")


def parse_method(method: str) -> tuple[str, float | None]:
    """('youden', None), ('fixed', None) or ('specificity'|'sensitivity'|'rejection', X)."""
    if method in ("youden", "fixed"):
        return method, None
    m = re.fullmatch(r"(specificity|sensitivity|rejection)@(0?\.\d+|1(\.0*)?)", str(method))
    if not m:
        raise ValueError(
            f"model.threshold_method={method!r}: choose youden, fixed, specificity@X, "
            "sensitivity@X or rejection@X with 0 < X <= 1 (e.g. specificity@0.95, "
            "rejection@0.9)"
        )
    return m.group(1), float(m.group(2))


def choose_threshold(
    fpr: torch.Tensor, tpr: torch.Tensor, thresholds: torch.Tensor, method: str
) -> float | None:
    """One head's threshold from its ROC points; None when the method keeps the old one.
    `rejection@X` is a joint choice over heads (`rejection_thresholds`); per head it gives the
    Youden threshold, the lower bound of that choice."""
    kind, target = parse_method(method)
    if kind == "fixed":
        return None
    spec = 1 - fpr
    if kind in ("youden", "rejection"):
        score = tpr - fpr
    elif kind == "specificity":
        ok = spec >= target
        if not ok.any():
            return None
        score = torch.where(ok, tpr, torch.full_like(tpr, -1.0))
    else:
        ok = tpr >= target
        if not ok.any():
            return None
        score = torch.where(ok, spec, torch.full_like(spec, -1.0))
    best = score.max()
    # Among ties take the middle one: the margin to both classes is largest there.
    ties = torch.nonzero(score == best).flatten()
    return float(thresholds[ties[len(ties) // 2]])


def rejection_thresholds(
    other_probs: torch.Tensor, floors: Sequence[float], target: float
) -> tuple[list[float], float]:
    """Per-head thresholds under which at least `target` of the `other` films (labels all 0;
    probabilities (N, R), N > 0) have every head below its threshold, i.e. are `unknown`.

    One common quantile level for all heads: with the other films' probabilities of each head
    sorted, the head's threshold lies above its m-th smallest value, halfway to the next larger
    one (`_cuts`), so m of the N films pass that head; m is the smallest count (found by
    bisection: rejection only grows with m) for which the films that pass every head make up
    `target`. No threshold goes below the head's floor (its Youden threshold), so heads
    already strict enough keep their sensitivity, and m = 0 (the floors alone) comes first. A
    common level spreads the loss of in-set sensitivity over the heads instead of spending it
    on one. Returns (thresholds, rejected share); m = N rejects every other film, so the
    target is always reached.
    """
    probs = other_probs.detach().float().cpu()
    n, r = probs.shape
    if n == 0:
        raise ValueError("rejection_thresholds needs at least one other film")
    if len(floors) != r:
        raise ValueError(f"{r} heads but {len(floors)} floors")
    floor = torch.tensor([float(f) for f in floors])
    cuts = torch.stack([_cuts(probs[:, k]) for k in range(r)], 1)  # (N, R): m-th cut in row m-1

    def at(m: int) -> tuple[torch.Tensor, float]:
        t = floor if m == 0 else torch.maximum(floor, cuts[m - 1])
        return t, float((probs < t).all(1).float().mean())

    lo, hi = 0, n  # at(n) rejects every other film
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid)[1] >= target:
            hi = mid
        else:
            lo = mid + 1
    thresholds, rejected = at(lo)
    return thresholds.tolist(), rejected


def _cuts(values: torch.Tensor) -> torch.Tensor:
    """For the sorted values v: a threshold above each v[i] that every larger value still
    reaches, halfway to the next larger value; above the largest, 0.001 more (less where that
    passes 1), a margin well above the float noise between batchings and devices."""
    v = values.sort().values
    nxt = torch.searchsorted(v, v, right=True)  # index of the first value > v[i]
    larger = v[nxt.clamp(max=len(v) - 1)]
    step = torch.nextafter(v, torch.full_like(v, float("inf")))  # never at v itself
    top = torch.minimum(v + 1e-3, (v + 1) / 2)
    return torch.maximum(torch.where(nxt < len(v), (v + larger) / 2, top), step)


def calibrate(
    method: str,
    regions: Sequence[str],
    curves: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    other_probs: torch.Tensor,
    current: Sequence[float],
    configured: Sequence[float] | None = None,
) -> tuple[list[float], str]:
    """Every head's threshold from one validation pass: a pure function (no model, no state).

    `curves`: ROC points (fpr, tpr, thresholds) of the heads that saw both classes; the others
    keep `current`. `other_probs`: (N, R) probabilities of the validation films with no
    positive label. Under `rejection@X` the floors are the `configured` thresholds, not
    `current` (those would ratchet up from one epoch to the next), and heads may rise above
    their Youden threshold. Without other films, `rejection@X` falls back to `specificity@X`.
    Returns (thresholds in head order, a log line saying what was done).
    """
    kind, target = parse_method(method)
    note = f"{method}: thresholds chosen on the validation split"
    if kind == "rejection" and len(other_probs) == 0:
        note = (
            f"model.threshold_method={method}: the validation split has no other films (labels "
            f"all 0), so no rejection rate can be measured; using specificity@{target} per head"
        )
        method, kind = f"specificity@{target}", "specificity"
    chosen = [float(t) for t in current]
    if kind == "rejection":
        ok = configured is not None and len(configured) == len(regions)
        chosen = [float(t) for t in configured] if ok else [0.5] * len(regions)
    for k, r in enumerate(regions):
        if r not in curves:
            continue
        t = choose_threshold(*curves[r], method)
        if t is not None:
            chosen[k] = t
    if kind == "rejection":  # the per-head choices above are Youden's: the floors
        chosen, rejected = rejection_thresholds(other_probs, chosen, target)
        rounded = dict(zip(regions, [round(t, 4) for t in chosen], strict=True))
        n = len(other_probs)
        note = f"{method}: thresholds {rounded} reject {rejected:.3f} of {n} validation other films"
    return chosen, note
