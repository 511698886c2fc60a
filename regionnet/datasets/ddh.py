"""Pediatric AP pelvis radiographs for developmental dysplasia of the hip (DDH).

Jordan DDH set (Fraiwan et al. 2022, Mendeley Data doi:10.17632/jf3pv98m9g.2, CC BY 4.0;
354 infants, 120 DDH and 234 normal). Layout, assumed from the paper (`--root` is the
unpacked folder; the class folder names are not checked)::

    <root>/DDH/*.{png,jpg,jpeg}
    <root>/Normal/*.{png,jpg,jpeg}

Other DDH pelvis sets (e.g. MTDDH) are read the same way: every image anywhere under the
root is an AP pelvis; the first folder below the root, when there is one, is kept as
`finding` (ddh / normal / the folder's name). Every image -> region `pelvis` (the DICOM term
for a pelvis/hip film; `hip` is an alias), view `AP`, age_group `pediatric`,
`original_label` `pelvis`. The sets publish one radiograph per child and no patient table:
`patient_id` is the file stem (`ddh-<stem>`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from regionnet.datasets.manifest import Excluded, LayoutError, build_manifest, find_images, require
from regionnet.io import IMAGE_EXTENSIONS

NAME = "ddh"
LAYOUT = "<root>/{DDH,Normal}/*.png (Fraiwan 2022) or any tree of AP pelvis images"


def index(root: str | Path, source: str = NAME) -> pd.DataFrame:
    """Index a DDH pelvis set under `root` (see the module docstring)."""
    root = require(root, NAME, LAYOUT)
    files = find_images(root)
    if not files:
        raise LayoutError(
            f"--root {str(root)!r} does not match the {NAME} layout: no images "
            f"({', '.join(IMAGE_EXTENSIONS)}) under it. Expected {LAYOUT}"
        )
    rows = []
    for f in files:
        rel = f.relative_to(root).parts
        folder = rel[0] if len(rel) > 1 else ""
        rows.append(
            {
                "path": f,
                "region": "pelvis",
                "patient_id": f.stem,
                "view": "AP",
                "original_label": "pelvis",
                "finding": folder.lower(),
                "age_group": "pediatric",
            }
        )
    return build_manifest(rows, source, Excluded(), where=str(root))
