"""`regionnet-predict` with a landmark checkpoint: one row per film, written batch by batch.

    regionnet-predict ckpt_path=.../landmarks/best.ckpt input=spines/ output=points.csv

Columns (CSV, or one JSON object per line for `.jsonl`): `path`; `status` (`ok` or
`error: <why>`: an unreadable file gets its row and the run goes on); `landmarks`, a JSON list
of [x, y] in the film's own pixels in the data set's landmark order (`landmark_names` in the
checkpoint and the model card); for spine models `pt`, `mt`, `tl`, the Cobb angles in degrees
from the predicted corners (AASCE rule); with `refine`, `step1_landmarks` (the points before
step 2); and `model_id`, last. `cam_dir=DIR` draws each film with its points, the endplate
lines and the angles into `DIR/<name>.landmarks.png`. Read by the region task's reader and
run through Lightning's predict loop (`LandmarkNet.predict_step`).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from regionnet.data.dataset import load_image
from regionnet.landmarks.infer import ANGLES, LandmarkReader, angles_of, collate, points_json
from regionnet.landmarks.metrics import COBB_POINTS
from regionnet.landmarks.overlay import draw_landmarks
from regionnet.model.identity import model_id
from regionnet.writer import csv_safe, is_jsonl

log = logging.getLogger(__name__)


def landmark_columns(model) -> list[str]:
    """The output's columns, in order (see the module docstring)."""
    cols = ["path", "status", "landmarks"]
    if model.skeleton == "vertebrae" and len(model.landmark_names) == COBB_POINTS:
        cols += list(ANGLES)
    if model.hparams.get("refine"):
        cols.append("step1_landmarks")
    return [*cols, "model_id"]


class FilmWriter(BasePredictionWriter):
    """Rows of each predicted batch appended to `output` at once (nothing lost on a crash),
    error rows for unreadable files, overlays into `cam_dir`: the writer of every head type
    whose rows are one film each (landmarks, boxes). A subclass gives `columns` and
    `overlay_suffix` and implements `film(prediction, k)` (the row's own cells and what
    `draw` needs) and `draw(image, drawn, target)`."""

    overlay_suffix = "overlay"

    def __init__(self, output: Path, model, mid: str, columns, cam_dir: Path | None = None):
        super().__init__(write_interval="batch")
        self.output, self.mid, self.cam_dir, self.columns = output, mid, cam_dir, list(columns)
        self.size = int(model.hparams.image_size)
        self.counts = {"ok": 0, "errors": 0, "overlays": 0, "overlay_failed": 0}
        self.names: set[str] = set()  # overlay file names used (two folders, one file name)
        output.parent.mkdir(parents=True, exist_ok=True)
        self.file = output.open("w", newline="", encoding="utf-8", errors="surrogateescape")
        self.jsonl = is_jsonl(output)
        self.csv = None
        if not self.jsonl:
            self.csv = csv.DictWriter(self.file, self.columns, extrasaction="ignore")
            self.csv.writeheader()

    def film(self, prediction: dict, k: int) -> tuple[dict, object]:
        raise NotImplementedError

    def draw(self, image, drawn, target: Path) -> None:
        raise NotImplementedError

    def _write(self, row: dict) -> None:
        row["model_id"] = self.mid
        if self.jsonl:
            self.file.write(json.dumps(row) + "\n")
        else:
            cells = {k: csv_safe(v) if isinstance(v, str) else v for k, v in row.items()}
            self.csv.writerow({c: cells.get(c, "") for c in self.columns})

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, *_):
        for path, why in prediction["errors"]:
            self.counts["errors"] += 1
            self._write({"path": path, "status": f"error: {why}"})
        for k, path in enumerate(prediction["path"]):
            cells, drawn = self.film(prediction, k)
            self._write({"path": path, "status": "ok", **cells})
            self.counts["ok"] += 1
            if self.cam_dir is not None:
                self._overlay(path, drawn)
        self.file.flush()

    def _overlay(self, path: str, drawn) -> None:
        name, n = Path(path).stem, 1
        while name in self.names:
            n += 1
            name = f"{Path(path).stem}-{n}"
        self.names.add(name)
        try:
            image = load_image(path, phantom_size=self.size)
            self.draw(image, drawn, self.cam_dir / f"{name}.{self.overlay_suffix}.png")
            self.counts["overlays"] += 1
        except Exception as e:  # noqa: BLE001 - a failed drawing must not cost the row
            self.counts["overlay_failed"] += 1
            log.warning("overlay of %s not written: %s", path, e)

    def close(self) -> None:
        self.file.close()


class LandmarkWriter(FilmWriter):
    """Landmark rows (points JSON, Cobb angles, step-1 points) and point overlays."""

    overlay_suffix = "landmarks"

    def __init__(self, output: Path, model, mid: str, cam_dir: Path | None = None):
        super().__init__(output, model, mid, landmark_columns(model), cam_dir)
        self.skeleton = model.skeleton

    def film(self, prediction: dict, k: int) -> tuple[dict, object]:
        points = prediction["points"][k].numpy()
        angles = angles_of(points, self.skeleton, float(prediction["size"][k][1]))
        cells = {"landmarks": points_json(points), **angles}
        if "step1_landmarks" in self.columns:
            cells["step1_landmarks"] = points_json(prediction["step1_points"][k].numpy())
        return cells, (points, angles)

    def draw(self, image, drawn, target: Path) -> None:
        points, angles = drawn
        values = [angles[a] for a in ANGLES] if angles else None
        draw_landmarks(image, points, self.skeleton, angles=values, path=target)


def refuse_resume(cfg, what: str) -> None:
    """`resume` is for region outputs only; checked before the writer rewrites `output`."""
    if cfg.get("resume"):
        raise ValueError(
            f"resume is not supported for {what} models yet: run without resume (the output "
            "is rewritten) or split the input"
        )


def predict_films(
    cfg, model, paths: list[str], output: Path, trainer_kwargs: dict, writer: FilmWriter, what: str
) -> dict:
    """Every film of `paths` through Lightning's predict loop into `writer` (the landmark
    reader: letterbox, scale and offset); the summary (`ok`, `errors`, `overlays`,
    `model_id`, `seconds`, `per_second`, `output`). `what` names the head type in messages."""
    loader = DataLoader(
        LandmarkReader(paths, model),
        batch_size=max(1, int(cfg.get("batch_size", 16))),
        shuffle=False,
        num_workers=int(cfg.get("num_workers", 0) or 0),
        collate_fn=collate,
    )
    trainer = L.Trainer(
        **trainer_kwargs,
        logger=False,
        callbacks=[writer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    try:
        trainer.predict(model, dataloaders=loader, return_predictions=False)
    finally:
        writer.close()
    seconds = time.perf_counter() - start
    summary = {
        **writer.counts,
        "model_id": writer.mid,
        "seconds": round(seconds, 3),
        "per_second": round(len(paths) / seconds, 2) if seconds else None,
        "output": str(output),
        "num_workers": loader.num_workers,
        "torch_threads": torch.get_num_threads(),
    }
    log.info("%s: %d films, %d errors, %.1f films/s -> %s", what, summary["ok"],
             summary["errors"], summary["per_second"] or 0, output)  # fmt: skip
    return summary


def predict_landmarks(
    cfg, model, paths: list[str], output: Path, trainer_kwargs: dict, cam_dir: Path | None
) -> dict:
    """Predict every film of `paths` with a landmark `model`; write `output`; return the
    summary (`predict_films`)."""
    refuse_resume(cfg, "landmark")
    if cam_dir is not None:
        cam_dir.mkdir(parents=True, exist_ok=True)
    mid = model_id(model)
    if model.detector is not None:  # step 2's crops come from a detector: both name the rows
        mid = f"{mid}+{model_id(model.detector)}"
    writer = LandmarkWriter(output, model, mid, cam_dir)
    return predict_films(cfg, model, paths, output, trainer_kwargs, writer, "landmarks")
