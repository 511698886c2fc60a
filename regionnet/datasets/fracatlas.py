"""FracAtlas (Abedeen et al., Sci Data 2023; figshare, CC BY 4.0): 4,083 musculoskeletal films.

Layout (`--root` is the unpacked `FracAtlas` folder)::

    FracAtlas/dataset.csv                  columns image_id, hand, leg, hip, shoulder, mixed,
                                           hardware, multiscan, fractured, fracture_count,
                                           frontal, lateral, oblique (flags are 0/1)
    FracAtlas/images/Fractured/<image_id>          e.g. IMG0000019.jpg
    FracAtlas/images/Non_fractured/<image_id>

Region from the body-part flags: hand -> hand, hip -> pelvis, shoulder -> shoulder, leg -> leg.
FracAtlas "leg" is the whole lower limb below the hip (foot, ankle, lower leg, knee, femur):
it is kept as `leg` (`other` for the default heads), so some knee films become negatives for
a knee head; drop `source == fracatlas & region == leg` from knee training if that matters.
Rows flagged `mixed` (several body parts in one image), with several part flags, or with none
cannot get a single region: they are excluded and counted in the log. `view` joins the
frontal/lateral/oblique flags (`frontal+lateral` for multiscan films); `finding` is
fractured/non-fractured. FracAtlas has no patient ids: each image is its own patient
(`fracatlas-<stem>`), so repeat films of one patient cannot be grouped.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from regionnet.datasets.manifest import Excluded, build_manifest, existing, require

NAME = "fracatlas"
LAYOUT = "FracAtlas/dataset.csv and FracAtlas/images/{Fractured,Non_fractured}/<image_id>.jpg"
PARTS = {"hand": "hand", "leg": "leg", "hip": "pelvis", "shoulder": "shoulder"}
VIEWS = ("frontal", "lateral", "oblique")
FOLDERS = ("Fractured", "Non_fractured")


def _flag(row: pd.Series, col: str) -> bool:
    return str(row.get(col, "0")).strip() in ("1", "1.0", "True", "true")


def index(root: str | Path, source: str = NAME) -> pd.DataFrame:
    """Index FracAtlas under `root` (see the module docstring for the layout)."""
    root = require(root, NAME, LAYOUT, "dataset.csv", "images")
    table = pd.read_csv(root / "dataset.csv", dtype=str, keep_default_na=False)
    need = ["image_id", *PARTS, "mixed"]
    missing = [c for c in need if c not in table]
    if missing:
        raise ValueError(
            f"{root / 'dataset.csv'}: missing columns {missing}; FracAtlas has "
            "image_id, hand, leg, hip, shoulder, mixed, ..., frontal, lateral, oblique"
        )
    excluded, rows = Excluded(), []
    for _, r in table.iterrows():
        image = r["image_id"].strip()
        name = image if Path(image).suffix else f"{image}.jpg"
        first = FOLDERS[0] if _flag(r, "fractured") else FOLDERS[1]
        candidates = [root / "images" / first / name] + [
            root / "images" / f / name for f in FOLDERS if f != first
        ]
        path = next((p for p in candidates if p.is_file()), candidates[0])
        parts = [p for p in PARTS if _flag(r, p)]
        if _flag(r, "mixed"):
            excluded.add("flagged mixed (several body parts in one image)", image)
            continue
        if len(parts) != 1:
            reason = "no body-part flag" if not parts else "several body-part flags"
            excluded.add(reason, image)
            continue
        rows.append(
            {
                "path": path,
                "region": PARTS[parts[0]],
                "patient_id": Path(name).stem,
                "view": "+".join(v for v in VIEWS if _flag(r, v)),
                "original_label": parts[0],
                "finding": "fractured" if _flag(r, "fractured") else "non-fractured",
            }
        )
    rows = existing(rows, root / "dataset.csv", excluded)
    return build_manifest(rows, source, excluded, where=str(root))
