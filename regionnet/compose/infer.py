"""Inference with a composed model (`task=multi`): its loader, the Python API's per-film
results and `regionnet-predict`'s extra columns.

Films are read at full size and letterboxed by the landmark reader (`regionnet.landmarks.
infer.prepare`: the region task's letterbox and mean/std, with each film's scale and offset),
so the parts' points and boxes come back in the film's own pixels; one backbone pass gives the
region probabilities, the finding probabilities and every part's output (`MultiNet.
predict_batch`). A part's outputs are given only on films it applies to
(`applies`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from regionnet.boxes.infer import box_list, boxes_json
from regionnet.landmarks.infer import ANGLES, angles_of, array_batch, points_json
from regionnet.model.checkpoint import load_module
from regionnet.regions import UNKNOWN


def applies(predicted: str, landmark_region: str | None) -> bool:
    """Whether a film called `predicted` gets the parts' outputs: its region is the landmark
    set's (`landmark_region`), or, for a set of no region head (null), no head called it."""
    return predicted == (landmark_region or UNKNOWN)


def part_cells(model, out: Mapping, k: int, predicted: str) -> dict:
    """The part columns of film `k` of a batch's outputs (`MultiNet.predict_batch`'s dict):
    `landmarks` (+ angles), `boxes`; empty strings where the parts do not apply."""
    use = applies(predicted, model.landmark_region)
    row: dict = {}
    if "points" in out:
        pred = out["points"][k].numpy()
        row["landmarks"] = points_json(pred) if use else ""
        height = float(out["size"][k][1]) if "size" in out else None
        angles = angles_of(pred, model.hparams.skeleton, height)
        row.update({a: (v if use else float("nan")) for a, v in angles.items()})
    if "boxes" in out:
        names = model.hparams.box_names
        found = box_list(out["boxes"][k], out["scores"][k], out["labels"][k], names)
        row["boxes"] = boxes_json(found) if use else ""
    return row


def load_multi_model(ckpt_path: str | Path, device: str | torch.device = "cpu"):
    """A trained `MultiNet` in eval mode on `device`; read with `weights_only=True`."""
    from regionnet.compose.module import MultiNet

    return load_module(MultiNet, ckpt_path, device)


def part_columns(model) -> list[str]:
    """`regionnet-predict`'s columns for the model's parts, after the finding columns:
    `landmarks` (and `pt`, `mt`, `tl` on spines), `boxes`."""
    cols = []
    if "landmarks" in model.parts:
        cols.append("landmarks")
        if model.hparams.skeleton == "vertebrae":
            cols += list(ANGLES)
    if "boxes" in model.parts:
        cols.append("boxes")
    return cols


class PartCells:
    """The prediction writer's hook for a composed model: `columns`, and `cells(prediction,
    k, region)` for film k of a batch's predictions called `region`."""

    def __init__(self, model):
        self.model = model
        self.columns = part_columns(model)

    def cells(self, prediction: dict, k: int, region: str) -> dict:
        return part_cells(self.model, prediction, k, region)


@torch.inference_mode()
def predict_arrays(model, images: Sequence[np.ndarray]) -> list[tuple[list, list, dict]]:
    """Per film (region probabilities, finding probabilities, {"landmarks", "angles", "boxes"})
    for float (H, W) arrays in [0, 1] at full size; the part results are unfiltered (the API
    keeps them for films the parts apply to)."""
    if not images:
        return []
    found = model.predict_batch(array_batch(model, images))
    probs = found["probs"].float().tolist()
    finding = found.get("finding_probs")
    finding = finding.float().tolist() if finding is not None else [[] for _ in probs]
    out = []
    for k in range(len(probs)):
        parts = {}
        if "points" in found:
            pts = found["points"][k].numpy()
            parts["landmarks"] = [[float(x), float(y)] for x, y in pts]
            height = float(found["size"][k][1])
            parts["angles"] = angles_of(pts, model.hparams.skeleton, height)
        if "boxes" in found:
            parts["boxes"] = box_list(
                found["boxes"][k], found["scores"][k], found["labels"][k], model.hparams.box_names
            )
        out.append((probs[k], finding[k], parts))
    return out


def keep_parts(model, region: str, parts: dict) -> dict:
    """`parts` where they apply to a film called `region`, else nothing."""
    return parts if applies(region, model.landmark_region) else {}
