"""LandmarkNet: the Lightning module of the landmark head type (issue 17, Cina et al. 2021).

It trains a `LandmarkNetwork` (timm backbone -> FPN -> one heatmap per landmark -> DSNT) and,
with `refine=true`, a second one (`refiner`) on crops around each point group: step 1 finds
every landmark on the whole film, step 2 places each vertebra's four corners again on a crop
around them and maps them back (`roi_align` crops; `from_crops`). Step 2 trains on crops around
the true points shifted and scaled by up to `refine_jitter` of the crop side (step 1's typical
error), and runs on crops around step 1's points.

Where step 2 crops from: with `detail_size` D (`conf/model/dsnt.yaml`: `data.detail_size`), from
the batch's `detail` image, the film at D x D in the input's frame (`regionnet.landmarks.data`;
the S x S input is it pooled, `coords.detail_to_input`), so a crop sees the vertebra at D/S
times the input's resolution: at S = 256 a vertebra is ~11 px tall, and Cina's 2 % of its size
is 0.2 input px; at D = 1024, 0.9 px. The boxes stay in input pixels (`roi_align`'s
`spatial_scale` = D/S), `refine_size` is the crop's side in crop pixels, and everything after
the crop is unchanged. Without `detail_size` (models trained before it, `detail_size: null`)
step 2 crops from the input itself.

Batches come from `regionnet.landmarks.data.LandmarkDataModule`: `points` are normalised input
coordinates in [-1, 1] (align_corners=False), `points_px` the truth in the stored film's pixels,
`scale`/`offset` the letterbox (x_in = x_orig * scale + offset). Metrics (`LandmarkMetrics`)
are measured in original pixels: `stage/mre_px`, `stage/mre_pct`, `stage/err_{x,y}_{median,
mean}_pct` (% of the vertebra's size, Cina's figures), `stage/pck@2`, `stage/pck@5`, and on
spines `stage/off_level_pct`, `stage/cobb_mae/<pt|mt|tl>` and `stage/cobb_smape`; with
`refine`, step 1 alone is logged under `stage/step1/...`. The best checkpoint follows
`val/mre_pct` (lower is better).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchmetrics import MeanMetric

from regionnet.data.transforms import GRAY_MEAN, GRAY_STD
from regionnet.io import INTENSITY
from regionnet.landmarks.coords import from_normalised, to_original
from regionnet.landmarks.data import _vertebra_corners
from regionnet.landmarks.metrics import LandmarkMetrics
from regionnet.landmarks.model import (
    build_landmark_network,
    crop_groups,
    dsnt_loss,
    from_crops,
    group_boxes,
    landmark_groups,
    square_boxes,
)
from regionnet.model.loop import HeadLoop, check_intensity

log = logging.getLogger(__name__)

SKELETONS = ("vertebrae", "points")
MONITOR = "val/mre_pct"


class LandmarkNet(HeadLoop):
    """Landmark localisation with DSNT, optionally in two steps (see the module docstring);
    the loop is `HeadLoop`'s."""

    task = "landmarks"
    monitor = MONITOR
    monitor_mode = "min"

    def __init__(
        self,
        landmark_names: Sequence[str],
        skeleton: str = "points",
        flip_pairs: Sequence[Sequence[int]] | None = None,
        dataset: str | None = None,
        backbone: str = "resnet18",
        pretrained: bool = False,
        weights_file: str | None = None,
        in_chans: int = 1,
        drop_path_rate: float = 0.0,
        stride: int = 8,
        head_width: int = 128,
        sigma: float = 1.0,
        js_weight: float = 1.0,
        refine: bool = False,
        refine_size: int = 64,
        refine_margin: float = 0.3,
        refine_min_side: float = 0.05,
        refine_jitter: float = 0.15,
        refine_weight: float = 1.0,
        detail_size: int | None = None,
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
        names = [str(n) for n in landmark_names]
        if not names:
            raise ValueError("a landmark model needs landmark_names (from the data module)")
        if skeleton not in SKELETONS:
            raise ValueError(f"model.skeleton={skeleton!r}: use one of {SKELETONS}")
        check_intensity(intensity)
        for key, value, lo, hi in (
            ("sigma", sigma, 0.0, 100.0),
            ("refine_margin", refine_margin, 0.0, 5.0),
            ("refine_min_side", refine_min_side, 0.0, 1.0),
            ("refine_jitter", refine_jitter, 0.0, 1.0),
        ):
            if not lo <= float(value) <= hi:
                raise ValueError(f"model.{key}={value!r}: use a value in [{lo}, {hi}]")
        if int(refine_size) < 16:
            raise ValueError(f"model.refine_size={refine_size}: use 16 px or more (e.g. 64)")
        # only step 2 uses the detail image; the input's own size is no detail
        if not refine or detail_size is None or int(detail_size) == int(image_size):
            detail_size = None
        elif int(detail_size) < int(image_size) or int(detail_size) % int(image_size):
            raise ValueError(
                f"model.detail_size={detail_size}: use a multiple of image_size={image_size} "
                f"(e.g. {4 * int(image_size)}), or null (step 2 crops from the input)"
            )
        self.save_hyperparameters()
        self.hparams["detail_size"] = None if detail_size is None else int(detail_size)
        self.hparams["landmark_names"] = names
        self.hparams["flip_pairs"] = [list(map(int, p)) for p in (flip_pairs or [])]
        self.landmark_names = names
        self.skeleton = skeleton
        self.net, source = build_landmark_network(
            backbone,
            len(names),
            pretrained,
            weights_file,
            in_chans,
            drop_path_rate,
            stride,
            head_width,
            channels_last,
        )
        if pretrained or weights_file or not weights_source:
            weights_source = source
        self.hparams["weights_source"] = dict(weights_source)
        groups = landmark_groups(skeleton, len(names))
        # derived from the skeleton, so not saved: old and new checkpoints agree on it
        self.register_buffer("groups", torch.tensor(groups, dtype=torch.long), persistent=False)
        # every landmark sits in exactly one group: `order` maps group order to landmark order
        self.register_buffer("order", torch.argsort(self.groups.reshape(-1)), persistent=False)
        self.refiner = None
        if refine:
            # step 2 starts from the same weights as step 1's backbone (never a download)
            self.refiner, _ = build_landmark_network(
                backbone,
                len(groups[0]),
                pretrained,
                weights_file,
                in_chans,
                drop_path_rate,
                stride,
                head_width,
                channels_last,
            )
        stages = ("val", "test")
        self.metrics = nn.ModuleDict({s: LandmarkMetrics(skeleton) for s in stages})
        self.step1_metrics = nn.ModuleDict({s: LandmarkMetrics(skeleton) for s in stages})
        self.losses = nn.ModuleDict({s: MeanMetric() for s in stages})

    # -- inference ------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return int(self.hparams.image_size)

    @property
    def detail_size(self) -> int | None:
        """D of the detail image step 2 crops from; None: it crops from the input."""
        d = self.hparams.get("detail_size")
        return None if d is None else int(d)

    def forward(self, x: torch.Tensor, detail: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised input coordinates (B, K, 2) of every landmark: step 2's where `refine`."""
        return self.infer(x, detail)["final"]

    def infer(self, x: torch.Tensor, detail: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{"step1": (B, K, 2), "final": (B, K, 2)} normalised input coordinates; "final" is
        step 2's where the model refines, else step 1's. `x`: the (B, 1, S, S) input;
        `detail`: the (B, 1, D, D) detail image of a model with `detail_size` (the batch's
        `detail`; `x` is then `coords.detail_to_input(detail)`)."""
        step1, _ = self.net(x)
        if self.refiner is None:
            return {"step1": step1, "final": step1}
        boxes = self.detector_boxes(x) if self.detector is not None else None
        return {"step1": step1, "final": self.refine(x, step1.detach(), detail, boxes)}

    # -- step 2's crops from a vertebra detector ---------------------------------------------
    @property
    def detector(self):
        """The box model (`task=boxes`) whose vertebra boxes place step 2's crops, or None
        (crops around step 1's corners). Attached for inference by `use_detector`; not part
        of this model's weights or checkpoint."""
        return self._detector[0] if getattr(self, "_detector", ()) else None

    def level_names(self) -> list[str]:
        """The vertebrae of the `<vertebra>_<corner>` landmark names, head to foot (the data
        module's own parse, `landmarks.data._vertebra_corners`); [] for other point sets."""
        return [v for v, _ in _vertebra_corners(self.landmark_names) or []]

    def use_detector(self, box_model) -> None:
        """Take step 2's crops from `box_model`'s vertebra boxes (one per level, its best
        box; step 1's corners where it finds none). It must detect this model's vertebrae on
        this model's input: the same levels in order, input size and normalisation."""
        if self.refiner is None or self.skeleton != "vertebrae":
            raise ValueError(
                "refine_detector: only a two-step vertebra model (model.refine=true on spine "
                "data) takes step 2's crops from a detector"
            )
        theirs, ours = list(box_model.box_names), self.level_names()
        if theirs != ours:
            raise ValueError(
                f"refine_detector: the detector finds {theirs}, this model's vertebrae are "
                f"{ours}; use a box model trained on the same landmark set (task=boxes)"
            )
        h, b = self.hparams, box_model.hparams
        mine = (self.image_size, float(h.get("mean", GRAY_MEAN)), float(h.get("std", GRAY_STD)))
        other = (int(b.image_size), float(b.get("mean", GRAY_MEAN)), float(b.get("std", GRAY_STD)))
        if mine != other:
            raise ValueError(
                f"refine_detector: the detector takes (image_size, mean, std) {other}, this "
                f"model {mine}; train the box model with data.image_size={mine[0]}"
            )
        self._detector = (box_model.to(self.device).eval(),)  # a tuple: not a submodule

    @torch.no_grad()
    def detector_boxes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, G, 4) input-pixel boxes of each vertebra level from the detector on the input
        `x` (its best-scoring box per level), NaN where it finds none."""
        detector = self.detector
        weight = next(detector.parameters(), None)
        if weight is not None and weight.device != x.device:  # Lightning moved this model only
            detector.to(x.device)
        found = detector.net(x)
        out = torch.full((len(x), len(self.groups), 4), float("nan"), device=x.device)
        for k, d in enumerate(found):
            for g in range(len(self.groups)):
                mine = d["labels"] == g + 1
                if mine.any():
                    best = torch.argmax(torch.where(mine, d["scores"], -1.0))
                    out[k, g] = d["boxes"][best].float()
        return out

    def _min_side(self) -> float:
        return float(self.hparams.refine_min_side) * self.image_size

    def _crop_source(
        self, x: torch.Tensor, detail: torch.Tensor | None
    ) -> tuple[torch.Tensor, float]:
        """What step 2 crops from and its pixels per input pixel: the detail image (D/S) or,
        for a model without `detail_size`, the input (1)."""
        d = self.detail_size
        if d is None:
            return x, 1.0
        if detail is None:
            raise ValueError(
                f"this model's step 2 crops from a {d} x {d} px detail image (model.detail_size="
                f"{d}), but none was given: pass the batch's `detail` (data.detail=true, "
                f"data.detail_size={d})"
            )
        if detail.shape[-1] != d or detail.shape[-2] != d:
            raise ValueError(
                f"detail image of {tuple(detail.shape[-2:])} px: this model takes {d} x {d}"
            )
        return detail, d / self.image_size

    def refine(
        self,
        x: torch.Tensor,
        coords: torch.Tensor,
        detail: torch.Tensor | None = None,
        detected: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Step 2: crop around each group of `coords` (normalised) from the detail image (or
        the input `x` without `detail_size`), place its points again, and return all points
        as normalised input coordinates (B, K, 2). `detected` (B, G, 4): input-pixel boxes of
        the groups from a detector, NaN where none; a group with one is cropped around it."""
        size = self.image_size
        points = (coords.float() + 1) / 2 * size
        margin = float(self.hparams.refine_margin)
        boxes = group_boxes(points, self.groups, margin, self._min_side())
        if detected is not None:
            squares = square_boxes(detected.to(boxes), margin, self._min_side())
            boxes = torch.where(torch.isfinite(squares).all(-1, keepdim=True), squares, boxes)
        source, scale = self._crop_source(x, detail)
        crops = crop_groups(source, boxes, int(self.hparams.refine_size), scale)
        local, _ = self.refiner(crops)
        placed = from_crops(local.float(), boxes).flatten(1, 2)  # (B, G * P, 2), group order
        # back to landmark order with a gather (shapes from the tensors: an ONNX export keeps
        # its batch axis dynamic)
        return placed[:, self.order] / size * 2 - 1

    def to_original(self, coords: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor):
        """Normalised input coordinates (B, K, 2) -> pixels of the stored films (B, K, 2);
        `scale` (B,) or (B, 2) per axis and `offset` (B, 2): the letterbox (`coords`)."""
        points = from_normalised(coords.float(), self.image_size)
        return to_original(points, scale.float(), offset.float())

    # -- training -------------------------------------------------------------------------
    def _loss(self, batch: dict, train: bool) -> torch.Tensor:
        h = self.hparams
        coords, heat = self.net(batch["image"])
        loss = dsnt_loss(coords, heat, batch["points"], batch["visible"], h.sigma, h.js_weight)
        if self.refiner is not None:
            loss = loss + float(h.refine_weight) * self._refine_loss(batch, train)
        return loss

    def _refine_loss(self, batch: dict, train: bool) -> torch.Tensor:
        """Step 2's DSNT loss on crops around the true groups, shifted and scaled at random by
        up to `refine_jitter` of the crop side in training (fixed crops in validation), cut
        from the batch's `detail` image where the model has `detail_size`."""
        h, size = self.hparams, self.image_size
        truth = (batch["points"].float() + 1) / 2 * size
        boxes = group_boxes(truth, self.groups, float(h.refine_margin), self._min_side())
        if train and h.refine_jitter:
            side = boxes[..., 2:] - boxes[..., :2]
            j = float(h.refine_jitter)
            shift = (torch.rand_like(side) * 2 - 1) * j * side
            grow = 1 + (torch.rand_like(side[..., :1]) * 2 - 1) * j
            centre = (boxes[..., :2] + boxes[..., 2:]) / 2 + shift
            half = side * grow / 2
            boxes = torch.cat([centre - half, centre + half], dim=-1)
        source, scale = self._crop_source(batch["image"], batch.get("detail"))
        crops = crop_groups(source, boxes, int(h.refine_size), scale)
        local, heat = self.refiner(crops)
        lo, hi = boxes[..., None, :2], boxes[..., None, 2:]
        target = ((truth[:, self.groups] - lo) / (hi - lo) * 2 - 1).flatten(0, 1)
        visible = batch["visible"][:, self.groups].flatten(0, 1)
        visible = visible & (target.abs() <= 1).all(-1)  # a point outside its crop: no target
        return dsnt_loss(local, heat, target, visible, h.sigma, h.js_weight)

    # -- the head type's part of the loop (regionnet.model.loop) ---------------------------
    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._loss(batch, train=True), {}

    def reset_metrics(self) -> None:
        for m in (*self.metrics.values(), *self.step1_metrics.values(), *self.losses.values()):
            m.reset()

    def update_metrics(self, batch: dict, stage: str) -> dict:
        out = self.infer(batch["image"], batch.get("detail"))
        self.losses[stage].update(self._loss(batch, train=False), weight=len(batch["image"]))
        cobb = batch.get("cobb")
        heights = batch["size"][:, 1] if "size" in batch else None  # the Cobb rule's film height
        for key, metrics in (("final", self.metrics), ("step1", self.step1_metrics)):
            if key == "step1" and self.refiner is None:
                continue
            pred = self.to_original(out[key], batch["scale"], batch["offset"])
            metrics[stage].update(pred, batch["points_px"], batch["visible"], cobb, heights)
        return self._outputs(batch, out)

    def end_stage(self, stage: str) -> dict[str, float]:
        metrics = self.metrics[stage]
        if not self.losses[stage].update_count:
            return {}
        values = dict(metrics.compute_all(stage))
        values[f"{stage}/loss"] = float(self.losses[stage].compute())
        if self.refiner is not None:
            values.update(self.step1_metrics[stage].compute_all(f"{stage}/step1"))
            self.step1_metrics[stage].reset()
        metrics.reset()
        self.losses[stage].reset()
        return values

    def predict_batch(self, batch: dict) -> dict:
        """Landmarks of a batch's readable films in their own pixels: "points" (B, K, 2) CPU
        float tensor, "step1_points" (the same as "points" without `refine`), "size" (B, 2)
        original width and height; labelled batches also pass their truth on ("points_px",
        "visible", "cobb")."""
        return self._outputs(batch, self.infer(batch["image"], batch.get("detail")))

    def _outputs(self, batch: dict, found: dict[str, torch.Tensor]) -> dict:
        """`predict_batch`'s dict from `infer`'s output for the batch."""
        out = {}
        for key, name in (("final", "points"), ("step1", "step1_points")):
            out[name] = self.to_original(found[key], batch["scale"], batch["offset"]).cpu()
        for key in ("size", "points_px", "visible", "cobb"):  # the truth, where a test has it
            if key in batch:
                out[key] = batch[key].cpu()
        return out

    def empty_prediction(self) -> dict:
        return {"points": torch.empty(0, len(self.landmark_names), 2)}

    def head_parameters(self) -> list[nn.Parameter]:
        """The heatmap heads of both steps train at the full rate, the backbones and FPNs at
        `backbone_lr_scale` x it."""
        heads = list(self.net.head.parameters())
        if self.refiner is not None:
            heads += list(self.refiner.head.parameters())
        return heads
