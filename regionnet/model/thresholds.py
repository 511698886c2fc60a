"""Operating thresholds per head, chosen on the validation split.

A head calls its region present when its probability is >= its threshold; when no head does,
the radiograph is `unknown`. Methods: `youden` (maximise sensitivity + specificity - 1, the
default), `specificity@X` (the most sensitive threshold whose specificity is >= X, e.g.
`specificity@0.95` to reject more out-of-set films), `sensitivity@X`, and `fixed` (keep them).
"""

from __future__ import annotations

import re

import torch

METHODS = ("youden", "fixed", "specificity@X", "sensitivity@X")


def parse_method(method: str) -> tuple[str, float | None]:
    """('youden', None), ('fixed', None) or ('specificity'|'sensitivity', target)."""
    if method in ("youden", "fixed"):
        return method, None
    m = re.fullmatch(r"(specificity|sensitivity)@(0?\.\d+|1(\.0*)?)", str(method))
    if not m:
        raise ValueError(
            f"model.threshold_method={method!r}: choose youden, fixed, specificity@X or "
            "sensitivity@X with 0 < X <= 1 (e.g. specificity@0.95)"
        )
    return m.group(1), float(m.group(2))


def choose_threshold(
    fpr: torch.Tensor, tpr: torch.Tensor, thresholds: torch.Tensor, method: str
) -> float | None:
    """One head's threshold from its ROC points; None when the method keeps the old one."""
    kind, target = parse_method(method)
    if kind == "fixed":
        return None
    spec = 1 - fpr
    if kind == "youden":
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
