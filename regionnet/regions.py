"""The anatomical region vocabulary: order, aliases, DICOM terms and codes.

`REGIONS` is the one ordered definition of the five target regions of the reference study
(Yi et al., Pediatric Radiology 2019). Heads, label columns (`p_<region>`), metric names
(`val/auroc/<region>`) and plots all follow the order of the region set in use, which is a
config value (`data.regions`) and defaults to `REGIONS`.

A label is one binary target per region (one-vs-rest): 1 = the radiograph shows this region,
0 = it does not. Radiographs of any region outside the set ("other": chest, wrist, finger, ...)
are 0 for every head; they teach the heads to answer "none of mine".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

OTHER = "other"
UNKNOWN = "unknown"  # prediction outcome when no head passes its threshold


@dataclass(frozen=True)
class Region:
    """One anatomical region: canonical name, DICOM `BodyPartExamined` term, codes, aliases."""

    name: str
    dicom: str  # DICOM PS3.16 CID 4031 defined term for BodyPartExamined
    snomed: str = ""  # SNOMED CT concept id
    aliases: tuple[str, ...] = ()
    radlex: str = ""  # RadLex anatomy id (RID...), "" where not verified


# Known anatomy, target regions first. Wrist and finger are NOT hand unless a user maps them
# (`data.aliases={wrist: hand}`): a hand head trained on wrist films would fire on wrists.
# RadLex ids as in the RSNA/LOINC Radiology Playbook anatomy (the HL7 CH RAD-Order RadLex
# extract); "shoulder" RID39518 is also the anatomiclocations.org / OIDM shoulder.
KNOWN_REGIONS: tuple[Region, ...] = (
    Region(
        "shoulder",
        "SHOULDER",
        "16982005",
        ("shoulders", "xr_shoulder", "glenohumeral"),
        radlex="RID39518",
    ),
    Region("elbow", "ELBOW", "127949000", ("elbows", "xr_elbow"), radlex="RID2010"),
    Region("hand", "HAND", "85562004", ("hands", "xr_hand"), radlex="RID2318"),
    Region(
        "pelvis",
        "PELVIS",
        "12921003",
        ("hip", "hips", "pelvic", "xr_pelvis", "xr_hip"),
        radlex="RID2507",
    ),
    Region("knee", "KNEE", "72696002", ("knees", "xr_knee"), radlex="RID2743"),
    Region("wrist", "WRIST", "8205005", ("wrists", "xr_wrist"), radlex="RID2177"),
    Region("finger", "FINGER", "7569003", ("fingers", "xr_finger", "thumb"), radlex="RID2391"),
    Region("forearm", "FOREARM", "14975008", ("xr_forearm",), radlex="RID2107"),
    Region("humerus", "HUMERUS", "85050009", ("arm", "upper_arm", "xr_humerus"), radlex="RID1971"),
    Region("chest", "CHEST", "51185008", ("thorax", "cxr", "lung", "lungs"), radlex="RID1243"),
    Region("foot", "FOOT", "56459004", ("feet", "toe", "toes"), radlex="RID28829"),
    Region("ankle", "ANKLE", "344001", ("ankles",), radlex="RID28545"),
    Region("skull", "SKULL", "89546000", ("head",), radlex="RID9196"),
    Region(
        "spine",
        "SPINE",
        "421060004",
        ("cspine", "tspine", "lspine", "c_spine", "l_spine"),
        radlex="RID7741",
    ),
    Region("femur", "FEMUR", "71341001", ("thigh",), radlex="RID2662"),
    Region(
        "leg", "LEG", "30021000", ("lower_leg", "tibia", "fibula", "tibia_fibula"), radlex="RID2869"
    ),
    Region("abdomen", "ABDOMEN", "818983003", ("abdominal",), radlex="RID56"),
)
REGIONS: tuple[str, ...] = ("shoulder", "elbow", "hand", "pelvis", "knee")

_BY_NAME: dict[str, Region] = {r.name: r for r in KNOWN_REGIONS}
_ALIASES: dict[str, str] = {
    key: r.name for r in KNOWN_REGIONS for key in (r.name, r.dicom.lower(), *r.aliases)
}


def _key(label: str) -> str:
    """Normalise a raw label ('XR_SHOULDER', 'Hip ', 'lower-leg') to a lookup key."""
    return re.sub(r"[\s\-]+", "_", str(label).strip().lower())


def region_info(name: str) -> Region | None:
    """The `Region` record for a canonical name, or None for a user-defined region."""
    return _BY_NAME.get(name)


def validate_regions(regions: Iterable[str]) -> tuple[str, ...]:
    """Check a configured region set (`data.regions`) and return it as an ordered tuple.

    Names are lower-case identifiers; known aliases resolve to their canonical name
    (`hip` -> `pelvis`); names regionnet does not know are allowed (a user's own region set).
    """
    if isinstance(regions, str):
        raise ValueError(
            f"data.regions must be a list of region names, got the string {regions!r}; "
            f"write e.g. data.regions=[{','.join(REGIONS)}]"
        )
    out = tuple(_ALIASES.get(_key(r), _key(r)) for r in regions)
    if not out:
        raise ValueError(f"data.regions is empty; give at least one, e.g. [{','.join(REGIONS)}]")
    bad = [r for r in out if r in (OTHER, UNKNOWN) or not re.fullmatch(r"[a-z][a-z0-9_]*", r)]
    if bad:
        raise ValueError(
            f"data.regions has invalid names {bad}: use lower-case identifiers; "
            f"'{OTHER}' and '{UNKNOWN}' are reserved"
        )
    dupes = sorted({r for r in out if out.count(r) > 1})
    if dupes:
        raise ValueError(f"data.regions lists {dupes} more than once (aliases included): {out}")
    return out


def canonical_region(label: str, aliases: Mapping[str, str] | None = None) -> str | None:
    """Map a raw label (folder name, CSV value, DICOM BodyPartExamined) to a canonical name.

    User `aliases` (e.g. {'wrist': 'hand'}) win over the built-in table. Returns None when the
    label is not known anatomy.
    """
    key = _key(label)
    user = {_key(k): _key(v) for k, v in (aliases or {}).items()}
    if key in user:
        return _ALIASES.get(user[key], user[key])
    if key == OTHER:
        return OTHER
    return _ALIASES.get(key)


def to_target(
    label: str,
    regions: tuple[str, ...],
    aliases: Mapping[str, str] | None = None,
    unknown_as_other: bool = False,
    where: str = "",
) -> str:
    """Map a raw label to a member of `regions` or to `other`.

    Known anatomy outside the set is `other`. A label regionnet cannot place raises ValueError
    (naming `where` and the valid names) unless `unknown_as_other` is set.
    """
    name = canonical_region(label, aliases)
    if name is not None and name in regions:
        return name
    if name == OTHER or (name is not None and name in _BY_NAME):
        return OTHER
    if name is not None and name in (aliases or {}).values():
        return OTHER
    if _key(label) in regions:
        return _key(label)
    if unknown_as_other:
        return OTHER
    valid = sorted(set(regions) | {OTHER} | set(_BY_NAME))
    raise ValueError(
        f"{where or 'label'}: unknown region name {label!r}. Valid names: {', '.join(valid)} "
        "(or their aliases, e.g. hip, XR_SHOULDER). Map it with data.aliases={name: region}, "
        "or set data.unknown_as_other=true to treat it as a negative for every head."
    )
