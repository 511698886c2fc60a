"""Pre-label a DICOM archive from its metadata (`--dataset dicom`), for audit against predictions.

Layout: any tree of DICOM files under `--root` (`.dcm`/`.dicom`, or no suffix with the DICM
magic). Per file, headers only (no pixels):
1. `Modality` must be a radiograph (CR, DX, RG, or empty); CT, MR, US, SR, ... are skipped.
2. `BodyPartExamined` (CID 4031 terms: KNEE, HIP, LSPINE, ...) -> a canonical region via the
   keyword map and regionnet's aliases; vague terms (EXTREMITY, LOW_EXM) fall through to
3. keywords found as whole words in `StudyDescription`, then `SeriesDescription`, then
   `ProtocolName` ("XR KNEE 2 VIEWS" -> knee). A description naming two regions ("HIP AND
   KNEE") is ambiguous and the next field is tried.
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
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from regionnet.datasets.generic import load_label_map
from regionnet.datasets.manifest import Excluded, LayoutError, build_manifest, require
from regionnet.io import RadiographReadError, is_dicom, read_dicom_header
from regionnet.regions import KNOWN_REGIONS, canonical_region

log = logging.getLogger(__name__)

NAME = "dicom"
LAYOUT = "any folder tree of DICOM files"
RADIOGRAPH_MODALITIES = ("CR", "DX", "RG", "")
DESCRIPTION_TAGS = ("StudyDescription", "SeriesDescription", "ProtocolName")
# Built-in keywords: every region's name, DICOM term and aliases, plus common report wording.
DEFAULT_KEYWORDS: dict[str, str | None] = {
    **{k.replace("_", " "): r.name for r in KNOWN_REGIONS for k in (r.name, *r.aliases)},
    **{r.dicom.lower(): r.name for r in KNOWN_REGIONS},
    "cervical spine": "spine", "thoracic spine": "spine", "lumbar spine": "spine",
    "c spine": "spine", "t spine": "spine", "l spine": "spine", "lumbar": "spine",
    "sacrum": "spine", "scaphoid": "wrist", "carpal": "wrist", "calcaneus": "foot",
    "os calcis": "foot", "patella": "knee", "tib fib": "leg", "acetabulum": "pelvis",
    "sij": "pelvis", "clavicle": None, "ribs": None, "scout": None,
}  # fmt: skip


def _words(text: str) -> str:
    """Lower-case text with every non-alphanumeric run as one space, padded by spaces."""
    return " " + re.sub(r"[^a-z0-9]+", " ", text.lower()).strip() + " "


def match_keywords(text: str, keywords: Mapping[str, str | None]) -> set[str]:
    """Regions whose keywords occur as whole words in `text` (longest keywords first, so
    'lower leg' is one hit and 'forearm' never matches 'arm')."""
    words, found = _words(text), set()
    for kw in sorted(keywords, key=len, reverse=True):
        needle = _words(kw)
        if needle.strip() and needle in words:
            if keywords[kw] is not None:
                found.add(keywords[kw])
            words = words.replace(needle, " ")
    return found


def label_header(header: Mapping[str, str], keywords: Mapping[str, str | None]) -> tuple:
    """(region, evidence, original label) for a header, or (None, reason, text)."""
    body = header.get("BodyPartExamined", "").strip()
    if body:
        aliases = {k: v for k, v in keywords.items() if v is not None}
        region = canonical_region(body, aliases)
        if region is not None:
            return region, f"BodyPartExamined={body}", body
    for tag in DESCRIPTION_TAGS:
        text = header.get(tag, "").strip()
        found = match_keywords(text, keywords) if text else set()
        if len(found) == 1:
            return found.pop(), f"{tag}~{text}", text
    texts = " | ".join(header.get(t, "") for t in ("BodyPartExamined", *DESCRIPTION_TAGS))
    return None, "no tag names a single region", texts


def index(
    root: str | Path,
    source: str = NAME,
    keywords: str | Path | Mapping | None = None,
) -> pd.DataFrame:
    """Pre-label the DICOM files under `root` from their headers (see the module docstring)."""
    root = require(root, NAME, LAYOUT)
    table = {**DEFAULT_KEYWORDS, **{k.lower(): v for k, v in load_label_map(keywords).items()}}
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".") and is_dicom(p)
    )
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
        region, evidence, text = label_header(header, table)
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
