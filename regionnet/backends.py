"""Prediction backends of `regionnet-predict`: `backend=torch` (the checkpoint's RegionNet, the
default) or `backend=onnxruntime`.

`onnxruntime` exports the checkpoint's plain network (`regionnet.export.ProbabilityModel`:
region heads, sigmoid probabilities) to ONNX in memory and runs every batch through an
`onnxruntime.InferenceSession` on the CPU (intra-op threads: `torch.get_num_threads()`).
`OnnxRuntimeModule` wraps the session as a LightningModule whose `predict_step` returns what
`RegionNet.predict_step` returns, so the reader, the dataset, the collate function, the writer
callback (rows, errors, resume, model_id) and the summary stay the torch backend's. With the
checkpoint's `tta`, each batch's probabilities are averaged with those of its horizontally
flipped images, as `RegionNet.inference_proba` does. Rows agree with the torch backend's
within 1e-4 (tests/test_onnx_backend.py).

Not with onnxruntime: finding heads (the export holds region heads only), `cam=true` (Grad-CAM
needs torch's gradients), precision other than 32-true; it always runs on the CPU.
onnxruntime and onnx are the optional `export` extra: pip install 'regionnet[export]'.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch

BACKENDS = ("torch", "onnxruntime")
INSTALL_HINT = "pip install 'regionnet[export]' (or pip install onnx onnxruntime)"


def backend_name(value) -> str:
    name = str(value if value is not None else "torch").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"backend={value!r}: choose torch or onnxruntime")
    return name


def import_onnxruntime():
    """The onnxruntime module, or an ImportError saying how to install it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(
            f"backend=onnxruntime needs the onnxruntime package: {INSTALL_HINT}; "
            "or use backend=torch"
        ) from e
    return onnxruntime


def check_onnxruntime_options(cfg, model) -> None:
    """Refuse what the ONNX Runtime backend cannot do, before anything is read or written."""
    if cfg.get("cam"):
        raise ValueError(
            "cam=true needs torch (Grad-CAM takes gradients through the network); "
            "use backend=torch for class activation maps"
        )
    findings = list(getattr(model, "findings", []) or [])
    if findings:
        raise ValueError(
            f"backend=onnxruntime runs the exported region heads only; this checkpoint also has "
            f"finding heads {findings}: use backend=torch"
        )
    precision = str(cfg.get("precision", "32-true"))
    node = cfg.get("trainer") or {}
    precision = str(node.get("precision", precision))
    if precision not in ("32-true", "32"):
        raise ValueError(
            f"precision={precision}: backend=onnxruntime runs the float32 graph; "
            "use precision=32-true or backend=torch"
        )


def onnx_bytes(model) -> bytes:
    """The checkpoint's plain network as an ONNX graph (`regionnet.export.export_onnx`)."""
    from regionnet.export import ProbabilityModel, export_onnx

    size = int(model.hparams.image_size)
    net = ProbabilityModel(model).eval()
    example = torch.zeros(2, 1, size, size)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        path = Path(tmp) / "model.onnx"
        try:
            export_onnx(net, example, path, {"regions": list(model.regions)}, opset=17)
        except ImportError as e:
            raise ImportError(f"backend=onnxruntime needs the onnx package: {INSTALL_HINT}") from e
        return path.read_bytes()


class OnnxRuntimeModule(L.LightningModule):
    """An ONNX Runtime session in Lightning's predict loop: `predict_step` gives
    {"path", "probs" (B, R) float32 CPU tensor, "errors"}, like `RegionNet.predict_step`."""

    def __init__(self, graph: bytes, regions: list[str], tta: bool, threads: int | None = None):
        super().__init__()
        ort = import_onnxruntime()
        from regionnet.export import INPUT_NAME, OUTPUT_NAME

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        self.session = ort.InferenceSession(
            graph, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.regions, self.tta = list(regions), bool(tta)
        self._input, self._output = INPUT_NAME, OUTPUT_NAME

    @classmethod
    def from_regionnet(cls, model) -> OnnxRuntimeModule:
        import_onnxruntime()  # say what to install before exporting
        tta = bool(model.hparams.get("tta", False))
        return cls(onnx_bytes(model), list(model.regions), tta)

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self._output], {self._input: x})[0]

    def proba(self, image: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(image.detach().cpu().float().numpy())
        probs = torch.from_numpy(self.run(x)).float()
        if self.tta:
            flipped = torch.from_numpy(self.run(np.ascontiguousarray(x[..., ::-1]))).float()
            probs = (probs + flipped) / 2
        return probs

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.proba(image)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        probs = (
            self.proba(batch["image"]) if "image" in batch else torch.empty(0, len(self.regions))
        )
        return {"path": batch["path"], "probs": probs, "errors": batch.get("errors", [])}
