"""`export(cfg)`: a trained RegionNet as a deployable ONNX or TorchScript file.

The exported graph takes a normalised batch (B, 1, S, S) float32 — the radiograph resized so
its longest side is S, centre-padded with black to S x S, then `(x - mean) / std` — and
returns probabilities (B, R), one sigmoid per region head in head order (and, for a model
with finding heads, `finding_probs` (B, L): the finding sigmoids from the same backbone pass,
an ordinal head's as cumulative P(grade > k), decoded outside the graph). A head says "my
region" when its probability reaches its threshold (chosen on validation, stored in the
checkpoint); when no head does, the radiograph is `unknown`. Everything deployment code needs
for this lies in a sidecar `<output>.json` (and inside the file: ONNX metadata_props /
TorchScript extra file `regionnet.json`).

ONNX uses torch's TorchScript-based exporter (`dynamo=False`: no onnxscript needed) with a
dynamic batch axis. TorchScript (`torch.jit.trace`) is deprecated in recent torch; prefer ONNX.
With `check=true` the file is run (onnxruntime / `torch.jit.load`) on random inputs and
phantom radiographs and compared with PyTorch; a difference above `atol` is an error.

`quantize=int8` (ONNX only) also writes `<output stem>.int8.onnx`: static int8 quantisation
calibrated on films of the checkpoint's training split and kept only when its AUROC on the
validation split stays within `max_auroc_drop` of float32 (`regionnet.quantize`); its sidecar
holds the facts under `quantization`. Files are made in a scratch folder and moved in place
at the end: a failed check or a refused int8 model writes nothing. Each ONNX sidecar records
`source_model_id` (the checkpoint's `model_id`) and `onnx_model_id` (`file_model_id`, what
`regionnet-predict backend=onnxruntime onnx_path=FILE` writes in its rows).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from regionnet.boxes.export import export_boxes
from regionnet.compose.infer import load_multi_model
from regionnet.compose.module import one_pass
from regionnet.data.phantom import PHANTOM_REGIONS, render_phantom
from regionnet.data.transforms import GRAY_MEAN, GRAY_STD, eval_transform
from regionnet.landmarks.export import export_landmarks
from regionnet.model.checkpoint import checkpoint_task
from regionnet.model.identity import model_id
from regionnet.model.module import RegionNet, load_regionnet
from regionnet.model.ordinal import logit_slices
from regionnet.onnx_graph import export_graph, quiet_export, set_onnx_metadata, write_sidecar
from regionnet.quantize import import_quantization, int8_path, quantize_int8, quantize_mode

FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}
INPUT_NAME, OUTPUT_NAME = "image", "probs"
#: the second output of a model with finding heads
FINDING_OUTPUT = "finding_probs"
#: the last output of a composed model with a landmark part (`task=multi`)
LANDMARK_OUTPUT = "landmarks"


class ProbabilityModel(nn.Module):
    """RegionNet's plain network (`RegionClassifier`) as (B, 1, S, S) -> (B, R) probabilities
    in head order and, with finding heads, (B, L) finding sigmoids from the same backbone
    pass: a binary finding's probability, an ordinal finding's G-1 cumulative P(grade > k)
    (`regionnet.model.ordinal.logit_slices`; grades decode outside the graph, as
    `ordinal.to_probs` does: ONNX has no cumulative minimum). A composed model's landmark part
    (`task=multi`) adds `landmarks` (B, K, 2), normalised input coordinates from the same pass
    (`RegionClassifier.forward_maps`). Plain so tracing does not touch Lightning or
    torchmetrics; no test-time flip."""

    def __init__(self, model: RegionNet):
        super().__init__()
        self.regions = list(model.regions)
        self.findings = {f: dict(model.hparams.findings[f]) for f in model.findings}
        self.net = model.net
        self.landmarks = dict(getattr(model, "parts", {})).get("landmarks")

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.landmarks is not None:
            found = bool(self.findings)
            parts = {"landmarks": self.landmarks}
            logits, finding_logits, outs = one_pass(self.net, parts, image, found)
            coords, _ = outs["landmarks"]
            out = (torch.sigmoid(logits.float()),)
            out += (torch.sigmoid(finding_logits.float()),) if found else ()
            return (*out, coords.float())
        if not self.findings:
            return self.net.predict_proba(image)
        logits, finding_logits = self.net.all_logits(image)
        return torch.sigmoid(logits.float()), torch.sigmoid(finding_logits.float())


def output_names(model: RegionNet | ProbabilityModel) -> list[str]:
    """The graph's outputs: `probs`, `finding_probs` where the model has finding heads, and
    `landmarks` where it has a landmark part (`task=multi`)."""
    names = [OUTPUT_NAME, FINDING_OUTPUT] if model.findings else [OUTPUT_NAME]
    if isinstance(model, ProbabilityModel):
        has_landmarks = model.landmarks is not None
    else:
        has_landmarks = "landmarks" in getattr(model, "parts", {})
    return [*names, LANDMARK_OUTPUT] if has_landmarks else names


def torch_outputs(model: RegionNet, x: torch.Tensor) -> list[np.ndarray]:
    """What the exported graph should give for `x`, from PyTorch (no test-time flip)."""
    out = ProbabilityModel(model).eval()(x)
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def load_checkpoint(path: str | Path, multi: bool = False) -> tuple[RegionNet, dict]:
    """The model (eval, CPU) and the intensity normalisation it was trained with; `multi`: a
    composed model (`task=multi`, a RegionNet with parts)."""
    model = load_multi_model(path) if multi else load_regionnet(path)
    h = model.hparams
    return model, {"mean": float(h.get("mean", GRAY_MEAN)), "std": float(h.get("std", GRAY_STD))}


def metadata(model: RegionNet, norm: dict, fmt: str, output: Path, ckpt: Path) -> dict:
    """What deployment code needs besides the graph (written as `<output>.json`)."""
    size = int(model.hparams.image_size)
    return {
        "format": fmt,
        "model_file": output.name,
        "checkpoint": str(ckpt),
        "regions": list(model.regions),
        "thresholds": [round(float(t), 6) for t in model.thresholds],
        "image_size": size,
        "mean": norm["mean"],
        "std": norm["std"],
        "input": {"name": INPUT_NAME, "shape": ["batch", 1, size, size], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(model.regions)], "dtype": "float32"},
        "outputs": output_names(model),
        "preprocessing": (
            "grey radiograph in [0, 1] (MONOCHROME2: bone bright); resize the longest side to "
            "image_size (antialiased bilinear), centre-pad with 0 to image_size x image_size; "
            "then (x - mean) / std"
        ),
        "decision": (
            "probs[:, k] >= thresholds[k] means the radiograph shows regions[k]; "
            "no head at or above its threshold means unknown"
        ),
        "backbone": model.hparams.backbone,
        "shared_backbone": bool(model.hparams.shared_backbone),
        **finding_metadata(model),
        **part_metadata(model),
    }


def part_metadata(model: RegionNet) -> dict:
    """A composed model's parts in the sidecar (`task=multi`): the landmark output's names,
    frame and decoding, the films it applies to, and what the graph leaves out; nothing for
    other models."""
    parts = getattr(model, "parts", None)
    if not parts:
        return {}
    h, size = model.hparams, int(model.hparams.image_size)
    out: dict = {"task": "multi", "parts": list(parts)}
    if "landmarks" in parts:
        names = list(model.landmark_names)
        out["landmarks"] = {
            "names": names,
            "skeleton": h.skeleton,
            "dataset": h.dataset,
            "output": {
                "name": LANDMARK_OUTPUT,
                "shape": ["batch", len(names), 2],
                "dtype": "float32",
            },  # fmt: skip
            "decode": (
                "[x, y] per landmark in normalised input coordinates, align_corners=False "
                f"(-1 = the left/top edge of the {size} x {size} input, +1 = the right/bottom "
                f"edge): x_in = (x + 1) * {size} / 2, then x_film = (x_in - offset_x) / "
                "scale_x (and y alike) with the letterbox's scale and offset: scale = "
                f"{size} / max(W, H) (per axis: the resized side / the film's side), offset = "
                "the centring pad"
            ),
            "applies_to": (
                f"films called {model.landmark_region}"
                if model.landmark_region
                else "films no region head calls (unknown): the landmark set has no region head"
            ),
        }
    if "boxes" in parts:
        out["not_exported"] = {
            "boxes": "the box part: FCOS's decoding and NMS trace one image at a time, so this "
            "batched graph leaves it out; regionnet-predict and regionnet.load_model give the "
            "boxes (a task=boxes model exports with them)"
        }
    return out


def finding_metadata(model: RegionNet) -> dict:
    """The finding heads' part of the sidecar: their declarations, thresholds (binary ones;
    chosen on validation) and columns of `finding_probs`; nothing without finding heads."""
    if not model.findings:
        return {}
    specs = {f: dict(model.hparams.findings[f]) for f in model.findings}
    columns = {f: [sl.start, sl.stop] for f, sl in logit_slices(specs).items()}
    width = max(stop for _, stop in columns.values())
    return {
        "findings": specs,
        "finding_thresholds": [round(float(t), 6) for t in model.finding_thresholds],
        "finding_columns": columns,
        "finding_backbone": model.hparams.get("finding_backbone", "shared"),
        "finding_output": {"name": FINDING_OUTPUT, "shape": ["batch", width], "dtype": "float32"},
        "finding_decision": (
            "binary finding f: finding_probs[:, columns[f][0]] >= its threshold (in "
            "finding_thresholds, finding order). Ordinal finding f with grades g_0..g_(G-1): "
            "columns[f] hold c_k = P(grade > g_k), k = 0..G-2; make them non-increasing "
            "(c_k = min(c_0..c_k)), then P(g_0) = 1 - c_0, P(g_k) = c_(k-1) - c_k, "
            "P(g_(G-1)) = c_(G-2); the predicted grade is the number of c_k >= 0.5. "
            "Meaningful only on films of the finding's region"
        ),
    }


def export_onnx(net: ProbabilityModel, example: torch.Tensor, output: Path, meta: dict, opset: int):
    """The graph: (B, 1, S, S) -> (B, R) region probabilities (and (B, P) finding
    probabilities with finding heads), a dynamic batch axis."""
    names = output_names(net)
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *names)}
    export_graph(net, (example,), output, [INPUT_NAME], names, axes, opset)
    set_onnx_metadata(output, meta)


def file_model_id(path: Path, meta: dict) -> str:
    """The `model_id` of an ONNX file run by `regionnet-predict onnx_path=`: 12 hex digits of
    the SHA-256 of its graph (initializers and nodes; the metadata entry left out, so the id
    does not depend on itself or on the checkpoint's path) and of the preprocessing and
    thresholds that the sidecar records. Another file than the checkpoint (an int8 model
    predicts other probabilities), so another id than the checkpoint's."""
    import onnx

    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    digest = hashlib.sha256(graph.SerializeToString(deterministic=True))
    keys = ("regions", "thresholds", "image_size", "mean", "std")
    keys += tuple(k for k in ("findings", "finding_thresholds", "landmarks") if k in meta)
    digest.update(json.dumps({k: meta.get(k) for k in keys}, sort_keys=True).encode())
    return digest.hexdigest()[:12]


def export_torchscript(net: ProbabilityModel, example: torch.Tensor, output: Path, meta: dict):
    with quiet_export():
        traced = torch.jit.trace(net, example)
        torch.jit.save(traced, str(output), _extra_files={"regionnet.json": json.dumps(meta)})


def exported_runner(fmt: str, output: Path):
    """A function numpy (B, 1, S, S) -> [numpy (B, R), numpy (B, P) with finding heads]
    running the exported file."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError(
                "check=true for ONNX needs onnxruntime: pip install 'regionnet[export]' "
                "(or check=false)"
            ) from e
        session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {INPUT_NAME: x})
    with quiet_export():
        loaded = torch.jit.load(str(output), map_location="cpu")

    def run(x: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            out = loaded(torch.from_numpy(x))
        return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]

    return run


def sample_inputs(model: RegionNet, norm: dict, batch_size: int) -> dict[str, torch.Tensor]:
    """Check inputs: random normal values, and one phantom per head in a batch of another
    size (which exercises ONNX's dynamic batch axis)."""
    size = int(model.hparams.image_size)
    gen = torch.Generator().manual_seed(0)
    shown = [r for r in model.regions if r in PHANTOM_REGIONS] or ["hand"]
    if len(shown) == batch_size:
        shown.append(shown[0])
    tf = eval_transform(model)
    phantoms = [
        tf(torch.from_numpy(render_phantom(r, 7 + k, size=size))[None]) for k, r in enumerate(shown)
    ]
    return {
        "random": torch.randn(batch_size, 1, size, size, generator=gen),
        "phantoms": torch.stack(phantoms),
    }


def check_export(fmt: str, output: Path, model: RegionNet, inputs: dict, atol: float) -> float:
    """Largest |exported - PyTorch| probability over the inputs and outputs (region and
    finding probabilities); raises above `atol`."""
    run = exported_runner(fmt, output)
    diffs = {}
    with torch.no_grad():
        for name, x in inputs.items():
            expected = torch_outputs(model, x)
            got = run(x.numpy())
            shapes = [g.shape for g in got], [e.shape for e in expected]
            if shapes[0] != shapes[1]:
                raise RuntimeError(
                    f"{output}: exported model gives shapes {shapes[0]} for {name} input "
                    f"{tuple(x.shape)}, PyTorch {shapes[1]}"
                )
            diffs[name] = max(float(np.abs(g - e).max()) for g, e in zip(got, expected))
    worst = max(diffs.values())
    detail = ", ".join(f"{k} (batch {len(inputs[k])}): {v:.2e}" for k, v in diffs.items())
    print(f"check {fmt}: max |exported - pytorch| probability = {worst:.2e} ({detail})")
    if worst > atol:
        raise RuntimeError(
            f"{output}: exported {fmt} model differs from PyTorch by {worst:.3e} > atol={atol} "
            f"({detail}). Try another opset (opset=...), format=torchscript, or raise atol"
        )
    return worst


def export(cfg: DictConfig) -> Path:
    """Export `cfg.ckpt_path` as `cfg.format` to `cfg.output`; return the output path."""
    fmt = str(cfg.format).lower()
    if fmt not in FORMATS:
        raise ValueError(f"format={cfg.format!r} is not supported; use format=onnx or torchscript")
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise ValueError("ckpt_path is required: regionnet-export ckpt_path=.../best.ckpt")
    # landmark and box heads: their own export modules (a missing file: the region path's error)
    task = checkpoint_task(cfg.ckpt_path)
    if task == "landmarks":
        return export_landmarks(cfg)
    if task == "boxes":
        return export_boxes(cfg)
    if task == "multi" and (fmt != "onnx" or cfg.get("quantize")):
        raise ValueError(
            f"ckpt_path={cfg.ckpt_path}: a composed model (task=multi) exports to float32 ONNX "
            "only: format=onnx, quantize=null"
        )
    ckpt = Path(cfg.ckpt_path).expanduser()
    model, norm = load_checkpoint(ckpt, multi=task == "multi")
    output = Path(cfg.output).expanduser() if cfg.get("output") else ckpt.parent / FORMATS[fmt]
    output.parent.mkdir(parents=True, exist_ok=True)
    batch_size = int(cfg.get("batch_size", 2))
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use 1 or more")

    mode = quantize_mode(cfg.get("quantize"))
    if mode is not None and fmt != "onnx":
        raise ValueError(f"quantize={mode} needs format=onnx (format={fmt})")
    if mode is not None:
        import_quantization()  # say what to install before exporting

    net = ProbabilityModel(model).eval()  # eval: the exporters keep the mode they are given
    meta = metadata(model, norm, fmt, output, ckpt)
    meta["source_model_id"] = model_id(model)
    inputs = sample_inputs(model, norm, batch_size)
    # Files are made in a scratch folder beside `output` and moved in place at the end, so a
    # failed check or a refused int8 model leaves nothing behind.
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".export-") as tmp:
        work = Path(tmp) / output.name
        with torch.no_grad():
            if fmt == "onnx":
                meta["opset"] = int(cfg.get("opset", 17))
                export_onnx(net, inputs["random"], work, meta, meta["opset"])
            else:
                export_torchscript(net, inputs["random"], work, meta)
        if cfg.get("check", True):
            meta["check_max_abs_diff"] = check_export(
                fmt, work, model, inputs, float(cfg.get("atol", 1e-4))
            )
        written = [(work, output, meta)]
        if mode == "int8":
            final8 = int8_path(output)
            work8 = Path(tmp) / final8.name
            facts = quantize_int8(
                work,
                work8,
                model,
                ckpt,
                calibration=str(cfg.get("calibration", "train")),
                calibration_films=_optional_int(cfg.get("calibration_films", 128)),
                guard_split=str(cfg.get("guard_split", "val")),
                guard_films=_optional_int(cfg.get("guard_films")),
                max_auroc_drop=_optional_float(cfg.get("max_auroc_drop", 0.005)),
                calibrate_method=str(cfg.get("calibrate_method", "auto")),
                percentile=float(cfg.get("calibrate_percentile", 99.99)),
            )
            meta8 = {**meta, "model_file": final8.name, "quantization": facts}
            meta8.pop("check_max_abs_diff", None)  # the float32 file's check
            set_onnx_metadata(work8, meta8)
            written.append((work8, final8, meta8))
        for src, dst, info in written:
            info["onnx_model_id"] = file_model_id(src, info) if fmt == "onnx" else None
            if info["onnx_model_id"] is None:
                info.pop("onnx_model_id")
            src.replace(dst)
            sidecar = write_sidecar(dst, info)
            print(f"exported {fmt}: {dst}\nmetadata: {sidecar}")
    return output


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


def _optional_float(value) -> float | None:
    return None if value is None else float(value)
