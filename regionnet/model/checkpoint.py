"""Reading checkpoint and weights files safely, and what a checkpoint keeps for inference.

Every load is `torch.load(..., weights_only=True)`: tensors and plain values only, never code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from regionnet.model.identity import package_version

# What a checkpoint may hold: tensors and plain values, read with torch's allow-list loader.
UNSAFE_FILE = (
    "is not a regionnet checkpoint or holds objects other than tensors and plain values; "
    "regionnet never unpickles code: retrain or re-save it with regionnet"
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint or weights file that the allow-list loader refused, or could not read."""


def refuse_file(path: str | Path, key: str = "ckpt_path", error: BaseException | None = None):
    """The error for a file torch's `weights_only` loader refused: it names the file and never
    repeats torch's advice to load with `weights_only=False` (that would run the file's code)."""
    why = ""
    if error is not None and not isinstance(error, pickle.UnpicklingError):
        text = str(error).splitlines()[0] if str(error) else ""
        if text and "weights_only" not in str(error):
            why = f" ({type(error).__name__}: {text})"
    return UnsafeCheckpointError(f"{key}={str(path)!r} {UNSAFE_FILE}{why}")


def load_plain(path: str | Path, key: str = "ckpt_path") -> dict:
    """`torch.load` with `weights_only=True` (explicit: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot
    turn it off) on the CPU; a refused or unreadable file raises `UnsafeCheckpointError`."""
    try:
        return torch.load(Path(str(path)).expanduser(), map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as e:
        raise refuse_file(path, key, e) from None


def load_module(cls, ckpt_path: str | Path, device: str | torch.device = "cpu"):
    """A trained LightningModule of class `cls` (a landmark, box or composed model) from a
    checkpoint, in eval mode on `device`: read with `weights_only=True` (a file that needs
    code to unpickle is refused), never reading ImageNet weights again (the checkpoint holds
    every weight)."""
    path = Path(str(ckpt_path)).expanduser()
    try:
        model = cls.load_from_checkpoint(
            path, map_location="cpu", weights_only=True, pretrained=False, weights_file=None
        )
    except pickle.UnpicklingError as e:
        raise refuse_file(path, "ckpt_path", e) from None
    return model.to(device).eval()


def check_resumable(ckpt_path) -> None:
    """A file to resume from must be a full training checkpoint (`last.ckpt`), read with
    `weights_only=True`; best.ckpt keeps only what inference needs."""
    if ckpt_path is None or not Path(str(ckpt_path)).expanduser().is_file():
        return  # none, or Lightning's own names ("last", "hpc", ...), which it resolves
    checkpoint = load_plain(ckpt_path, "ckpt_path")
    if "optimizer_states" not in checkpoint or "loops" not in checkpoint:
        raise ValueError(
            f"ckpt_path={str(ckpt_path)!r} holds only what inference needs (a best.ckpt): "
            "resume from the run's checkpoints/last.ckpt"
        )


def inference_checkpoint(checkpoint: dict) -> dict:
    """What inference needs of a training checkpoint: the weights (the averaged ones under
    weight averaging), the hyperparameters and the versions. No optimizer, loop or callback
    state, no data module hyperparameters: those name the data root and the run directory.
    `weights_file` keeps its file name only (`weights_source` has its sha256)."""
    kept = {k: checkpoint[k] for k in INFERENCE_KEYS if k in checkpoint}
    hparams = dict(kept.get("hyper_parameters") or {})
    if hparams.get("weights_file"):
        hparams["weights_file"] = Path(str(hparams["weights_file"])).name
    kept["hyper_parameters"] = hparams
    kept["regionnet"] = {"kind": "inference", "version": package_version()}
    return kept


INFERENCE_KEYS = ("state_dict", "hyper_parameters", "hparams_name", "pytorch-lightning_version")


def checkpoint_task(path: str | Path) -> str:
    """The head type a checkpoint holds, read once from its hyperparameters: "multi" (region
    heads with landmark/box parts, `parts`), "landmarks" (`landmark_names`), "boxes"
    (`box_names`) or "regions" (anything else, and a path that is no file: the region loader
    then names the problem)."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        return "regions"
    hparams = load_plain(path).get("hyper_parameters") or {}
    if "parts" in hparams:
        return "multi"
    if "landmark_names" in hparams:
        return "landmarks"
    return "boxes" if "box_names" in hparams else "regions"


def init_from(model: torch.nn.Module, path: str | Path) -> dict[str, int]:
    """Start `model` from a regionnet checkpoint's weights (`init_from=`): every tensor whose
    name and shape match is copied, the rest keep their initialisation (e.g. a two-step
    landmark model from a step-1 run: step 1's network is copied, step 2's starts from
    ImageNet). Not a resume: optimizer, schedule and epochs start afresh. Returns the counts
    {"copied", "shape_differs", "not_in_checkpoint"}; a checkpoint of which nothing fits is
    refused, naming the file."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"init_from={str(path)!r}: no such file; give a regionnet checkpoint (a run's "
            "checkpoints/best.ckpt or last.ckpt)"
        )
    state = load_plain(path, "init_from").get("state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"init_from={str(path)!r} holds no state_dict: {UNSAFE_FILE}")
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    counts = {
        "copied": len(fits),
        "shape_differs": sum(1 for k, v in state.items() if k in own and k not in fits),
        "not_in_checkpoint": sum(1 for k in own if k not in state),
    }
    if not fits:
        raise ValueError(
            f"init_from={str(path)!r}: none of its {len(state)} tensors fits this model "
            "(other head type or backbone); give a checkpoint of the same backbone"
        )
    model.load_state_dict(fits, strict=False)
    return counts
