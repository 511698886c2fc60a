"""Ordinal finding heads (`model.findings.<name>.grades`): the head, its targets and its
decoding, and the column layout that binary and ordinal findings share.

An ordinal finding with G grades (Kellgren-Lawrence KL0..KL4: G = 5) has G-1 logits, one per
cut k = 0..G-2: the logit of P(grade > k). Its training targets are the cumulative ones
(grade > k), 0/1 each, so the loss is the binary findings' masked BCE over G-1 columns (all of
a film's columns masked together when it has no grade).

Column layouts, in declaration order of the findings:
- logits: 1 column per binary finding, G-1 per ordinal one (`logit_widths`);
- probabilities (what `RegionNet.inference_all`, `predict_step`'s `finding_probs` and eval
  give): 1 column per binary finding (its probability), G per ordinal one (the probability of
  each grade, `grade_probs`; `prob_widths`). A model with binary findings only has F columns
  in both, as before ordinal findings existed.

Decoding: the grade probabilities come from the cumulative ones made non-increasing in k
(`P(>k) = min over j <= k of P(>j)`; the head below is monotone by construction, the clamp keeps
averages such as test-time augmentation's honest too): p(0) = 1 - P(>0), p(k) = P(>k-1) - P(>k),
p(G-1) = P(>G-2). The predicted grade is the number of cuts with P(>k) >= 0.5, the median of
that distribution (CORAL's rule), not the argmax: on an ordinal scale the median minimises the
expected absolute grade error, and it never skips a grade the cumulative heads agree on. The
expected grade is sum_k P(>k).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from regionnet.data.sources import is_ordinal
from regionnet.model.heads import region_head


class OrdinalHead(nn.Module):
    """G-1 cumulative logits `score(x) - cut_k` from one score per film and G-1 ordered cut
    points (a cumulative-logit, proportional-odds head; CORAL's shared weights with ordered
    biases). Chosen over G-1 independent outputs because the cut logits are then ordered by
    construction (`cut_k = first + sum of softplus gaps`), so P(>k) never rises with k, and
    because the rare grades (few KL4 films) share one learned direction of the features
    instead of each fitting its own. `score` is a region head (same hidden/dropout)."""

    def __init__(self, in_features: int, grades: int, hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        if grades < 3:
            raise ValueError(f"an ordinal head needs >= 3 grades, got {grades}")
        self.score = region_head(in_features, hidden, dropout)
        # cuts start at -(G-2)/2, ..., (G-2)/2, one logit apart (softplus(gap) = 1)
        self.first = nn.Parameter(torch.tensor([-(grades - 2) / 2]))
        self.gaps = nn.Parameter(torch.full((grades - 2,), math.log(math.e - 1)))

    @property
    def cuts(self) -> torch.Tensor:
        """(G-1,) increasing cut points."""
        steps = torch.cat([self.first.new_zeros(1), torch.cumsum(F.softplus(self.gaps), 0)])
        return self.first + steps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, G-1) logits of P(grade > k)."""
        return self.score(features) - self.cuts


def logit_widths(findings: Mapping[str, Mapping]) -> list[int]:
    """Logit columns per validated finding: 1 (binary) or G-1 (ordinal)."""
    return [len(s["grades"]) - 1 if is_ordinal(s) else 1 for s in findings.values()]


def prob_widths(findings: Mapping[str, Mapping]) -> list[int]:
    """Probability columns per validated finding: 1 (binary) or G (ordinal, one per grade)."""
    return [len(s["grades"]) if is_ordinal(s) else 1 for s in findings.values()]


def _slices(widths: list[int], names) -> dict[str, slice]:
    out, start = {}, 0
    for name, w in zip(names, widths, strict=True):
        out[name] = slice(start, start + w)
        start += w
    return out


def prob_slices(findings: Mapping[str, Mapping]) -> dict[str, slice]:
    """Finding name -> its columns in the probability layout."""
    return _slices(prob_widths(findings), findings)


def logit_slices(findings: Mapping[str, Mapping]) -> dict[str, slice]:
    """Finding name -> its columns in the logit layout."""
    return _slices(logit_widths(findings), findings)


def expand_targets(
    labels: torch.Tensor, mask: torch.Tensor, findings: Mapping[str, Mapping]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, F) targets and mask -> the logit layout: a binary finding's column as it is, an
    ordinal finding's grade index y -> G-1 columns (y > k), its mask repeated over them."""
    if not any(is_ordinal(s) for s in findings.values()):
        return labels, mask
    targets, masks = [], []
    for k, spec in enumerate(findings.values()):
        y, m = labels[:, k : k + 1], mask[:, k : k + 1]
        if is_ordinal(spec):
            cuts = torch.arange(len(spec["grades"]) - 1, device=labels.device, dtype=labels.dtype)
            targets.append((y > cuts).to(labels.dtype))
            masks.append(m.expand(-1, len(cuts)))
        else:
            targets.append(y)
            masks.append(m)
    return torch.cat(targets, 1), torch.cat(masks, 1)


def monotone(cumulative: torch.Tensor) -> torch.Tensor:
    """(..., G-1) P(grade > k) made non-increasing in k (running minimum)."""
    return torch.cummin(cumulative, dim=-1).values


def grade_probs(cumulative: torch.Tensor) -> torch.Tensor:
    """(..., G-1) P(grade > k) -> (..., G) probability of each grade (see the module doc)."""
    c = monotone(cumulative.float())
    ones = torch.ones_like(c[..., :1])
    upper = torch.cat([ones, c], -1)  # P(> k-1), with P(> -1) = 1
    lower = torch.cat([c, torch.zeros_like(ones)], -1)  # P(> k), with P(> G-1) = 0
    return (upper - lower).clamp(min=0)


def cumulative_from_grades(probs: torch.Tensor) -> torch.Tensor:
    """(..., G) grade probabilities -> (..., G-1) P(grade > k)."""
    tail = torch.flip(torch.cumsum(torch.flip(probs, (-1,)), -1), (-1,))  # P(>= k)
    return tail[..., 1:]


def predicted_grade(probs: torch.Tensor) -> torch.Tensor:
    """(..., G) grade probabilities -> the predicted grade index (long): the number of cuts
    with P(grade > k) >= 0.5 (the median grade)."""
    return (cumulative_from_grades(probs) >= 0.5).sum(-1)


def expected_grade(probs: torch.Tensor) -> torch.Tensor:
    """(..., G) grade probabilities -> the expected grade index, sum_k k p(k)."""
    index = torch.arange(probs.shape[-1], device=probs.device, dtype=probs.dtype)
    return (probs * index).sum(-1)


def to_probs(cumulative: torch.Tensor, findings: Mapping[str, Mapping]) -> torch.Tensor:
    """(B, logit columns) sigmoids of the finding logits -> (B, probability columns): a binary
    finding's probability as it is, an ordinal finding's G grade probabilities."""
    if not any(is_ordinal(s) for s in findings.values()):
        return cumulative
    parts = []
    for name, cols in logit_slices(findings).items():
        part = cumulative[:, cols]
        parts.append(grade_probs(part) if is_ordinal(findings[name]) else part)
    return torch.cat(parts, 1)


def grade_of(probs) -> int:
    """`predicted_grade` of one film's G grade probabilities given as plain numbers."""
    probs = [float(p) for p in probs]
    return sum(sum(probs[k + 1 :]) >= 0.5 for k in range(len(probs) - 1))
