"""Vertebra boxes from the landmark data: `LandmarkDataModule` batches plus per-film boxes.

The boxes are vertebrae, not lesions: each T1..L5 vertebra of an AP spine film (`spine_aasce`,
481 films, or the synthetic `phantom` spines) has four annotated corners, and its box is their
axis-aligned bounding box, [x1, y1, x2, y2] = [min x, min y, max x, max y]. 17 boxes per film.

The films, split, letterbox, augmentation and annotation check are the landmark task's
(`regionnet.landmarks.data`): the corners are augmented as `tv_tensors.KeyPoints` and the box
is taken from the augmented corners afterwards. A rotated box is then the box of the rotated
vertebra, which rotating the box itself (`tv_tensors.BoundingBoxes` through `RandomAffine`
takes the box of the rotated box's corners) would overestimate. The boxes then go through
`tv_tensors.BoundingBoxes` with `v2.ClampBoundingBoxes` (a vertebra partly pushed off the
input keeps its visible part) and `v2.SanitizeBoundingBoxes` (one thinner than 1 px is
dropped, with its label).

A batch has the landmark keys (see `regionnet.landmarks.data`) and, per film:

- `boxes` list of float32 (N_i, 4): input pixels of the S x S (augmented) network input;
- `box_labels` list of int64 (N_i,): 1..V (1 = the first vertebra, T1; 0 is torchvision's
  background), the same films' boxes in `box_names` order;
- `boxes_px` list of float32 (M_i, 4) and `box_labels_px` (M_i,): the boxes of the film as
  stored (not augmented), in its own pixels: the truth the metrics use.

A vertebra has a box when its four corners are annotated (`points_px` finite) and at least one
is `visible`: vertebrae hidden by the annotation check (`annotation_issues`: all four corners
hidden) and vertebrae pushed off the input by augmentation drop out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from regionnet.landmarks.coords import from_normalised
from regionnet.landmarks.data import LandmarkDataModule, _vertebra_corners, collate

MIN_SIDE = 1.0  # input pixels: a thinner box (a vertebra almost off the input) is dropped


def vertebra_groups(names: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """The vertebrae of `<vertebra>_<corner>` landmark names, head to foot, and their corner
    indices (V, 4) [TL, TR, BL, BR]; ValueError for names without four corners each."""
    groups = _vertebra_corners(names)
    if not groups:
        raise ValueError(
            "box heads need vertebra corners (<vertebra>_top_left ... _bottom_right landmark "
            "names, e.g. data.dataset=spine_aasce or phantom); got "
            f"{list(names)[:4]}..."
        )
    return [v for v, _ in groups], torch.tensor([idx for _, idx in groups], dtype=torch.long)


def boxes_from_corners(
    points: torch.Tensor, groups: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (N, 4) [x1, y1, x2, y2] and labels (N,) 1..V of one film's points (K, 2): each
    group's (`groups` (V, 4) indices) min/max over its corners; `keep` (V,) bool picks the
    vertebrae (default: those with four finite corners)."""
    corners = points[groups]  # (V, 4, 2)
    if keep is None:
        keep = torch.isfinite(corners).all(-1).all(-1)
    boxes = torch.cat([corners.amin(1), corners.amax(1)], dim=-1)
    labels = torch.arange(1, len(groups) + 1, dtype=torch.long, device=points.device)
    return boxes[keep].float(), labels[keep]


def clamp_and_sanitize(
    boxes: torch.Tensor, labels: torch.Tensor, size: int, min_size: float = MIN_SIDE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes clamped to the S x S input and those thinner than `min_size` dropped with their
    labels (torchvision's `ClampBoundingBoxes` and `SanitizeBoundingBoxes`)."""
    box = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(size, size))
    out = v2.SanitizeBoundingBoxes(min_size=min_size)(
        {"boxes": v2.ClampBoundingBoxes()(box), "labels": labels}
    )
    return out["boxes"].as_subclass(torch.Tensor), out["labels"]


class BoxCollate:
    """The landmark `collate`, then each film's boxes (see the module docstring)."""

    def __init__(self, groups: torch.Tensor, size: int):
        self.groups, self.size = groups, int(size)

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate(samples)
        if "image" not in batch:
            return batch
        points = from_normalised(batch["points"], self.size)
        keys = ("boxes", "box_labels", "boxes_px", "box_labels_px")
        out: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for pts, px, vis in zip(points, batch["points_px"], batch["visible"], strict=True):
            annotated = torch.isfinite(px[self.groups]).all(-1).all(-1)  # (V,)
            keep = annotated & vis[self.groups].any(-1)
            boxes, labels = boxes_from_corners(pts, self.groups, keep)
            boxes, labels = clamp_and_sanitize(boxes, labels, self.size)
            out["boxes"].append(boxes)
            out["box_labels"].append(labels)
            # the truth in the film's pixels: every annotated vertebra not hidden or lost
            # (no augmentation in val/test, so this is every annotated, unhidden one)
            shown = annotated & vis[self.groups].all(-1)
            boxes_px, labels_px = boxes_from_corners(px, self.groups, shown)
            out["boxes_px"].append(boxes_px)
            out["box_labels_px"].append(labels_px)
        batch.update(out)
        return batch


class BoxDataModule(LandmarkDataModule):
    """`LandmarkDataModule` whose batches also carry vertebra boxes (module docstring).

    Same arguments (`conf/data/landmarks.yaml`); the model reads `box_names` (the vertebrae,
    head to foot: label k is `box_names[k - 1]`) and `dataset`. Spine data only.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.skeleton != "vertebrae":
            raise ValueError(
                f"data.dataset={self.dataset!r} has no vertebrae: box heads (task=boxes) need "
                "a spine set (spine_aasce or phantom)"
            )

    @property
    def box_names(self) -> list[str]:
        return vertebra_groups(self.landmark_names)[0]

    def _loader(self, split, train: bool | None = None) -> DataLoader:
        loader = super()._loader(split, train)
        # DataLoader allows collate_fn to change after construction (it is read per iterator)
        loader.collate_fn = BoxCollate(
            vertebra_groups(self.landmark_names)[1], self.hparams.image_size
        )
        return loader
