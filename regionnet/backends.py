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

Finding heads run too: the export's second output `finding_probs` (`regionnet.export`: the
finding sigmoids, an ordinal head's cumulative P(grade > k)), one backbone pass with the
region heads, averaged with the flip under `tta` and decoded to grades as `RegionNet` does
(`ordinal.to_probs`), gives the rows' finding columns as the torch backend does. Not with
onnxruntime: `cam=true` (Grad-CAM needs torch's gradients), precision other than 32-true; it
always runs on the CPU.
onnxruntime and onnx are the optional `export` extra: pip install 'regionnet[export]'.

`onnx_path=FILE` runs an exported file (`regionnet-export`, e.g. its `model.int8.onnx`) instead
of exporting in memory (`onnx_file_model`). Its sidecar `FILE.json` (or, without one, the
`regionnet` metadata inside the file) says the regions, thresholds, image_size and mean/std;
with `ckpt_path` they must match the checkpoint's, without it they are taken from there. The
rows' `model_id` is then the file's (`regionnet.export.file_model_id`: its graph and the
sidecar's preprocessing and thresholds), not the checkpoint's: an int8 file predicts other
probabilities than its checkpoint, so an output resumes only with the model that began it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf

from regionnet.model.ordinal import prob_widths, to_probs

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
    if cfg.get("onnx_path") and (cfg.get("dicomweb") or {}).get("store_sr"):
        raise ValueError(
            "dicomweb.store_sr=true names the checkpoint's model in each SR; with onnx_path the "
            "rows come from another file. Store SRs with backend=torch or without onnx_path"
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
    {"path", "probs" (B, R) float32 CPU tensor, "errors"} and, for a graph with finding heads,
    "finding_probs" (B, P), like `RegionNet.predict_step`."""

    def __init__(
        self,
        graph: bytes,
        regions: list[str],
        tta: bool,
        threads: int | None = None,
        findings: dict | None = None,
    ):
        super().__init__()
        ort = import_onnxruntime()
        from regionnet.export import FINDING_OUTPUT, INPUT_NAME

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        self.session = ort.InferenceSession(
            graph, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.regions, self.tta = list(regions), bool(tta)
        self._input = INPUT_NAME
        outputs = [o.name for o in self.session.get_outputs()]
        self._findings = FINDING_OUTPUT in outputs
        # the finding declarations decode an ordinal head's cumulative outputs into grades
        self.findings = {f: dict(v) for f, v in (findings or {}).items()}
        if self._findings and not self.findings:
            raise ValueError(
                "the ONNX graph has finding outputs but no finding declarations came with it: "
                "export the checkpoint again with regionnet-export (its sidecar has them)"
            )
        self._width = sum(prob_widths(self.findings)) if self._findings else 0

    @classmethod
    def from_file(cls, graph: bytes, meta: dict) -> OnnxRuntimeModule:
        """A session of an exported file (`onnx_file_model`); no test-time flip (the export
        holds the plain network only)."""
        return cls(graph, list(meta["regions"]), tta=False, findings=meta.get("findings"))

    @classmethod
    def from_regionnet(cls, model) -> OnnxRuntimeModule:
        import_onnxruntime()  # say what to install before exporting
        tta = bool(model.hparams.get("tta", False))
        findings = {f: model.hparams.findings[f] for f in getattr(model, "findings", [])}
        return cls(onnx_bytes(model), list(model.regions), tta, findings=findings)

    def run_all(self, x: np.ndarray) -> list[torch.Tensor]:
        """[region probabilities (B, R), finding probabilities (B, P) where the graph has
        them], averaged with the flipped films' under `tta` before an ordinal head's grades
        are decoded (`RegionNet._infer_all`'s order)."""
        out = [torch.from_numpy(o).float() for o in self.session.run(None, {self._input: x})]
        if self.tta:
            flipped = self.session.run(None, {self._input: np.ascontiguousarray(x[..., ::-1])})
            out = [(a + torch.from_numpy(b).float()) / 2 for a, b in zip(out, flipped)]
        if self._findings:
            out[1] = to_probs(out[1], self.findings)
        return out

    def proba(self, image: torch.Tensor) -> torch.Tensor:
        return self.run_all(np.ascontiguousarray(image.detach().cpu().float().numpy()))[0]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.proba(image)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        out = {"path": batch["path"], "errors": batch.get("errors", [])}
        if "image" not in batch:
            found = [torch.empty(0, len(self.regions)), torch.empty(0, int(self._width))]
        else:
            found = self.run_all(np.ascontiguousarray(batch["image"].cpu().float().numpy()))
        names = ("probs", "finding_probs") if self._findings else ("probs",)
        return {**out, **dict(zip(names, found))}


# -- an exported file: onnx_path= -----------------------------------------------------------
SIDECAR_KEYS = ("regions", "thresholds", "image_size", "mean", "std")


def read_onnx_file(path) -> tuple[bytes, dict]:
    """(the file's bytes, its sidecar metadata); errors name the file and the fix."""
    import_onnxruntime()
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"onnx_path={str(path)!r} does not exist; give a file written by regionnet-export "
            "format=onnx (model.onnx or model.int8.onnx), or leave onnx_path=null to export "
            "the checkpoint in memory"
        )
    graph = file.read_bytes()
    try:
        import onnx

        proto = onnx.load_from_string(graph)
        inside = {p.key: p.value for p in proto.metadata_props}.get("regionnet")
    except Exception as e:  # a truncated or foreign file: onnx's own error says little
        raise ValueError(
            f"onnx_path={str(file)!r} is not a readable ONNX file ({type(e).__name__}: {e}); "
            "export it again with regionnet-export format=onnx"
        ) from e
    sidecar = file.with_name(file.name + ".json")
    try:
        meta = json.loads(sidecar.read_text()) if sidecar.is_file() else json.loads(inside or "")
    except json.JSONDecodeError as e:
        where = sidecar if sidecar.is_file() else f"{file} (metadata entry 'regionnet')"
        raise ValueError(
            f"onnx_path={str(file)!r}: its metadata in {where} is not JSON ({e}); export the "
            "checkpoint again with regionnet-export format=onnx"
        ) from e
    missing = [k for k in SIDECAR_KEYS if k not in meta]
    if missing:
        raise ValueError(
            f"onnx_path={str(file)!r}: its metadata ({sidecar}) lacks {missing}; export the "
            "checkpoint again with regionnet-export format=onnx"
        )
    return graph, meta


def check_sidecar(meta: dict, model, file) -> None:
    """The file's regions, thresholds and preprocessing must be the checkpoint's."""
    h = model.hparams
    from regionnet.data.transforms import GRAY_MEAN, GRAY_STD

    ours = {
        "regions": list(model.regions),
        "image_size": int(h.image_size),
        "mean": float(h.get("mean", GRAY_MEAN)),
        "std": float(h.get("std", GRAY_STD)),
    }
    findings = list(getattr(model, "findings", []) or [])
    ours["findings"] = {f: dict(h.findings[f]) for f in findings} or None
    wrong = {k: (meta.get(k), v) for k, v in ours.items() if meta.get(k) != v}
    pairs = [("thresholds", meta["thresholds"], model.thresholds)]
    if findings:
        file_values = meta.get("finding_thresholds")
        pairs.append(("finding_thresholds", file_values, model.finding_thresholds))
    for key, file_values, checkpoint_values in pairs:
        theirs = [float(t) for t in file_values or []]
        mine = [float(t) for t in checkpoint_values]
        if len(theirs) != len(mine) or max(abs(a - b) for a, b in zip(theirs, mine)) > 1e-5:
            wrong[key] = (theirs, [round(t, 6) for t in mine])
    if wrong:
        detail = "; ".join(f"{k}: file {a}, checkpoint {b}" for k, (a, b) in wrong.items())
        raise ValueError(
            f"onnx_path={str(file)!r} was not exported from ckpt_path={meta.get('checkpoint')!r}"
            f"'s model ({detail}). Export this checkpoint (regionnet-export), or leave "
            "ckpt_path=null to take regions, thresholds and preprocessing from the file"
        )


def sidecar_model(meta: dict) -> SimpleNamespace:
    """What the predict loop reads of a model (regions, thresholds, finding heads, hparams),
    from the metadata of an exported file; no test-time flip."""
    findings = dict(meta.get("findings") or {})
    hparams = {
        "image_size": int(meta["image_size"]),
        "mean": float(meta["mean"]),
        "std": float(meta["std"]),
        "tta": False,
        "backbone": meta.get("backbone", "onnx"),
        "findings": findings,
    }
    return SimpleNamespace(
        regions=list(meta["regions"]),
        thresholds=torch.tensor([float(t) for t in meta["thresholds"]]),
        hparams=OmegaConf.create(hparams),
        findings=list(findings),
        finding_thresholds=torch.tensor(
            [float(t) for t in meta.get("finding_thresholds") or []], dtype=torch.float32
        ),
    )


def onnx_file_model(cfg, load_checkpoint) -> tuple:
    """(model, runner, model_id) of `regionnet-predict backend=onnxruntime onnx_path=FILE`:
    `model` the checkpoint (its sidecar checked against it) or, with ckpt_path=null, the
    sidecar's stand-in; `runner` the file's session; `model_id` the file's."""
    from regionnet.export import file_model_id

    graph, meta = read_onnx_file(cfg.onnx_path)
    file = Path(str(cfg.onnx_path)).expanduser()
    ckpt = None if OmegaConf.is_missing(cfg, "ckpt_path") else cfg.get("ckpt_path")
    if ckpt:
        model = load_checkpoint(ckpt)
        check_sidecar(meta, model, file)
    else:
        model = sidecar_model(meta)
    check_onnxruntime_options(cfg, model)
    with tempfile.TemporaryDirectory() as tmp:  # file_model_id reads a path
        copy = Path(tmp) / "model.onnx"
        copy.write_bytes(graph)
        mid = file_model_id(copy, meta)
    recorded = meta.get("onnx_model_id")
    if recorded and recorded != mid:
        raise ValueError(
            f"onnx_path={str(file)!r}: the file's model id {mid} is not the {recorded} its "
            f"sidecar {file.name}.json records: the file was changed or belongs to another "
            "export; export the checkpoint again"
        )
    try:
        runner = OnnxRuntimeModule.from_file(graph, meta)
    except Exception as e:  # onnxruntime cannot build a session: a corrupt graph
        raise ValueError(
            f"onnx_path={str(file)!r}: ONNX Runtime cannot load it ({type(e).__name__}: {e}); "
            "export the checkpoint again with regionnet-export format=onnx"
        ) from e
    return model, runner, mid
