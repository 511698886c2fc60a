"""Grad-CAM maps and overlays (regionnet.cam) on small random-init models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from regionnet import cam
from regionnet.cam import cam_for_file, cam_overlay, content_box, grad_cam, save_png
from regionnet.data.phantom import render_phantom
from regionnet.data.transforms import build_transforms, resize_pad
from regionnet.io import read_radiograph
from regionnet.model.module import RegionNet

S = 64  # stride-32 backbones give a 2 x 2 map here: the smallest that is not constant
REGIONS = ["hand", "knee"]


def make_model(backbone: str = "resnet18", shared: bool = True) -> RegionNet:
    torch.manual_seed(0)
    return RegionNet(
        regions=REGIONS, backbone=backbone, image_size=S, shared_backbone=shared
    ).eval()


def model_input(pixels: np.ndarray) -> torch.Tensor:
    return build_transforms(S, train=False)(torch.from_numpy(pixels)[None])[None]


def point_head_at(model: RegionNet, region: str, x: torch.Tensor) -> None:
    """Make the head's logit grow with this image's own pooled features. A random head can
    point against every position of a random backbone's map, and then Grad-CAM is rightly all
    zero; a head aligned with the features always has positive evidence to localise."""
    backbone = model.net.backbone_for(region)
    with torch.no_grad():
        feats = backbone(x)[0]
        model.net.heads[region][-1].weight.copy_(feats / feats.norm())


@pytest.fixture(scope="module")
def knee() -> np.ndarray:
    """A non-square 'radiograph': a phantom knee cropped to 96 x 64 (H x W)."""
    return render_phantom("knee", 3, size=96)[:, 16:80].copy()


def classic_cam(model: RegionNet, region: str, x: torch.Tensor) -> np.ndarray:
    """CAM of Zhou et al. 2016: with global average pooling and a linear head, Grad-CAM's
    channel weights are the head's weights, so the map is ReLU(sum_c w_c A_c)."""
    backbone = model.net.backbone_for(region)
    with torch.no_grad():
        fmap = backbone.forward_features(x)
        w = model.net.heads[region][-1].weight[0]
        m = F.relu(torch.einsum("c,bchw->bhw", w, fmap))[:, None]
        m = F.interpolate(m, size=(S, S), mode="bilinear", align_corners=False)[0, 0]
    return (m / m.max()).numpy()


@pytest.mark.parametrize("backbone", ["resnet18", "convnext_atto"])
def test_grad_cam_is_a_normalised_map_of_input_size(backbone, knee):
    model = make_model(backbone)
    x = model_input(knee)
    point_head_at(model, "knee", x)
    m = grad_cam(model, x, 1)
    assert m.shape == (S, S) and m.dtype == np.float32
    assert m.min() >= 0 and m.max() == pytest.approx(1.0)
    assert m.std() > 0.01  # varies over the image


def test_grad_cam_equals_classic_cam_for_a_linear_head(knee):
    model = make_model("resnet18")
    x = model_input(knee)
    point_head_at(model, "knee", x)
    np.testing.assert_allclose(grad_cam(model, x, "knee"), classic_cam(model, "knee", x), atol=1e-5)


def test_grad_cam_per_region_backbones(knee):
    model = make_model("resnet18", shared=False)
    x = model_input(knee)
    for region in REGIONS:
        point_head_at(model, region, x)
    before = grad_cam(model, x, "knee")
    np.testing.assert_allclose(before, classic_cam(model, "knee", x), atol=1e-5)
    with torch.no_grad():  # the hand backbone is none of the knee head's business
        for p in model.net.backbones["hand"].parameters():
            p.add_(1.0)
    np.testing.assert_array_equal(grad_cam(model, x, "knee"), before)


def test_grad_cam_inside_inference_mode_leaves_no_trace(knee):
    """As inside a Lightning predict loop: inference-mode input, grads globally off."""
    model = make_model("resnet18")
    x = model_input(knee)
    point_head_at(model, "knee", x)
    outside = grad_cam(model, x, 1)
    model.train()
    with torch.inference_mode():
        inside = grad_cam(model, model_input(knee), 1)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    np.testing.assert_allclose(inside, outside, atol=1e-6)


def test_grad_cam_names_the_heads_on_a_bad_region(knee):
    model = make_model()
    with pytest.raises(IndexError, match="hand"):
        grad_cam(model, model_input(knee), 5)
    with pytest.raises(ValueError, match="knee"):
        grad_cam(model, model_input(knee), "skull")


@pytest.mark.parametrize("shape", [(96, 64), (40, 130), (77, 77), (500, 13)])
def test_content_box_matches_the_transform(shape):
    padded = resize_pad(S)(torch.ones(1, *shape))[0]
    rows, cols = torch.nonzero(padded > 0, as_tuple=True)
    top, left = int(rows.min()), int(cols.min())
    expected = (top, left, int(rows.max()) - top + 1, int(cols.max()) - left + 1)
    assert content_box(*shape, size=S) == expected


def test_overlay_undoes_the_padding(knee, monkeypatch):
    """Heat only in the black padding must vanish from the overlay; heat on the whole
    content box must tint every pixel of the original."""
    top, left, h, w = content_box(*knee.shape, size=S)
    inside = np.zeros((S, S), np.float32)
    inside[top : top + h, left : left + w] = 1
    gray = np.round(knee * 255).astype(np.uint8)[..., None].repeat(3, axis=2)
    model = make_model()
    x = model_input(knee)

    monkeypatch.setattr(cam, "grad_cam", lambda *a: 1 - inside)
    only_pad = cam_overlay(model, x, 0, knee)
    assert only_pad.shape == (*knee.shape, 3) and only_pad.dtype == np.uint8
    np.testing.assert_array_equal(only_pad, gray)

    monkeypatch.setattr(cam, "grad_cam", lambda *a: inside)
    everywhere = cam_overlay(model, x, 0, knee)
    assert (np.abs(everywhere.astype(int) - gray).max(axis=2) > 10).all()


def test_overlay_of_a_real_map_is_an_rgb_image_of_the_original_size(knee):
    model = make_model()
    x = model_input(knee)
    point_head_at(model, "knee", x)
    overlay = cam_overlay(model, x, 1, knee)
    assert overlay.shape == (96, 64, 3) and overlay.dtype == np.uint8
    gray = np.round(knee * 255)[..., None]
    tint = np.abs(overlay - gray).max(axis=2)
    assert tint.max() > 50 and tint.min() < tint.max() / 2  # a hot spot, not a uniform wash


def test_save_png_round_trip(tmp_path, knee):
    rgb = np.random.default_rng(0).integers(0, 256, (*knee.shape, 3), dtype=np.uint8)
    path = save_png(rgb, tmp_path / "sub" / "cam.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), rgb)
    grey = np.asarray(Image.open(save_png(knee, tmp_path / "grey.png")))
    np.testing.assert_array_equal(grey, np.round(knee * 255).astype(np.uint8))


def test_cam_for_file(tmp_path, knee):
    path = save_png(knee, tmp_path / "knee.png")
    model = make_model()
    overlay, region, prob = cam_for_file(model, path)
    probs = model.predict_proba(model_input(read_radiograph(path))).detach()[0]
    assert overlay.shape == (*knee.shape, 3) and overlay.dtype == np.uint8
    assert region == REGIONS[int(probs.argmax())]
    assert prob == pytest.approx(float(probs.max()), abs=1e-6)
    assert cam_for_file(model, path, region="hand")[1] == "hand"


def test_cam_for_file_uses_the_checkpoints_normalisation(tmp_path, knee):
    """Defect: cam_for_file normalised with ImageNet's grey statistics whatever the model was
    trained with, so its probability differed from the API's for the same film."""
    from regionnet.api import RegionPredictor

    path = save_png(knee, tmp_path / "knee.png")
    torch.manual_seed(0)
    model = RegionNet(regions=REGIONS, backbone="resnet18", image_size=S, mean=0.2, std=0.05)
    api = RegionPredictor(model.eval()).predict([path])[0]
    for region in REGIONS:
        _, _, prob = cam_for_file(model, path, region=region)
        assert prob == pytest.approx(api.probabilities[region], abs=1e-6)


@pytest.mark.parametrize("shape", [(96, 64), (40, 130), (600, 800)])
def test_label_overlay_adds_a_strip_and_keeps_the_overlay(shape):
    from regionnet.cam import heat_colors, label_overlay, strip_height

    rng = np.random.default_rng(1)
    overlay = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    labelled = label_overlay(overlay, "knee p=0.97")
    h, w = shape
    assert labelled.shape == (h + strip_height(w), w, 3) and labelled.dtype == np.uint8
    np.testing.assert_array_equal(labelled[:h], overlay)  # the overlay's pixels unchanged
    strip = labelled[h:]
    row = strip[strip.shape[0] // 2]
    # the colour bar runs from the colormap's 0 (dark blue) to its 1 (dark red), left to right
    low, high = (np.round(heat_colors(np.array([v]))[0] * 255) for v in (0.0, 1.0))
    lo = np.abs(row.astype(int) - low).sum(axis=1).argmin()
    hi = np.abs(row.astype(int) - high).sum(axis=1).argmin()
    assert np.abs(row[lo].astype(int) - low).max() <= 2
    assert np.abs(row[hi].astype(int) - high).max() <= 2
    assert w // 2 < lo < hi
    # white text on the left part of the strip
    assert (strip[:, : w // 2] == 255).all(axis=2).any()
    # another label, another strip; a long label never spills into the bar
    other = label_overlay(overlay, "unknown (elbow p=0.12) " * 20)
    assert not np.array_equal(other[h:, : w // 2], strip[:, : w // 2])
    np.testing.assert_array_equal(other[h:, lo : hi + 1], strip[:, lo : hi + 1])


def test_label_overlay_refuses_a_grey_image():
    from regionnet.cam import label_overlay

    with pytest.raises(ValueError, match="uint8"):
        label_overlay(np.zeros((8, 8)), "knee")
