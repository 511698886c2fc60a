"""`regionnet-predict` with a box checkpoint: one row per film, written batch by batch.

    regionnet-predict ckpt_path=.../boxes/best.ckpt input=spines/ output=boxes.csv

Columns (CSV, or one JSON object per line for `.jsonl`): `path`; `status` (`ok` or
`error: <why>`: an unreadable file gets its row and the run goes on); `boxes`, a JSON list of
`{"label", "score", "box": [x1, y1, x2, y2]}` in the film's own pixels, best score first (the
labels are vertebrae, T1..L5: not lesions); and `model_id`, last. `cam_dir=DIR` draws each
film with its boxes into `DIR/<name>.boxes.png`. The inputs, reader and predict loop are the
landmark task's (`regionnet.landmarks.predict`), through `BoxNet.predict_step`.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from regionnet.boxes.infer import box_list, boxes_json
from regionnet.boxes.overlay import draw_boxes
from regionnet.data.dataset import load_image
from regionnet.landmarks.infer import LandmarkReader, collate
from regionnet.landmarks.predict import LandmarkWriter
from regionnet.model.identity import model_id
from regionnet.writer import is_jsonl

log = logging.getLogger(__name__)

COLUMNS = ["path", "status", "boxes", "model_id"]


class BoxWriter(LandmarkWriter):
    """The landmark writer's rows (appended per batch, nothing lost on a crash; `_write`,
    `close`) with box columns and box overlays."""

    def __init__(self, output: Path, model, mid: str, cam_dir: Path | None = None):
        BasePredictionWriter.__init__(self, write_interval="batch")
        self.output, self.mid, self.cam_dir = output, mid, cam_dir
        self.columns, self.box_names = COLUMNS, list(model.box_names)
        self.size = int(model.hparams.image_size)
        self.counts = {"ok": 0, "errors": 0, "overlays": 0, "overlay_failed": 0}
        self.names: set[str] = set()
        output.parent.mkdir(parents=True, exist_ok=True)
        self.file = output.open("w", newline="", encoding="utf-8", errors="surrogateescape")
        self.jsonl = is_jsonl(output)
        self.csv = None
        if not self.jsonl:
            self.csv = csv.DictWriter(self.file, self.columns, extrasaction="ignore")
            self.csv.writeheader()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, *_):
        for path, why in prediction["errors"]:
            self.counts["errors"] += 1
            self._write({"path": path, "status": f"error: {why}"})
        for k, path in enumerate(prediction["path"]):
            boxes = box_list(prediction["boxes"][k], prediction["scores"][k],
                             prediction["labels"][k], self.box_names)  # fmt: skip
            self._write({"path": path, "status": "ok", "boxes": boxes_json(boxes)})
            self.counts["ok"] += 1
            if self.cam_dir is not None:
                self._overlay(path, boxes)
        self.file.flush()

    def _overlay(self, path: str, boxes: list[dict]) -> None:
        name, n = Path(path).stem, 1
        while name in self.names:
            n += 1
            name = f"{Path(path).stem}-{n}"
        self.names.add(name)
        try:
            image = load_image(path, phantom_size=self.size)
            draw_boxes(image, boxes, path=self.cam_dir / f"{name}.boxes.png")
            self.counts["overlays"] += 1
        except Exception as e:  # noqa: BLE001 - a failed drawing must not cost the row
            self.counts["overlay_failed"] += 1
            log.warning("overlay of %s not written: %s", path, e)


def predict_boxes(
    cfg, model, paths: list[str], output: Path, trainer_kwargs: dict, cam_dir: Path | None
) -> dict:
    """Predict every film of `paths` with a box `model`; write `output`; return the summary
    (`ok`, `errors`, `overlays`, `model_id`, `seconds`, `per_second`, `output`)."""
    if cfg.get("resume"):
        raise ValueError(
            "resume is not supported for box models yet: run without resume (the output is "
            "rewritten) or split the input"
        )
    mid = model_id(model)
    if cam_dir is not None:
        cam_dir.mkdir(parents=True, exist_ok=True)
    writer = BoxWriter(output, model, mid, cam_dir)
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
        "model_id": mid,
        "seconds": round(seconds, 3),
        "per_second": round(len(paths) / seconds, 2) if seconds else None,
        "output": str(output),
    }
    log.info("boxes: %d films, %d errors, %.1f films/s -> %s", summary["ok"], summary["errors"],
             summary["per_second"] or 0, output)  # fmt: skip
    return summary
