"""GRAZPEDWRI-DX (Nagy et al., Sci Data 2022; figshare doi:10.6084/m9.figshare.14825193,
CC BY 4.0): 20,327 pediatric wrist trauma radiographs of 6,091 patients, Graz 2008-2018.

Layout (`--root` is the folder holding the unpacked download)::

    dataset.csv                  one row per image; used columns: filestem, patient_id and,
                                 when present, projection (1 AP, 2 lateral, 3 oblique -- an
                                 assumption; other values are kept as written), laterality,
                                 fracture_visible
    images_part{1..4}/<filestem>.png   (the four image zips; any folder under the root works)

Every image -> region `wrist` (`other` unless the region set has wrist), age_group
`pediatric`; `patient_id` from the CSV (patients have 3.3 images on average, so grouping
matters); `finding` is `fracture` where fracture_visible is 1. Listed stems without a PNG are
reported and skipped.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from regionnet.datasets.manifest import Excluded, build_manifest, find_images, require

NAME = "grazpedwri"
LAYOUT = "dataset.csv (filestem, patient_id, ...) and images_part*/<filestem>.png"
PROJECTIONS = {"1": "AP", "2": "lateral", "3": "oblique"}


def index(root: str | Path, source: str = NAME) -> pd.DataFrame:
    """Index GRAZPEDWRI-DX under `root` (see the module docstring)."""
    root = require(root, NAME, LAYOUT, "dataset.csv")
    table = pd.read_csv(root / "dataset.csv", dtype=str, keep_default_na=False)
    missing = [c for c in ("filestem", "patient_id") if c not in table]
    if missing:
        raise ValueError(
            f"{root / 'dataset.csv'}: missing columns {missing}; GRAZPEDWRI-DX's dataset.csv "
            f"has filestem, patient_id, ...; found {list(table.columns)}"
        )
    pngs = {p.stem: p for p in find_images(root, (".png",))}
    excluded, rows = Excluded(), []
    for _, r in table.iterrows():
        stem = r["filestem"].strip()
        if stem not in pngs:
            excluded.add(f"listed in {root / 'dataset.csv'} but no {stem}.png under the root", stem)
            continue
        projection = str(r.get("projection", "")).strip().removesuffix(".0")
        fracture = str(r.get("fracture_visible", "")).strip() in ("1", "1.0")
        rows.append(
            {
                "path": pngs[stem],
                "region": "wrist",
                "patient_id": r["patient_id"].strip(),
                "view": PROJECTIONS.get(projection, projection),
                "original_label": "wrist",
                "laterality": str(r.get("laterality", "")).strip(),
                "finding": "fracture" if fracture else "",
                "age_group": "pediatric",
            }
        )
    return build_manifest(rows, source, excluded, where=str(root))
