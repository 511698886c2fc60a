"""Image transforms (torchvision.transforms.v2) for single-channel radiographs.

Input: a float32 tensor (1, H, W) in [0, 1] from `regionnet.io.read_radiograph`.
Output: (1, S, S) with S = `data.image_size`, aspect kept (resize the longest side, pad with
black), normalised with `mean`/`std` (defaults: ImageNet's RGB statistics averaged, which fits
timm's grey adaptation of ImageNet weights, where the first conv sums the RGB filters).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

GRAY_MEAN = 0.449  # mean of ImageNet's (0.485, 0.456, 0.406)
GRAY_STD = 0.226  # mean of ImageNet's (0.229, 0.224, 0.225)


class RandomGamma(torch.nn.Module):
    """Random gamma in [lo, hi]: mimics exposure and detector response curves."""

    def __init__(self, gamma: Sequence[float] = (0.7, 1.5), p: float = 0.5):
        super().__init__()
        self.lo, self.hi = float(gamma[0]), float(gamma[1])
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return x
        g = self.lo + float(torch.rand(())) * (self.hi - self.lo)
        return F.adjust_gamma(x.clamp(0, 1), g)


def resize_pad(size: int) -> v2.Compose:
    """Aspect-preserving resize of the longest side to `size`, then pad to a square."""
    return v2.Compose([v2.Resize(size=None, max_size=size, antialias=True), v2.CenterCrop(size)])


def build_transforms(
    image_size: int,
    train: bool,
    augment: Mapping | None = None,
    mean: float = GRAY_MEAN,
    std: float = GRAY_STD,
) -> v2.Compose:
    """The eval pipeline (resize-pad, normalise) or, with `train`, radiograph augmentation.

    `augment` keys (all optional): `rotation` degrees, `translate` fraction, `scale` range,
    `hflip` probability (left and right limbs look alike, mirrored), `brightness`, `contrast`,
    `gamma` range, `noise` sigma, `crop_scale` range for a random resized crop that hides the
    source's image size and crop style (off by default).
    """
    if image_size < 16:
        raise ValueError(f"data.image_size={image_size} is too small; use 16 or more (e.g. 224)")
    steps: list[torch.nn.Module] = [resize_pad(image_size)]
    a = dict(augment or {})
    if train and a:
        if a.get("crop_scale"):
            steps.append(
                v2.RandomResizedCrop(image_size, scale=tuple(a["crop_scale"]), antialias=True)
            )
        steps.append(
            v2.RandomAffine(
                degrees=a.get("rotation", 10),
                translate=(a.get("translate", 0.05),) * 2,
                scale=tuple(a.get("scale", (0.9, 1.1))),
                interpolation=v2.InterpolationMode.BILINEAR,
            )
        )
        if a.get("hflip", 0.5):
            steps.append(v2.RandomHorizontalFlip(a.get("hflip", 0.5)))
        steps.append(
            v2.ColorJitter(brightness=a.get("brightness", 0.2), contrast=a.get("contrast", 0.2))
        )
        if a.get("gamma"):
            steps.append(RandomGamma(a["gamma"]))
        if a.get("noise"):
            steps.append(v2.GaussianNoise(sigma=float(a["noise"])))
    steps.append(v2.Normalize(mean=[mean], std=[std]))
    return v2.Compose(steps)


def eval_transform(model) -> v2.Compose:
    """The one evaluation preprocessing: resize-pad to `image_size`, normalise with `mean`/
    `std`, all read from `model.hparams` (a checkpoint's, so inference matches training) or
    from a mapping with those keys (a data module's hparams). Validation, test, eval, predict,
    the Python API, Grad-CAM, export and the benchmarks all call this."""
    h = getattr(model, "hparams", model)
    return build_transforms(
        int(h["image_size"]),
        train=False,
        mean=float(h.get("mean", GRAY_MEAN)),
        std=float(h.get("std", GRAY_STD)),
    )
