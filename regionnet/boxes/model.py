"""The box network: torchvision's FCOS detector on a timm backbone through an FPN.

`TimmFPN` is the detection backbone torchvision expects (`out_channels`, and a forward giving
an ordered dict of feature maps): the region task's headless timm model (`build_backbone`:
the same offline ImageNet weights, weights files and names) gives its stride-8/16/32 maps
through timm's `forward_intermediates`, and `torchvision.ops.FeaturePyramidNetwork` with
`LastLevelP6P7` makes P3..P7 (strides 8..128), the five levels of FCOS (Tian et al. 2019) and
of torchvision's own `fcos_resnet50_fpn`. Anchors, the loss (focal, GIoU, centre-ness),
box decoding and NMS are torchvision's `FCOS`; nothing here re-implements them.

Inputs are (B, 1, S, S) letterboxed films already normalised with the checkpoint's
`mean`/`std` (the landmark task's `eval_transform`), so FCOS's own transform is told to leave
them alone: `image_mean=[0]`, `image_std=[1]` (one channel: its normalise broadcasts a
one-value mean over the one channel) and `min_size = max_size = S` (its resize is then the
identity: S x S in, S x S out, boxes unchanged). The backbone is built with `in_chans=1`
(timm sums the first convolution's RGB weights), so nothing repeats the grey channel to three.
Boxes in and out are [x1, y1, x2, y2] in input pixels; labels 1..V (0 = background).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from regionnet.landmarks.model import feature_indices
from regionnet.model.backbone import build_backbone

STRIDES = (8, 16, 32)
REGRESSION_BIAS = 1.0  # the side-distance outputs' starting bias, in anchor sizes (see below)


def box_feature_indices(backbone: nn.Module) -> list[int]:
    """timm `feature_info` positions of the backbone's stride-8/16/32 maps (FCOS's C3..C5)."""
    indices = feature_indices(backbone, STRIDES[0])
    reductions = [int(backbone.feature_info[i]["reduction"]) for i in indices]
    if tuple(reductions[: len(STRIDES)]) != STRIDES:
        raise ValueError(
            f"this backbone's feature maps are at strides {reductions}; box heads need "
            f"{list(STRIDES)} (FCOS's P3..P5)"
        )
    return indices[: len(STRIDES)]


def box_fpn(in_channels: list[int], width: int) -> FeaturePyramidNetwork:
    """torchvision's FPN over C3..C5 with P6/P7 (`LastLevelP6P7`): FCOS's P3..P7."""
    return FeaturePyramidNetwork(in_channels, width, extra_blocks=LastLevelP6P7(width, width))


def fcos_detector(
    backbone: nn.Module,
    num_classes: int,
    image_size: int,
    in_chans: int = 1,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.6,
    detections_per_img: int = 100,
    topk_candidates: int = 1000,
) -> FCOS:
    """torchvision's FCOS for `num_classes` box classes (plus background) on `backbone` (its
    `out_channels`), its transform the identity on S x S normalised inputs (module
    docstring), its regression bias started at one anchor size (below)."""
    detector = FCOS(
        backbone,
        num_classes=num_classes + 1,  # torchvision counts the background class 0
        min_size=int(image_size),
        max_size=int(image_size),
        image_mean=[0.0] * in_chans,
        image_std=[1.0] * in_chans,
        score_thresh=float(score_thresh),
        nms_thresh=float(nms_thresh),
        detections_per_img=int(detections_per_img),
        topk_candidates=int(topk_candidates),
    )
    # torchvision's FCOS regresses the four side distances through a ReLU from a zero bias, so
    # at the start half of them sit at the ReLU's kink; a side pushed below it in the first
    # steps gets no gradient again (seen here: box edges stuck on the anchor points, GIoU loss
    # flat near 0.9 on spine films). A bias of 1 starts every side at one anchor size.
    nn.init.constant_(detector.head.regression_head.bbox_reg.bias, REGRESSION_BIAS)
    return detector


class TimmFPN(nn.Module):
    """A timm backbone's stride-8/16/32 maps -> FPN (+ P6, P7): torchvision's detection
    backbone interface (`out_channels`; forward -> OrderedDict of maps, finest first)."""

    def __init__(self, backbone: nn.Module, width: int = 128, channels_last: bool = False):
        super().__init__()
        self.backbone = backbone
        self.indices = box_feature_indices(backbone)
        chans = [int(backbone.feature_info[i]["num_chs"]) for i in self.indices]
        self.fpn = box_fpn(chans, width)
        self.out_channels = width
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        maps = self.backbone.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def build_box_network(
    backbone: str,
    num_classes: int,
    image_size: int,
    pretrained: bool = False,
    weights_file: str | None = None,
    in_chans: int = 1,
    drop_path_rate: float = 0.0,
    width: int = 128,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.6,
    detections_per_img: int = 100,
    topk_candidates: int = 1000,
    channels_last: bool = False,
) -> tuple[FCOS, dict]:
    """FCOS over `TimmFPN` for `num_classes` box classes (plus background), and where the
    backbone's starting weights came from (`build_backbone`)."""
    net, source = build_backbone(backbone, pretrained, weights_file, in_chans, drop_path_rate)
    detector = fcos_detector(
        TimmFPN(net, width, channels_last),
        num_classes,
        image_size,
        in_chans,
        score_thresh,
        nms_thresh,
        detections_per_img,
        topk_candidates,
    )
    return detector, source
