"""Step 2 of a two-step vertebra model takes its crops from a vertebra detector
(`refine_detector=`, `LandmarkNet.use_detector`): each level the detector finds is cropped
around its best box, a level it misses around step 1's corners; a detector of other levels or
another input is refused with the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import regionnet.landmarks.module as landmark_module
from regionnet.boxes.module import BoxNet
from regionnet.landmarks.model import group_boxes, square_boxes
from regionnet.landmarks.module import LandmarkNet
from regionnet.landmarks.phantom import landmark_names

SIZE = 64
LEVELS = ["V1", "V2", "V3"]


def _landmarks(**kw) -> LandmarkNet:
    torch.manual_seed(0)
    args = {"skeleton": "vertebrae", "backbone": "resnet18", "pretrained": False,
            "image_size": SIZE, "refine": True, "refine_size": 16, "head_width": 16,
            "refine_margin": 0.25, "refine_min_side": 0.05}  # fmt: skip
    return LandmarkNet(landmark_names(len(LEVELS)), **{**args, **kw}).eval()


class FixedDetections(nn.Module):
    """A detector network that finds V1 twice (the better box wins) and V3, never V2."""

    def forward(self, images):
        d = {
            "boxes": torch.tensor([[10.0, 4, 30, 14], [0, 0, 8, 8], [12, 40, 36, 52]]),
            "scores": torch.tensor([0.9, 0.3, 0.8]),
            "labels": torch.tensor([1, 1, 3]),
        }
        return [dict(d) for _ in images]


def _detector(names=LEVELS, image_size=SIZE) -> BoxNet:
    box = BoxNet(names, backbone="resnet18", image_size=image_size, fpn_width=64)
    box.net = FixedDetections()
    return box


def test_square_boxes_keep_the_centre_and_take_the_longer_side():
    out = square_boxes(torch.tensor([[10.0, 20, 30, 30]]), margin=0.5, min_side=4.0)
    assert out.tolist() == [[0.0, 5.0, 40.0, 45.0]]  # centre (20, 25), side 20 x 2
    assert torch.isnan(square_boxes(torch.full((1, 4), float("nan")), 0.5, 4.0)).all()


def test_step_2_crops_around_the_detectors_boxes_where_it_finds_the_level(monkeypatch):
    model = _landmarks()
    x = torch.randn(2, 1, SIZE, SIZE)
    seen = []
    real = landmark_module.crop_groups

    def spy(source, boxes, size, scale=1.0):
        seen.append(boxes.clone())
        return real(source, boxes, size, scale)

    monkeypatch.setattr(landmark_module, "crop_groups", spy)
    with torch.no_grad():
        plain = model.infer(x)
        model.use_detector(_detector())
        found = model.detector_boxes(x)
        with_detector = model.infer(x)
    step1_boxes, detector_crops = seen
    assert torch.isnan(found[:, 1]).all() and found[0, 0].tolist() == [10, 4, 30, 14]
    margin, min_side = 0.25, 0.05 * SIZE
    expected = square_boxes(found, margin, min_side)
    torch.testing.assert_close(detector_crops[:, 0], expected[:, 0])  # V1: its best box
    torch.testing.assert_close(detector_crops[:, 2], expected[:, 2])  # V3
    torch.testing.assert_close(detector_crops[:, 1], step1_boxes[:, 1])  # V2: step 1's corners
    points = (plain["step1"] + 1) / 2 * SIZE
    torch.testing.assert_close(step1_boxes, group_boxes(points, model.groups, margin, min_side))
    torch.testing.assert_close(with_detector["step1"], plain["step1"])  # step 1 unchanged
    assert not torch.allclose(with_detector["final"][:, :4], plain["final"][:, :4])
    # the detector is used, not owned: the landmark model's weights (and model_id) stay
    assert not any(k.startswith("_detector") for k in model.state_dict())


def test_a_detector_of_other_levels_or_input_is_refused():
    with pytest.raises(ValueError, match=r"finds \['A', 'B', 'C'\].*task=boxes"):
        _landmarks().use_detector(_detector(names=["A", "B", "C"]))
    with pytest.raises(ValueError, match="data.image_size=64"):
        _landmarks().use_detector(_detector(image_size=96))
    with pytest.raises(ValueError, match="two-step vertebra model"):
        _landmarks(refine=False).use_detector(_detector())
