"""MedNIST (MONAI tutorials; CC BY-SA 4.0): 64x64 JPEGs gathered from several public sets.

Layout (`--root` is the unpacked `MedNIST` folder)::

    MedNIST/<Class>/*.jpeg    <Class> in AbdomenCT, BreastMRI, CXR, ChestCT, Hand, HeadCT

Only two classes are radiographs: `Hand` -> hand and `CXR` -> chest (`other` for the default
heads). AbdomenCT, BreastMRI, ChestCT and HeadCT are CT/MR slices: they are never labelled
with a region -- their folders are skipped with a log line, and asking for them (`classes=`)
is an error. MedNIST has no patient ids: each image is its own patient (`mednist-Hand-<stem>`).
At 64x64 px these images are far smaller than real radiographs: use them for pipelines,
not for accuracy claims.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from regionnet.datasets.manifest import (
    Excluded,
    LayoutError,
    build_manifest,
    find_images,
    require,
    require_any,
)

log = logging.getLogger(__name__)

NAME = "mednist"
RADIOGRAPHS = {"Hand": "hand", "CXR": "chest"}
NOT_RADIOGRAPHS = ("AbdomenCT", "BreastMRI", "ChestCT", "HeadCT")
LAYOUT = "MedNIST/<Class>/*.jpeg with <Class> in " + ", ".join([*RADIOGRAPHS, *NOT_RADIOGRAPHS])


def index(
    root: str | Path, source: str = NAME, classes: Sequence[str] | None = None
) -> pd.DataFrame:
    """Index MedNIST's radiograph classes under `root` (see the module docstring).

    `classes=None` indexes the radiograph classes present (Hand, CXR).
    """
    root = require(root, NAME, LAYOUT)
    present = require_any(root, NAME, LAYOUT, [*RADIOGRAPHS, *NOT_RADIOGRAPHS])
    if classes is None:
        classes = require_any(root, NAME, LAYOUT, list(RADIOGRAPHS))
    rejected = [c for c in classes if c in NOT_RADIOGRAPHS]
    unknown = [c for c in classes if c not in RADIOGRAPHS and c not in NOT_RADIOGRAPHS]
    if rejected or unknown:
        raise ValueError(
            f"MedNIST classes {rejected + unknown} cannot be indexed: "
            + (f"{rejected} are CT/MR slices, not radiographs; " if rejected else "")
            + (f"{unknown} are not MedNIST classes; " if unknown else "")
            + f"choose from {list(RADIOGRAPHS)}"
        )
    skipped = [c for c in NOT_RADIOGRAPHS if c in present]
    if skipped:
        log.info("%s: skipped CT/MR classes %s (not radiographs, never labelled)", root, skipped)
    rows = []
    for cls in classes:
        if cls not in present:
            raise LayoutError(
                f"--root {str(root)!r} does not match the {NAME} layout: missing "
                f"{str(root / cls)!r}. Expected {LAYOUT}"
            )
        for f in find_images(root / cls, (".jpeg", ".jpg", ".png")):
            rows.append(
                {
                    "path": f,
                    "region": RADIOGRAPHS[cls],
                    "patient_id": f"{cls}-{f.stem}",
                    "original_label": cls,
                }
            )
    return build_manifest(rows, source, Excluded(), where=str(root))
