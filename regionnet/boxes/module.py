"""BoxNet: the Lightning module of the box head type (issue 18), vertebra detection.

It trains torchvision's FCOS on a timm backbone and FPN (`regionnet.boxes.model`) on the
vertebra boxes of `regionnet.boxes.data.BoxDataModule`: one class per vertebra level (T1..L5 on
`spine_aasce`), so a box says which vertebra it is. These are vertebrae, not lesions.

Training logs the detector's losses (`train/loss` = their sum, `train/loss_classification`,
`train/loss_bbox_regression`, `train/loss_bbox_ctrness`). Validation and test run the detector
in eval mode, map its boxes from the letterbox back to each film's pixels and score them with
`torchmetrics.detection.MeanAveragePrecision` (COCO rules, `faster_coco_eval` backend) against
the un-augmented boxes in film pixels: `stage/map` (mAP@[.5:.95]), `stage/map_50`,
`stage/map_75`, `stage/mar_100`, and per level `stage/ap/<level>` (AP@[.5:.95]) and
`stage/ap_50/<level>` (AP@0.5, from a second metric at IoU 0.5 alone). The best checkpoint
follows `val/map_50` (higher is better).

Under DDP each process keeps its films' boxes and, at the end of the stage, all processes
exchange them in one `all_gather_object` and score the same whole set: torchmetrics' own sync
of MeanAveragePrecision gathers its per-film list states one tensor at a time, which hangs or
fails when processes saw different numbers of films (the unpadded sampler of odd splits).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchmetrics.detection import MeanAveragePrecision

from regionnet.boxes.model import build_box_network
from regionnet.data.transforms import GRAY_MEAN, GRAY_STD
from regionnet.io import INTENSITY
from regionnet.landmarks.coords import to_original
from regionnet.model.loop import HeadLoop, check_intensity

log = logging.getLogger(__name__)

MONITOR = "val/map_50"
SUMMARY = ("map", "map_50", "map_75", "mar_100")


def box_metric(iou_thresholds: Sequence[float] | None = None) -> MeanAveragePrecision:
    """COCO box mAP in [x1, y1, x2, y2] pixels, per class too (`class_metrics`); it never syncs
    across processes itself (`gather_films` gives it every process's films)."""
    # faster_coco_eval logs its 24-line COCO table at INFO on every compute; we log the numbers
    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
    return MeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        iou_thresholds=None if iou_thresholds is None else list(iou_thresholds),
        class_metrics=True,
        backend="faster_coco_eval",
        sync_on_compute=False,
    )


def gather_films(items: list) -> list:
    """Every process's items in rank order (one `all_gather_object`, whatever each process
    holds, none included); the items themselves outside DDP."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def to_film_pixels(found: list[dict], batch: dict) -> list[dict]:
    """A detector's per-film boxes (input pixels) mapped through each film's letterbox
    (`scale`, `offset`) to its own pixels and clamped to it (`size`; a box may reach into the
    letterbox's pad), in place; returns `found`."""
    for k, d in enumerate(found):
        boxes = boxes_to_original(d["boxes"], batch["scale"][k], batch["offset"][k])
        if "size" in batch:
            w, h = (float(v) for v in batch["size"][k])
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        d["boxes"] = boxes
    return found


def score_films(
    films: list, metric, metric_50, names: Sequence[str], stage: str
) -> dict[str, float]:
    """`map_values` of a stage's (prediction, truth) per film, every process's
    (`gather_films`: each process scores them all); the metrics reset after; {} without
    films."""
    films = gather_films(films)
    if not films:
        return {}
    preds, targets = [p for p, _ in films], [t for _, t in films]
    for m in (metric, metric_50):
        m.update(preds, targets)
    values = map_values(metric.compute(), metric_50.compute(), names, stage)
    metric.reset()
    metric_50.reset()
    return values


def boxes_to_original(boxes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor):
    """Input-pixel boxes (N, 4) of one film -> its own pixels, through the letterbox's
    per-axis `scale` (2,) and `offset` (2,) (`regionnet.landmarks.coords`)."""
    corners = to_original(boxes.float().reshape(-1, 2), scale.float(), offset.float())
    return corners.reshape(-1, 4)


class BoxNet(HeadLoop):
    """Vertebra detection with FCOS (see the module docstring); the loop is `HeadLoop`'s."""

    task = "boxes"
    monitor = MONITOR
    monitor_mode = "max"

    def __init__(
        self,
        box_names: Sequence[str],
        dataset: str | None = None,
        backbone: str = "resnet18",
        pretrained: bool = False,
        weights_file: str | None = None,
        in_chans: int = 1,
        drop_path_rate: float = 0.0,
        fpn_width: int = 128,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        optimizer: Mapping | None = None,
        scheduler: Mapping | None = None,
        scheduler_interval: str = "epoch",
        backbone_lr_scale: float = 1.0,
        channels_last: bool = False,
        compile: bool = False,
        image_size: int = 256,
        mean: float = GRAY_MEAN,
        std: float = GRAY_STD,
        intensity: str = INTENSITY,
        weights_source: Mapping | None = None,
    ):
        super().__init__()
        names = [str(n) for n in box_names]
        if not names:
            raise ValueError("a box model needs box_names (from the data module)")
        check_intensity(intensity)
        if not 0.0 <= float(score_thresh) < 1.0 or not 0.0 < float(nms_thresh) <= 1.0:
            raise ValueError(
                f"model.score_thresh={score_thresh} must be in [0, 1) and model.nms_thresh="
                f"{nms_thresh} in (0, 1]"
            )
        if int(fpn_width) % 32 or int(fpn_width) < 64:
            raise ValueError(
                f"model.fpn_width={fpn_width}: use a multiple of 32, at least 64 (FCOS's head "
                "normalises in 32 groups, and P7 can be a single cell)"
            )
        self.save_hyperparameters()
        self.hparams["box_names"] = names
        self.box_names = names
        self.net, source = build_network(self.hparams)
        if pretrained or weights_file or not weights_source:
            weights_source = source
        self.hparams["weights_source"] = dict(weights_source)
        stages = ("val", "test")
        self.metrics = nn.ModuleDict({s: box_metric() for s in stages})
        self.metrics_50 = nn.ModuleDict({s: box_metric([0.5]) for s in stages})
        # this process's (prediction, truth) per film of the stage, scored at its end
        self.films: dict[str, list] = {s: [] for s in stages}

    @property
    def image_size(self) -> int:
        return int(self.hparams.image_size)

    # -- inference ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per film {"boxes" (N, 4) input pixels, "scores" (N,), "labels" (N,) 1..V}, from
        the detector in eval mode (score threshold, NMS, top detections)."""
        return self.net(x)

    def detect(self, batch: dict) -> list[dict[str, torch.Tensor]]:
        """`forward` of a batch's films with the boxes in each film's own pixels."""
        return to_film_pixels(self.net(batch["image"]), batch)

    # -- the head type's part of the loop (regionnet.model.loop) ---------------------------
    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The sum of FCOS's losses, and each of them (`train/loss_classification`, ...)."""
        targets = [{"boxes": b, "labels": c}
                   for b, c in zip(batch["boxes"], batch["box_labels"], strict=True)]  # fmt: skip
        losses = self.net(batch["image"], targets)
        return sum(losses.values()), {f"loss_{k}": v for k, v in losses.items()}

    def reset_metrics(self) -> None:
        for m in (*self.metrics.values(), *self.metrics_50.values()):
            m.reset()
        for films in self.films.values():
            films.clear()

    def update_metrics(self, batch: dict, stage: str) -> dict:
        found = self.detect(batch)
        truth = zip(batch["boxes_px"], batch["box_labels_px"], strict=True)
        for d, (b, c) in zip(found, truth, strict=True):
            pred = {k: d[k].detach().cpu() for k in ("boxes", "scores", "labels")}
            self.films[stage].append((pred, {"boxes": b.cpu(), "labels": c.cpu()}))
        return self._outputs(batch, found)

    def end_stage(self, stage: str) -> dict[str, float]:
        films, self.films[stage] = self.films[stage], []
        metrics = (self.metrics[stage], self.metrics_50[stage])
        return score_films(films, *metrics, self.box_names, stage)  # the same on every process

    def predict_batch(self, batch: dict) -> dict:
        """Boxes of a batch's readable films in their own pixels: "boxes", "scores", "labels":
        per film CPU tensors (N, 4), (N,), (N,) (labels 1..V, `box_names` order), "size"
        (B, 2); labelled batches also pass their truth on ("boxes_px", "box_labels_px")."""
        return self._outputs(batch, self.detect(batch))

    def _outputs(self, batch: dict, found: list[dict[str, torch.Tensor]]) -> dict:
        """`predict_batch`'s dict from `detect`'s output for the batch."""
        out = {key: [d[key].detach().cpu() for d in found] for key in ("boxes", "scores", "labels")}
        out["size"] = batch["size"].cpu()
        for key in ("boxes_px", "box_labels_px"):
            if key in batch:
                out[key] = [t.cpu() for t in batch[key]]
        return out

    def empty_prediction(self) -> dict:
        return {"boxes": [], "scores": [], "labels": []}

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything but the timm backbone: FPN and FCOS head train at the full rate."""
        return [p for n, p in self.net.named_parameters()
                if not n.startswith("backbone.backbone.")]  # fmt: skip


def build_network(h: Mapping):
    """The FCOS network of a BoxNet's hyperparameters and its weights' source."""
    return build_box_network(
        h["backbone"],
        len(h["box_names"]),
        h["image_size"],
        h["pretrained"],
        h["weights_file"],
        h["in_chans"],
        h["drop_path_rate"],
        h["fpn_width"],
        h["score_thresh"],
        h["nms_thresh"],
        h["detections_per_img"],
        h["topk_candidates"],
        h["channels_last"],
    )


def map_values(
    result: Mapping, result_50: Mapping, names: Sequence[str], stage: str
) -> dict[str, float]:
    """Plain floats from `MeanAveragePrecision.compute()` (all IoUs) and its IoU-0.5 twin:
    `stage/<summary>` and per level `stage/ap/<name>`, `stage/ap_50/<name>` (a level with no
    true box and no detection has none: COCO gives -1 there)."""
    values = {f"{stage}/{k}": float(result[k]) for k in SUMMARY if k in result}
    for key, res in (("ap", result), ("ap_50", result_50)):
        classes = torch.as_tensor(res["classes"]).reshape(-1).tolist()
        per = torch.as_tensor(res["map_per_class"]).reshape(-1).tolist()
        for c, v in zip(classes, per, strict=True):
            if 1 <= int(c) <= len(names) and v >= 0:
                values[f"{stage}/{key}/{names[int(c) - 1]}"] = float(v)
    return values
