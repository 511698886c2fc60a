"""A box model (`task=boxes`) as one ONNX file, the detector's post-processing included.

The graph is torchvision's FCOS as it runs in eval mode (`BoxNet.forward`): the timm backbone
and FPN, the class / box / centre-ness heads, box decoding from the anchor points, the score
threshold (`score_thresh`), the top candidates per level (`topk_candidates`), class-wise NMS
(`nms_thresh`, ONNX `NonMaxSuppression`) and the best `detections_per_img`. torchvision writes
these with ONNX-exportable ops, so nothing is left for deployment code but the letterbox.

Input `image`: ONE film (1, 1, S, S) float32, letterboxed to S x S and normalised with the
sidecar's `mean`/`std` exactly as for predict (`regionnet.landmarks.infer.prepare`); torchvision's
detectors trace one image at a time, so the batch axis is fixed at 1. Outputs, N detections
(N varies, at most `detections_per_img`): `boxes` (N, 4) [x1, y1, x2, y2] in input pixels,
`scores` (N,), `labels` (N,) int64 1..V, label k naming `box_names[k - 1]`. A box maps back to
the film's pixels through the letterbox: x = (x_in - offset_x) / scale_x, the same per axis for
y (`regionnet.landmarks.coords`; predict does this). On spine films the boxes are vertebrae,
not lesions.

With `check=true` the file runs in onnxruntime on phantom spine films and random inputs and
must give PyTorch's detections: the same number, labels and order, boxes within `atol` input
pixels and scores within `atol`. Where a score sits within float noise of the score threshold
or two boxes within it of the NMS overlap, the two could keep different boxes: the check says
so and writes nothing. `quantize=int8` is for region models only.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from regionnet.data.transforms import GRAY_MEAN, GRAY_STD, eval_transform
from regionnet.landmarks.infer import prepare
from regionnet.landmarks.phantom import render_spine
from regionnet.model.identity import model_id
from regionnet.onnx_graph import export_graph, onnx_session, set_onnx_metadata, write_sidecar

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "scores", "labels")
CHECK_FILMS = 4


class DetectorGraph(nn.Module):
    """BoxNet's FCOS as (1, 1, S, S) -> (boxes (N, 4), scores (N,), labels (N,))."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        found = self.detector(list(image))[0]
        return found["boxes"], found["scores"], found["labels"]


def sample_inputs(model) -> list[torch.Tensor]:
    """Check inputs, one film each: phantom spines letterboxed and normalised like predict's
    films, and random normal values."""
    size = int(model.hparams.image_size)
    transform = eval_transform(model)
    films = []
    for k in range(CHECK_FILMS - 1):
        pixels, _ = render_spine(seed=7, index=k, size=(2 * size, size))
        films.append(prepare(pixels, transform, size)["image"][None])
    gen = torch.Generator().manual_seed(0)
    films.append(torch.randn(1, 1, size, size, generator=gen))
    return films


def check_parity(output: Path, graph: DetectorGraph, inputs: list[torch.Tensor], atol: float):
    """Largest |onnxruntime - PyTorch| over boxes (input pixels) and scores of `inputs`, with
    the same detections kept; raises otherwise. Returns (largest difference, detections)."""
    session = onnx_session(output)
    worst, counts = 0.0, []
    for k, x in enumerate(inputs):
        with torch.no_grad():
            expected = [t.numpy() for t in graph(x)]
        got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
        counts.append(len(expected[0]))
        if len(got[0]) != len(expected[0]) or not np.array_equal(got[2], expected[2]):
            raise RuntimeError(
                f"{output}: on check film {k} the ONNX detector keeps {len(got[0])} boxes "
                f"(labels {got[2].tolist()[:8]}...), PyTorch {len(expected[0])} "
                f"({expected[2].tolist()[:8]}...): a score at the threshold or an overlap at "
                "the NMS limit falls the other way in float noise. Nothing was written; try "
                "another opset (opset=...) or check=false and compare on your own films"
            )
        if len(got[0]):
            worst = max(
                worst,
                float(np.abs(got[0] - expected[0]).max()),
                float(np.abs(got[1] - expected[1]).max()),
            )
    print(
        f"check onnx: {sum(counts)} detections on {len(inputs)} films {counts}, max |onnxruntime "
        f"- pytorch| box coordinate (px) or score = {worst:.2e}"
    )
    if not worst <= atol:  # NaN fails too
        raise RuntimeError(
            f"{output}: the exported detector differs from PyTorch by {worst:.3e} > atol={atol} "
            "(input pixels or score); nothing was written. Try another opset (opset=...) or "
            "raise atol"
        )
    return worst, counts


def metadata(model, output: Path, ckpt: Path, opset: int) -> dict:
    """What deployment code needs besides the graph (the sidecar `<output>.json`)."""
    h = model.hparams
    size = int(h.image_size)
    return {
        "format": "onnx",
        "task": "boxes",
        "model_file": output.name,
        "checkpoint": str(ckpt),
        "source_model_id": model_id(model),
        "opset": int(opset),
        "box_names": list(model.box_names),
        "dataset": h.get("dataset"),
        "note": "boxes of vertebrae (one class per level), not lesions",
        "backbone": h.backbone,
        "image_size": size,
        "mean": float(h.get("mean", GRAY_MEAN)),
        "std": float(h.get("std", GRAY_STD)),
        "score_thresh": float(h.score_thresh),
        "nms_thresh": float(h.nms_thresh),
        "detections_per_img": int(h.detections_per_img),
        "input": {
            "name": INPUT_NAME,
            "shape": [1, 1, size, size],
            "dtype": "float32",
            "preprocessing": (
                "one film, greyscale in [0, 1] (MONOCHROME2, bone bright), resized keeping its "
                f"aspect so the longest side is {size}, centred on a black {size}x{size} "
                "canvas (the letterbox), then (x - mean) / std"
            ),
        },
        "outputs": {
            "boxes": "(N, 4) float32 [x1, y1, x2, y2] in input pixels; to the film's pixels: "
            "x = (x_in - offset_x) / scale_x, y = (y_in - offset_y) / scale_y with the letterbox's "
            "scale and offset",
            "scores": "(N,) float32, best first",
            "labels": "(N,) int64 in 1..V: label k is box_names[k - 1]",
        },
        "postprocessing_in_graph": "box decoding, score threshold, top candidates, NMS",
    }


def export_boxes(cfg: DictConfig) -> Path:
    """`regionnet-export` for a box checkpoint: `model.onnx` and its sidecar (see above)."""
    from regionnet.boxes.infer import load_box_model

    fmt = str(cfg.format).lower()
    if fmt != "onnx":
        raise ValueError(
            f"format={cfg.format!r}: a box model exports to ONNX only (format=onnx); "
            "TorchScript cannot trace torchvision's detector post-processing here"
        )
    if cfg.get("quantize"):
        raise ValueError(
            f"quantize={cfg.quantize}: int8 export is for region models; export the box model "
            "with quantize=null"
        )
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    model = load_box_model(ckpt)
    output = Path(cfg.output).expanduser() if cfg.get("output") else ckpt.parent / "model.onnx"
    output.parent.mkdir(parents=True, exist_ok=True)
    opset = int(cfg.get("opset", 17))
    graph = DetectorGraph(model.net).eval()
    inputs = sample_inputs(model)
    meta = metadata(model, output, ckpt, opset)
    # made in a scratch folder beside `output` and moved in place: a failed check leaves nothing
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".export-") as tmp:
        work = Path(tmp) / output.name
        axes = {name: {0: "detections"} for name in OUTPUT_NAMES}
        export_graph(graph, (inputs[0],), work, [INPUT_NAME], OUTPUT_NAMES, axes, opset)
        if cfg.get("check", True):
            worst, counts = check_parity(work, graph, inputs, float(cfg.get("atol", 1e-4)))
            meta["check_max_abs_diff"] = worst
            meta["check_detections"] = counts
        set_onnx_metadata(work, meta)
        work.replace(output)
    sidecar = write_sidecar(output, meta)
    print(f"exported onnx: {output}\nmetadata: {sidecar}")
    return output
