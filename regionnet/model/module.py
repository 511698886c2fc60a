"""RegionNet: the Lightning module that trains a `RegionClassifier` (`self.net`).

The network (backbone(s) + one binary head per region, `regionnet.model.net`) is a plain
`nn.Module`; this module holds the loop, the losses, the metrics and the threshold
calibration (`regionnet.model.thresholds.calibrate`, a pure function). Input: (B, 1, S, S)
single-channel radiographs, pixels in [0, 1] normalised with the `mean`/`std` hyperparameters
(kept in the checkpoint so inference matches training; `eval_transform(model)`), S =
`image_size`. `forward` returns a dict region -> logits (B,); `sigmoid(logit)` is the
probability that the radiograph shows the region. Heads are independent (one-vs-rest), so all
of them can say no: the radiograph is `unknown` (e.g. a chest film). `shared_backbone=false`
builds the reference study's design instead: one backbone per region.

Training recipe knobs (defaults leave plain BCE): `label_smoothing` (targets y(1-e)+e/2, in the
training loss only), `other_weight` (loss weight of `other` films, labels all 0, in the
training loss only), `tta` (validation, test, predict and the Python API average each
radiograph's probabilities with those of its horizontal flip: left and right limbs are mirror
images). Exports (`regionnet.export`) hold the plain forward, `predict_proba`, without the flip.

Finding heads (`findings`, e.g. `{knee_oa: {region: knee, from: finding, positive: [KL2, KL3,
KL4]}}`; see `regionnet.data.sources.validate_findings`): one binary head per finding on the
features of its region's backbone, trained with the region heads on the same batches
(`finding_backbone=separate`: on a backbone of their own, so the two never share weights;
`regionnet.model.net`). The training loss is the region loss + `finding_weight` x a masked
BCE (`masked_bce`: the mean over the labelled entries only, so a film without a label gives
that head no gradient). Metrics
`stage/auroc/<finding>` etc. (`FindingMetrics`), thresholds chosen on validation
(`finding_thresholds`, a buffer in the checkpoint); they never enter `stage/auroc_mean`, but
`stage/auroc_mean_all` is the mean AUROC of every region head and binary finding head together:
task=knee_oa's best checkpoint, early stopping and plateau scheduler (`monitor`) follow it,
since the region heads' mean saturates (~0.997 on the shared data) long before the finding
heads stop improving.

Ordinal findings (`{kl_grade: {region: knee, from: finding, grades: [KL0, KL1, KL2, KL3,
KL4]}}`): an `OrdinalHead` with G-1 logits of P(grade > k), trained by the same masked BCE on
the cumulative targets (grade > k) (`regionnet.model.ordinal`); their probabilities are given
per grade, and `OrdinalMetrics` logs `stage/accuracy|mae|kappa/<finding>` and the confusion
matrix (a W&B plot where W&B logs). Their entries of `finding_thresholds` are unused (0.5).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from regionnet.data.sources import is_ordinal, validate_findings
from regionnet.data.transforms import GRAY_MEAN, GRAY_STD
from regionnet.io import INTENSITY
from regionnet.model.checkpoint import checkpoint_task, refuse_file
from regionnet.model.loop import HeadLoop, check_intensity
from regionnet.model.metrics import FindingMetrics, OrdinalMetrics, RegionMetrics
from regionnet.model.net import RegionClassifier, build_region_classifier, legacy_state_dict
from regionnet.model.ordinal import expand_targets, prob_slices, prob_widths, to_probs
from regionnet.model.thresholds import calibrate, choose_threshold, parse_method
from regionnet.regions import REGIONS, validate_regions

log = logging.getLogger(__name__)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits averaged over the entries where `mask` is true (labelled films), (B, F)
    each. Unlabelled entries give exactly zero loss and zero gradient (`torch.where`, not a
    multiplication: a NaN logit or label there stays out too); no labelled entry at all gives
    0, still attached to the graph."""
    mask = mask.bool()
    logits = logits.float()
    safe_logits = torch.where(mask, logits, torch.zeros_like(logits))
    targets = torch.where(mask, labels.float(), torch.zeros_like(logits))
    loss = F.binary_cross_entropy_with_logits(safe_logits, targets, reduction="none")
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    return loss.sum() / mask.sum().clamp(min=1)


#: validation metrics a RegionNet may follow (`monitor`): the region heads' mean AUROC, or
#: that of every region and binary finding head
MONITORS = ("val/auroc_mean", "val/auroc_mean_all")


class RegionNet(HeadLoop):
    """Shared-backbone multi-head region classifier (see module docstring); the loop is
    `HeadLoop`'s."""

    task = "regions"
    monitor = "val/auroc_mean"
    monitor_mode = "max"
    stages = ("val", "test", "external")

    def __init__(
        self,
        regions: Sequence[str] = REGIONS,
        backbone: str = "resnet18",
        pretrained: bool = False,
        weights_file: str | None = None,
        in_chans: int = 1,
        shared_backbone: bool = True,
        head_hidden: int = 0,
        head_dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        pos_weight: str | float | None = "auto",
        optimizer: Mapping | None = None,
        scheduler: Mapping | None = None,
        scheduler_interval: str = "epoch",
        channels_last: bool = False,
        compile: bool = False,
        image_size: int = 224,
        mean: float = GRAY_MEAN,
        std: float = GRAY_STD,
        thresholds: Sequence[float] | None = None,
        threshold_method: str = "youden",
        label_smoothing: float = 0.0,
        other_weight: float = 1.0,
        tta: bool = False,
        weights_source: Mapping | None = None,
        backbone_lr_scale: float = 1.0,
        intensity: str = INTENSITY,
        findings: Mapping[str, Mapping] | None = None,
        finding_weight: float = 1.0,
        finding_thresholds: Sequence[float] | None = None,
        finding_backbone: str = "shared",
        monitor: str = "val/auroc_mean",
    ):
        super().__init__()
        if monitor not in MONITORS:
            raise ValueError(
                f"model.monitor={monitor!r}: use one of {list(MONITORS)} (the validation metric "
                "a plateau scheduler follows; set callbacks.model_checkpoint.monitor alike)"
            )
        # the instance's: `<monitor>_best` is logged beside val/auroc_mean_best (HeadLoop)
        self.monitor = monitor
        regions = list(validate_regions(regions))
        # The pixel intensity rule the training images were read with (regionnet.io). Old
        # checkpoints lack it and get the default: every film they were trained on (8-bit PNGs,
        # phantoms) reads the same under it.
        check_intensity(intensity)
        parse_method(threshold_method)
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(
                f"model.label_smoothing={label_smoothing!r}: use 0 <= value < 1 (e.g. 0.1; "
                "0 = hard 0/1 targets)"
            )
        if float(other_weight) < 0.0:
            raise ValueError(
                f"model.other_weight={other_weight!r}: use a weight >= 0 (1 = like every other "
                "film, 2 = other films count double in the training loss)"
            )
        if not 0.0 < float(backbone_lr_scale) <= 1.0:
            raise ValueError(
                f"model.backbone_lr_scale={backbone_lr_scale!r}: use 0 < value <= 1 (the "
                "backbone's learning rate as a share of the heads'; 0.1 is usual for fine-tuning)"
            )
        if pos_weight not in ("auto", None) and not isinstance(pos_weight, int | float):
            raise ValueError(f"model.pos_weight={pos_weight!r}: use auto, null or a number")
        findings = validate_findings(findings, regions)
        if not float(finding_weight) >= 0.0:
            raise ValueError(
                f"model.finding_weight={finding_weight!r}: use a weight >= 0 (the finding "
                "heads' share of the training loss; 1 = as much as the region heads)"
            )
        # Plain values only, so load_from_checkpoint works without Hydra.
        self.save_hyperparameters()
        self.hparams["regions"] = regions
        self.hparams["findings"] = findings
        self.regions = regions
        self.findings = list(findings)
        self.binary_findings = [f for f, s in findings.items() if not is_ordinal(s)]
        self.ordinal_findings = {f: s["grades"] for f, s in findings.items() if is_ordinal(s)}
        self.net: RegionClassifier
        self.net, source = build_region_classifier(
            regions,
            backbone,
            pretrained,
            weights_file,
            in_chans,
            shared_backbone,
            drop_path_rate,
            head_hidden,
            head_dropout,
            channels_last,
            {f: spec["region"] for f, spec in findings.items()},
            {f: len(g) for f, g in self.ordinal_findings.items()},
            finding_backbone,
        )
        # Where the backbone's starting weights came from (package, version, sha256): built
        # now when weights were loaded, else kept from the checkpoint being restored.
        if pretrained or weights_file or not weights_source:
            weights_source = source
        self.hparams["weights_source"] = dict(weights_source)
        thresholds = list(thresholds) if thresholds is not None else [0.5] * len(regions)
        if len(thresholds) != len(regions):
            raise ValueError(f"model.thresholds needs {len(regions)} values, got {thresholds}")
        # Buffers travel with the checkpoint: operating thresholds and the loss's pos_weight.
        self.register_buffer("thresholds", torch.tensor(thresholds, dtype=torch.float32))
        self.register_buffer("pos_weight", torch.ones(len(regions)))
        self.metrics = nn.ModuleDict(
            {s: RegionMetrics(regions) for s in ("val", "test", "external")}
        )
        # Finding heads: operating thresholds (chosen on validation) and metrics per stage.
        f_thresholds = (
            finding_thresholds if finding_thresholds is not None else [0.5] * len(findings)
        )
        if len(f_thresholds) != len(findings):
            raise ValueError(
                f"model.finding_thresholds needs {len(findings)} values, got {f_thresholds}"
            )
        f_thresholds = torch.tensor(list(f_thresholds), dtype=torch.float32)
        if findings:
            self.register_buffer("finding_thresholds", f_thresholds)
        else:  # no buffer: the state dict, and so the model id, of a region-only model stay
            self.finding_thresholds = f_thresholds
        self.finding_metrics = nn.ModuleDict(
            {s: FindingMetrics(self.binary_findings) for s in ("val", "test", "external")}
        )
        self.ordinal_metrics = nn.ModuleDict(
            {s: OrdinalMetrics(self.ordinal_findings) for s in ("val", "test", "external")}
        )

    # -- model ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits stacked in head order, (B, R)."""
        return self.net.logits(x)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities per head of the plain forward, (B, R): what an export computes.
        Evaluation and prediction go through `inference_proba`."""
        return torch.sigmoid(self.logits(x).float())

    def inference_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities per head, (B, R), as validation, test, predict and the Python API
        report them: `predict_proba`, averaged with that of the horizontally flipped image when
        `tta` is set."""
        return self._infer(x)[1]

    def inference_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(region probabilities (B, R), finding probabilities (B, P)) as `inference_proba`
        reports them (with `tta`), from one backbone pass (two with `tta`). P = F with binary
        findings only; an ordinal finding has one column per grade (`prob_slices`)."""
        _, probs, _, finding_probs = self._infer_all(x)
        return probs, finding_probs

    def _infer_all(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(region logits, region probabilities, finding logits, finding probabilities); the
        finding parts are (B, 0) without findings. Finding logits in the logit layout, finding
        probabilities in the probability layout (`regionnet.model.ordinal`): with `tta` the
        cumulative probabilities of an ordinal finding are averaged, then decoded per grade."""
        logits, finding_logits = self._all_logits(x)
        probs, finding_probs = self._probs_from(x, logits, finding_logits)
        return logits, probs, finding_logits, finding_probs

    def _probs_from(
        self, x: torch.Tensor, logits: torch.Tensor, finding_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(region probabilities, finding probabilities) of `_all_logits(x)`'s logits; with
        `tta` averaged with those of the flipped `x` (a second pass)."""
        probs, finding_probs = self._sigmoid_tta(x, (logits, finding_logits), self._all_logits)
        if self.findings:
            finding_probs = to_probs(finding_probs, self.hparams.findings)
        return probs, finding_probs

    def _all_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Region logits (B, R) and finding logits (B, L) from one backbone pass: one column
        per binary finding, G-1 per ordinal one (`regionnet.model.ordinal.logit_widths`)."""
        return self.net.all_logits(x)

    def finding_loss(
        self, finding_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """`masked_bce` of the finding logits (B, L) against the batch's (B, F) targets and
        mask, an ordinal finding's grade y spread over its G-1 columns as (y > k), its mask
        with it: a film without a grade gives its head no gradient."""
        targets, mask = expand_targets(labels, mask, self.hparams.findings)
        return masked_bce(finding_logits, targets, mask)

    def _infer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(plain logits, inference probabilities) of the region heads alone."""
        logits = self.logits(x)
        (probs,) = self._sigmoid_tta(x, (logits,), lambda z: (self.logits(z),))
        return logits, probs

    def _sigmoid_tta(self, x: torch.Tensor, logits: tuple, of) -> tuple[torch.Tensor, ...]:
        """Sigmoids of `logits` (computed from `x`), each averaged under `tta` with the one of
        `of(flipped x)` (a second pass): the one place test-time augmentation is. Region-only
        callers pass the region logits alone, so they never run the finding heads (or, with
        `finding_backbone=separate`, a second backbone)."""
        probs = tuple(torch.sigmoid(t.float()) for t in logits)
        if not self.hparams.get("tta", False):
            return probs
        flipped = of(torch.flip(x, dims=(-1,)))
        pairs = zip(probs, flipped, strict=True)
        return tuple((p + torch.sigmoid(f.float())) / 2 for p, f in pairs)

    # -- training -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        data_findings = list(getattr(dm, "findings", None) or {})
        if stage == "fit" and dm is not None and data_findings != self.findings:
            raise ValueError(
                f"the data module's findings {data_findings} differ "
                f"from the model's {self.findings}: give both the same declaration "
                "(conf/data/base.yaml reads data.findings from model.findings)"
            )
        if stage != "fit" or self.hparams.pos_weight is None or dm is None:
            return
        if list(dm.regions) != self.regions:
            raise ValueError(f"data.regions {list(dm.regions)} != model heads {self.regions}")
        if self.hparams.pos_weight == "auto":
            # negatives/positives per head: one-vs-rest is about 1:4 with five balanced regions
            pos = torch.tensor(dm.positives(), dtype=torch.float32)
            n = float(dm.train_size())
            weight = ((n - pos) / pos.clamp(min=1)).clamp(1.0, 100.0)
        else:
            weight = torch.full((len(self.regions),), float(self.hparams.pos_weight))
        self.pos_weight = weight.to(self.pos_weight.device)
        log.info(
            "BCE pos_weight per head: %s", dict(zip(self.regions, weight.tolist(), strict=True))
        )

    def _loss(
        self, logits: torch.Tensor, labels: torch.Tensor, train: bool = False
    ) -> torch.Tensor:
        """Mean over heads and images of per-head BCE-with-logits. `train`: with the recipe's
        label smoothing and `other` film weight; validation and test losses use neither, so they
        stay comparable between recipes."""
        targets, weight, pos_weight = labels, None, self.pos_weight
        if train:
            other_weight = float(self.hparams.get("other_weight", 1.0))
            if other_weight != 1.0:
                other = (labels.sum(1, keepdim=True) == 0).to(logits.dtype)
                weight = (1 + (other_weight - 1) * other).float()  # (B, 1), broadcast over heads
            eps = float(self.hparams.get("label_smoothing", 0.0))
            if eps:
                targets = labels * (1 - eps) + eps / 2
                # pos_weight must weigh the positive *films*, not the positive part of every
                # soft target: BCE's pos_weight on a soft target y moves a negative film's
                # optimum from e/2 to pw*y/(pw*y + 1-y) (0.84 for a head with pw = 100, which
                # then fires on everything). As a per-film weight the optimum stays at e/2.
                film = torch.where(labels > 0.5, self.pos_weight, torch.ones_like(labels))
                weight = film if weight is None else film * weight
                pos_weight = None
        return F.binary_cross_entropy_with_logits(
            logits.float(), targets, weight=weight, pos_weight=pos_weight
        )

    # -- the head type's part of the loop (regionnet.model.loop) ---------------------------
    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._region_loss(batch, *self._all_logits(batch["image"]))

    def _region_loss(
        self, batch: dict, logits: torch.Tensor, finding_logits: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The region loss (with the recipe's smoothing and `other` weight), plus
        `finding_weight` x the finding heads' masked loss (`train/finding_loss`), of a batch's
        logits (`_all_logits`)."""
        loss = self._loss(logits, batch["labels"], train=True)
        if not self.findings:
            return loss, {}
        finding_loss = self.finding_loss(
            finding_logits, batch["finding_labels"], batch["finding_mask"]
        )
        loss = loss + float(self.hparams.get("finding_weight", 1.0)) * finding_loss
        return loss, {"finding_loss": finding_loss}

    def reset_metrics(self) -> None:
        for group in (self.metrics, self.finding_metrics, self.ordinal_metrics):
            for m in group.values():
                m.reset()

    def update_metrics(self, batch: dict, stage: str) -> dict:
        return self._update_from(batch, stage, *self._all_logits(batch["image"]))

    def _update_from(
        self, batch: dict, stage: str, logits: torch.Tensor, finding_logits: torch.Tensor
    ) -> dict:
        """`update_metrics` of a batch's logits (`_all_logits`)."""
        probs, finding_probs = self._probs_from(batch["image"], logits, finding_logits)
        labels = batch["labels"]
        if self.findings and "finding_labels" in batch:
            self._update_findings(stage, finding_probs, batch)
        # the loss goes through torchmetrics too (`stage/loss`): Lightning's sync_dist mean
        # is wrong when processes see unequal image counts (it averages an integer count);
        # it is the plain forward's, with or without tta
        loss = self._loss(logits, labels)
        self.metrics[stage].update(probs, labels, self.thresholds, loss)
        found = {"probs": probs.detach().cpu()}  # predict_batch's, from this pass
        if self.findings:
            found["finding_probs"] = finding_probs.detach().cpu()
        return found

    def _update_findings(self, stage: str, finding_probs: torch.Tensor, batch: dict) -> None:
        """Binary findings to `FindingMetrics`, ordinal ones to `OrdinalMetrics`."""
        labels, mask = batch["finding_labels"], batch["finding_mask"]
        if not self.ordinal_findings:  # binary only: columns as they were
            self.finding_metrics[stage].update(finding_probs, labels, mask, self.finding_thresholds)
            return
        cols = prob_slices(self.hparams.findings)
        binary = [self.findings.index(f) for f in self.binary_findings]
        if binary:
            self.finding_metrics[stage].update(
                torch.cat([finding_probs[:, cols[f]] for f in self.binary_findings], 1),
                labels[:, binary],
                mask[:, binary],
                self.finding_thresholds[binary],
            )
        ordinal = [self.findings.index(f) for f in self.ordinal_findings]
        self.ordinal_metrics[stage].update(
            {f: finding_probs[:, cols[f]] for f in self.ordinal_findings},
            labels[:, ordinal],
            mask[:, ordinal],
        )

    def end_stage(self, stage: str) -> dict[str, float]:
        metrics = self.metrics[stage]
        if not metrics.counts.update_count:
            return {}
        values = metrics.compute(stage)
        values.update(self._end_findings(stage))
        if f"{stage}/auroc_mean" in values:  # without binary findings: auroc_mean again
            heads = [*self.regions, *self.binary_findings]
            aurocs = [values[k] for h in heads if (k := f"{stage}/auroc/{h}") in values]
            values[f"{stage}/auroc_mean_all"] = sum(aurocs) / len(aurocs)
        if stage == "val" and "val/auroc_mean" not in values and not self.trainer.sanity_checking:
            self._no_val_auroc(values)
        curves = metrics.roc_curves()  # every rank computes (a sync); rank 0 logs
        other = metrics.other_probs()  # a sync too: every rank, whatever the method
        if not self.trainer.sanity_checking:
            self._log_roc(stage, curves)
            if stage == "val":
                self._calibrate(curves, values, other)
        metrics.reset()
        return values

    def _end_findings(self, stage: str) -> dict[str, float]:
        """The finding metrics of a stage; on validation (not the sanity check) each finding's
        threshold is chosen on its ROC points (`threshold_method`; `rejection@X`, a rule for
        region heads, gives Youden's)."""
        if not self.findings:
            return {}
        metrics = self.finding_metrics[stage]
        binary = bool(self.binary_findings)  # no binary finding: nothing to compute there
        values = metrics.compute(stage) if binary else {}
        if self.ordinal_findings:
            ordinal = self.ordinal_metrics[stage]
            values.update(ordinal.compute(stage))
            confusion = ordinal.confusion()  # a sync: every rank
            if not self.trainer.sanity_checking:
                from regionnet.loggers import log_grade_confusion

                log_grade_confusion(
                    self.loggers, stage, confusion, self.ordinal_findings, self.global_step
                )
            ordinal.reset()
        curves = metrics.roc_curves() if binary else {}
        if stage == "val" and not self.trainer.sanity_checking:
            method = self.hparams.threshold_method
            if parse_method(method)[0] == "rejection":
                method = "youden"
            chosen = self.finding_thresholds.tolist()
            for k, f in enumerate(self.findings):
                if f in curves:
                    t = choose_threshold(*curves[f], method)
                    chosen[k] = chosen[k] if t is None else t
            self.finding_thresholds.copy_(torch.tensor(chosen, dtype=torch.float32))
            log.info(
                "finding thresholds (%s on validation): %s",
                method,
                dict(zip(self.findings, chosen, strict=True)),
            )
        metrics.reset()
        return values

    def _calibrate(self, curves: dict, values: dict[str, float], other: torch.Tensor) -> None:
        """Each head's threshold from this validation pass (`threshold_method`); the checkpoint
        saved after it carries them. `other`: the probabilities (N, R) of the validation films
        with no positive label."""
        method = self.hparams.threshold_method
        chosen, note = calibrate(
            method,
            self.regions,
            {r: curves[r] for r in self.regions if f"val/auroc/{r}" in values},
            other,
            self.thresholds.tolist(),
            self.hparams.get("thresholds"),
        )
        no_other = parse_method(method)[0] == "rejection" and len(other) == 0
        (log.warning if no_other else log.info)(note)
        self.thresholds.copy_(torch.tensor(chosen, dtype=self.thresholds.dtype))

    def _no_val_auroc(self, values: dict[str, float]) -> None:
        """A validation pass where no head saw both classes has no val/auroc_mean; where a
        callback monitors it (best checkpoint, early stopping), say why and what to change
        instead of Lightning's 'metric not available'."""
        monitors = {getattr(cb, "monitor", None) for cb in self.trainer.callbacks}
        if "val/auroc_mean" not in monitors:
            return
        raise ValueError(
            f"the validation split ({int(values.get('val/images', 0))} readable films) has no "
            "head with both positive and negative films, so val/auroc_mean, which the best "
            "checkpoint and early stopping follow, cannot be computed. Give the validation split "
            "films of at least two regions: more films or patients, a larger validation share "
            "(data.split_fractions), or check the patient grouping (a DICOM folder groups its "
            "films by PatientID)"
        )

    def _log_roc(self, stage: str, curves: dict) -> None:
        from regionnet.loggers import log_roc_curves

        points = {r: (fpr.tolist(), tpr.tolist()) for r, (fpr, tpr, _) in curves.items()}
        log_roc_curves(self.loggers, stage, points, self.global_step)

    def predict_batch(self, batch: dict) -> dict:
        """Probabilities per head of a batch's readable films: "probs" (B, R) float tensor on
        CPU, and with finding heads "finding_probs" (B, P) (`inference_all`)."""
        if self.findings:
            probs, finding_probs = (p.cpu() for p in self.inference_all(batch["image"]))
            return {"probs": probs, "finding_probs": finding_probs}
        return {"probs": self.inference_proba(batch["image"]).cpu()}

    def empty_prediction(self) -> dict:
        out = {"probs": torch.empty(0, len(self.regions))}
        if self.findings:
            out["finding_probs"] = torch.empty(0, sum(prob_widths(self.hparams.findings)))
        return out

    # -- weight averaging (callbacks.ema) ---------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A weight-averaging callback (Lightning's EMAWeightAveraging; it runs first) puts the
        # averaged weights into `state_dict` and the trained ones into `current_model_state`.
        # It averages every buffer too, but thresholds and pos_weight are no weights: keep the
        # ones chosen on this validation pass (on the averaged weights) and the loss's.
        if "current_model_state" in checkpoint:
            for name in ("thresholds", "pos_weight", "finding_thresholds"):
                if name in checkpoint["state_dict"]:
                    checkpoint["state_dict"][name] = getattr(self, name).detach().clone()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        for key in ("state_dict", "current_model_state"):  # checkpoints from before `net`
            if key in checkpoint:
                checkpoint[key] = legacy_state_dict(checkpoint[key])
        # Outside a fit (validate/test/predict with ckpt_path=, as `train` does with best.ckpt)
        # a checkpoint written under weight averaging means its averaged weights, the ones its
        # metrics were measured on. Lightning's callback would load the trained ones into the
        # model and swap the averaged ones in for validation only, so test and predict would
        # see other weights than validation; resuming a fit still restores both.
        trainer = self._trainer
        if (
            trainer is not None
            and "current_model_state" in checkpoint
            and trainer.state.fn != TrainerFn.FITTING
        ):
            checkpoint["current_model_state"] = checkpoint["state_dict"]

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.net.heads.parameters(), *self.net.finding_heads.parameters()]


def load_regionnet(ckpt_path: str | Path, device: str | torch.device = "cpu") -> RegionNet:
    """A trained RegionNet from a `.ckpt`, in eval mode on `device`. Never downloads or reads
    ImageNet weights again: the checkpoint holds every weight. Read with `weights_only=True`:
    a file that would need code to unpickle is refused (`UnsafeCheckpointError`)."""
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={str(path)!r} does not exist; give a checkpoint written by "
            "regionnet-train, e.g. ckpt_path=outputs/train/runs/RUN/checkpoints/best.ckpt"
        )
    try:
        model = RegionNet.load_from_checkpoint(
            path, map_location="cpu", weights_only=True, pretrained=False, weights_file=None
        )
    except pickle.UnpicklingError as e:  # torch's message advises weights_only=False: never
        raise refuse_file(path, "ckpt_path", e) from None
    except Exception as e:  # torch/Lightning say "zip archive" or "KeyError"; name the file
        if "weights_only" in str(e):
            raise refuse_file(path, "ckpt_path", e) from None
        if _task_of(path) == "multi":
            raise ValueError(
                f"ckpt_path={str(path)!r} holds region heads with landmark or box parts "
                "(task=multi): load it with regionnet.load_model, regionnet-predict or "
                "regionnet-eval"
            ) from None
        raise ValueError(
            f"ckpt_path={str(path)!r} is not a RegionNet checkpoint ({type(e).__name__}: {e})"
        ) from e
    return model.to(device).eval()


def _task_of(path: Path) -> str | None:
    """`checkpoint_task`, None for a file that cannot be read at all."""
    try:
        return checkpoint_task(path)
    except Exception:
        return None
