"""`regionnet-export` of a landmark checkpoint: `export_landmarks(cfg)` writes an ONNX file that
maps a normalised batch (B, 1, S, S) to landmark coordinates (B, K, 2), a JSON sidecar, and
checks the file against PyTorch with onnxruntime.

`regionnet.export.export(cfg)` hands a landmark checkpoint here (the same `conf/export.yaml`:
`ckpt_path`, `output`, `opset`, `check`, `atol`, `batch_size`). The graph is both steps when the
model refines (`refine`: step 2's crops are `torchvision.ops.roi_align` with `aligned=True`,
ONNX `RoiAlign` with `coordinate_transformation_mode=half_pixel` from opset 16); where that
cannot be exported, the file holds step 1 alone and the sidecar and the log say so.

Input: the radiograph in [0, 1] (bone bright), letterboxed (longest side to N, antialiased
bilinear; centre-padded with 0 to N x N), then `(x - mean) / std`: `film_transform(model)`.
N is the input size S (`image_size`), or, for a two-step model whose step 2 crops from a detail
image (`detail_size` D), N = D: the graph pools the D x D image to S x S for step 1
(AveragePool, `coords.detail_to_input`) and cuts step 2's crops from the D x D image itself,
as in training; the sidecar's `input_size` is N. Output `coords`: [x, y] per landmark in
normalised input coordinates, align_corners=False (-1 = the left/top edge of the N x N input,
+1 = the right/bottom edge; `regionnet.landmarks.coords`; the same at S and D). Back to a
W x H film's pixels: `x_in = (x + 1) * N / 2`, then `x_film = (x_in - offset_x) / scale_x` with
the letterbox's per-axis `scale` and `offset` at N (`coords.letterbox_params`; the sidecar
spells it out).

Parity: the exported file and PyTorch (`LandmarkNet.infer`) on random inputs and on phantom
spines, in batches of two sizes (the batch axis is dynamic); a largest |difference| above
`atol` (normalised coordinates, default 1e-4, i.e. 1/20000 of the input side) is an error and
nothing is written.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from regionnet.data.transforms import GRAY_MEAN, GRAY_STD
from regionnet.landmarks.coords import detail_to_input, letterbox_params
from regionnet.landmarks.infer import film_transform, load_landmark_model
from regionnet.landmarks.phantom import render_spine
from regionnet.model.identity import model_id
from regionnet.onnx_graph import export_graph as write_graph
from regionnet.onnx_graph import onnx_session, set_onnx_metadata, write_sidecar

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "image", "coords"
MIN_OPSET = 16  # ONNX RoiAlign with half_pixel coordinates (roi_align aligned=True)


class CoordinateModel(nn.Module):
    """A `LandmarkNet`'s networks as (B, 1, N, N) -> normalised coordinates (B, K, 2): step 1,
    and step 2 when `two_steps` (`LandmarkNet.refine`, whose shapes come from the tensors, so
    the batch axis stays dynamic in the traced graph). N = `input_size(model)`: the detail
    image of a model with `detail_size` (pooled to S for step 1 here), else the S x S input."""

    def __init__(self, model, two_steps: bool = True):
        super().__init__()
        self.model = model
        self.two_steps = two_steps and model.refiner is not None
        self.detail = model.detail_size is not None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        detail = image if self.detail else None
        if self.detail:
            image = detail_to_input(detail, self.model.image_size)
        step1, _ = self.model.net(image)
        return self.model.refine(image, step1, detail) if self.two_steps else step1


def input_size(model) -> int:
    """The side N of the exported graph's input: the detail size D, else S."""
    return model.detail_size or model.image_size


def reference(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """PyTorch's `infer` on an exported graph's input `x` (N x N; pooled for step 1)."""
    if model.detail_size is None:
        return model.infer(x)
    return model.infer(detail_to_input(x, model.image_size), x)


def export_graph(net: CoordinateModel, example: torch.Tensor, output: Path, opset: int) -> None:
    """The coordinate graph with a dynamic batch axis (`regionnet.onnx_graph.export_graph`)."""
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    write_graph(net, (example,), output, [INPUT_NAME], [OUTPUT_NAME], axes, opset)


def onnx_runner(path: Path):
    """numpy (B, 1, S, S) -> numpy (B, K, 2) through onnxruntime on the CPU."""
    session = onnx_session(path)
    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def sample_inputs(model, batch_size: int) -> dict[str, torch.Tensor]:
    """Check inputs (N x N, `input_size`): random normal values (`batch_size` films) and
    phantom spines letterboxed by `film_transform(model)`, in a batch of another size (the
    dynamic batch axis)."""
    size = input_size(model)
    gen = torch.Generator().manual_seed(0)
    k = len(model.landmark_names)
    vertebrae = k // 4 if model.skeleton == "vertebrae" else 17
    tf = film_transform(model)
    films = batch_size + 1
    spines = [
        tf(torch.from_numpy(render_spine(7, i, (2 * size, size), vertebrae)[0])[None])
        for i in range(films)
    ]
    return {
        "random": torch.randn(batch_size, 1, size, size, generator=gen),
        "phantoms": torch.stack(spines),
    }


def check_parity(output: Path, model, two_steps: bool, inputs: dict, atol: float) -> float:
    """Largest |onnxruntime - PyTorch| normalised coordinate over `inputs`; raises above
    `atol`. PyTorch is the model itself (`infer`: "final" or "step1")."""
    run = onnx_runner(output)
    key = "final" if two_steps else "step1"
    diffs = {}
    with torch.no_grad():
        for name, x in inputs.items():
            expected = reference(model, x)[key].float().numpy()
            got = run(x.numpy())
            if got.shape != expected.shape:
                raise RuntimeError(
                    f"{output}: the ONNX model gives shape {got.shape} for {name} input "
                    f"{tuple(x.shape)}, PyTorch {expected.shape}"
                )
            diffs[name] = float(np.abs(got - expected).max())
    worst = max(diffs.values())
    detail = ", ".join(f"{k} (batch {len(inputs[k])}): {v:.2e}" for k, v in diffs.items())
    print(f"check onnx: max |onnxruntime - pytorch| normalised coordinate = {worst:.2e} ({detail})")
    if not worst <= atol:  # NaN fails too
        raise RuntimeError(
            f"{output}: the exported landmark model differs from PyTorch by {worst:.3e} > "
            f"atol={atol} in normalised coordinates ({detail}); nothing was written. Try "
            "another opset (opset=...) or raise atol"
        )
    return worst


def metadata(model, output: Path, ckpt: Path, opset: int, steps: int, note: str | None) -> dict:
    """What deployment code needs besides the graph (the sidecar `<output>.json`)."""
    h = model.hparams
    size = input_size(model)  # N: the graph's input side (the detail size, else S)
    k = len(model.landmark_names)
    (sx, sy), ox, oy = letterbox_params(512, 1024, size)
    meta = {
        "format": "onnx",
        "task": "landmarks",
        "model_file": output.name,
        "checkpoint": str(ckpt),
        "source_model_id": model_id(model),
        "opset": int(opset),
        "landmark_names": list(model.landmark_names),
        "skeleton": model.skeleton,
        "dataset": h.get("dataset"),
        "flip_pairs": [list(p) for p in h.get("flip_pairs") or []],
        "steps": steps,
        "image_size": int(h.image_size),
        "detail_size": model.detail_size,
        "input_size": size,
        "mean": float(h.get("mean", GRAY_MEAN)),
        "std": float(h.get("std", GRAY_STD)),
        "input": {"name": INPUT_NAME, "shape": ["batch", 1, size, size], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", k, 2], "dtype": "float32"},
        "preprocessing": (
            "grey radiograph in [0, 1] (MONOCHROME2: bone bright); resize the longest side to "
            "input_size (antialiased bilinear), the shorter to int(input_size * short / long) "
            "(rounded down); centre-pad with 0 to input_size x input_size, (input_size - new) "
            "// 2 before; then (x - mean) / std"
            + (
                ". input_size is detail_size: the graph pools it to image_size for step 1 and "
                "cuts step 2's crops from it"
                if model.detail_size
                else ""
            )
        ),
        "coordinates": (
            "coords[b, k] = [x, y] of landmark_names[k], normalised input coordinates with "
            "align_corners=False: -1 is the left/top edge of the input_size x input_size input "
            "and +1 its right/bottom edge, so input pixel column j spans [2j/N - 1, "
            "2(j+1)/N - 1] and its centre is 2(j + 0.5)/N - 1 (N = input_size); (0, 0) is the "
            "top-left corner of the top-left pixel, x to the right, y down"
        ),
        "to_pixels": (
            "input pixels: x_in = (x + 1) * N / 2, y_in = (y + 1) * N / 2 (N = input_size). "
            "A W x H film's letterbox: new_w, new_h = the resized size (the long side N, the "
            "short side int(N * short / long)); scale_x = new_w / W, scale_y = new_h / H, "
            "offset_x = (N - new_w) // 2, offset_y = (N - new_h) // 2; film pixels: x_film = "
            "(x_in - offset_x) / scale_x, y_film = (y_in - offset_y) / scale_y "
            "(regionnet.landmarks.coords.letterbox_params and to_original)"
        ),
        "to_pixels_example": {
            "film": [512, 1024],
            "scale": [sx, sy],
            "offset": [ox, oy],
        },
    }
    if note:
        meta["note"] = note
    return meta


def export_landmarks(cfg: DictConfig) -> Path:
    """Export the landmark checkpoint `cfg.ckpt_path` to ONNX (`cfg.output`, default
    `model.onnx` beside it) with its sidecar; return the output path."""
    fmt = str(cfg.get("format", "onnx")).lower()
    if fmt != "onnx":
        raise ValueError(f"format={fmt}: landmark models export to ONNX only; use format=onnx")
    if cfg.get("quantize"):
        raise ValueError(f"quantize={cfg.quantize}: int8 export is for region models only")
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    model = load_landmark_model(ckpt)
    output = Path(cfg.output).expanduser() if cfg.get("output") else ckpt.parent / "model.onnx"
    output.parent.mkdir(parents=True, exist_ok=True)
    batch_size = int(cfg.get("batch_size", 2))
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use 1 or more")
    opset = int(cfg.get("opset", 17))
    inputs = sample_inputs(model, batch_size)
    two_steps, note = model.refiner is not None, None
    if two_steps and opset < MIN_OPSET:
        two_steps = False
        note = (
            f"step 1 only: step 2's roi_align (aligned=True) needs opset >= {MIN_OPSET} "
            f"(opset={opset}); the checkpoint refines, this file does not"
        )
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".export-") as tmp:
        work = Path(tmp) / output.name
        try:
            export_graph(CoordinateModel(model, two_steps).eval(), inputs["random"], work, opset)
        except Exception as e:  # noqa: BLE001 - any exporter failure of step 2: step 1 alone
            if not two_steps:
                raise
            two_steps = False
            note = f"step 1 only: step 2 did not export ({type(e).__name__}: {e})"
            export_graph(CoordinateModel(model, False).eval(), inputs["random"], work, opset)
        if note:
            log.warning("%s: %s", output, note)
        steps = 2 if two_steps else 1
        meta = metadata(model, output, ckpt, opset, steps, note)
        if cfg.get("check", True):
            atol = float(cfg.get("atol", 1e-4))
            meta["check_max_abs_diff"] = check_parity(work, model, two_steps, inputs, atol)
            meta["check_atol"] = atol
        set_onnx_metadata(work, meta)
        work.replace(output)
    sidecar = write_sidecar(output, meta)
    print(f"exported onnx ({steps} step{'s' if steps == 2 else ''}): {output}\nmetadata: {sidecar}")
    return output
