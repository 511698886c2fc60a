"""DICOM header audit and `BodyPartExamined` writing for predictions.

`BodyPartExamined` (0018,0015) is often empty or wrong in radiographs (technologists pick
the protocol of the previous patient, scanners send a default), which is what makes a
pixel-based region useful: the audit compares the header's region with the predicted one, and
`write_body_part` writes a corrected copy. The header region comes from `BodyPartExamined`
mapped through `regionnet.regions.canonical_region` (`HIP` -> pelvis, `LSPINE` -> spine), else
from region words in StudyDescription, SeriesDescription or ProtocolName ("XR KNEE 2 VIEWS").
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pydicom

from regionnet.io import RadiographReadError, is_dicom, read_dicom_header
from regionnet.regions import OTHER, UNKNOWN, canonical_region

log = logging.getLogger(__name__)

AUDIT_COLUMNS = ("header_region", "mismatch", "study_uid", "series_uid", "sop_uid")
_TEXT_TAGS = ("StudyDescription", "SeriesDescription", "ProtocolName")


def text_region(text: str) -> str | None:
    """The one known region a free-text description names, else None (none or several)."""
    words = [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w]
    # Single words and adjacent pairs ("lower leg", "c spine"), as canonical_region keys.
    keys = words + [f"{a}_{b}" for a, b in zip(words, words[1:])]
    found = {canonical_region(k) for k in keys} - {None, OTHER}
    return found.pop() if len(found) == 1 else None


def header_region(header: Mapping[str, str]) -> str | None:
    """The region a DICOM header claims: BodyPartExamined first, then the descriptions."""
    body_part = header.get("BodyPartExamined", "").strip()
    if body_part:
        region = canonical_region(body_part)
        if region not in (None, OTHER):
            return region
    for tag in _TEXT_TAGS:
        region = text_region(header.get(tag, ""))
        if region:
            return region
    return None


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


def mirrored_path(src: str | Path, root: Path | None, out_dir: Path, suffix: str = "") -> Path:
    """`src`'s place under `out_dir` with the layout it has under `root` (an input folder).

    Files outside `root` keep their whole path below `out_dir`, so two inputs never collide.
    """
    src = Path(src).absolute()
    try:
        rel = src.relative_to(root) if root is not None else Path(*src.parts[1:])
    except ValueError:
        rel = Path(*src.parts[1:])
    dst = out_dir / rel
    return dst.with_name(dst.name + suffix) if suffix else dst


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
