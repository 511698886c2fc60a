"""Pre-label a DICOM archive from its metadata (`--dataset dicom`), for audit against predictions.

Layout: any tree of DICOM files under `--root` (`.dcm`/`.dicom`, or no suffix with the DICM
magic; found by `regionnet.data.files.list_radiographs`, hidden files skipped). Per file,
headers only (no pixels):
1. `Modality` must be a radiograph (CR, DX, RG, or empty); CT, MR, US, SR, ... are skipped.
2. The region is what `regionnet.dicom_tags.header_evidence` (the parser the prediction audit
   uses) reads: `BodyPartExamined` (CID 4031 terms: KNEE, HIP, LSPINE, ...) via the keyword
   map and regionnet's aliases; vague terms (EXTREMITY, LOW_EXM) fall through to keywords
   found as whole words in `StudyDescription`, then `SeriesDescription`, then `ProtocolName`
   ("XR KNEE 2 VIEWS" -> knee). A description naming two regions ("HIP AND KNEE") is
   ambiguous and the next field is tried.
Files no field places are excluded and counted; the log lists the commonest unmatched
descriptions so the keyword map can be extended. Every kept row has
`label_source=dicom_metadata` and `evidence` (`BodyPartExamined=HIP`,
`StudyDescription~knee`): metadata is often wrong (a default protocol, a copied study
description), so audit these labels against a model's predictions before trusting them.

Keyword map (`--keywords map.yaml`, or a dict): `{keyword: region}` added to (and overriding)
`DEFAULT_KEYWORDS`, e.g. `{"genou": knee, "bassin": pelvis, "scout": null}` (null: ignore the
keyword). `patient_id` is PatientID, else StudyInstanceUID, else the file stem.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from regionnet.data.files import list_radiographs
from regionnet.datasets.generic import load_label_map
from regionnet.datasets.manifest import Excluded, LayoutError, build_manifest, require
from regionnet.dicom_tags import DEFAULT_KEYWORDS, header_evidence
from regionnet.io import RadiographReadError, is_dicom, read_dicom_header

log = logging.getLogger(__name__)

NAME = "dicom"
LAYOUT = "any folder tree of DICOM files"
RADIOGRAPH_MODALITIES = ("CR", "DX", "RG", "")


def index(
    root: str | Path,
    source: str = NAME,
    keywords: str | Path | Mapping | None = None,
) -> pd.DataFrame:
    """Pre-label the DICOM files under `root` from their headers (see the module docstring)."""
    root = require(root, NAME, LAYOUT)
    table = {**DEFAULT_KEYWORDS, **{k.lower(): v for k, v in load_label_map(keywords).items()}}
    files = [p for p in list_radiographs(root) if is_dicom(p)]
    if not files:
        raise LayoutError(f"--root {str(root)!r}: no DICOM files under it (--dataset dicom)")
    excluded, rows, unmatched = Excluded(), [], Counter()
    for f in files:
        try:
            header = read_dicom_header(f)
        except RadiographReadError as e:
            excluded.add("unreadable DICOM header", e)
            continue
        modality = header["Modality"].strip().upper()
        if modality not in RADIOGRAPH_MODALITIES:
            excluded.add(f"modality {modality} is not a radiograph", f)
            continue
        region, evidence, text = header_evidence(header, table)
        if region is None:
            excluded.add("no region in BodyPartExamined or the descriptions", f)
            unmatched[text] += 1
            continue
        rows.append(
            {
                "path": f,
                "region": region,
                "patient_id": header["PatientID"] or header["StudyInstanceUID"],
                "original_label": text,
                "evidence": evidence,
                "modality": modality,
            }
        )
    for text, n in unmatched.most_common(10):
        log.warning("%s: unmatched %dx: %s (add a keyword: --keywords map.yaml)", root, n, text)
    return build_manifest(rows, source, excluded, label_source="dicom_metadata", where=str(root))
