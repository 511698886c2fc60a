"""MURA v1.1 (Stanford AIMI): upper-extremity radiographs of seven study types.

Layout (`--root` is the unpacked `MURA-v1.1` folder)::

    MURA-v1.1/train_image_paths.csv    one path a line, no header:
                                       MURA-v1.1/train/XR_ELBOW/patient00011/study1_negative/image1.png
    MURA-v1.1/valid_image_paths.csv
    MURA-v1.1/{train,valid}/XR_<PART>/patient<id>/study<n>_<positive|negative>/image<k>.png

`<PART>` is ELBOW, FINGER, FOREARM, HAND, HUMERUS, SHOULDER or WRIST (region: the same name,
lower case; none is collapsed, so wrist/finger/forearm/humerus stay themselves and become
`other` only at training time). When the `*_image_paths.csv` files are present they are the
list of images (a listed file that is missing is reported and skipped); without them the
folders are walked. `patient_id` is `mura-patient<id>` (one patient may have several studies
and study types); `finding` is the study's abnormality label (abnormal/normal) and
`original_split` the publisher's train/valid. MURA gives no projection: `view` is empty.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from regionnet.datasets.manifest import (
    Excluded,
    build_manifest,
    existing,
    find_images,
    require,
    require_any,
)
from regionnet.regions import canonical_region

NAME = "mura"
LAYOUT = (
    "MURA-v1.1/{train,valid}_image_paths.csv and "
    "MURA-v1.1/{train,valid}/XR_<PART>/patient<id>/study<n>_<label>/image<k>.png"
)
SPLITS = ("train", "valid")
_PATH = re.compile(
    r"(?P<split>train|valid)/(?P<part>XR_[A-Z]+)/(?P<patient>patient\d+)/"
    r"(?P<study>study\d+)_(?P<label>positive|negative)/[^/]+$"
)


def _row(path: Path, rel: str, excluded: Excluded) -> dict | None:
    m = _PATH.search(rel.replace("\\", "/"))
    if m is None:
        excluded.add("path not like split/XR_<PART>/patient<id>/study<n>_<label>/", rel)
        return None
    region = canonical_region(m["part"])
    if region is None:
        excluded.add(f"unknown study type {m['part']}", rel)
        return None
    return {
        "path": path,
        "region": region,
        "patient_id": m["patient"],
        "original_label": m["part"],
        "finding": "abnormal" if m["label"] == "positive" else "normal",
        "study": f"{m['patient']}/{m['study']}",
        "original_split": m["split"],
    }


def index(root: str | Path, source: str = NAME) -> pd.DataFrame:
    """Index MURA v1.1 under `root` (see the module docstring for the layout)."""
    root = require(root, NAME, LAYOUT)
    present = require_any(
        root, NAME, LAYOUT, [f"{s}_image_paths.csv" for s in SPLITS] + list(SPLITS)
    )
    excluded, rows = Excluded(), []
    for split in SPLITS:
        listing = root / f"{split}_image_paths.csv"
        if listing.name in present:
            lines = [ln.strip() for ln in listing.read_text().splitlines() if ln.strip()]
            listed = []
            for rel in lines:
                # Listed paths start with the archive's folder name ("MURA-v1.1/train/...").
                parts = Path(rel).parts
                inner = Path(*parts[1:]) if parts and parts[0] not in SPLITS else Path(rel)
                row = _row(root / inner, rel, excluded)
                if row is not None:
                    listed.append(row)
            rows += existing(listed, listing, excluded)
        elif split in present:
            for f in find_images(root / split, (".png",)):
                row = _row(f, f.relative_to(root).as_posix(), excluded)
                if row is not None:
                    rows.append(row)
    return build_manifest(rows, source, excluded, where=str(root))
