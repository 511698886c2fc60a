"""Class activation maps: where in a radiograph a region head found its evidence.

Grad-CAM (Selvaraju et al. 2017) on the backbone's last feature map: the gradient of one
head's logit with respect to the (C, h, w) map, averaged over space, weighs the channels; the
ReLU of the weighted sum keeps what speaks *for* the region. The map is as coarse as the
backbone's stride (32 for resnet/efficientnet/convnext: 7 x 7 at 224 px, 2 x 2 at 64 px), then
upsampled. A trustworthy shoulder head lights up the humeral head and glenoid, not the burned-in
"L"/"R" marker, the collimation edge or a text label: CAMs are the quick check for such
shortcuts (Yi et al. 2019 show them for the same task).

The model input is the radiograph resized (longest side to S) and centre-padded to S x S;
`cam_overlay` crops the map to that content box before stretching it back onto the original.

`label_overlay` adds a strip below an overlay (its pixels stay as they are; the image grows by
the strip's height): the region and its probability on the left, the colour bar of the heat
map (0 = no evidence, 1 = the strongest in this image) on the right. `regionnet-predict
cam=true` saves labelled overlays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from regionnet.data.transforms import eval_transform


def _region_name(model, region_index: int | str) -> str:
    regions = list(model.regions)
    if isinstance(region_index, str):
        if region_index not in regions:
            raise ValueError(f"region {region_index!r} has no head; the model's heads: {regions}")
        return region_index
    if not -len(regions) <= int(region_index) < len(regions):
        raise IndexError(f"region_index={region_index} out of range for heads {regions}")
    return regions[int(region_index)]


def grad_cam(model, image_tensor: torch.Tensor, region_index: int | str) -> np.ndarray:
    """Grad-CAM of head `region_index` (position in `model.regions`, or its name) for one
    normalised input (1, 1, S, S): float32 (S, S) in [0, 1], 1 = strongest evidence for the
    region. All zeros when nothing in the image argues for it.

    Works inside `torch.no_grad()`/`torch.inference_mode()` (e.g. a predict loop), leaves no
    `.grad` on parameters and no hooks, and restores the model's train/eval mode.
    """
    region = _region_name(model, region_index)
    if image_tensor.ndim == 3:
        image_tensor = image_tensor.unsqueeze(0)
    if image_tensor.ndim != 4 or image_tensor.shape[0] != 1:
        raise ValueError(f"grad_cam needs one image (1, C, S, S), got {tuple(image_tensor.shape)}")
    net = getattr(model, "net", model)  # a RegionNet or its plain RegionClassifier
    backbone, head = net.backbone_for(region), net.heads[region]
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        # inference_mode(False) + clone: inference tensors cannot join an autograd graph.
        with torch.inference_mode(False), torch.enable_grad():
            x = image_tensor.to(param.device, param.dtype).clone()
            with torch.no_grad():  # no graph through the backbone: gradients start at the map
                fmap = backbone.forward_features(x)
            if fmap.ndim != 4:
                raise ValueError(
                    f"backbone {type(backbone).__name__} gives features of shape "
                    f"{tuple(fmap.shape)}, not a (B, C, h, w) map; Grad-CAM needs a CNN backbone"
                )
            fmap = fmap.detach().requires_grad_(True)
            logit = head(backbone.forward_head(fmap)).sum()
            # autograd.grad returns the gradient instead of accumulating it into .grad
            (grad,) = torch.autograd.grad(logit, fmap)
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * fmap.detach()).sum(dim=1, keepdim=True)).float()
        size = tuple(image_tensor.shape[-2:])
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0, 0]
        peak = cam.max()
        cam = cam / peak if peak > 0 else torch.zeros_like(cam)
        return cam.clamp(0, 1).cpu().numpy().astype(np.float32)
    finally:
        model.train(was_training)


def content_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the radiograph inside the S x S model input, as
    `regionnet.data.transforms.resize_pad` (torchvision's Resize(max_size) + CenterCrop) lays
    it out: the longest side becomes S, the shorter `int(S * short / long)`, centred."""
    long, short = max(height, width), min(height, width)
    new_short = max(1, int(size * short / long))
    h, w = (size, new_short) if height >= width else (new_short, size)
    return (size - h) // 2, (size - w) // 2, h, w


def heat_colors(heat: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """A matplotlib colormap applied to a [0, 1] map: float32 (H, W, 3) in [0, 1]."""
    from matplotlib import colormaps

    return colormaps[cmap](np.clip(heat, 0, 1))[..., :3].astype(np.float32)


def blend(
    pixels: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet"
) -> np.ndarray:
    """The radiograph in grey with the coloured heatmap on top: uint8 (H, W, 3).

    Opacity grows with the heat (`alpha * heat`), so cold areas show the radiograph untouched
    and the reader still sees the anatomy under the hot spots."""
    gray = np.clip(np.asarray(pixels, np.float32), 0, 1)[..., None].repeat(3, axis=2)
    a = (alpha * np.clip(heat, 0, 1))[..., None]
    out = (1 - a) * gray + a * heat_colors(heat, cmap)
    return np.round(out * 255).astype(np.uint8)


def cam_overlay(
    model,
    image_tensor: torch.Tensor,
    region_index: int | str,
    pixels: np.ndarray,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> np.ndarray:
    """Grad-CAM of one head drawn over the original radiograph.

    `image_tensor` (1, 1, S, S) is the model input made from `pixels` (float (H, W) in [0, 1],
    as `regionnet.io.read_radiograph` returns) by the eval transform. The map is cropped to the
    padded input's content box and resized to (H, W). Returns uint8 (H, W, 3).
    """
    pixels = np.asarray(pixels, np.float32)
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be a grey (H, W) radiograph, got shape {pixels.shape}")
    cam = grad_cam(model, image_tensor, region_index)
    top, left, h, w = content_box(*pixels.shape, size=cam.shape[0])
    crop = torch.from_numpy(cam[top : top + h, left : left + w].copy())[None, None]
    heat = F.interpolate(crop, size=pixels.shape, mode="bilinear", align_corners=False)[0, 0]
    return blend(pixels, heat.clamp(0, 1).numpy(), alpha, cmap)


def strip_height(width: int) -> int:
    """Height of `label_overlay`'s strip for an overlay `width` pixels wide: 6 % of the width,
    at least 16 pixels."""
    return max(16, round(0.06 * width))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()


def label_overlay(overlay: np.ndarray, text: str, cmap: str = "jet") -> np.ndarray:
    """`overlay` (uint8 (H, W, 3)) with a black strip of `strip_height(W)` rows below it:
    `text` (e.g. "knee p=0.97") in white on the left, and on the right, over about a third of
    the width, the colour bar of `cmap` from 0 to 1 with its end values. Returns uint8
    (H + strip, W, 3); the overlay's own pixels are unchanged."""
    overlay = np.asarray(overlay)
    if overlay.ndim != 3 or overlay.shape[2] != 3 or overlay.dtype != np.uint8:
        raise ValueError(f"overlay must be uint8 (H, W, 3), got {overlay.dtype} {overlay.shape}")
    height, width = overlay.shape[:2]
    sh = strip_height(width)
    strip = Image.new("RGB", (width, sh), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    font = _font(max(8, round(sh * 0.7)))
    pad = max(2, sh // 6)
    # the colour bar: "0" [gradient] "1" at the right end
    one_w = draw.textlength("1", font=font)
    zero_w = draw.textlength("0", font=font)
    bar_w = max(8, width // 3 - int(one_w + zero_w) - 4 * pad)
    bar_right = width - pad - int(one_w) - pad
    bar_left = bar_right - bar_w
    text_right = bar_left - pad - int(zero_w) - 2 * pad
    if text_right > pad:  # the text, cut at its box: a long label never runs into the bar
        box = Image.new("RGB", (text_right, sh), (0, 0, 0))
        ImageDraw.Draw(box).text((pad, sh / 2), text, fill=(255, 255, 255), font=font, anchor="lm")
        strip.paste(box, (0, 0))
    colours = np.round(heat_colors(np.linspace(0, 1, bar_w), cmap) * 255).astype(np.uint8)
    top, bottom = pad, sh - pad
    bar = np.broadcast_to(colours[None], (max(1, bottom - top), bar_w, 3))
    strip.paste(Image.fromarray(np.ascontiguousarray(bar)), (bar_left, top))
    draw.text((bar_left - pad, sh / 2), "0", fill=(255, 255, 255), font=font, anchor="rm")
    draw.text((bar_right + pad, sh / 2), "1", fill=(255, 255, 255), font=font, anchor="lm")
    return np.concatenate([overlay, np.asarray(strip, np.uint8)], axis=0)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write uint8 (H, W) or (H, W, 3) — or float in [0, 1] — as a PNG; creates the folder."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


def cam_for_file(
    model,
    path: str | Path,
    region: str | None = None,
) -> tuple[np.ndarray, str, float]:
    """One-liner for notebooks: read a radiograph (any format `read_radiograph` takes, or a
    `phantom://region/seed` URI), run the model, return (overlay uint8 (H, W, 3), region,
    probability) for the most probable head, or for `region` when given. Compare the
    probability with `model.thresholds` to decide whether the region is shown at all. The
    preprocessing and the probability are those of the Python API (`eval_transform(model)`,
    test-time flip when the checkpoint has `tta`).
    """
    from regionnet.data.dataset import load_image  # read_radiograph, plus phantom:// URIs

    size = int(model.hparams.image_size)
    pixels = load_image(str(path), phantom_size=max(size, 256))
    x = eval_transform(model)(torch.from_numpy(pixels)[None])
    x = x[None].to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        probs = model.inference_proba(x)[0].cpu()
    model.train(was_training)
    k = list(model.regions).index(_region_name(model, region)) if region else int(probs.argmax())
    return cam_overlay(model, x, k, pixels), model.regions[k], float(probs[k])
