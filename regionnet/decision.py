"""The one rule from head probabilities to a region, shared by `regionnet-predict` and the API.

Each head is a one-vs-rest detector with its own operating threshold, chosen on validation and
saved in the checkpoint (`RegionNet.thresholds`). A head *calls* its region when its
probability is >= its threshold (the same cut the metrics use). `regions` lists every calling
head in head order; `region` is the calling head with the highest probability, or `unknown`
when no head calls: a radiograph of anatomy outside the set (a chest film for a
musculoskeletal model) must end up here rather than in the least unlikely head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from regionnet.regions import UNKNOWN


def decide(
    probabilities: Sequence[float], thresholds: Sequence[float], regions: Sequence[str]
) -> tuple[str, list[str]]:
    """(region or `unknown`, all regions whose head passes its threshold, in head order)."""
    if not len(probabilities) == len(thresholds) == len(regions):
        raise ValueError(
            f"{len(probabilities)} probabilities, {len(thresholds)} thresholds and "
            f"{len(regions)} regions: one of each per head"
        )
    calls = [k for k, (p, t) in enumerate(zip(probabilities, thresholds)) if p >= t]
    if not calls:
        return UNKNOWN, []
    best = max(calls, key=lambda k: probabilities[k])
    return regions[best], [regions[k] for k in calls]


def resolve_thresholds(
    saved: Sequence[float],
    regions: Sequence[str],
    override: float | Sequence[float] | Mapping[str, float] | None = None,
) -> list[float]:
    """The operating thresholds: the checkpoint's, or `threshold_override`.

    The override is one number for every head, a list in head order, or a mapping
    region -> threshold (heads it leaves out keep the saved value).
    """
    out = [float(t) for t in saved]
    if override is None:
        pass
    elif isinstance(override, Mapping):
        unknown = sorted(set(override) - set(regions))
        if unknown:
            raise ValueError(
                f"threshold_override names {unknown}, which are not heads of this model "
                f"({', '.join(regions)})"
            )
        out = [float(override.get(r, t)) for r, t in zip(regions, out)]
    elif isinstance(override, int | float):
        out = [float(override)] * len(regions)
    else:
        out = [float(t) for t in override]
        if len(out) != len(regions):
            raise ValueError(
                f"threshold_override has {len(out)} values; the model has {len(regions)} heads "
                f"({', '.join(regions)}): give one per head, one number, or a mapping"
            )
    bad = [t for t in out if not 0.0 <= t <= 1.0]
    if bad:
        raise ValueError(f"thresholds must lie in [0, 1]; got {bad} (threshold_override)")
    return out
