"""Data sources: a folder tree, a CSV manifest, or phantoms -> a table of records.

Every source yields a pandas DataFrame with one row per radiograph and these columns:
`path` (absolute file path, or `phantom://<region>/<seed>`), `region` (a member of the
region set or `other`), `patient_id` (splits never put one patient in two splits), `source`,
`split` (train/val/test or empty), and one 0/1 label column per region in head order
(`label_<region>`; 1 = shows the region, 0 = does not). Extra manifest columns are kept.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from regionnet.data.files import SUPPORTED_FORMATS, list_radiographs
from regionnet.data.phantom import PHANTOM_REGIONS, phantom_uri
from regionnet.io import RadiographReadError, is_dicom, read_dicom_header
from regionnet.regions import OTHER, to_target

SPLITS = ("train", "val", "test")
log = logging.getLogger(__name__)


def label_columns(regions: Sequence[str]) -> list[str]:
    """Label column names in head order."""
    return [f"label_{r}" for r in regions]


def _finish(df: pd.DataFrame, regions: tuple[str, ...]) -> pd.DataFrame:
    """Add label columns from `region` (unless present) and fill optional columns."""
    for region, col in zip(regions, label_columns(regions), strict=True):
        if col not in df:
            df[col] = (df["region"] == region).astype(int)
    for col in ("patient_id", "source", "split"):
        if col not in df:
            df[col] = ""
    df["patient_id"] = df["patient_id"].fillna("").astype(str)
    # A radiograph without a patient id is its own patient: no grouping is possible.
    missing = df["patient_id"] == ""
    df.loc[missing, "patient_id"] = df.loc[missing, "path"]
    df["split"] = df["split"].fillna("").astype(str).str.strip().str.lower()
    bad = sorted(set(df["split"]) - {"", *SPLITS})
    if bad:
        raise ValueError(f"split column has values {bad}; allowed: {', '.join(SPLITS)} or empty")
    return df.reset_index(drop=True)


def folder_records(
    root: str | Path,
    regions: tuple[str, ...],
    aliases: Mapping[str, str] | None = None,
    unknown_as_other: bool = False,
    source: str | None = None,
) -> pd.DataFrame:
    """Records from `root/<region or alias>/**/<radiograph>`.

    The first folder level names the region (`hip/` -> pelvis, `chest/` -> other); a region
    folder may be a symlink. Below it, `regionnet.data.files.list_radiographs` finds the files
    (image suffixes, DICOM also without suffix; hidden files and symlinked folders skipped;
    other files counted in the log).

    DICOM files take `patient_id` from their PatientID, or `study:<StudyInstanceUID>` when it
    is empty (a study belongs to one patient), and `study_id` from StudyInstanceUID, so a
    hospital's DICOM folder is split by patient. Only those two header elements are read, not
    the pixels. Other files (and unreadable headers) are each their own patient.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data.root={str(root)!r} is not a folder. Point it at a folder whose sub-folders "
            "are named by region (e.g. root/knee/*.png, root/hip/*.dcm)."
        )
    rows = []
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise ValueError(f"data.root={str(root)!r} has no region sub-folders (e.g. knee/, hand/)")
    for sub in subdirs:
        region = to_target(sub.name, regions, aliases, unknown_as_other, where=f"folder {sub}")
        for f in list_radiographs(sub):
            row = {"path": str(f.resolve()), "region": region, "folder": sub.name}
            rows.append(row | _dicom_ids(f))
    if not rows:
        raise ValueError(f"data.root={str(root)!r}: no radiographs ({SUPPORTED_FORMATS})")
    df = pd.DataFrame(rows)
    known = df["patient_id"] != ""
    if known.any():
        log.info(
            "%s: patient ids of %d files from their DICOM headers (%d patients)",
            root,
            int(known.sum()),
            df.loc[known, "patient_id"].nunique(),
        )
    df["source"] = source or root.name
    return _finish(df, regions)


def _dicom_ids(path: Path) -> dict[str, str]:
    """`patient_id` and `study_id` of a DICOM file from its header; empty for other files."""
    if not is_dicom(path):
        return {"patient_id": "", "study_id": ""}
    try:
        header = read_dicom_header(path, ("PatientID", "StudyInstanceUID"))
    except RadiographReadError:
        return {"patient_id": "", "study_id": ""}  # the reader says why when it is read
    patient, study = header["PatientID"].strip(), header["StudyInstanceUID"].strip()
    return {"patient_id": patient or (f"study:{study}" if study else ""), "study_id": study}


def csv_records(
    csv_path: str | Path,
    regions: tuple[str, ...],
    aliases: Mapping[str, str] | None = None,
    unknown_as_other: bool = False,
    source: str | None = None,
) -> pd.DataFrame:
    """Records from a CSV manifest: `path` plus `region` or one 0/1 column per region.

    Optional columns: `patient_id`, `split` (train/val/test), `source`. Relative paths resolve
    against the CSV's folder. With per-region columns, a row with no 1 is `other`.
    """
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise FileNotFoundError(f"data.csv={str(csv_path)!r} does not exist; give a CSV manifest")
    df = pd.read_csv(csv_path, dtype={"patient_id": str, "split": str, "path": str})
    if "path" not in df:
        raise ValueError(f"{csv_path}: needs a 'path' column; has {list(df.columns)}")
    if df.empty:
        raise ValueError(f"{csv_path}: has no rows")
    base = csv_path.resolve().parent
    df["path"] = [str(p if Path(p).is_absolute() else (base / p)) for p in df["path"]]
    region_cols = [r for r in regions if r in df]
    if "region" in df:
        df["region"] = [
            to_target(v, regions, aliases, unknown_as_other, where=f"{csv_path} row {i + 2}")
            for i, v in enumerate(df["region"].astype(str))
        ]
    elif len(region_cols) == len(regions):
        values = df[list(regions)]
        if not values.isin([0, 1]).all().all():
            raise ValueError(f"{csv_path}: region columns {list(regions)} must hold 0 or 1")
        for r in regions:
            df[f"label_{r}"] = df[r].astype(int)
        # The region column names the single positive head; several positives keep the first.
        df["region"] = [
            next((r for r in regions if row[r] == 1), OTHER) for _, row in values.iterrows()
        ]
    else:
        raise ValueError(
            f"{csv_path}: needs a 'region' column or one 0/1 column per region "
            f"({', '.join(regions)}); found columns {list(df.columns)}"
        )
    if "source" not in df:
        df["source"] = source or csv_path.stem
    return _finish(df, regions)


def phantom_records(
    regions: tuple[str, ...],
    per_region: int = 120,
    other_regions: Sequence[str] = ("chest", "foot", "skull"),
    seed: int = 0,
) -> pd.DataFrame:
    """Records of synthetic phantoms: `per_region` per target region and per other region.

    Each phantom is its own patient. Target regions that `phantom.py` cannot draw raise.
    """
    drawable = [r for r in regions if r in PHANTOM_REGIONS]
    if len(drawable) != len(regions):
        missing = [r for r in regions if r not in PHANTOM_REGIONS]
        raise ValueError(
            f"data=phantom cannot draw regions {missing}; phantoms exist for {PHANTOM_REGIONS}"
        )
    bad_other = [r for r in other_regions if r not in PHANTOM_REGIONS or r in regions]
    if bad_other:
        raise ValueError(f"data.other_regions {bad_other} must be drawable and not in data.regions")
    rows = []
    for k, anatomy in enumerate((*regions, *other_regions)):
        for i in range(per_region):
            s = seed * 1_000_003 + k * 100_003 + i
            target = anatomy if anatomy in regions else OTHER
            rows.append({"path": phantom_uri(anatomy, s), "region": target, "anatomy": anatomy})
    df = pd.DataFrame(rows)
    df["source"] = "phantom"
    return _finish(df, regions)


def load_records(
    kind: str,
    regions: tuple[str, ...],
    root: str | None = None,
    csv: str | None = None,
    aliases: Mapping[str, str] | None = None,
    unknown_as_other: bool = False,
    phantom: Mapping | None = None,
) -> pd.DataFrame:
    """Dispatch on `data.source` (phantom, folder, csv)."""
    if kind == "folder":
        if not root:
            raise ValueError("data=folder needs data.root=DIR")
        return folder_records(root, regions, aliases, unknown_as_other)
    if kind == "csv":
        if not csv:
            raise ValueError("data=csv needs data.csv=FILE.csv")
        return csv_records(csv, regions, aliases, unknown_as_other)
    if kind == "phantom":
        return phantom_records(regions, **dict(phantom or {}))
    raise ValueError(f"data.source={kind!r}: choose phantom, folder or csv")


def records_from_path(
    path: str | Path,
    regions: tuple[str, ...],
    aliases: Mapping[str, str] | None = None,
    unknown_as_other: bool = False,
) -> pd.DataFrame:
    """A folder tree or a CSV manifest, chosen by what `path` is (for `data.external_test`)."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".csv":
        return csv_records(path, regions, aliases, unknown_as_other)
    return folder_records(path, regions, aliases, unknown_as_other)


# -- findings (model.findings) ----------------------------------------------------------------
FINDING_NAME = re.compile(r"[a-z][a-z0-9_]*")
# prediction columns and region words a finding name would collide with
RESERVED_NAMES = frozenset(
    {"path", "region", "regions", "status", "snomed", "radlex", "dicom_body_part", "model_id",
     "sr_status", "body_part_status", "study_uid", "series_uid", "sop_uid", "header_region",
     "mismatch", OTHER, "unknown", "all", "mean"}
)  # fmt: skip


def _value(v) -> str:
    """A manifest cell or a configured value as text: '' for empty/NaN, 2.0 -> '2'."""
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).strip()


def validate_findings(
    findings: Mapping[str, Mapping] | None, regions: Sequence[str]
) -> dict[str, dict]:
    """`model.findings` checked and normalised, in declaration order: a binary finding is
    name -> {region, from, positive: [str], negative: [str] or None}, an ordinal one name ->
    {region, from, grades: [str]} (its values in order, lowest first, at least 3). Errors name
    the key and the fix."""
    out: dict[str, dict] = {}
    for name, spec in dict(findings or {}).items():
        where = f"model.findings.{name}"
        if not isinstance(name, str) or not FINDING_NAME.fullmatch(name):
            raise ValueError(
                f"{where}: a finding name is lower-case letters, digits and _, starting with a "
                "letter (e.g. knee_oa); it names the p_<name> and <name> prediction columns"
            )
        if name in regions or name in RESERVED_NAMES:
            raise ValueError(
                f"{where}: {name!r} is a region or a prediction column name; choose another "
                "(e.g. knee_oa)"
            )
        if not isinstance(spec, Mapping):
            raise ValueError(
                f"{where}: give {{region: R, from: COLUMN, positive: [VALUES]}} (binary) or "
                "{region: R, from: COLUMN, grades: [LOWEST, ..., HIGHEST]} (ordinal)"
            )
        unknown = sorted(set(spec) - {"region", "from", "positive", "negative", "grades"})
        if unknown:
            raise ValueError(
                f"{where}: unknown keys {unknown}; use region, from, positive, negative "
                "(binary) or grades (ordinal)"
            )
        region = spec.get("region")
        if region not in regions:
            raise ValueError(
                f"{where}.region={region!r}: choose one of the model's regions {list(regions)}"
            )
        column = spec.get("from")
        if not isinstance(column, str) or not column:
            raise ValueError(
                f"{where}.from: name the record column holding the label (e.g. finding)"
            )
        if "grades" in spec:
            out[name] = {"region": region, "from": column, "grades": _grades(spec, where)}
            continue
        positive = spec.get("positive")
        if isinstance(positive, str | int | float):
            positive = [positive]
        positive = [_value(v) for v in positive or []]
        if not positive or "" in positive:
            raise ValueError(
                f"{where}.positive: list the non-empty values that mean 1 (e.g. [KL2, KL3, KL4])"
                ", or give grades: [...] for an ordinal finding"
            )
        negative = spec.get("negative")
        if negative is not None:
            if isinstance(negative, str | int | float):
                negative = [negative]
            negative = [_value(v) for v in negative]
            if not negative or "" in negative or set(negative) & set(positive):
                raise ValueError(
                    f"{where}.negative: list non-empty values that mean 0, none of them positive "
                    "(or leave it out: any other non-empty value is 0)"
                )
        out[name] = {"region": region, "from": column, "positive": positive, "negative": negative}
    _no_shared_columns(out)
    return out


def _no_shared_columns(findings: Mapping[str, Mapping]) -> None:
    """Two findings must not write the same prediction column (`p_kl_a` is both the grade `a`
    of an ordinal `kl` and the probability of a binary `kl_a`)."""
    seen: dict[str, str] = {}
    for name, spec in findings.items():
        cols = [f"p_{name}_{g}" for g in spec["grades"]] if is_ordinal(spec) else [f"p_{name}"]
        for col in [*cols, name]:
            if col in seen and seen[col] != name:
                raise ValueError(
                    f"model.findings.{name}: its column {col!r} is also one of "
                    f"model.findings.{seen[col]}'s; rename one of them"
                )
            seen[col] = name


def _grades(spec: Mapping, where: str) -> list[str]:
    """The `grades` of an ordinal finding: distinct non-empty values, lowest first, >= 3."""
    if "positive" in spec or "negative" in spec:
        raise ValueError(
            f"{where}: give either grades (ordinal) or positive/negative (binary), not both"
        )
    grades = spec["grades"]
    if isinstance(grades, str) or not isinstance(grades, Sequence):
        raise ValueError(
            f"{where}.grades: list the values in order, lowest first (e.g. [KL0, KL1, KL2, KL3, "
            "KL4])"
        )
    grades = [_value(v) for v in grades]
    if len(grades) < 3 or "" in grades or len(set(grades)) != len(grades):
        raise ValueError(
            f"{where}.grades={grades}: list at least 3 distinct non-empty values, lowest first "
            "(e.g. [KL0, KL1, KL2, KL3, KL4]); a finding with two values is binary: positive: "
            "[VALUE]"
        )
    return grades


def is_ordinal(spec: Mapping) -> bool:
    """Whether a validated finding is ordinal (`grades`) rather than binary (`positive`)."""
    return "grades" in spec


def finding_targets(records: pd.DataFrame, findings: Mapping[str, Mapping]) -> np.ndarray:
    """(N, F) float32 targets of validated `findings` for `records`. A binary finding: 1 for a
    positive value, 0 for a negative one (any other non-empty value when no `negative` list is
    given). An ordinal finding: the value's index in `grades` (0 = the lowest grade). NaN where
    there is no label: an empty cell, a value in no list, a missing column, or a film whose
    `region` is not the finding's (a knee finding says nothing about a hand film)."""
    out = np.full((len(records), len(findings)), np.nan, dtype=np.float32)
    for k, spec in enumerate(findings.values()):
        if spec["from"] not in records:
            continue
        values = [_value(v) for v in records[spec["from"]].tolist()]
        own = (records["region"].astype(str) == spec["region"]).to_numpy()
        if is_ordinal(spec):
            index = {g: j for j, g in enumerate(spec["grades"])}
            for i, v in enumerate(values):
                if own[i] and v in index:
                    out[i, k] = float(index[v])
            continue
        pos, neg = set(spec["positive"]), spec["negative"]
        for i, v in enumerate(values):
            if not own[i] or not v:
                continue
            if v in pos:
                out[i, k] = 1.0
            elif neg is None or v in neg:
                out[i, k] = 0.0
    return out
