"""Per-region binary heads: one logit each, 'this radiograph shows my region'."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def region_head(in_features: int, hidden: int = 0, dropout: float = 0.0) -> nn.Sequential:
    """A tiny head on pooled features: [dropout] -> [linear -> GELU] -> linear to one logit."""
    layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout else []
    if hidden:
        layers += [nn.Linear(in_features, hidden), nn.GELU()]
        in_features = hidden
    layers.append(nn.Linear(in_features, 1))
    return nn.Sequential(*layers)


def region_heads(
    regions: Sequence[str], in_features: int, hidden: int = 0, dropout: float = 0.0
) -> nn.ModuleDict:
    """One head per region, keyed by region name, in head order."""
    return nn.ModuleDict({r: region_head(in_features, hidden, dropout) for r in regions})
