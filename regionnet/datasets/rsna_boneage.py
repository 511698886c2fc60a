"""RSNA Pediatric Bone Age Challenge 2017: left-hand PA radiographs of children (0-19 y).

Layout (`--root` is the folder holding the unpacked challenge files)::

    boneage-training-dataset.csv        columns id, boneage, male
    boneage-training-dataset/<id>.png   (the Kaggle mirror nests a second
                                        boneage-training-dataset/ folder: both are accepted)
    boneage-test-dataset.csv            optional: columns Case ID, Sex
    boneage-test-dataset/<Case ID>.png

Every image -> region `hand`, view `PA`, age_group `pediatric`; `patient_id` is the image id
(one radiograph per child); `original_label` is `hand`, `boneage_months` the reference bone
age (training set). Listed ids whose file is missing are reported and skipped.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from regionnet.datasets.manifest import Excluded, build_manifest, existing, require, require_any

NAME = "rsna_boneage"
LAYOUT = "boneage-training-dataset.csv and boneage-training-dataset/<id>.png"
# (CSV, image folder, id column, bone-age column)
PARTS = (
    ("boneage-training-dataset.csv", "boneage-training-dataset", "id", "boneage"),
    ("boneage-test-dataset.csv", "boneage-test-dataset", "Case ID", None),
)


def _image_dir(root: Path, folder: str) -> Path:
    nested = root / folder / folder
    return nested if nested.is_dir() else root / folder


def index(root: str | Path, source: str = NAME) -> pd.DataFrame:
    """Index the RSNA bone-age set under `root` (see the module docstring)."""
    root = require(root, NAME, LAYOUT)
    present = require_any(root, NAME, LAYOUT, [csv for csv, *_ in PARTS])
    excluded, rows = Excluded(), []
    for csv, folder, id_col, age_col in PARTS:
        if csv not in present:
            continue
        require(root, NAME, LAYOUT, folder)
        table = pd.read_csv(root / csv, dtype=str, keep_default_na=False)
        if id_col not in table:
            raise ValueError(f"{root / csv}: needs an {id_col!r} column; has {list(table.columns)}")
        images = _image_dir(root, folder)
        listed = [
            {
                "path": images / f"{r[id_col].strip()}.png",
                "region": "hand",
                "patient_id": r[id_col].strip(),
                "view": "PA",
                "original_label": "hand",
                "age_group": "pediatric",
                "boneage_months": r[age_col] if age_col else "",
                "original_split": "train" if age_col else "test",
            }
            for _, r in table.iterrows()
        ]
        rows += existing(listed, root / csv, excluded)
    return build_manifest(rows, source, excluded, where=str(root))
