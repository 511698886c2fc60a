"""Per-region and summary metrics for one-vs-rest heads (torchmetrics, DDP-synced).

Names follow `stage/metric/region` (`val/auroc/knee`) plus summaries: `stage/auroc_mean`
and `stage/auroc_min` over heads with both positives and negatives in the stage, and
`stage/top1_acc`, the share of single-region radiographs whose highest head is their region.
Sensitivity, specificity and accuracy are taken at each head's operating threshold.
The probabilities of the stage's `other` films (labels all 0) are kept too (`other_probs`),
for `threshold_method=rejection@X`; nothing is logged from them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanMetric, Metric
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryRecall,
    BinaryROC,
    BinarySpecificity,
    MulticlassAccuracy,
    MulticlassCohenKappa,
    MulticlassConfusionMatrix,
)

from regionnet.model.ordinal import predicted_grade


class LabelCounts(Metric):
    """Images seen and positives per head (summed across processes)."""

    full_state_update = False

    def __init__(self, num_regions: int):
        super().__init__()
        self.add_state("positives", torch.zeros(num_regions), dist_reduce_fx="sum")
        self.add_state("images", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("single", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, labels: torch.Tensor) -> None:
        self.positives += labels.sum(0).to(self.positives)
        self.images += len(labels)
        self.single += (labels.sum(1) == 1).sum().to(self.single)

    def compute(self) -> tuple[list[float], float, float]:
        """Positives per head, images, single-region images (synced across processes)."""
        return self.positives.tolist(), float(self.images), float(self.single)


class OtherProbs(Metric):
    """Per-head probabilities of the films with no positive label (`other` films), gathered
    from every process. Kept flat, so a process that saw none adds an empty tensor of the same
    shape as the others' and the concatenation across processes stays well defined."""

    full_state_update = False

    def __init__(self, num_regions: int):
        super().__init__()
        self.num_regions = num_regions
        self.add_state("probs", [], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        other = labels.sum(1) == 0
        self.probs.append(probs[other].detach().float().flatten())

    def compute(self) -> torch.Tensor:
        """(N other films, R) probabilities; N may be 0."""
        state = self.probs
        if isinstance(state, list):  # unsynced list of batches (or no batch)
            state = torch.cat(state) if state else torch.zeros(0, device=self.device)
        return state.reshape(-1, self.num_regions)


class RegionMetrics(nn.Module):
    """Metric state for one stage; `update` with probabilities and 0/1 labels, shape (B, R)."""

    def __init__(self, regions: Sequence[str]):
        super().__init__()
        self.regions = list(regions)
        self.per_region = nn.ModuleDict(
            {
                r: nn.ModuleDict(
                    {
                        "auroc": BinaryAUROC(),
                        "acc": BinaryAccuracy(),
                        "sensitivity": BinaryRecall(),
                        "specificity": BinarySpecificity(),
                    }
                )
                for r in self.regions
            }
        )
        self.roc = nn.ModuleDict({r: BinaryROC(thresholds=200) for r in self.regions})
        self.counts = LabelCounts(len(self.regions))
        self.top1 = MulticlassAccuracy(num_classes=max(2, len(self.regions)), average="micro")
        self.loss = MeanMetric()
        self.other = OtherProbs(len(self.regions))

    def update(
        self,
        probs: torch.Tensor,
        labels: torch.Tensor,
        thresholds: torch.Tensor,
        loss: torch.Tensor | None = None,
    ) -> None:
        """`thresholds` (R,): each head's operating point for accuracy/sensitivity/specificity;
        `loss`: the batch's mean loss, averaged over images into `stage/loss`."""
        target = labels.int()
        calls = (probs >= thresholds).float()  # 0/1 decisions; torchmetrics then cuts at 0.5
        for k, r in enumerate(self.regions):
            self.per_region[r]["auroc"].update(probs[:, k], target[:, k])
            for name in ("acc", "sensitivity", "specificity"):
                self.per_region[r][name].update(calls[:, k], target[:, k])
            self.roc[r].update(probs[:, k], target[:, k])
        self.counts.update(labels)
        self.other.update(probs, labels)
        if loss is not None:
            self.loss.update(loss.detach().float(), weight=len(labels))
        single = labels.sum(1) == 1
        if single.any():
            self.top1.update(probs[single].argmax(1), labels[single].argmax(1))

    def compute(self, stage: str) -> dict[str, float]:
        """Plain floats keyed by logged name; AUROC only where a head saw both classes."""
        out: dict[str, float] = {}
        pos, n, single = self.counts.compute()
        aurocs = []
        for k, r in enumerate(self.regions):
            defined = 0 < pos[k] < n
            for name, metric in self.per_region[r].items():
                if name == "auroc" and not defined:
                    continue
                if name == "sensitivity" and pos[k] == 0:
                    continue
                if name == "specificity" and pos[k] == n:
                    continue
                out[f"{stage}/{name}/{r}"] = float(metric.compute())
            if defined:
                aurocs.append(out[f"{stage}/auroc/{r}"])
            out[f"{stage}/positives/{r}"] = pos[k]
        if aurocs:
            out[f"{stage}/auroc_mean"] = sum(aurocs) / len(aurocs)
            out[f"{stage}/auroc_min"] = min(aurocs)
        # the synced count, not the local update_count: under DDP every process must compute
        # (a collective) or none, even one that saw no single-region radiograph
        if single > 0:
            out[f"{stage}/top1_acc"] = float(self.top1.compute())
        out[f"{stage}/images"] = n
        if n:  # synced: every process computes (a collective) or none does
            out[f"{stage}/loss"] = float(self.loss.compute())
        return out

    def roc_curves(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(false positive rates, true positive rates, thresholds) per region."""
        return {r: tuple(self.roc[r].compute()) for r in self.regions}

    def other_probs(self) -> torch.Tensor:
        """Probabilities (N, R) of the stage's films with no positive label, all processes."""
        return self.other.compute()

    def reset(self) -> None:
        for group in self.per_region.values():
            for m in group.values():
                m.reset()
        for m in self.roc.values():
            m.reset()
        for m in (self.counts, self.top1, self.loss, self.other):
            m.reset()


class FindingMetrics(nn.Module):
    """Metric state of the finding heads for one stage: per finding AUROC, sensitivity and
    specificity at its operating threshold, ROC points (for the threshold chosen on
    validation), `labelled` films and `positives`, over the labelled films only. Named like
    the regions' (`stage/auroc/<finding>`), kept apart from them: no finding enters
    `stage/auroc_mean`, which selects checkpoints."""

    def __init__(self, findings: Sequence[str]):
        super().__init__()
        self.findings = list(findings)
        self.per_finding = nn.ModuleDict(
            {
                f: nn.ModuleDict(
                    {
                        "auroc": BinaryAUROC(),
                        "sensitivity": BinaryRecall(),
                        "specificity": BinarySpecificity(),
                    }
                )
                for f in self.findings
            }
        )
        self.roc = nn.ModuleDict({f: BinaryROC(thresholds=200) for f in self.findings})
        self.counts = LabelCounts(len(self.findings))  # positives; images = labelled below
        self.labelled = LabelCounts(len(self.findings))

    def update(
        self,
        probs: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
        thresholds: torch.Tensor,
    ) -> None:
        """(B, F) probabilities, 0/1 labels, bool mask of labelled entries; thresholds (F,)."""
        mask = mask.bool()
        calls = (probs >= thresholds).float()
        for k, f in enumerate(self.findings):
            m = mask[:, k]
            target = labels[m, k].int()
            # AUROC keeps lists of tensors, gathered across processes: every process adds one
            # per batch, empty where the batch has no label (the sum states need no such care)
            self.per_finding[f]["auroc"].update(probs[m, k], target)
            if len(target):  # torchmetrics' stat scores cannot take an empty batch
                for name in ("sensitivity", "specificity"):
                    self.per_finding[f][name].update(calls[m, k], target)
                self.roc[f].update(probs[m, k], target)
        self.counts.update(labels * mask)
        self.labelled.update(mask.float())

    def compute(self, stage: str) -> dict[str, float]:
        """Plain floats keyed by logged name; AUROC only where a finding saw both classes."""
        out: dict[str, float] = {}
        pos = self.counts.compute()[0]
        labelled = self.labelled.compute()[0]
        for k, f in enumerate(self.findings):
            n, p = labelled[k], pos[k]
            out[f"{stage}/labelled/{f}"] = n
            out[f"{stage}/positives/{f}"] = p
            if 0 < p < n:
                out[f"{stage}/auroc/{f}"] = float(self.per_finding[f]["auroc"].compute())
            if p > 0:
                out[f"{stage}/sensitivity/{f}"] = float(
                    self.per_finding[f]["sensitivity"].compute()
                )
            if p < n:
                out[f"{stage}/specificity/{f}"] = float(
                    self.per_finding[f]["specificity"].compute()
                )
        return out

    def roc_curves(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(fpr, tpr, thresholds) of the findings that saw both classes."""
        pos = self.counts.compute()[0]
        labelled = self.labelled.compute()[0]
        return {
            f: tuple(self.roc[f].compute())
            for k, f in enumerate(self.findings)
            if 0 < pos[k] < labelled[k]
        }

    def reset(self) -> None:
        for group in self.per_finding.values():
            for m in group.values():
                m.reset()
        for m in self.roc.values():
            m.reset()
        self.counts.reset()
        self.labelled.reset()


class OrdinalMetrics(nn.Module):
    """Metric state of the ordinal finding heads for one stage, over the films with a grade:
    per finding `stage/accuracy/<finding>` (exact grade), `stage/mae/<finding>` (mean absolute
    error of the grade index), `stage/kappa/<finding>` (quadratic-weighted Cohen's kappa),
    `stage/labelled/<finding>`, and the confusion matrix (`confusion`, rows = true grade). The
    predicted grade is `regionnet.model.ordinal.predicted_grade`. Never in `auroc_mean`."""

    def __init__(self, grades: dict[str, Sequence[str]]):
        super().__init__()
        self.grades = {f: list(g) for f, g in grades.items()}
        self.per_finding = nn.ModuleDict(
            {
                f: nn.ModuleDict(
                    {
                        "accuracy": MulticlassAccuracy(num_classes=len(g), average="micro"),
                        "mae": MeanAbsoluteError(),
                        "kappa": MulticlassCohenKappa(num_classes=len(g), weights="quadratic"),
                        "confusion": MulticlassConfusionMatrix(num_classes=len(g)),
                    }
                )
                for f, g in self.grades.items()
            }
        )
        self.labelled = LabelCounts(len(self.grades))

    def update(self, probs: dict[str, torch.Tensor], labels: torch.Tensor, mask: torch.Tensor):
        """`probs`: finding -> (B, G) grade probabilities; `labels` (B, F_ordinal) grade
        indices and `mask` (B, F_ordinal) labelled, columns in the order of `grades`."""
        mask = mask.bool()
        for k, f in enumerate(self.grades):
            m = mask[:, k]
            if not m.any():  # sum states only: an empty batch adds nothing
                continue
            target = labels[m, k].long()
            pred = predicted_grade(probs[f][m].float())
            for name, metric in self.per_finding[f].items():
                if name == "mae":
                    metric.update(pred.float(), target.float())
                else:
                    metric.update(pred, target)
        self.labelled.update(mask.float())

    def compute(self, stage: str) -> dict[str, float]:
        """Plain floats keyed by logged name; metrics only for findings with labelled films."""
        out: dict[str, float] = {}
        labelled = self.labelled.compute()[0] if self.grades else []
        for k, f in enumerate(self.grades):
            out[f"{stage}/labelled/{f}"] = labelled[k]
            if labelled[k] > 0:  # synced: every process computes or none
                for name in ("accuracy", "mae", "kappa"):
                    out[f"{stage}/{name}/{f}"] = float(self.per_finding[f][name].compute())
        return out

    def confusion(self) -> dict[str, list[list[int]]]:
        """Finding -> counts [true grade][predicted grade] of the findings with labelled films."""
        labelled = self.labelled.compute()[0] if self.grades else []
        return {
            f: self.per_finding[f]["confusion"].compute().long().tolist()
            for k, f in enumerate(self.grades)
            if labelled[k] > 0
        }

    def reset(self) -> None:
        for group in self.per_finding.values():
            for m in group.values():
                m.reset()
        self.labelled.reset()
