"""Head-type parts that read a shared backbone's feature maps: landmarks and boxes.

A part is a plain `nn.Module` on the stride-8..32 maps of the one timm trunk that the region
and finding heads read pooled (`RegionClassifier.forward_maps`: one backbone pass gives both).
It owns its neck and head, its masked loss, its metrics and its outputs; `MultiNet`
(`regionnet.compose.module`) composes parts with the region heads and runs the one loop
(`HeadLoop`). The pieces are the landmark and box head types' own, not copies:

- `LandmarkPart`: the landmark task's `LandmarkHead` (FPN, one heatmap per landmark, DSNT),
  `dsnt_loss` and `LandmarkMetrics` (step 1; the two-step refiner stays in `task=landmarks`).
- `BoxPart`: the box task's FPN with P6/P7 (`box_fpn`) inside torchvision's FCOS
  (`fcos_detector`: its anchors, losses, decoding and NMS), COCO mAP (`box_metric`).

Batches are `regionnet.compose.data`'s: every film has `image` and region `labels`; films of
the landmark set also have points (`points` normalised, `points_px` in film pixels, `visible`)
and, for vertebrae, boxes; `has_points` (B,) marks them. A film without points gives these
parts zero loss and zero gradient, and never enters their metrics.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList

from regionnet.boxes.model import box_feature_indices, box_fpn, fcos_detector
from regionnet.boxes.module import box_metric, score_films, to_film_pixels
from regionnet.landmarks.coords import from_normalised, to_original
from regionnet.landmarks.metrics import LandmarkMetrics
from regionnet.landmarks.model import LandmarkHead, dsnt_loss, feature_indices

STAGES = ("val", "test", "external")


def _channels(backbone: nn.Module, indices: Sequence[int]) -> list[int]:
    return [int(backbone.feature_info[i]["num_chs"]) for i in indices]


def _original(points_n: torch.Tensor, batch: Mapping, size: int) -> torch.Tensor:
    """Normalised input coordinates (B, K, 2) -> each film's own pixels (its letterbox)."""
    points = from_normalised(points_n.float(), size)
    return to_original(points, batch["scale"].float(), batch["offset"].float())


class LandmarkPart(nn.Module):
    """Landmarks (DSNT) on the trunk's maps from `stride` down (module docstring).

    `names`: the landmark set's point names in order; `skeleton`: "vertebrae" (4 corners per
    vertebra, Cobb angles) or "points"; `region`: the region head whose films the landmarks
    belong to (`hand` for hand_dha), or None (films of no region head, e.g. spines)."""

    kind = "landmarks"

    def __init__(
        self,
        backbone: nn.Module,
        names: Sequence[str],
        skeleton: str,
        image_size: int,
        stride: int = 8,
        width: int = 128,
        sigma: float = 1.0,
        js_weight: float = 1.0,
    ):
        super().__init__()
        self.names = [str(n) for n in names]
        self.skeleton = skeleton
        self.image_size = int(image_size)
        self.sigma, self.js_weight = float(sigma), float(js_weight)
        self.indices = feature_indices(backbone, stride)
        self.head = LandmarkHead(_channels(backbone, self.indices), len(self.names), width)
        self.metrics = nn.ModuleDict({s: LandmarkMetrics(skeleton) for s in STAGES})

    def forward(self, maps: Mapping[int, torch.Tensor], image: torch.Tensor):
        """(coords (B, K, 2) normalised input coordinates, heatmaps (B, K, h, w))."""
        return self.head([maps[i] for i in self.indices])

    def loss(self, out, batch: Mapping) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DSNT's loss over the visible points; films without points have none visible."""
        coords, heat = out
        visible = batch["visible"] & batch["has_points"][:, None]
        loss = dsnt_loss(coords, heat, batch["points"], visible, self.sigma, self.js_weight)
        return loss, {"loss_landmarks": loss}

    def update(self, out, batch: Mapping, stage: str) -> dict:
        """The films with points into the stage's metrics; `outputs` of the whole batch."""
        own = batch["has_points"]
        if not own.any():
            return self.outputs(out, batch)
        pred = _original(out[0], batch, self.image_size)[own]
        heights = batch["size"][own, 1] if "size" in batch else None
        cobb = batch["cobb"][own] if "cobb" in batch else None
        self.metrics[stage].update(
            pred, batch["points_px"][own], batch["visible"][own], cobb, heights
        )
        return self.outputs(out, batch)

    def compute(self, stage: str) -> dict[str, float]:
        """`stage/landmarks/<metric>` (the landmark task's names under `landmarks/`)."""
        metric = self.metrics[stage]
        if not metric.update_count:
            return {}
        values = metric.compute_all(stage)
        metric.reset()
        return {k.replace(f"{stage}/", f"{stage}/landmarks/", 1): v for k, v in values.items()}

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()

    def outputs(self, out, batch: Mapping) -> dict:
        """{"points": (B, K, 2) CPU float, each film's own pixels, "size": (B, 2) their width
        and height}; labelled batches also pass their truth on ("has_points", "points_px",
        "visible", "cobb")."""
        found = {"points": _original(out[0], batch, self.image_size).detach().cpu()}
        for key in ("size", "has_points", "points_px", "visible", "cobb"):
            if key in batch:
                found[key] = batch[key].cpu()
        return found

    def empty(self) -> dict:
        return {"points": torch.empty(0, len(self.names), 2)}

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())


class BoxPart(nn.Module):
    """Boxes (torchvision FCOS) on the trunk's stride-8/16/32 maps (module docstring): one
    class per name (`names`: vertebra levels, T1..L5 on spine_aasce; vertebrae, not lesions)."""

    kind = "boxes"

    def __init__(
        self,
        backbone: nn.Module,
        names: Sequence[str],
        image_size: int,
        in_chans: int = 1,
        width: int = 128,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
    ):
        super().__init__()
        self.names = [str(n) for n in names]
        self.image_size = int(image_size)
        self.indices = box_feature_indices(backbone)
        neck = MapsFPN(_channels(backbone, self.indices), width)
        self.detector = fcos_detector(
            neck, len(self.names), image_size, in_chans, score_thresh, nms_thresh,
            detections_per_img, topk_candidates,
        )  # fmt: skip
        self.metrics = nn.ModuleDict({s: box_metric() for s in STAGES})
        self.metrics_50 = nn.ModuleDict({s: box_metric([0.5]) for s in STAGES})
        self.films: dict[str, list] = {s: [] for s in STAGES}

    def forward(self, maps: Mapping[int, torch.Tensor], image: torch.Tensor) -> dict:
        """FCOS's head outputs and anchors on the FPN of `maps` (what `FCOS.forward` computes
        between its backbone and its loss or decoding)."""
        d = self.detector
        features = list(d.backbone([maps[i] for i in self.indices]).values())
        sizes = [tuple(image.shape[-2:])] * len(image)
        anchors = d.anchor_generator(ImageList(image, sizes), features)
        return {
            "head": d.head(features),
            "anchors": anchors,
            "per_level": [f.size(2) * f.size(3) for f in features],
            "sizes": sizes,
        }

    def loss(self, out: Mapping, batch: Mapping) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """FCOS's summed losses over the films with boxes (`has_points`); 0, still attached
        to the graph, when the batch has none."""
        own = batch["has_points"].nonzero().flatten().tolist()
        if not own:
            zero = sum(v.sum() for v in out["head"].values()) * 0.0
            return zero, {}
        targets = [{"boxes": batch["boxes"][k], "labels": batch["box_labels"][k]} for k in own]
        head = {k: v[own] for k, v in out["head"].items()}
        anchors = [out["anchors"][k] for k in own]
        losses = self.detector.compute_loss(targets, head, anchors, out["per_level"])
        total = sum(losses.values())
        return total, {"loss_boxes": total, **{f"loss_boxes_{k}": v for k, v in losses.items()}}

    def detect(self, out: Mapping, batch: Mapping) -> list[dict[str, torch.Tensor]]:
        """Per film {"boxes" (N, 4) in its own pixels, "scores", "labels" 1..V}: FCOS's
        decoding, score threshold and NMS (`postprocess_detections`), then the letterbox."""
        per_level = out["per_level"]
        head = {k: list(v.split(per_level, dim=1)) for k, v in out["head"].items()}
        anchors = [list(a.split(per_level)) for a in out["anchors"]]
        found = self.detector.postprocess_detections(head, anchors, out["sizes"])
        return to_film_pixels(found, batch)

    def update(self, out: Mapping, batch: Mapping, stage: str) -> dict:
        """The films with boxes into the stage's mAP; `outputs` of the whole batch."""
        found = self.detect(out, batch)
        for k in batch["has_points"].nonzero().flatten().tolist():
            pred = {key: found[k][key].detach().cpu() for key in ("boxes", "scores", "labels")}
            truth = {"boxes": batch["boxes_px"][k].cpu(), "labels": batch["box_labels_px"][k].cpu()}
            self.films[stage].append((pred, truth))
        return self._outputs(found, batch)

    def compute(self, stage: str) -> dict[str, float]:
        """`stage/boxes/<map, map_50, ...>`, `stage/boxes/ap[_50]/<name>` (`map_values`)."""
        films, self.films[stage] = self.films[stage], []
        metrics = (self.metrics[stage], self.metrics_50[stage])
        values = score_films(films, *metrics, self.names, stage)
        return {k.replace(f"{stage}/", f"{stage}/boxes/", 1): v for k, v in values.items()}

    def reset(self) -> None:
        for m in (*self.metrics.values(), *self.metrics_50.values()):
            m.reset()
        for films in self.films.values():
            films.clear()

    def outputs(self, out: Mapping, batch: Mapping) -> dict:
        """{"boxes", "scores", "labels"}: per film CPU tensors in its own pixels; labelled
        batches also pass their truth on ("boxes_px", "box_labels_px")."""
        return self._outputs(self.detect(out, batch), batch)

    @staticmethod
    def _outputs(found: list[dict[str, torch.Tensor]], batch: Mapping) -> dict:
        keys = ("boxes", "scores", "labels")
        out = {key: [d[key].detach().cpu() for d in found] for key in keys}
        for key in ("boxes_px", "box_labels_px"):
            if key in batch:
                out[key] = [t.cpu() for t in batch[key]]
        return out

    def empty(self) -> dict:
        return {"boxes": [], "scores": [], "labels": []}

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())


class MapsFPN(nn.Module):
    """`box_fpn` over maps already computed (the trunk's C3..C5): FCOS's backbone interface
    (`out_channels`; maps -> OrderedDict P3..P7), without a backbone of its own."""

    def __init__(self, in_channels: list[int], width: int):
        super().__init__()
        self.fpn = box_fpn(in_channels, width)
        self.out_channels = width

    def forward(self, maps: Sequence[torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))
