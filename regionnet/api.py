"""Python API for notebooks and services: load a checkpoint, predict regions, no Hydra.

    import regionnet
    model = regionnet.load_model("outputs/train/runs/.../checkpoints/best.ckpt")
    for p in model.predict(["knee.dcm", "hand.png", pixels]):
        print(p.path, p.region, p.regions, p.probabilities)

Inputs are file paths (DICOM, PNG, JPEG, TIFF; read by `regionnet.io.read_radiograph`, as in
training) or arrays: float (H, W) in [0, 1] with bone bright (MONOCHROME2), or integer arrays
(uint8 is divided by 255, deeper integers by the full scale of their bit depth, like 16-bit
PNGs: `regionnet.io`'s one intensity rule). The decision
rule and the preprocessing are the ones `regionnet-predict` uses, so both give the same
probabilities for the same file.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from regionnet.data.dataset import load_image
from regionnet.data.transforms import eval_transform
from regionnet.decision import decide, resolve_thresholds
from regionnet.io import RadiographReadError
from regionnet.model.ordinal import grade_of, prob_slices

Input = str | Path | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class Prediction:
    """The prediction for one radiograph.

    `region` is a head's region or `unknown` (no head passed its threshold), None for an
    input that could not be read; `regions` lists every head above its threshold; `status`
    is `ok` or `error: <why>` (the same text as the CLI's `status` column) and `error` the why.
    `findings`: finding name -> probability of the model's finding heads (`model.findings`)
    whose region is the predicted `region`, e.g. `{"knee_oa": 0.83}` for a knee film; empty
    for other regions, `unknown`, errors and models without finding heads. An ordinal finding
    (`grades`) gives its expected grade index there (sum of grade index x probability, e.g.
    `{"kl_grade": 2.3}`, 0 = the lowest grade), and its predicted grade's label in `grades`
    (`{"kl_grade": "KL2"}`: the median grade, as the CLI's `<finding>` column); `grades` is
    empty wherever `findings` is, and for binary findings.

    A landmark model (`task=landmarks`) fills `landmarks`: a list of [x, y] in the input
    image's pixels, in the data set's landmark order (`LandmarkPredictor.landmark_names`),
    and, for spines, `angles`: {"pt", "mt", "tl"} Cobb angles in degrees (AASCE rule); its
    `probabilities` are empty and `region` is None (it does not classify).

    A box model (`task=boxes`) fills `boxes`: a list of `{"label", "score", "box": [x1, y1,
    x2, y2]}` in the input image's pixels, best score first; the labels are vertebrae
    (T1..L5, `BoxPredictor.box_names`), not lesions. No probabilities, region None.

    A composed model (`task=multi`: region heads with landmark and box parts on one backbone)
    fills the region fields and, on films its parts apply to (`MultiPredictor`), `landmarks`,
    `angles` and `boxes` from the same backbone pass.
    """

    probabilities: dict[str, float]
    region: str | None
    regions: list[str] = field(default_factory=list)
    path: str | None = None
    status: str = "ok"
    error: str | None = None
    findings: dict[str, float] = field(default_factory=dict)
    grades: dict[str, str] = field(default_factory=dict)
    landmarks: list[list[float]] | None = None
    angles: dict[str, float] = field(default_factory=dict)
    boxes: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


def load_checkpoint(ckpt: str | Path, device: str | torch.device = "cpu"):
    """A trained `RegionNet` in eval mode on `device`, from a Lightning checkpoint."""
    from regionnet.model.module import load_regionnet

    return load_regionnet(ckpt, device)


def array_pixels(x: np.ndarray | torch.Tensor, name: str = "array") -> np.ndarray:
    """An in-memory image as float32 (H, W) in [0, 1]; RadiographReadError if unusable.

    The intensity rule of `regionnet.io` (the one every file reader uses): integer arrays are
    divided by the full scale of their bit depth, which an array does not declare, so it is the
    smallest of 8, 10, 12, 14, 16, 32 bits holding the brightest value (uint8: v / 255, like an
    8-bit PNG; 12-bit data: v / 4095, like a 12-bit DICOM; signed when any value is negative).
    Float arrays must already lie in [0, 1] and are taken as they are."""
    from regionnet.io import integer_pixels

    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
    if arr.ndim != 2 or arr.size == 0:
        raise RadiographReadError(name, f"expected a grey image of shape (H, W), got {arr.shape}")
    if arr.dtype.kind in "iu":
        return np.ascontiguousarray(integer_pixels(arr))
    if arr.dtype.kind != "f":
        raise RadiographReadError(name, f"unsupported dtype {arr.dtype}; use float or integers")
    if not np.isfinite(arr).all():
        raise RadiographReadError(name, "image contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise RadiographReadError(
            name, f"float pixels must lie in [0, 1], got [{lo:g}, {hi:g}]", "scale them first"
        )
    return np.ascontiguousarray(arr, dtype=np.float32)


class RegionPredictor:
    """A trained model with its thresholds and preprocessing; see the module docstring."""

    def __init__(
        self,
        model,
        device: str | torch.device = "cpu",
        thresholds: float | Sequence[float] | Mapping[str, float] | None = None,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.regions: tuple[str, ...] = tuple(model.regions)
        self._thresholds = resolve_thresholds(model.thresholds.tolist(), self.regions, thresholds)
        self.transform = eval_transform(model)
        names = list(getattr(model, "findings", []))
        # finding name -> its region (the only region whose films it is meaningful for)
        self.finding_regions = {f: model.hparams.findings[f]["region"] for f in names}
        # finding name -> its grade labels (ordinal findings), its columns of inference_all
        self.finding_grades = {
            f: list(model.hparams.findings[f]["grades"])
            for f in names
            if "grades" in model.hparams.findings[f]
        }
        self.finding_columns = prob_slices(model.hparams.findings) if names else {}

    @property
    def thresholds(self) -> dict[str, float]:
        """Operating threshold per head (the checkpoint's unless overridden)."""
        return dict(zip(self.regions, self._thresholds))

    @property
    def image_size(self) -> int:
        return int(self.model.hparams.image_size)

    def __repr__(self) -> str:
        return (
            f"RegionPredictor(regions={list(self.regions)}, backbone="
            f"{self.model.hparams.backbone!r}, image_size={self.image_size}, device={self.device})"
        )

    def _load(self, x: Input, k: int) -> tuple[str | None, np.ndarray]:
        # files decoded at reduced size, as regionnet-predict does (eval_transform's size)
        return _read(x, k, self.image_size, target=self.image_size)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Probabilities (B, R) for preprocessed images (B, 1, S, S)."""
        return self.model.inference_proba(images.to(self.device)).float().cpu()

    def predict(self, inputs: Input | Iterable[Input], batch_size: int = 32) -> list[Prediction]:
        """One `Prediction` per input, in order; unreadable inputs give error predictions."""
        if isinstance(inputs, str | Path | np.ndarray | torch.Tensor):
            inputs = [inputs]
        inputs = list(inputs)
        size = max(1, int(batch_size))
        out: list[Prediction | None] = [None] * len(inputs)
        for start in range(0, len(inputs), size):
            good, pixels = [], []
            for k in range(start, min(start + size, len(inputs))):
                path = str(inputs[k]) if isinstance(inputs[k], str | Path) else None
                try:
                    path, image = self._load(inputs[k], k)
                except RadiographReadError as e:
                    why = " ".join(e.reason.split())  # one line, as in the CLI's status
                    out[k] = Prediction({}, None, [], path, f"error: {why}", why)
                    continue
                good.append((k, path))
                pixels.append(image)
            if not pixels:
                continue
            for (k, path), (p, fp, parts) in zip(good, self._infer(pixels), strict=True):
                region, above = decide(p, self._thresholds, self.regions)
                findings, grades = self._findings(region, fp)
                out[k] = Prediction(
                    dict(zip(self.regions, p)),
                    region,
                    above,
                    path,
                    findings=findings,
                    grades=grades,
                    **self._parts(region, parts),
                )
        return out  # type: ignore[return-value]

    def _infer(self, pixels: list[np.ndarray]) -> list[tuple[list, list, dict]]:
        """Per film (region probabilities, finding probabilities, part results) of a batch of
        read films (`_load`): one backbone pass (two with `tta`)."""
        batch = torch.stack([self.transform(torch.from_numpy(p)[None]) for p in pixels])
        if self.finding_regions:
            with torch.inference_mode():
                probs, found = self.model.inference_all(batch.to(self.device))
            probs, found = probs.float().cpu().tolist(), found.float().cpu().tolist()
        else:
            probs = self.probabilities(batch).tolist()
            found = [[] for _ in probs]
        return [(p, fp, {}) for p, fp in zip(probs, found, strict=True)]

    def _parts(self, region: str, parts: dict) -> dict:
        """The `Prediction` fields of the part results of a film called `region`."""
        return parts

    def predict_one(self, x: Input) -> Prediction:
        """The prediction for one path or array."""
        return self.predict([x])[0]

    def _findings(self, region: str, probs: list[float]) -> tuple[dict, dict]:
        """`Prediction.findings` and `.grades` of one film: its finding probabilities (one
        column per binary finding, one per grade of an ordinal one) on its predicted region."""
        findings, grades = {}, {}
        for f, own in self.finding_regions.items():
            if own != region:
                continue
            p = probs[self.finding_columns[f]]
            if f in self.finding_grades:
                findings[f] = sum(k * q for k, q in enumerate(p))
                grades[f] = self.finding_grades[f][grade_of(p)]
            else:
                findings[f] = p[0]
        return findings, grades


class LandmarkPredictor:
    """A trained landmark model (`task=landmarks`) with the API of `RegionPredictor`:
    `predict(inputs)` gives one `Prediction` per input with `landmarks` and `angles`."""

    infer_module = "regionnet.landmarks.infer"  # its `predict_arrays` makes the results

    def __init__(self, model, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.landmark_names: tuple[str, ...] = tuple(model.landmark_names)

    @property
    def image_size(self) -> int:
        return int(self.model.hparams.image_size)

    def __repr__(self) -> str:
        return (
            f"LandmarkPredictor(landmarks={len(self.landmark_names)}, "
            f"skeleton={self.model.skeleton!r}, backbone={self.model.hparams.backbone!r}, "
            f"image_size={self.image_size}, refine={bool(self.model.hparams.refine)}, "
            f"device={self.device})"
        )

    def predict(self, inputs: Input | Iterable[Input], batch_size: int = 16) -> list[Prediction]:
        """One `Prediction` per input, in order; unreadable inputs give error predictions."""
        predict_arrays = importlib.import_module(self.infer_module).predict_arrays
        if isinstance(inputs, str | Path | np.ndarray | torch.Tensor):
            inputs = [inputs]
        inputs = list(inputs)
        out: list[Prediction | None] = [None] * len(inputs)
        size = max(1, int(batch_size))
        for start in range(0, len(inputs), size):
            good, pixels = [], []
            for k in range(start, min(start + size, len(inputs))):
                path = str(inputs[k]) if isinstance(inputs[k], str | Path) else None
                try:
                    path, image = _read(inputs[k], k, self.image_size)
                except RadiographReadError as e:
                    why = " ".join(e.reason.split())
                    out[k] = Prediction({}, None, [], path, f"error: {why}", why)
                    continue
                good.append((k, path))
                pixels.append(image)
            for (k, path), found in zip(good, predict_arrays(self.model, pixels), strict=True):
                out[k] = Prediction({}, None, [], path, **found)
        return out  # type: ignore[return-value]

    def predict_one(self, x: Input) -> Prediction:
        """The prediction for one path or array."""
        return self.predict([x])[0]


class BoxPredictor(LandmarkPredictor):
    """A trained box model (`task=boxes`, vertebrae): `predict(inputs)` gives one `Prediction`
    per input with `boxes`."""

    infer_module = "regionnet.boxes.infer"

    def __init__(self, model, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.box_names: tuple[str, ...] = tuple(model.box_names)

    def __repr__(self) -> str:
        return (
            f"BoxPredictor(boxes={list(self.box_names)}, backbone={self.model.hparams.backbone!r},"
            f" image_size={self.image_size}, device={self.device})"
        )


class MultiPredictor(RegionPredictor):
    """A composed model (`task=multi`): region heads (and finding heads) with landmark and box
    parts on one backbone. `predict(inputs)` gives one `Prediction` per input from one pass:
    `probabilities`, `region`, `findings` as a region model's, and `landmarks`/`angles` and
    `boxes` (in the input's pixels) on films the parts apply to (films called the landmark
    set's region, or `unknown` for a set of no region head such as spines; empty elsewhere)."""

    def __init__(self, model, device: str | torch.device = "cpu", thresholds=None):
        super().__init__(model, device, thresholds)
        self.parts: tuple[str, ...] = tuple(model.parts)
        self.landmark_names: tuple[str, ...] = tuple(model.landmark_names)

    def __repr__(self) -> str:
        return (
            f"MultiPredictor(regions={list(self.regions)}, parts={list(self.parts)}, "
            f"backbone={self.model.hparams.backbone!r}, image_size={self.image_size}, "
            f"device={self.device})"
        )

    def _load(self, x: Input, k: int) -> tuple[str | None, np.ndarray]:
        return _read(x, k, self.image_size)  # full size: points and boxes in its pixels

    def _infer(self, pixels: list[np.ndarray]) -> list[tuple[list, list, dict]]:
        return importlib.import_module("regionnet.compose.infer").predict_arrays(self.model, pixels)

    def _parts(self, region: str, parts: dict) -> dict:
        return importlib.import_module("regionnet.compose.infer").keep_parts(
            self.model, region, parts
        )


def _read(x: Input, k: int, size: int, target: int | None = None) -> tuple[str | None, np.ndarray]:
    """(path or None, float32 (H, W) pixels in [0, 1]) of a path or an in-memory image;
    `target`: a file is decoded at reduced size for `resize_pad(target)` (region models;
    landmark models keep full size: their points are in the file's pixels)."""
    if isinstance(x, str | Path):
        return str(x), load_image(str(x), phantom_size=size, target=target)
    return None, array_pixels(x, name=f"input {k}")


def load_model(
    ckpt: str | Path,
    device: str | torch.device = "cpu",
    thresholds: float | Sequence[float] | Mapping[str, float] | None = None,
    refine_detector: str | Path | None = None,
) -> RegionPredictor | LandmarkPredictor | BoxPredictor | MultiPredictor:
    """A `RegionPredictor` from a checkpoint written by `regionnet-train`, a
    `LandmarkPredictor` for a landmark checkpoint (`task=landmarks`), a `BoxPredictor` for a
    box checkpoint (`task=boxes`) or a `MultiPredictor` for region heads with landmark and box
    parts (`task=multi`).

    `thresholds` overrides the saved per-head thresholds (one number, a list in head order,
    or a mapping region -> threshold); landmark and box models have none.
    `refine_detector`: a box checkpoint whose vertebra boxes place a two-step landmark
    model's step-2 crops (instead of step 1's corners).
    """
    from regionnet.boxes.infer import attach_detector, load_box_model
    from regionnet.landmarks.infer import load_landmark_model
    from regionnet.model.checkpoint import checkpoint_task

    path = Path(str(ckpt)).expanduser()
    task = checkpoint_task(path)
    if task == "multi":
        from regionnet.compose.infer import load_multi_model

        if refine_detector:
            raise ValueError(f"{path.name}: refine_detector is for two-step landmark models")
        return MultiPredictor(load_multi_model(path, device), device, thresholds)
    if refine_detector and task != "landmarks":
        raise ValueError(f"{path.name}: refine_detector is for two-step landmark models")
    if task == "boxes":
        if thresholds is not None:
            raise ValueError(f"{path.name} is a box model: it has no thresholds to override")
        return BoxPredictor(load_box_model(path, device), device)
    if task == "landmarks":
        if thresholds is not None:
            raise ValueError(f"{path.name} is a landmark model: it has no thresholds to override")
        model = attach_detector(load_landmark_model(path, device), refine_detector)
        return LandmarkPredictor(model, device)
    return RegionPredictor(load_checkpoint(ckpt, device), device, thresholds)
