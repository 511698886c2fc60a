"""The landmark network: a timm backbone's feature maps -> FPN -> one heatmap per landmark -> DSNT.

Input: (B, 1, S, S) letterboxed radiographs normalised with the checkpoint's `mean`/`std`
(the region task's `eval_transform`). Output: normalised input coordinates (B, K, 2), [x, y] in
[-1, 1] with align_corners=False (-1 = the left/top edge of the input, +1 = the right/bottom edge;
`regionnet.landmarks.coords`), and the heatmaps (B, K, h, w), each a probability map (DSNT:
spatial softmax, then the expected position; Nibali et al. 2018, as in Cina et al. 2021).

The backbone is the region task's headless timm model (`build_backbone`: the same offline
ImageNet weights, weights files and names); its stride-`stride`..32 maps come from timm's
`forward_intermediates` and are fused by torchvision's `FeaturePyramidNetwork`, so a heatmap
cell is `stride` input pixels. Two steps: a second network of the same kind looks at a crop
around each group of points (a vertebra's four corners) and places them again;
`torchvision.ops.roi_align` cuts the crops, so crop and map-back share one frame. The crops
come from the input, or from a detail image of the same frame at a higher resolution
(`crop_groups(..., scale=D/S)`; `regionnet.landmarks.coords`, "detail").
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from kornia.geometry.subpix import render_gaussian2d, spatial_expectation2d, spatial_softmax2d
from kornia.losses import js_div_loss_2d
from torch import nn
from torchvision.ops import FeaturePyramidNetwork, roi_align

from regionnet.model.backbone import build_backbone

EPS = 1e-12


def heatmap_coords(heat: torch.Tensor) -> torch.Tensor:
    """Expected position of each probability map (B, K, h, w) as normalised input coordinates
    (B, K, 2), align_corners=False: heatmap cell j covers input [j, j+1) x stride, so its centre
    is at (j + 0.5) / w of the width."""
    idx = spatial_expectation2d(heat, normalized_coordinates=False)  # [x = column, y = row]
    h, w = heat.shape[-2:]
    size = torch.tensor([w, h], dtype=idx.dtype, device=idx.device)
    return 2 * (idx + 0.5) / size - 1


def target_heatmaps(points: torch.Tensor, shape: tuple[int, int], sigma: float) -> torch.Tensor:
    """Gaussian probability maps (B, K, h, w) centred on normalised points (B, K, 2), `sigma` in
    heatmap cells: the Jensen-Shannon regulariser's target (DSNT)."""
    h, w = shape
    size = torch.tensor([w, h], dtype=points.dtype, device=points.device)
    cells = (points + 1) / 2 * size - 0.5
    std = torch.full_like(cells, float(sigma))
    return render_gaussian2d(cells, std, (h, w), normalized_coordinates=False)


def dsnt_loss(
    coords: torch.Tensor,
    heat: torch.Tensor,
    target: torch.Tensor,
    visible: torch.Tensor,
    sigma: float = 1.0,
    js_weight: float = 1.0,
) -> torch.Tensor:
    """DSNT's loss: Euclidean distance between predicted and true normalised coordinates, plus
    `js_weight` x the Jensen-Shannon divergence of each heatmap from a Gaussian at the truth;
    averaged over the visible points only (a point that left the image adds nothing)."""
    visible = visible.bool()
    diff = coords.float() - target.float()
    dist = (diff.pow(2).sum(-1) + EPS).sqrt()  # (B, K); EPS: a finite gradient at the truth
    loss = torch.where(visible, dist, torch.zeros_like(dist))
    if js_weight:
        gauss = target_heatmaps(target.float().clamp(-1, 1), heat.shape[-2:], sigma)
        # cells that underflow to 0 would make the divergence's log NaN
        js = js_div_loss_2d(heat.float().clamp(min=EPS), gauss.clamp(min=EPS), reduction="none")
        loss = loss + js_weight * torch.where(visible, js, torch.zeros_like(js))
    return loss.sum() / visible.sum().clamp(min=1)


def feature_indices(backbone: nn.Module, stride: int) -> list[int]:
    """Indices of the backbone's feature maps from `stride` down to its coarsest (timm's
    `feature_info`), e.g. [2, 3, 4] for resnet18 at stride 8."""
    info = backbone.feature_info
    reductions = [int(f["reduction"]) for f in info]
    chosen = [i for i, r in enumerate(reductions) if r >= stride]
    if not chosen or reductions[chosen[0]] != stride:
        raise ValueError(
            f"model.stride={stride}: this backbone has feature maps at strides {reductions}; "
            "pick one of them (8 keeps a 256 px input at 32 x 32 heatmap cells)"
        )
    return chosen


class LandmarkHead(nn.Module):
    """FPN over the backbone's maps (levels upsampled to the finest and summed), then a 3x3 conv
    block and a 1x1 conv to one heatmap per landmark; `forward` gives (coords (B, K, 2),
    heatmaps (B, K, h, w))."""

    def __init__(self, in_channels: Sequence[int], num_points: int, width: int = 128):
        super().__init__()
        self.fpn = FeaturePyramidNetwork(list(in_channels), width)
        self.out = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, num_points, 1),
        )

    def forward(self, maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        levels = list(self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps))).values())
        # every pyramid level, upsampled to the finest and summed (a semantic-FPN merge):
        # coarse levels carry the context that tells one vertebra from the next
        size = levels[0].shape[-2:]
        fused = levels[0] + sum(
            F.interpolate(lv, size=size, mode="bilinear", align_corners=False) for lv in levels[1:]
        )
        logits = self.out(fused).float()
        heat = spatial_softmax2d(logits)
        return heatmap_coords(heat), heat


class LandmarkNetwork(nn.Module):
    """A headless timm backbone and a `LandmarkHead` (see the module docstring)."""

    def __init__(
        self,
        backbone: nn.Module,
        num_points: int,
        stride: int = 8,
        width: int = 128,
        channels_last: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.indices = feature_indices(backbone, stride)
        chans = [int(backbone.feature_info[i]["num_chs"]) for i in self.indices]
        self.head = LandmarkHead(chans, num_points, width)
        self.channels_last = channels_last

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone.forward_intermediates(x, indices=self.indices, intermediates_only=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.feature_maps(x))


def build_landmark_network(
    backbone: str,
    num_points: int,
    pretrained: bool = False,
    weights_file: str | None = None,
    in_chans: int = 1,
    drop_path_rate: float = 0.0,
    stride: int = 8,
    width: int = 128,
    channels_last: bool = False,
) -> tuple[LandmarkNetwork, dict]:
    """The network and where its backbone's starting weights came from (`build_backbone`)."""
    net, source = build_backbone(backbone, pretrained, weights_file, in_chans, drop_path_rate)
    return LandmarkNetwork(net, num_points, stride, width, channels_last), source


def group_boxes(
    points: torch.Tensor, groups: torch.Tensor, margin: float, min_side: float
) -> torch.Tensor:
    """Square crop boxes (B, G, 4) [x1, y1, x2, y2] in input pixels around each group of points
    (B, K, 2) (input pixels; `groups` (G, P) point indices): the group's bounding box centre,
    side = max(width, height, `min_side`) x (1 + 2 `margin`). Square, so a crop resized to the
    refiner's input keeps the film's aspect ratio."""
    pts = points[:, groups]  # (B, G, P, 2)
    return square_boxes(torch.cat([pts.amin(dim=2), pts.amax(dim=2)], dim=-1), margin, min_side)


def square_boxes(boxes: torch.Tensor, margin: float, min_side: float) -> torch.Tensor:
    """Square crop boxes (..., 4) around boxes (..., 4) [x1, y1, x2, y2]: the same centre,
    side = max(width, height, `min_side`) x (1 + 2 `margin`) (NaN stays NaN)."""
    lo, hi = boxes[..., :2], boxes[..., 2:]
    centre = (lo + hi) / 2
    side = (hi - lo).amax(dim=-1).clamp(min=min_side) * (1 + 2 * margin)
    half = side.unsqueeze(-1) / 2
    return torch.cat([centre - half, centre + half], dim=-1)


def crop_groups(
    image: torch.Tensor, boxes: torch.Tensor, size: int, scale: float = 1.0
) -> torch.Tensor:
    """Crops (B*G, C, size, size) of `image` (B, C, H, W) inside `boxes` (B, G, 4), input pixels,
    bilinear (`roi_align`, aligned=True: box edges are pixel edges, as in our coordinates).
    `scale`: `image` pixels per input pixel (D/S for a detail image of the input's frame; the
    boxes stay in input pixels and roi_align scales them, `spatial_scale`)."""
    b, g = boxes.shape[:2]
    index = torch.arange(b, device=boxes.device, dtype=boxes.dtype).repeat_interleave(g)
    rois = torch.cat([index[:, None], boxes.reshape(b * g, 4)], dim=1)
    return roi_align(image, rois.to(image.dtype), (size, size), float(scale), 2, aligned=True)


def from_crops(coords: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Normalised crop coordinates (B*G, P, 2) back to input pixels (B, G, P, 2)."""
    b, g = boxes.shape[:2]
    boxes = boxes.reshape(b * g, 1, 4)
    lo, hi = boxes[..., :2], boxes[..., 2:]
    return (lo + (coords + 1) / 2 * (hi - lo)).reshape(b, g, -1, 2)


def landmark_groups(skeleton: str, num_points: int) -> list[list[int]]:
    """The point groups step 2 refines together: each vertebra's four corners (`vertebrae`:
    TL, TR, BL, BR per vertebra), else every point alone (`points`, e.g. hand landmarks)."""
    if skeleton == "vertebrae":
        if num_points % 4:
            raise ValueError(f"skeleton 'vertebrae' needs 4 corners per vertebra, got {num_points}")
        return [list(range(v * 4, v * 4 + 4)) for v in range(num_points // 4)]
    return [[k] for k in range(num_points)]
