"""Dotted names of a benchmark section's figures, e.g. `landmarks.spine.two_step.test.cobb_smape`:
what tests and tools look results up by."""

from __future__ import annotations


def flat_keys(res: dict, prefix: str) -> dict[str, object]:
    """Every number of the nested `res` under `<prefix>.<key>.<key>...` (lists, texts and
    booleans left out)."""
    out: dict[str, object] = {}
    for key, value in res.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out.update(flat_keys(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = value
    return out
