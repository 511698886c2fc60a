"""What `train(cfg)` does after a composed fit (`task=multi`): test predictions, the console
tables and the model card, each the region task's with the parts' additions.

`test_predictions.csv`: the region task's columns (`path`, `true_region`, `p_<region>`,
`region`, `regions`, ..., `label_<region>`) and, per part, what `regionnet-predict` writes for
it: `landmarks` (JSON [[x, y], ...] in the film's pixels, the set's order) with `pt`, `mt`,
`tl` on spines, `boxes` (JSON [{"label", "score", "box"}]). A part's cells are filled only on
films it applies to (`regionnet.compose.infer.applies`: the films called its landmark set's
region, or `unknown` for a set of no region head, such as spines) among the landmark set's
films (a region film is read at reduced size in training and evaluation; regionnet-predict
and the API read every film at full size), empty elsewhere; `mre_px`
is the error of every test film of the landmark set, called or not; `same_film`: the region
manifest's copy of a landmark film both data sets hold (`regionnet.compose.data.
join_same_films`), else empty.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from regionnet.boxes import run as box_run
from regionnet.compose.infer import part_cells
from regionnet.landmarks import run as landmark_run
from regionnet.model_card import model_card as region_card
from regionnet.regions import UNKNOWN
from regionnet.reporting import test_predictions as region_test_predictions
from regionnet.run import print_summary as print_regions


def test_predictions(trainer, model, dm) -> pd.DataFrame | None:
    """The region task's test table with the parts' columns (module docstring), of the
    films the test loader gave (`dm.test_split`)."""
    table = region_test_predictions(trainer, model, dm, getattr(dm, "test_split", "test"))
    if table is None:
        return None
    predicted = dict(zip(table["path"], table["region"], strict=True))
    cells: dict[str, dict] = {}
    for out in model.test_outputs:
        for k, path in enumerate(out["path"]):
            if path in cells or path not in predicted:
                continue
            # the landmark set's films only: a region film was read at reduced size, so its
            # points would be in that image's pixels (regionnet-predict reads full size)
            own = "has_points" in out and bool(out["has_points"][k])
            cells[path] = part_cells(model, out, k, predicted[path] if own else "")
            if "points_px" in out and own:
                diff = out["points"][k].numpy() - out["points_px"][k].numpy()
                err = np.linalg.norm(diff, axis=-1)
                err = err[out["visible"][k].numpy().astype(bool)]
                cells[path]["mre_px"] = round(float(err.mean()), 2) if err.size else np.nan
    extra = pd.DataFrame([cells.get(p, {}) for p in table["path"]], index=table.index)
    table = pd.concat([table, extra], axis=1)
    # the region manifest's copy of a joined landmark film (`data.join_same_films`), or empty
    same = dm.records.set_index("path")["same_film"] if "same_film" in dm.records else None
    table["same_film"] = table["path"].map(same).fillna("") if same is not None else ""
    return table


def print_summary(metrics: Mapping[str, float], model) -> None:
    """The region table, then the landmark part's errors and the box part's mAP."""
    print_regions(metrics, model.regions, findings=list(model.findings))
    for prefix, run in (("landmarks", landmark_run), ("boxes", box_run)):
        mine = {
            k.replace(f"/{prefix}/", "/", 1): v for k, v in metrics.items() if f"/{prefix}/" in k
        }
        if mine:
            run.print_summary(mine)


def model_card(model, dm, metrics: Mapping[str, float]) -> dict:
    """The region card, its task and description naming the parts, plus `parts`: per part
    what it outputs, on which films, and its metrics."""
    card = region_card(model, dm, metrics)
    h = model.hparams
    names = ", ".join(model.parts)
    card["task"] += f", with {names} on the same backbone"
    card["description"] += (
        f" The same backbone pass feeds the {names} part(s) on its stride-8..32 feature maps "
        f"(landmark set {h.dataset}); their outputs are given on films called "
        f"{model.landmark_region or UNKNOWN}."
    )
    parts = {}
    for name, part in model.parts.items():
        found = {k: v for k, v in metrics.items() if f"/{name}/" in k}
        if name == "landmarks":
            parts[name] = {
                "points": list(part.names),
                "skeleton": part.skeleton,
                "output": "[x, y] per landmark in the input film's pixels (DSNT, one step)",
            }
        else:
            parts[name] = {
                "classes": list(part.names),
                "output": "{label, score, box [x1, y1, x2, y2]} per box in the film's pixels "
                "(FCOS); vertebrae, not lesions",
            }
        parts[name].update(
            dataset=h.dataset,
            films=model.landmark_region or UNKNOWN,
            weight=model.part_weights[name],
            metrics=found,
        )
    card["parts"] = parts
    card["references"] = [*card["references"], *landmark_run.REFERENCES[:2]]
    return card
