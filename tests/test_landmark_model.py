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


def test_detail_crops_share_the_frame_at_the_detail_scale():
    """The same dot in a 4x detail image: a crop cut with scale=4 from input-pixel boxes maps
    back to the dot's input position, 4x finer than a crop of the input could."""
    image = torch.zeros(1, 1, 256, 256)
    image[0, 0, 82, 162] = 1.0  # detail pixel centre (162.5, 82.5) = input (40.625, 20.625)
    points = torch.tensor([[[36.0, 16.0], [45.0, 16.0], [36.0, 25.0], [45.0, 25.0]]])
    groups = torch.tensor(landmark_groups("vertebrae", 4))
    boxes = group_boxes(points, groups, margin=0.0, min_side=4.0)  # 9 input px = 36 detail px
    crop = crop_groups(image, boxes, 72, scale=4.0)[0, 0]
    row, col = divmod(int(crop.argmax()), 72)
    local = torch.tensor([[[2 * (col + 0.5) / 72 - 1, 2 * (row + 0.5) / 72 - 1]]])
    back = from_crops(local, boxes)[0, 0, 0]
    assert back.tolist() == pytest.approx([40.625, 20.625], abs=9 / 72 + 1e-4)


def _detail_model(**kw) -> LandmarkNet:
    names = [f"V{v}_{c}" for v in range(2) for c in ("tl", "tr", "bl", "br")]
    args = {"skeleton": "vertebrae", "backbone": "resnet18", "pretrained": False,
            "image_size": 32, "refine": True, "refine_size": 32, "head_width": 16,
            "detail_size": 128, "refine_margin": 0.0}  # fmt: skip
    return LandmarkNet(names, **{**args, **kw})


def test_step_2_crops_come_from_the_detail_image_at_its_resolution():
    """Vertical stripes 2 detail px wide: visible in the 128 px detail image, averaged away to
    a flat grey in the 32 px input (4 x 4 pooling). Step 2's crops show them only when the
    model crops from the detail image; a model without detail_size crops the flat input."""
    from regionnet.landmarks.coords import detail_to_input

    columns = (torch.arange(128) // 2 % 2).float()
    detail = columns.expand(2, 1, 128, 128).contiguous()
    image = detail_to_input(detail, 32)
    assert torch.allclose(image, torch.full_like(image, 0.5))  # the stripes averaged away
    # corners 8 input px apart, no margin: 32 detail px into a 32 px crop, 1 px per crop px
    coords = torch.tensor([[10.0, 10.0], [18.0, 10.0], [10.0, 18.0], [18.0, 18.0]])
    coords = (torch.cat([coords, coords + 6]) / 32 * 2 - 1).expand(2, 8, 2)
    seen = {}
    for d in (128, None):
        model = _detail_model(detail_size=d).eval()
        crops: list[torch.Tensor] = []
        model.refiner.register_forward_pre_hook(lambda _, args, seen=crops: seen.append(args[0]))
        with torch.no_grad():
            final = model.refine(image, coords, detail if d else None)
        assert final.shape == (2, 8, 2)
        seen[d] = crops[0]
    assert seen[128].shape == seen[None].shape == (4, 1, 32, 32)
    assert seen[128].std() > 0.3 and seen[None].std() < 1e-4, (seen[128].std(), seen[None].std())
    stripes = seen[128][0, 0, 16]  # one crop row: runs of two dark and two bright pixels
    assert (stripes[:-2] - stripes[2:]).abs().min() > 0.4


def test_a_detail_model_names_what_it_needs():
    model = _detail_model().eval()
    assert model.detail_size == 128 and model.hparams.detail_size == 128
    with pytest.raises(ValueError, match="detail image.*model.detail_size=128"):
        model.infer(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(64, 64\) px: this model takes 128 x 128"):
        model.infer(torch.randn(1, 1, 32, 32), torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="model.detail_size=100: use a multiple of image_size"):
        _detail_model(detail_size=100)
    # only step 2 uses it; the input's own size is no detail; old checkpoints have none
    assert _detail_model(refine=False).hparams.detail_size is None
    assert _detail_model(detail_size=32).detail_size is None
    old = dict(_detail_model().hparams)
    old.pop("detail_size")
    assert LandmarkNet(**old).detail_size is None


def test_groups_are_vertebrae_or_single_points():
    assert landmark_groups("vertebrae", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert landmark_groups("points", 3) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="4 corners"):
        landmark_groups("vertebrae", 6)


@pytest.mark.parametrize("refine, detail", [(False, None), (True, None), (True, 128)])
def test_every_parameter_learns_and_outputs_have_the_documented_shapes(refine, detail):
    names = [f"V{v}_{c}" for v in range(2) for c in ("tl", "tr", "bl", "br")]
    model = LandmarkNet(names, skeleton="vertebrae", backbone="resnet18", pretrained=False,
                        image_size=64, refine=refine, refine_size=32, head_width=16,
                        detail_size=detail)  # fmt: skip
    x = torch.randn(2, 1, 64, 64)
    points = torch.rand(2, 8, 2) * 1.2 - 0.6
    batch = {"image": x, "points": points, "visible": torch.ones(2, 8, dtype=torch.bool)}
    if detail:
        batch["detail"] = torch.randn(2, 1, detail, detail)
    out = model.infer(x, batch.get("detail"))
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
