"""Box inference on files and arrays: checkpoint detection and loading, per-film boxes, shared
by `regionnet-predict` and the Python API. Films are read, letterboxed and normalised exactly
as for landmark models (`regionnet.landmarks.infer`: `LandmarkReader`, `prepare`, `collate`),
and boxes come back in each film's own pixels. The boxes are vertebrae, not lesions.

One box is `{"label": "T7", "score": 0.93, "box": [x1, y1, x2, y2]}`, pixels of the film as
given (0.1 px), best score first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from regionnet.landmarks.infer import array_batch
from regionnet.model.checkpoint import checkpoint_task, load_module


def is_box_checkpoint(path: str | Path) -> bool:
    """Whether a checkpoint holds a box model (its hyperparameters name boxes)."""
    return checkpoint_task(path) == "boxes"


def load_box_model(ckpt_path: str | Path, device: str | torch.device = "cpu"):
    """A trained `BoxNet` in eval mode on `device`; read with `weights_only=True`."""
    from regionnet.boxes.module import BoxNet

    return load_module(BoxNet, ckpt_path, device)


def attach_detector(landmark_model, box_ckpt: str | Path | None):
    """`landmark_model` (a two-step vertebra model) takes step 2's crops from the vertebra
    boxes of the box checkpoint `box_ckpt` (`refine_detector=`); nothing when None."""
    if box_ckpt:
        if checkpoint_task(box_ckpt) != "boxes":
            raise ValueError(
                f"refine_detector={box_ckpt}: not a box model; give a checkpoint of "
                "regionnet-train task=boxes"
            )
        landmark_model.use_detector(load_box_model(box_ckpt, landmark_model.device))
    return landmark_model


def box_list(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, names: Sequence[str]
) -> list[dict]:
    """One film's detections as `{"label", "score", "box"}` dicts, best score first."""
    order = torch.argsort(scores, descending=True).tolist()
    out = []
    for i in order:
        c = int(labels[i])
        out.append({
            "label": names[c - 1] if 1 <= c <= len(names) else str(c),
            "score": round(float(scores[i]), 4),
            "box": [round(float(v), 1) for v in boxes[i]],
        })  # fmt: skip
    return out


def boxes_json(boxes: list[dict]) -> str:
    """`box_list` as a CSV cell other tools read with json.loads."""
    return json.dumps(boxes)


@torch.inference_mode()
def predict_arrays(model, images: Sequence[np.ndarray]) -> list[dict]:
    """Per film {"boxes": `box_list`} for float (H, W) arrays in [0, 1] (the API's path)."""
    if not images:
        return []
    found = model.detect(array_batch(model, images))
    return [
        {
            "boxes": box_list(
                d["boxes"].cpu(), d["scores"].cpu(), d["labels"].cpu(), model.box_names
            )
        }  # fmt: skip
        for d in found
    ]
