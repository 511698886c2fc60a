"""DICOM header audit and `BodyPartExamined` writing for predictions.

`BodyPartExamined` (0018,0015) is often empty or wrong in radiographs (technologists pick
the protocol of the previous patient, scanners send a default), which is what makes a
pixel-based region useful: the audit compares the header's region with the predicted one, and
`write_body_part` writes a corrected copy.

`header_evidence` is regionnet's one parser from a DICOM header to a region, used by the audit
(and so the study view, `regionnet.study_view`) and by `regionnet-data index --dataset dicom`
(`regionnet.datasets.dicom_index`):
1. `BodyPartExamined` (CID 4031 terms: KNEE, HIP, LSPINE, ...) mapped through
   `regionnet.regions.canonical_region` with the keyword table as extra aliases (`HIP` ->
   pelvis, `SCAPHOID` -> wrist); vague terms (EXTREMITY, LOW_EXM, OTHER) fall through to
2. keywords found as whole words in `StudyDescription`, then `SeriesDescription`, then
   `ProtocolName` ("XR KNEE 2 VIEWS" -> knee, "TIB FIB AP" -> leg). A description naming two
   regions ("HIP AND KNEE") is ambiguous and the next field is tried.
The region is canonical anatomy (`regionnet.regions`: wrist stays wrist, chest stays chest),
not a member of a model's region set: `mismatch` compares it with a prediction.
`DEFAULT_KEYWORDS` holds every known region's name, DICOM term and aliases plus common report
wording; `regionnet-data index --dataset dicom --keywords map.yaml` adds to it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pydicom

from regionnet.io import RadiographReadError, is_dicom, read_dicom_header
from regionnet.regions import KNOWN_REGIONS, OTHER, UNKNOWN, canonical_region

log = logging.getLogger(__name__)

AUDIT_COLUMNS = ("header_region", "mismatch", "study_uid", "series_uid", "sop_uid")
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


def match_keywords(text: str, keywords: Mapping[str, str | None] = DEFAULT_KEYWORDS) -> set[str]:
    """Regions whose keywords occur as whole words in `text` (longest keywords first, so
    'lower leg' is one hit and 'forearm' never matches 'arm'; a None keyword is ignored)."""
    words, found = _words(text), set()
    for kw in sorted(keywords, key=len, reverse=True):
        needle = _words(kw)
        if needle.strip() and needle in words:
            if keywords[kw] is not None:
                found.add(keywords[kw])
            words = words.replace(needle, " ")
    return found


def text_region(text: str, keywords: Mapping[str, str | None] = DEFAULT_KEYWORDS) -> str | None:
    """The one region a free-text description names, else None (none or several)."""
    found = match_keywords(text, keywords) if text.strip() else set()
    return found.pop() if len(found) == 1 else None


def header_evidence(
    header: Mapping[str, str], keywords: Mapping[str, str | None] = DEFAULT_KEYWORDS
) -> tuple[str | None, str, str]:
    """(region, evidence, the tag text it came from) for a DICOM header, or (None, why, the
    texts tried); see the module docstring. Evidence reads `BodyPartExamined=HIP` or
    `StudyDescription~XR KNEE 2 VIEWS`."""
    body = str(header.get("BodyPartExamined", "") or "").strip()
    if body and body.lower() != OTHER:
        aliases = {k: v for k, v in keywords.items() if v is not None}
        region = canonical_region(body, aliases)
        if region is not None:
            return region, f"BodyPartExamined={body}", body
    for tag in DESCRIPTION_TAGS:
        text = str(header.get(tag, "") or "").strip()
        region = text_region(text, keywords)
        if region is not None:
            return region, f"{tag}~{text}", text
    texts = " | ".join(
        str(header.get(t, "") or "") for t in ("BodyPartExamined", *DESCRIPTION_TAGS)
    )
    return None, "no tag names a single region", texts


def header_region(
    header: Mapping[str, str], keywords: Mapping[str, str | None] = DEFAULT_KEYWORDS
) -> str | None:
    """The region a DICOM header claims (`header_evidence`), or None."""
    return header_evidence(header, keywords)[0]


def mismatch(predicted: str, claimed: str | None, regions: Sequence[str]) -> bool | None:
    """Whether a prediction contradicts the header; None when they cannot be compared.

    A header region the model has a head for must be predicted as such; a header region
    outside the model's set (chest for a limb model) agrees only with `unknown`.
    """
    if claimed is None or not predicted:
        return None
    if claimed in regions:
        return predicted != claimed
    return predicted != UNKNOWN


def audit(
    path: str, predicted: str, regions: Sequence[str], header: Mapping[str, str] | None = None
) -> dict[str, object]:
    """The audit columns for one file ({} values for non-DICOM or unreadable headers).

    `header` (tags as `read_dicom_header` returns them) stands in for reading `path`: an
    instance retrieved over DICOMweb has no file to read.
    """
    out: dict[str, object] = dict.fromkeys(AUDIT_COLUMNS)
    if header is None:
        if path.startswith("phantom://") or not is_dicom(path):
            return out
        try:
            header = read_dicom_header(path)
        except RadiographReadError as e:
            log.warning("audit: cannot read the DICOM header of %s: %s", path, e.reason)
            return out
    claimed = header_region(header)
    out.update(
        header_region=claimed,
        mismatch=mismatch(predicted, claimed, regions),
        study_uid=header["StudyInstanceUID"] or None,
        series_uid=header["SeriesInstanceUID"] or None,
        sop_uid=header["SOPInstanceUID"] or None,
    )
    return out


def _normal(path: str | Path) -> Path:
    """The absolute path with `.` and `..` resolved by name (symlinks are not followed)."""
    return Path(os.path.normpath(Path(path).absolute()))


def mirrored_path(src: str | Path, root: Path | None, out_dir: Path, suffix: str = "") -> Path:
    """`src`'s place under `out_dir` with the layout it has under `root` (an input folder).

    Files outside `root` keep their whole path below `out_dir`, so two inputs never collide.
    Paths are normalised first (a CSV's `../x.dcm` is `x.dcm` beside the CSV's folder), so
    the result is always inside `out_dir`; one that would not be (or whose folder inside
    `out_dir` is a symlink leading out of it) raises ValueError.
    """
    src, out_dir = _normal(src), _normal(out_dir)
    root = _normal(root) if root is not None else None
    if root is not None and src.is_relative_to(root) and src != root:
        rel = src.relative_to(root)
    else:
        rel = Path(*src.parts[1:])
    dst = out_dir / rel
    dst = dst.with_name(dst.name + suffix) if suffix else dst
    inside = dst.is_relative_to(out_dir) and ".." not in rel.parts and dst != out_dir
    if inside:  # folders that exist inside out_dir must not be links leading out of it
        real_parent = Path(os.path.realpath(dst.parent))
        inside = real_parent.is_relative_to(Path(os.path.realpath(out_dir)))
    if not inside:
        raise ValueError(f"{str(src)!r} would be written outside {str(out_dir)!r}; refused")
    return dst


def write_body_part(src: str | Path, dst: str | Path, term: str) -> Path:
    """Write a copy of DICOM `src` to `dst` with BodyPartExamined set to `term`.

    The input is only read; refusing `dst == src` keeps it that way even when an output
    folder is pointed at the input folder.
    """
    src, dst = Path(src), Path(dst)
    if dst.absolute() == src.absolute() or (dst.exists() and dst.samefile(src)):
        raise ValueError(
            f"dicom.write_body_part would overwrite the input {src}; choose an output folder "
            "outside the input folder"
        )
    ds = pydicom.dcmread(src)
    ds.BodyPartExamined = term
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)  # keeps the file's own transfer syntax and meta information
    return dst
