"""The identity of a trained model: what `regionnet-predict` writes in its `model_id` column,
the Python API reports and a DICOM SR names, so every output says which weights made it."""

from __future__ import annotations

import hashlib
import json

import torch

MODEL_ID_HPARAMS = ("regions", "image_size", "in_chans", "mean", "std", "tta", "intensity")


def model_id(model) -> str:
    """12 hex digits of the SHA-256 of a loaded model's `state_dict` (every weight and buffer,
    thresholds included, names sorted, each with dtype, shape and bytes) and of its
    `MODEL_ID_HPARAMS`. It names the model, not the file: the same for a checkpoint copied,
    renamed or rewritten by Lightning with other metadata (optimizer state, callbacks, paths),
    different when weights, thresholds or preprocessing differ. Call it on the model as
    loaded (float32 on the CPU), before precision or memory-format changes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    hparams = {k: model.hparams.get(k) for k in MODEL_ID_HPARAMS}
    digest.update(json.dumps(hparams, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:12]


def package_version() -> str:
    """The installed regionnet version, "unknown" when run from a tree without metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("regionnet")
    except PackageNotFoundError:
        return "unknown"
