"""One way to write an ONNX graph, shared by every head type's export (`regionnet.export` for
region heads, `regionnet.boxes.export` for detectors): torch's TorchScript-based exporter
(`dynamo=False`, so onnxscript is not needed), the graph checked by `onnx.checker`, and the
`regionnet` metadata entry that carries the sidecar inside the file. onnx and onnxruntime are
the optional `export` extra. Nothing here knows a model type, so any export module imports it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

INSTALL = "pip install 'regionnet[export]'"


@contextmanager
def quiet_export() -> Iterator[None]:
    """torch warns several times per call that the TorchScript-based exporter is legacy, and
    the tracer notes Python numbers taken from shapes (constant for a fixed input size); the
    export modules say so once in their docstrings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*feature will be removed.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # torchvision's detectors copy shape tensors while traced (its own ONNX path)
        warnings.filterwarnings("ignore", module=r"torchvision\.models\.detection")
        yield


def export_graph(
    net: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    output: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None,
    opset: int,
) -> None:
    """`net` (in eval mode) traced on `inputs` into the ONNX file `output`, then checked."""
    try:
        import onnx
    except ImportError as e:
        raise ImportError(f"format=onnx needs the onnx package: {INSTALL}") from e
    with quiet_export(), torch.no_grad():
        torch.onnx.export(
            net,
            inputs,
            str(output),
            dynamo=False,
            opset_version=int(opset),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes={k: dict(v) for k, v in (dynamic_axes or {}).items()},
        )
    onnx.checker.check_model(str(output))


def set_onnx_metadata(path: Path, meta: dict) -> None:
    """`meta` as the file's `regionnet` metadata_props entry (replacing an earlier one)."""
    import onnx

    graph = onnx.load(str(path))
    kept = [p for p in graph.metadata_props if p.key != "regionnet"]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    entry = graph.metadata_props.add()
    entry.key, entry.value = "regionnet", json.dumps(meta)
    onnx.save(graph, str(path))


def write_sidecar(output: Path, meta: dict) -> Path:
    """`meta` as `<output>.json` beside the exported file (what deployment code reads)."""
    sidecar = output.with_name(output.name + ".json")
    sidecar.write_text(json.dumps(meta, indent=2) + "\n")
    return sidecar


def onnx_session(path: Path, what: str = "check=true for ONNX"):
    """An onnxruntime CPU session of `path`; a missing onnxruntime says how to install it."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(f"{what} needs onnxruntime: {INSTALL} (or check=false)") from e
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
