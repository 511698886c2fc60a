"""Landmark inference on files and arrays: the reader dataset, the checkpoint loader and the
per-film result, shared by `regionnet-predict` and the Python API.

A film is read by the region task's reader (`regionnet.io`, `load_image`), letterboxed and
normalised by the checkpoint's `eval_transform`, and its points come back in its own pixels
through the letterbox's `scale`/`offset` (`regionnet.landmarks.coords`). A two-step model with
a `detail_size` D is given what it was trained on: the film letterboxed to D x D (`detail`,
step 2's crops) and that image average-pooled to the S x S input (`film_transform`,
`prepare`). Angles: the three Cobb angles (PT, MT, TL, degrees; AASCE rule,
`geometry.cobb_angles`) of a `vertebrae` model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from regionnet.data.dataset import load_image
from regionnet.data.transforms import GRAY_MEAN, GRAY_STD, eval_transform
from regionnet.io import RadiographReadError
from regionnet.landmarks.coords import detail_to_input, input_letterbox
from regionnet.landmarks.geometry import cobb_angles
from regionnet.landmarks.metrics import COBB_POINTS
from regionnet.model.checkpoint import checkpoint_task, load_module

ANGLES = ("pt", "mt", "tl")


def is_landmark_checkpoint(path: str | Path) -> bool:
    """Whether a checkpoint holds a landmark model (its hyperparameters name landmarks)."""
    return checkpoint_task(path) == "landmarks"


def load_landmark_model(ckpt_path: str | Path, device: str | torch.device = "cpu"):
    """A trained `LandmarkNet` in eval mode on `device`; read with `weights_only=True`."""
    from regionnet.landmarks.module import LandmarkNet

    return load_module(LandmarkNet, ckpt_path, device)


def angles_of(points: np.ndarray, skeleton: str, height: float | None = None) -> dict:
    """{"pt", "mt", "tl"} Cobb angles in degrees of one spine's 68 corners (T1..L5); {} for
    other point sets.
    `height`: the film's height in the points' pixels (the AASCE rule's upper-half test)."""
    if skeleton != "vertebrae" or len(points) != COBB_POINTS:
        return {}
    values = cobb_angles(np.asarray(points, dtype=np.float64)[None], height).reshape(-1)
    return {a: round(float(v), 2) for a, v in zip(ANGLES, values, strict=True)}


def points_json(points: np.ndarray) -> str:
    """[[x, y], ...] in pixels, 0.1 px: a CSV cell other tools read with json.loads."""
    return json.dumps([[round(float(x), 1), round(float(y), 1)] for x, y in points])


def detail_size_of(model) -> int | None:
    """The detail image's side D of a two-step model that crops from one, else None (any
    model with `hparams`: landmark and box models share the reader)."""
    d = getattr(model, "hparams", {}).get("detail_size")
    return None if d is None else int(d)


def film_transform(model):
    """The letterbox and normalisation a film goes through first: `eval_transform(model)` at
    the model's detail size where it has one (`prepare` pools that to the input)."""
    h = model.hparams
    d = detail_size_of(model)
    if d is None:
        return eval_transform(model)
    return eval_transform(
        {"image_size": d, "mean": h.get("mean", GRAY_MEAN), "std": h.get("std", GRAY_STD)}
    )


def prepare(pixels: np.ndarray, transform, size: int, detail_size: int | None = None) -> dict:
    """One film's network input and letterbox: {"image" (1, S, S), "scale" (2,), "offset" (2,),
    "size" (2,) = original (width, height)}. With `detail_size` D (`transform` is then
    `film_transform`, at D) also "detail" (1, D, D), and "image" is it pooled to S; "scale"
    and "offset" are always of the S x S input (`coords.input_letterbox`)."""
    h, w = pixels.shape
    scale, ox, oy = input_letterbox(w, h, size, detail_size)
    image = transform(torch.from_numpy(np.ascontiguousarray(pixels))[None])
    out = {}
    if detail_size is not None:
        out["detail"], image = image, detail_to_input(image, size)
    return {
        "image": image,
        **out,
        "scale": torch.tensor(scale, dtype=torch.float32),
        "offset": torch.tensor([ox, oy], dtype=torch.float32),
        "size": torch.tensor([w, h], dtype=torch.long),
    }


class LandmarkReader(Dataset):
    """Files for landmark prediction: each gives `prepare`'s dict plus "path", or
    {"path", "error"} when it cannot be read (`collate` reports and drops it)."""

    def __init__(self, paths: Sequence[str], model):
        self.paths = list(paths)
        self.transform = film_transform(model)
        self.size = int(model.hparams.image_size)
        self.detail_size = detail_size_of(model)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path, start = self.paths[i], time.perf_counter()
        try:
            pixels = load_image(path, phantom_size=self.size)
        except RadiographReadError as e:
            took = time.perf_counter() - start
            return {"path": path, "error": " ".join(e.reason.split()), "read_seconds": took}
        found = prepare(pixels, self.transform, self.size, self.detail_size)
        return {"path": path, **found, "read_seconds": time.perf_counter() - start}


def collate(samples: list[dict]) -> dict:
    """Stack readable films; unreadable ones go to `errors` as (path, reason) pairs.
    `read_seconds`: the reading time of all of them, summed (the predict clock's)."""
    good = [s for s in samples if "error" not in s]
    batch = {
        "path": [s["path"] for s in good],
        "errors": [(s["path"], s["error"]) for s in samples if "error" in s],
        "read_seconds": float(sum(s.get("read_seconds", 0.0) for s in samples)),
    }
    if good:
        for key in ("image", "detail", "scale", "offset", "size"):
            if key in good[0]:
                batch[key] = torch.stack([s[key] for s in good])
    return batch


def array_batch(model, images: Sequence[np.ndarray]) -> dict:
    """Float (H, W) arrays in [0, 1] as one batch of the reader's (`prepare` with the model's
    `film_transform` and detail size, then `collate`), its tensors on the model's device: the
    API's path for landmark, box and composed models."""
    transform, size = film_transform(model), int(model.hparams.image_size)
    d = detail_size_of(model)
    batch = collate(
        [{"path": str(k), **prepare(p, transform, size, d)} for k, p in enumerate(images)]
    )
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.inference_mode()
def predict_arrays(model, images: Sequence[np.ndarray]) -> list[dict]:
    """Per film {"landmarks": [[x, y], ...] in its pixels, "angles": {...}} for float (H, W)
    arrays in [0, 1] (the API's path)."""
    if not images:
        return []
    batch = array_batch(model, images)
    found = model.infer(batch["image"], batch.get("detail"))["final"]
    points = model.to_original(found, batch["scale"], batch["offset"])
    out = []
    for pts, (_, h) in zip(points.cpu().numpy(), batch["size"].tolist(), strict=True):
        landmarks = [[float(x), float(y)] for x, y in pts]
        out.append({"landmarks": landmarks, "angles": angles_of(pts, model.skeleton, h)})
    return out
