"""What `train(cfg)` does after a box fit: per-film test predictions, the console table and
the model card (`regionnet.train.TASK_RUNS`). The boxes are vertebrae, not lesions.

`test_predictions.csv` columns: `path`, `boxes` (JSON list of {"label", "score", "box":
[x1, y1, x2, y2]} in the stored film's pixels, best first), `true_boxes` (JSON list of
{"label", "box"}: the annotated vertebrae), `found_50` (how many true vertebrae have a
detection of their own level at IoU >= 0.5) and `n_true`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import pandas as pd
from torchvision.ops import box_iou

from regionnet.boxes.infer import box_list, boxes_json
from regionnet.model_card import head_card

REFERENCES = (
    "Tian et al., ICCV 2019: FCOS, fully convolutional one-stage object detection "
    "(torchvision's implementation).",
    "Nguyen et al., MICCAI 2021: VinDr-SpineXR, abnormality detection in spine X-rays "
    "(the box-task setting; here the boxes are vertebrae, not lesions).",
    "Wang et al., AASCE 2019 challenge: the spine films and their vertebral corners.",
)


def found_at_50(boxes, labels, true_boxes, true_labels) -> int:
    """True boxes with a detection of the same label at IoU >= 0.5."""
    if not len(true_boxes) or not len(boxes):
        return 0
    iou = box_iou(true_boxes.float(), boxes.float())
    same = true_labels[:, None] == labels[None, :]
    return int(((iou >= 0.5) & same).any(1).sum())


def test_predictions(trainer, model, dm) -> pd.DataFrame | None:
    """One row per readable test film (see the module docstring), from the test pass just
    run (`HeadLoop.test_outputs`, every process's films); None off rank 0."""
    if not trainer.is_global_zero:
        return None
    rows = prediction_rows(model.test_outputs, model.box_names)
    return pd.DataFrame(rows).drop_duplicates("path") if rows else pd.DataFrame(rows)


def prediction_rows(outputs, names) -> list[dict]:
    """Rows of `BoxNet.predict_step` outputs (see the module docstring)."""
    rows = []
    for out in outputs:
        for k, path in enumerate(out["path"]):
            b, s, c = out["boxes"][k], out["scores"][k], out["labels"][k]
            row = {"path": path, "boxes": boxes_json(box_list(b, s, c, names))}
            if "boxes_px" in out:
                tb, tc = out["boxes_px"][k], out["box_labels_px"][k]
                truth = [{"label": names[int(i) - 1], "box": [round(float(v), 1) for v in x]}
                         for x, i in zip(tb, tc, strict=True)]  # fmt: skip
                row["true_boxes"] = json.dumps(truth)
                row["found_50"] = found_at_50(b, c, tb, tc)
                row["n_true"] = len(tb)
            rows.append(row)
    return rows


def level_order(name: str) -> tuple:
    """Head to foot: C, T, L, S levels by number (T1 ... T12, L1 ... L5), others after."""
    region, number = name[:1], name[1:]
    rank = "CTLS".find(region) if region and region in "CTLS" else 4
    return (rank, int(number) if number.isdigit() else 0, name)


def print_summary(metrics: Mapping[str, float], model=None) -> None:
    """Vertebra mAP on the console: the summary figures, then AP per level; a column per
    stage. `model`: unused (`train` passes every head type its model)."""
    from rich.console import Console
    from rich.table import Table

    stages = [s for s in ("val", "test") if any(k.startswith(f"{s}/") for k in metrics)]
    table = Table(title="Vertebra detection (boxes are vertebrae, not lesions)")
    table.add_column("figure")
    for s in stages:
        table.add_column(f"{s} AP@[.5:.95]", justify="right")
        table.add_column(f"{s} AP@0.5", justify="right")
    levels = sorted({k.split("/", 2)[2] for k in metrics if k.split("/")[1:2] == ["ap_50"]},
                    key=level_order)  # fmt: skip

    def cell(key: str) -> str:
        return f"{metrics[key]:.3f}" if key in metrics else "n/a"

    table.add_row("mAP", *(c for s in stages for c in (cell(f"{s}/map"), cell(f"{s}/map_50"))))
    for n in levels:
        table.add_row(n, *(c for s in stages
                           for c in (cell(f"{s}/ap/{n}"), cell(f"{s}/ap_50/{n}"))))  # fmt: skip
    Console().print(table)


def model_card(model, dm, metrics: Mapping[str, float]) -> dict:
    """`model_card.json` of a box model (the region card's keys where they fit)."""
    h = model.hparams
    size = int(h.image_size)
    return head_card(
        model,
        dm,
        metrics,
        task="Vertebra detection on AP spine radiographs (FCOS boxes; vertebrae, not lesions)",
        description=(
            f"{h.backbone} backbone, FPN (P3-P7) and torchvision FCOS; one class per vertebra "
            f"level ({len(model.box_names)}: {', '.join(model.box_names)})."
        ),
        box_names=list(model.box_names),
        dataset=h.get("dataset"),
        network_data_format={
            "inputs": {
                "image": {
                    "shape": [1, size, size],
                    "value_range": "[0, 1] pixels letterboxed to the square, then "
                    f"(x - {float(h.mean)}) / {float(h.std)}",
                }
            },
            "outputs": {
                "boxes": {
                    "meaning": 'list of {"label", "score", "box": [x1, y1, x2, y2]} in the '
                    "input film's pixels; label = vertebra level",
                    "score_thresh": float(h.score_thresh),
                    "nms_thresh": float(h.nms_thresh),
                }
            },
        },
        intended_use=(
            "Research: locate and name vertebrae (T1..L5) on AP spine films, e.g. to crop or "
            "count levels. It finds vertebrae, not lesions or fractures. Not for diagnosis or "
            "treatment decisions."
        ),
        references=list(REFERENCES),
    )
