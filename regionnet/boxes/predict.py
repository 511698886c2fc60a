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

import logging
from pathlib import Path

from regionnet.boxes.infer import box_list, boxes_json
from regionnet.boxes.overlay import draw_boxes
from regionnet.landmarks.predict import FilmWriter, predict_films, refuse_resume
from regionnet.model.identity import model_id

log = logging.getLogger(__name__)

COLUMNS = ["path", "status", "boxes", "model_id"]


class BoxWriter(FilmWriter):
    """Box rows (detections JSON, film pixels) and box overlays on the shared film writer."""

    overlay_suffix = "boxes"

    def __init__(self, output: Path, model, mid: str, cam_dir: Path | None = None):
        super().__init__(output, model, mid, COLUMNS, cam_dir)
        self.box_names = list(model.box_names)

    def film(self, prediction: dict, k: int) -> tuple[dict, object]:
        boxes = box_list(prediction["boxes"][k], prediction["scores"][k],
                         prediction["labels"][k], self.box_names)  # fmt: skip
        return {"boxes": boxes_json(boxes)}, boxes

    def draw(self, image, drawn, target: Path) -> None:
        draw_boxes(image, drawn, path=target)


def predict_boxes(
    cfg, model, paths: list[str], output: Path, trainer_kwargs: dict, cam_dir: Path | None
) -> dict:
    """Predict every film of `paths` with a box `model`; write `output`; return the summary
    (`predict_films`)."""
    refuse_resume(cfg, "box")
    if cam_dir is not None:
        cam_dir.mkdir(parents=True, exist_ok=True)
    writer = BoxWriter(output, model, model_id(model), cam_dir)
    return predict_films(cfg, model, paths, output, trainer_kwargs, writer, "boxes")
