"""MultiNet: region (and finding) heads composed with landmark and box parts on one trunk.

One timm backbone, one pass per film: its pooled features feed the region heads and finding
heads (`RegionNet`, unchanged), its stride-8..32 maps feed the parts
(`regionnet.compose.parts`: `LandmarkPart`, `BoxPart`), all in one checkpoint, trained on one
loop (`HeadLoop`) by one summed loss: the region loss (+ `finding_weight` x the findings'
masked loss) + each part's `weight` x its loss, masked to the films that carry its targets.
`task=multi` (conf/task/multi.yaml) composes it with `regionnet.compose.data.MultiDataModule`
(region films and a landmark set in one table).

Declared in `model.parts` (a part left out or null is not built):

    parts:
      landmarks: {stride: 8, width: 128, sigma: 1.0, js_weight: 1.0, weight: 1.0}
      boxes: {width: 128, score_thresh: 0.05, nms_thresh: 0.6, weight: 1.0}   # vertebrae only

What a part needs from the data (landmark names, skeleton, flip pairs, the landmark set's
region, box names) comes from the data module (`run.build_model`) and stays in the checkpoint.
Metrics: the region task's (`stage/auroc/<region>`, `stage/auroc_mean`: the monitor), the
landmark part's under `stage/landmarks/...` (e.g. `val/landmarks/mre_pct`), the box part's
under `stage/boxes/...` (e.g. `val/boxes/map_50`). Outputs per film: `probs` (and
`finding_probs`), `points` in the film's pixels, `boxes`/`scores`/`labels`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from regionnet.compose.parts import BoxPart, LandmarkPart
from regionnet.model.module import RegionNet

#: part name -> (its class, the settings it takes besides `weight`)
PARTS = {
    "landmarks": (LandmarkPart, ("stride", "width", "sigma", "js_weight")),
    "boxes": (
        BoxPart,
        ("width", "score_thresh", "nms_thresh", "detections_per_img", "topk_candidates"),
    ),
}


def validate_parts(parts: Mapping | None) -> dict[str, dict]:
    """`model.parts` as plain dicts, null entries dropped; unknown parts, unknown settings and
    negative weights refused with the key to fix."""
    out = {}
    for name, spec in dict(parts or {}).items():
        if spec is None:
            continue
        if name not in PARTS:
            raise ValueError(f"model.parts.{name}: unknown part; use {sorted(PARTS)}")
        spec = dict(spec)
        unknown = set(spec) - {"weight", *PARTS[name][1]}
        if unknown:
            raise ValueError(
                f"model.parts.{name} has unknown settings {sorted(unknown)}; it takes weight and "
                f"{list(PARTS[name][1])}"
            )
        if not float(spec.get("weight", 1.0)) >= 0.0:
            raise ValueError(f"model.parts.{name}.weight={spec['weight']!r}: use a weight >= 0")
        out[name] = spec
    if not out:
        raise ValueError(
            "model.parts declares no part: give landmarks (and boxes for vertebrae), or train "
            "region heads alone with task=regions"
        )
    return out


def one_pass(
    net: nn.Module, parts: Mapping[str, nn.Module], x: torch.Tensor, findings: bool
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(region logits (B, R), finding logits (B, L), each of `parts`' raw outputs) from one
    pass of `net` (a `RegionClassifier`) over `x`: the maps every part reads
    (`forward_maps`), the region and finding heads on its pooled features. Plain (no
    Lightning), so the ONNX export traces it too (`regionnet.export.ProbabilityModel`)."""
    indices = sorted({i for p in parts.values() for i in p.indices})
    features, maps = net.forward_maps(x, indices, findings=findings)
    logits, finding_logits = net.logits_from(features)
    return logits, finding_logits, {n: p(maps, x) for n, p in parts.items()}


class MultiNet(RegionNet):
    """Region and finding heads plus landmark/box parts on one backbone (module docstring)."""

    task = "multi"

    def __init__(
        self,
        *args,
        parts: Mapping | None = None,
        landmark_names: Sequence[str] = (),
        skeleton: str = "points",
        flip_pairs: Sequence[Sequence[int]] | None = None,
        dataset: str | None = None,
        landmark_region: str | None = None,
        box_names: Sequence[str] = (),
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        spec = validate_parts(parts)
        if not self.net.shared or self.hparams.get("finding_backbone", "shared") != "shared":
            raise ValueError(
                "model.parts read the one shared backbone: use model.shared_backbone=true and "
                "model.finding_backbone=shared"
            )
        if landmark_region is not None and landmark_region not in self.regions:
            raise ValueError(
                f"the landmark films' region {landmark_region!r} has no head in {self.regions}"
            )
        names = [str(n) for n in landmark_names]
        if not names:
            raise ValueError("model.parts need the landmark set's names (from the data module)")
        if "boxes" in spec and not box_names:
            raise ValueError(
                "model.parts.boxes needs box names: vertebra boxes come from a spine landmark "
                "set (data.landmarks.dataset=spine_aasce or phantom)"
            )
        self.hparams.update(
            parts=spec,
            landmark_names=names,
            flip_pairs=[list(map(int, p)) for p in (flip_pairs or [])],
            box_names=[str(n) for n in box_names],
        )
        self.landmark_names = names
        self.landmark_region = landmark_region
        backbone = next(iter(self.net.backbones.values()))
        size, h = self.image_size, self.hparams
        built = {}
        for name, settings in spec.items():
            cls, keys = PARTS[name]
            options = {k: settings[k] for k in keys if k in settings}
            if name == "landmarks":
                built[name] = cls(backbone, names, skeleton, size, **options)
            else:
                built[name] = cls(backbone, box_names, size, int(h.in_chans), **options)
        self.parts = nn.ModuleDict(built)
        self.part_weights = {n: float(s.get("weight", 1.0)) for n, s in spec.items()}

    @property
    def image_size(self) -> int:
        return int(self.hparams.image_size)

    # -- the one pass -----------------------------------------------------------------------
    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(region logits (B, R), finding logits (B, L), each part's raw outputs) from one
        backbone pass."""
        return one_pass(self.net, self.parts, x, bool(self.findings))

    # -- the head type's part of the loop (regionnet.model.loop) ----------------------------
    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The region (and finding) loss + each part's weight x its masked loss; each term is
        logged (`train/loss_landmarks`, `train/loss_boxes`, ...)."""
        logits, finding_logits, outs = self.forward_all(batch["image"])
        loss, terms = self._region_loss(batch, logits, finding_logits)
        terms = {**terms, "loss_regions": loss}
        for name, part in self.parts.items():
            part_loss, part_terms = part.loss(outs[name], batch)
            loss = loss + self.part_weights[name] * part_loss
            terms.update(part_terms)
        return loss, terms

    def update_metrics(self, batch: dict, stage: str) -> dict:
        logits, finding_logits, outs = self.forward_all(batch["image"])
        found = self._update_from(batch, stage, logits, finding_logits)
        for name, part in self.parts.items():
            found.update(part.update(outs[name], batch, stage))
        return found

    def end_stage(self, stage: str) -> dict[str, float]:
        values = super().end_stage(stage)
        for part in self.parts.values():
            values.update(part.compute(stage))
        return values

    def reset_metrics(self) -> None:
        super().reset_metrics()
        for part in self.parts.values():
            part.reset()

    def predict_batch(self, batch: dict) -> dict:
        """`RegionNet.predict_batch`'s "probs" (and "finding_probs") and each part's outputs
        in the films' own pixels ("points"; "boxes", "scores", "labels"); the batch needs the
        letterbox (`scale`, `offset`, `size`: `regionnet.landmarks.infer`'s reader)."""
        logits, finding_logits, outs = self.forward_all(batch["image"])
        probs, finding_probs = self._probs_from(batch["image"], logits, finding_logits)
        found = {"probs": probs.cpu()}
        if self.findings:
            found["finding_probs"] = finding_probs.cpu()
        for name, part in self.parts.items():
            found.update(part.outputs(outs[name], batch))
        return found

    def empty_prediction(self) -> dict:
        out = super().empty_prediction()
        for part in self.parts.values():
            out.update(part.empty())
        return out

    def head_parameters(self) -> list[nn.Parameter]:
        """Region and finding heads and every part (neck and head) at the full rate; the
        backbone at `backbone_lr_scale` x it."""
        return [*super().head_parameters(), *self.parts.parameters()]
