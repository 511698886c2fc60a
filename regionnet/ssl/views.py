"""Two random views of one radiograph, for contrastive (SimCLR) and self-distillation (BYOL)
pretraining.

Radiograph-appropriate: random crops (a part of the film must identify the anatomy), small
rotations and mirroring (left and right limbs are mirror images), exposure changes
(brightness, contrast, gamma: tube current, detector response), blur and quantum noise. No
colour jitter or greyscale conversion: the input is one channel (1, H, W) in [0, 1] from
`regionnet.io.read_radiograph`, and the output is normalised like the fine-tuning input.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from lightly.transforms.multi_view_transform import MultiViewTransform
from torchvision.transforms import v2

from regionnet.data.transforms import GRAY_MEAN, GRAY_STD, RandomGamma

DEFAULT_VIEW = {
    "crop_scale": (0.25, 1.0),  # share of the film's area a view keeps
    "rotation": 10,  # degrees
    "hflip": 0.5,
    "brightness": 0.3,
    "contrast": 0.3,
    "gamma": (0.7, 1.4),
    "blur": 0.3,  # probability of a Gaussian blur (sigma 0.1-1.5 px)
    "noise": 0.02,  # Gaussian sigma on [0, 1] pixels
}


def radiograph_view(
    image_size: int,
    view: Mapping | None = None,
    mean: float = GRAY_MEAN,
    std: float = GRAY_STD,
) -> v2.Compose:
    """One random view: (1, H, W) in [0, 1] -> (1, S, S) normalised, S = `image_size`."""
    if image_size < 16:
        raise ValueError(f"data.image_size={image_size} is too small; use 16 or more (e.g. 96)")
    a = {**DEFAULT_VIEW, **dict(view or {})}
    unknown = sorted(set(a) - set(DEFAULT_VIEW))
    if unknown:
        raise ValueError(f"data.view has unknown keys {unknown}; known: {sorted(DEFAULT_VIEW)}")
    lo, hi = (float(s) for s in a["crop_scale"])
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"data.view.crop_scale={a['crop_scale']}: need 0 < min <= max <= 1")
    steps: list[torch.nn.Module] = [
        v2.RandomResizedCrop(image_size, scale=(lo, hi), ratio=(0.75, 4 / 3), antialias=True),
        v2.RandomRotation(a["rotation"], interpolation=v2.InterpolationMode.BILINEAR),
        v2.RandomHorizontalFlip(a["hflip"]),
        v2.ColorJitter(brightness=a["brightness"], contrast=a["contrast"]),
    ]
    if a["gamma"]:
        steps.append(RandomGamma(a["gamma"]))
    if a["blur"]:
        steps.append(v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=a["blur"]))
    if a["noise"]:
        steps.append(v2.GaussianNoise(sigma=float(a["noise"])))
    steps.append(v2.Normalize(mean=[mean], std=[std]))
    return v2.Compose(steps)


class TwoViews(torch.nn.Module):
    """(1, H, W) -> (2, 1, S, S): two independent views of the same radiograph."""

    def __init__(self, image_size: int, view: Mapping | None = None, mean=GRAY_MEAN, std=GRAY_STD):
        super().__init__()
        one = radiograph_view(image_size, view, mean, std)
        self.views = MultiViewTransform([one, one])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.views(image))
