"""Knee Osteoarthritis Severity Grading (Chen 2018, Mendeley Data doi:10.17632/56rmx5bjcr.1,
CC BY 4.0): knee-joint crops from OAI PA fixed-flexion radiographs, Kellgren-Lawrence grades.

Layout (`--root` is one image-size folder of the download, e.g.
`KneeXrayData/ClsKLData/kneeKL224`; the Kaggle mirror unpacks to the same tree)::

    <root>/{train,val,test,auto_test}/<KL>/<name>.png    <KL> = 0..4 (also KL0..KL4)

At least one split folder must exist. Every image -> region `knee`, view `PA`, age_group
`adult` (OAI: 45-79 y); `original_label` and `finding` are the grade (`KL2`; KL >= 2 is
radiographic osteoarthritis) and `original_split` the publisher's split. The files carry no
patient table; their names are the OAI subject id and side (`9003175L.png`), so that id
groups both knees of a subject (`kneeoa-9003175`); a name without it is its own patient
(`kneeoa-<stem>`). `auto_test` holds the test knees cropped by the authors' detector: the
same subjects as `test`, grouped with them by that id.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from regionnet.datasets.manifest import (
    Excluded,
    build_manifest,
    find_images,
    require,
    require_any,
)

NAME = "kneeoa"
LAYOUT = "<root>/{train,val,test}/<0-4>/*.png (Chen 2018 kneeKL224 or kneeKL299 folder)"
SPLITS = ("train", "val", "test", "auto_test")
_GRADE = re.compile(r"(?:kl)?([0-4])", re.IGNORECASE)
_OAI = re.compile(r"(?<!\d)(\d{7})([LR])$")  # OAI subject id + side at the end of the stem


def patient_of(stem: str) -> tuple[str, str]:
    """(patient id, side) from a file stem: the OAI subject id when the name carries it."""
    m = _OAI.search(stem)
    return (m[1], m[2]) if m else (stem, "")


def index(root: str | Path, source: str = NAME) -> pd.DataFrame:
    """Index the knee OA severity set under `root` (see the module docstring)."""
    root = require(root, NAME, LAYOUT)
    splits = require_any(root, NAME, LAYOUT, SPLITS)
    excluded, rows = Excluded(), []
    for split in splits:
        for grade_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            m = _GRADE.fullmatch(grade_dir.name)
            if m is None:
                excluded.add("folder is not a KL grade 0-4", grade_dir)
                continue
            for f in find_images(grade_dir, (".png", ".jpg", ".jpeg")):
                patient, side = patient_of(f.stem)
                rows.append(
                    {
                        "path": f,
                        "region": "knee",
                        "patient_id": patient,
                        "view": "PA",
                        "original_label": f"KL{m[1]}",
                        "finding": f"KL{m[1]}",
                        "laterality": side,
                        "age_group": "adult",
                        "original_split": split,
                    }
                )
    return build_manifest(rows, source, excluded, where=str(root))
