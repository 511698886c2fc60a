"""What `train(cfg)` does after a landmark fit: per-film test predictions, the console table and
the model card. The loop itself is the region task's (`regionnet.train`); only these outputs
differ by head type.

`test_predictions.csv` columns: `path`, `landmarks` (JSON list of [x, y] in the stored film's
pixels, in the data set's landmark order), `mre_px` (the film's mean radial error) and, for
spines, `pt`, `mt`, `tl` (Cobb angles in degrees from the predicted corners) and `true_pt`,
`true_mt`, `true_tl`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from regionnet.landmarks.infer import ANGLES, angles_of, points_json
from regionnet.landmarks.report import print_table
from regionnet.model_card import head_card

REFERENCES = (
    "Cina et al., Scientific Reports 2021: 2-step deep learning model for landmarks "
    "localization in spine radiographs (DSNT heads; step 2 on vertebra crops).",
    "Nibali et al. 2018: numerical coordinate regression with convolutional neural networks "
    "(DSNT).",
    "Wang et al., AASCE 2019 challenge: Cobb angles from vertebral corners, SMAPE.",
)


def test_predictions(trainer, model, dm) -> pd.DataFrame | None:
    """One row per readable test film (see the module docstring), from the test pass just
    run (`HeadLoop.test_outputs`, every process's films); None off rank 0."""
    if not trainer.is_global_zero:
        return None
    rows, seen = [], set()
    for out in model.test_outputs:
        for k, path in enumerate(out["path"]):
            if path in seen:  # a film the distributed sampler gave two processes
                continue
            seen.add(path)
            pred = out["points"][k].numpy()
            height = float(out["size"][k][1])
            row = {"path": path, "landmarks": points_json(pred)}
            if "points_px" in out:
                err = np.linalg.norm(pred - out["points_px"][k].numpy(), axis=-1)
                err = err[out["visible"][k].numpy().astype(bool)]
                row["mre_px"] = round(float(err.mean()), 2) if err.size else float("nan")
            row.update(angles_of(pred, model.skeleton, height))
            if model.skeleton == "vertebrae" and "cobb" in out:
                cobb = out["cobb"][k].tolist()
                row.update({f"true_{a}": float(v) for a, v in zip(ANGLES, cobb, strict=True)})
            rows.append(row)
    return pd.DataFrame(rows)


def print_summary(metrics: Mapping[str, float], model=None) -> None:
    """The landmark errors on the console: one row per figure, a column per stage.
    `model`: unused (`train` passes every head type its model)."""
    columns = []
    for s in ("val", "test"):
        if any(k.startswith(f"{s}/") for k in metrics):
            columns.append((s, s))
            if f"{s}/step1/mre_pct" in metrics:
                columns.append((f"{s} step 1", f"{s}/step1"))
    print_table(
        metrics, "Landmark errors (% = of the vertebra's size or the hand's width)", columns
    )


def model_card(model, dm, metrics: Mapping[str, float]) -> dict:
    """`model_card.json` of a landmark model (the region card's keys where they fit)."""
    h = model.hparams
    size = int(h.image_size)
    detail = h.get("detail_size")
    return head_card(
        model,
        dm,
        metrics,
        task="Landmark localisation on radiographs (DSNT heads)",
        description=(
            f"{h.backbone} backbone, FPN and one DSNT heatmap per landmark "
            f"({len(model.landmark_names)} landmarks, {model.skeleton})"
            + ("; step 2 refines each point group on a crop" if h.refine else "")
            + (
                f" of the film at {h.detail_size} px (the detail image)."
                if h.get("detail_size")
                else "."
            )
        ),
        landmarks=list(model.landmark_names),
        skeleton=model.skeleton,
        dataset=h.get("dataset"),
        network_data_format={
            "inputs": {
                "image": {
                    "shape": [1, size, size],
                    "value_range": "[0, 1] pixels letterboxed to the square, then "
                    f"(x - {float(h.mean)}) / {float(h.std)}"
                    + ("; the detail image average-pooled to this size" if detail else ""),
                },
                **(
                    {
                        "detail": {
                            "shape": [1, detail, detail],
                            "value_range": "the film letterboxed to this size and normalised "
                            "as the image: step 2's crops, in the image's frame",
                        }
                    }
                    if detail
                    else {}
                ),
            },
            "outputs": {
                "landmarks": {
                    "shape": [len(model.landmark_names), 2],
                    "meaning": "[x, y] per landmark in the input film's pixels",
                }
            },
        },
        intended_use=(
            "Research: place anatomical landmarks (vertebral corners, hand joints) and derive "
            "angles for measurement studies. Not for diagnosis or treatment decisions."
        ),
        references=list(REFERENCES),
    )
