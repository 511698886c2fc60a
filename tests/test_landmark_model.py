"""The landmark network's parts: DSNT's coordinate frame, its loss, step 2's crops, gradients."""

from __future__ import annotations

import pytest
import torch

from regionnet.landmarks.model import (
    crop_groups,
    dsnt_loss,
    from_crops,
    group_boxes,
    heatmap_coords,
    landmark_groups,
    target_heatmaps,
)
from regionnet.landmarks.module import LandmarkNet


def test_a_heatmap_peak_maps_to_the_centre_of_its_cell():
    # cell (row 2, column 5) of an 8 x 16 map covers input [5/16, 6/16) of the width
    heat = torch.zeros(1, 1, 8, 16)
    heat[0, 0, 2, 5] = 1.0
    x, y = heatmap_coords(heat)[0, 0].tolist()
    assert x == pytest.approx(2 * 5.5 / 16 - 1)
    assert y == pytest.approx(2 * 2.5 / 8 - 1)


def test_gaussian_targets_have_their_expectation_at_the_point():
    points = torch.tensor([[[-0.31, 0.42], [0.05, -0.6]]])
    heat = target_heatmaps(points, (32, 32), sigma=1.0)
    assert heat.sum(dim=(-1, -2)).allclose(torch.ones(1, 2), atol=1e-4)
    assert heatmap_coords(heat).allclose(points, atol=2e-3)


def test_dsnt_loss_is_zero_at_the_truth_and_ignores_hidden_points():
    target = torch.tensor([[[0.1, 0.2], [0.5, -0.5]]])
    heat = target_heatmaps(target, (16, 16), 1.0)
    coords = target.clone().requires_grad_(True)
    assert dsnt_loss(coords, heat, target, torch.ones(1, 2, dtype=torch.bool)) < 1e-3
    wrong = target.clone()
    wrong[0, 1] = torch.tensor([0.9, 0.9])
    wrong.requires_grad_(True)
    visible = torch.tensor([[True, False]])
    loss = dsnt_loss(wrong, heat, target, visible, js_weight=0.0)
    loss.backward()
    assert float(loss) < 1e-6
    assert wrong.grad[0, 1].abs().sum() == 0  # a hidden point gives no gradient


def test_crops_and_map_back_share_one_frame():
    # a bright dot at input pixel (x=40.5, y=20.5) (centre of pixel column 40, row 20)
    image = torch.zeros(1, 1, 64, 64)
    image[0, 0, 20, 40] = 1.0
    points = torch.tensor([[[36.0, 16.0], [45.0, 16.0], [36.0, 25.0], [45.0, 25.0]]])
    groups = torch.tensor(landmark_groups("vertebrae", 4))
    boxes = group_boxes(points, groups, margin=0.5, min_side=4.0)
    assert boxes.shape == (1, 1, 4)
    crop = crop_groups(image, boxes, 64)[0, 0]
    row, col = divmod(int(crop.argmax()), 64)
    # the crop pixel's centre, in normalised crop coordinates, maps back near the dot
    local = torch.tensor([[[2 * (col + 0.5) / 64 - 1, 2 * (row + 0.5) / 64 - 1]]])
    back = from_crops(local, boxes)[0, 0, 0]
    side = float(boxes[0, 0, 2] - boxes[0, 0, 0])
    assert back.tolist() == pytest.approx([40.5, 20.5], abs=side / 64 + 1e-4)


def test_groups_are_vertebrae_or_single_points():
    assert landmark_groups("vertebrae", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert landmark_groups("points", 3) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="4 corners"):
        landmark_groups("vertebrae", 6)


@pytest.mark.parametrize("refine", [False, True])
def test_every_parameter_learns_and_outputs_have_the_documented_shapes(refine):
    names = [f"V{v}_{c}" for v in range(2) for c in ("tl", "tr", "bl", "br")]
    model = LandmarkNet(names, skeleton="vertebrae", backbone="resnet18", pretrained=False,
                        image_size=64, refine=refine, refine_size=32, head_width=16)  # fmt: skip
    x = torch.randn(2, 1, 64, 64)
    points = torch.rand(2, 8, 2) * 1.2 - 0.6
    batch = {"image": x, "points": points, "visible": torch.ones(2, 8, dtype=torch.bool)}
    out = model.infer(x)
    assert out["final"].shape == out["step1"].shape == (2, 8, 2)
    assert out["final"].abs().max() <= 1.0 + 1e-5
    model._loss(batch, train=True).backward()
    silent = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not silent, f"parameters without gradient: {silent[:5]}"
    if refine:
        assert model.refiner is not None
        assert not torch.equal(out["final"], out["step1"])


def test_to_original_undoes_the_letterbox():
    model = LandmarkNet(["a", "b"], backbone="resnet18", image_size=100, head_width=8)
    # a 200 x 100 (w x h) film letterboxed to 100: scale 0.5, 25 px of padding above
    scale, offset = torch.tensor([0.5]), torch.tensor([[0.0, 25.0]])
    original = torch.tensor([[[10.0, 20.0], [190.0, 80.0]]])
    normalised = (original * 0.5 + offset[:, None]) / 100 * 2 - 1
    assert model.to_original(normalised, scale, offset).allclose(original, atol=1e-4)


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="model.skeleton"):
        LandmarkNet(["a"], skeleton="ribs", backbone="resnet18")
    with pytest.raises(ValueError, match="model.stride"):
        LandmarkNet(["a"], backbone="resnet18", stride=6)
    with pytest.raises(ValueError, match="model.refine_size"):
        LandmarkNet(["a"], backbone="resnet18", refine=True, refine_size=4)
