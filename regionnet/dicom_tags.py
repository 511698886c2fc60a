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

Re-tagging (`regionnet-predict dicom.write_body_part=DIR`) never replaces a header a hospital
can trust unless asked. `body_part_decision` applies `dicom.write_body_part_mode`:
- `fill_empty` (default): write only where `BodyPartExamined` is empty or generic
  (`GENERIC_BODY_PARTS`: OTHER, UNKNOWN, EXTREMITY, LOW_EXM, UP_EXM, WHOLEBODY, BODY, XR, ...)
  and the descriptions (`header_evidence`) name no other region than the predicted one;
- `mismatch_margin`: as `fill_empty`, and a header whose region (`header_evidence`: the tag,
  else the descriptions) disagrees with the prediction is overwritten when the predicted
  head's probability beats the probability of the header region's head by at least
  `dicom.mismatch_margin`. A header region the model has no head for (CHEST for a limb model)
  has no probability to beat and is kept: the model cannot argue against anatomy it does not
  know. A `BodyPartExamined` that is neither generic nor a region regionnet knows is kept too;
- `all`: write every predicted region (the behaviour before these safeguards).
Copies are new DICOM instances (`write_body_part`): a new SOP Instance UID (and, with
`dicom.new_series_uid=true`, a new Series Instance UID shared by the copies of one series),
the source referenced in `SourceImageSequence` and described in `DerivationDescription`, so a
copy stored to a PACS never collides with its source.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

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


# -- re-tagging ------------------------------------------------------------------------------
FILL_EMPTY, MISMATCH_MARGIN, ALL = "fill_empty", "mismatch_margin", "all"
BODY_PART_MODES = (FILL_EMPTY, MISMATCH_MARGIN, ALL)
DEFAULT_MISMATCH_MARGIN = 0.5
# BodyPartExamined values that name no region: empty, placeholders scanners and protocols send,
# and whole-limb or whole-body terms (CID 4031 EXTREMITY, LOW_EXM, UP_EXM, WHOLEBODY) that a
# region refines. Compared upper-case with everything but letters and digits removed.
GENERIC_BODY_PARTS = frozenset(
    {
        "", "OTHER", "UNKNOWN", "NONE", "NA", "NULL", "DEFAULT", "ANY",
        "XR", "CR", "DX", "XRAY", "RADIOGRAPH", "BODY", "WHOLEBODY", "SKELETON", "BONE",
        "BONES", "EXTREMITY", "EXTREMITIES", "LIMB", "LIMBS", "LOWEXM", "UPEXM",
        "LOWERLIMB", "UPPERLIMB", "LOWEREXTREMITY", "UPPEREXTREMITY", "MSK",
        "MUSCULOSKELETAL",
    }
)  # fmt: skip


def generic_body_part(value: str | None) -> bool:
    """Whether a BodyPartExamined value names no region (`GENERIC_BODY_PARTS`)."""
    return re.sub(r"[^A-Z0-9]", "", str(value or "").upper()) in GENERIC_BODY_PARTS


def body_part_mode(mode: str | None, margin: float | None = None) -> tuple[str, float]:
    """(mode, margin) from `dicom.write_body_part_mode` and `dicom.mismatch_margin`; the mode
    may carry the margin itself: `mismatch_margin:0.3` (or quoted `mismatch_margin=0.3`)."""
    text = str(mode if mode is not None else FILL_EMPTY).strip().lower()
    name, _, value = text.replace("=", ":").partition(":")
    name = name.strip()
    if name not in BODY_PART_MODES or (value and name != MISMATCH_MARGIN):
        raise ValueError(
            f"dicom.write_body_part_mode={mode!r}: choose fill_empty (write where "
            "BodyPartExamined is empty or generic), mismatch_margin (also overwrite a "
            "disagreeing header when the prediction beats it by dicom.mismatch_margin; "
            "or mismatch_margin:0.3) or all"
        )
    try:
        x = float(value) if value else float(DEFAULT_MISMATCH_MARGIN if margin is None else margin)
    except ValueError:
        raise ValueError(f"write_body_part_mode={mode!r}: {value!r} is not a number") from None
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"dicom.mismatch_margin={x}: a probability difference in [0, 1]")
    return name, x


def body_part_decision(
    header: Mapping[str, str],
    predicted: str,
    probabilities: Mapping[str, float],
    mode: str = FILL_EMPTY,
    margin: float = DEFAULT_MISMATCH_MARGIN,
) -> tuple[bool, str]:
    """(write the copy?, why) for a file whose header is `header`, predicted as `predicted`
    with `probabilities` ({head: probability}); see the module docstring for the modes.
    The reason starts with `written:` or `kept:` (the `body_part_status` column)."""
    body = str(header.get("BodyPartExamined", "") or "").strip()
    was = f"BodyPartExamined={body}" if body else "BodyPartExamined empty"
    if mode == ALL:
        return True, f"written: {was} (mode all)"
    claimed, evidence, _ = header_evidence(header)
    generic = generic_body_part(body)
    if not generic and claimed is None:
        return False, f"kept: {was} is not generic and names no region regionnet knows"
    if claimed == predicted:
        if generic:
            return True, f"written: {was}, {evidence} agrees"
        return False, f"kept: {was} agrees"
    if claimed is None:  # generic tag, descriptions name nothing
        return True, f"written: {was}"
    against = f"{evidence} names {claimed}"
    if mode == FILL_EMPTY:
        return False, f"kept: {against} (fill_empty writes empty or generic tags only)"
    if claimed not in probabilities:
        return False, f"kept: {against}, which has no head to compare (mismatch_margin)"
    p, q = float(probabilities[predicted]), float(probabilities[claimed])
    beats = f"{predicted} {p:.3f} - {claimed} {q:.3f} = {p - q:.3f}"
    if p - q >= margin:
        return True, f"written: {against}; {beats} >= margin {margin:g}"
    return False, f"kept: {against}; {beats} < margin {margin:g}"


def derived_uid(uid: str, *salt: str) -> str:
    """A UID for a copy of the instance `uid`: `2.25.<name-based UUID>` (UUID version 5) of
    the source UID and `salt`, so the same copy made twice gets the same UID (a PACS
    replaces it instead of holding it twice) and never the source's."""
    name = "|".join(("regionnet", str(uid), *salt))
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def _read_for_copy(src: Path) -> pydicom.Dataset:
    """The whole data set of `src`; one without preamble and file meta (read with
    `force=True`, as `regionnet.io` does) gets file meta with the transfer syntax it was
    parsed with, so that its copy is a complete DICOM file."""
    try:
        return pydicom.dcmread(src)
    except InvalidDicomError:
        ds = pydicom.dcmread(src, force=True)
        implicit, little = ds.original_encoding
        if "SOPInstanceUID" not in ds or little is None:
            raise
        meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        if "TransferSyntaxUID" not in meta:
            meta.TransferSyntaxUID = (
                ImplicitVRLittleEndian
                if implicit
                else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
            )
        if "SOPClassUID" in ds:
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta = meta
        ds.preamble = b"\0" * 128
        return ds


def write_body_part(
    src: str | Path,
    dst: str | Path,
    term: str,
    *,
    new_series_uid: bool = False,
    description: str = "",
) -> Path:
    """Write a copy of DICOM `src` to `dst` with BodyPartExamined set to `term`, as a new
    instance: SOPInstanceUID (and the file meta's) `derived_uid(source SOP, term)`; with
    `new_series_uid`, SeriesInstanceUID `derived_uid(source series)` (every copy of one
    series in one new series); the source in `SourceImageSequence` (its SOP Class and
    Instance UIDs, appended to any items already there) and `DerivationDescription` (what
    changed, plus `description`). Study, patient and pixel data stay as they are.

    The input is only read; refusing `dst == src` keeps it that way even when an output
    folder is pointed at the input folder.
    """
    src, dst = Path(src), Path(dst)
    if dst.absolute() == src.absolute() or (dst.exists() and dst.samefile(src)):
        raise ValueError(
            f"dicom.write_body_part would overwrite the input {src}; choose an output folder "
            "outside the input folder"
        )
    ds = _read_for_copy(src)
    old = str(ds.get("BodyPartExamined", "") or "").strip()
    sop, sop_class = str(ds.get("SOPInstanceUID", "") or ""), ds.get("SOPClassUID")
    ds.BodyPartExamined = term
    ds.SOPInstanceUID = derived_uid(sop, "BodyPartExamined", term)
    if new_series_uid:
        ds.SeriesInstanceUID = derived_uid(str(ds.get("SeriesInstanceUID", "")), "series")
    if sop:
        item = pydicom.Dataset()
        if sop_class:
            item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop
        ds.SourceImageSequence = [*ds.get("SourceImageSequence", []), item]
    text = f"BodyPartExamined set to {term} (was {old or 'empty'}) from instance {sop or '?'}"
    ds.DerivationDescription = " ".join(t for t in (text, description) if t)[:1024]
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    dst.parent.mkdir(parents=True, exist_ok=True)
    # the file's own transfer syntax; preamble, DICM and file meta (filled in where missing)
    ds.save_as(dst, enforce_file_format=True)
    return dst
