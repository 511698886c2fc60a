"""regionnet manifests: the one CSV format every dataset adapter writes, and merge/stats.

A manifest has one row per radiograph and the columns of `MANIFEST_COLUMNS`:
- `path`: absolute file path;
- `region`: the anatomy shown, as a canonical regionnet name (`regionnet.regions`: shoulder,
  elbow, hand, pelvis, knee, wrist, finger, chest, ...) or `other`. The dataset's anatomy is
  kept (a MURA wrist stays `wrist`): the region SET is chosen at training time
  (`data.regions`), where anatomy outside it becomes `other`, a negative for every head;
- `source`: the dataset (`mura`, `kneeoa`, ...);
- `patient_id`: prefixed by the source (`mura-patient00001`) so ids of different datasets
  never collide and patient-grouped splits never leak a patient;
- `view`: projection where the dataset says it (`PA`, `lateral`, ...), else empty;
- `original_label`: the dataset's own label the region came from (`XR_WRIST`, `hip`, `10 15`);
- `label_source`: `dataset` (the publisher's label) or `dicom_metadata` (pre-labelled from DICOM
  tags: audit these against predictions).
`original_label` and `label_source` are optional (`OPTIONAL_COLUMNS`): every adapter writes them,
but a manifest made elsewhere (such as the shared radiographs' manifest.csv) may lack them, and
an empty `label_source` means "not stated" (a merge of manifests with and without it).
Adapters may add columns (`age_group`, `finding`, `original_split`, ...); they are kept.

A multi-label manifest (UNIFESP with `--multilabel`) has no `region` column but one 0/1 column
per region name instead; `regionnet.data.sources.csv_records` reads both kinds.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from regionnet.data.files import list_radiographs
from regionnet.regions import KNOWN_REGIONS, OTHER, region_info

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "path", "region", "source", "patient_id", "view", "original_label", "label_source",
)  # fmt: skip
OPTIONAL_COLUMNS = ("original_label", "label_source")
LABEL_SOURCES = ("dataset", "dicom_metadata")
_NAME = re.compile(r"[a-z][a-z0-9_]*")


class LayoutError(FileNotFoundError):
    """A dataset root does not have the publisher's layout; the message names what is missing."""


def require(root: str | Path, dataset: str, layout: str, *names: str) -> Path:
    """Check that `root` is a folder holding each of `names`; return it as an absolute Path.

    `layout` is a one-line picture of the expected tree, quoted in the error.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise LayoutError(
            f"--root {str(root)!r} is not a folder; for --dataset {dataset} give the folder "
            f"laid out as {layout}"
        )
    for name in names:
        if not (root / name).exists():
            raise LayoutError(
                f"--root {str(root)!r} does not match the {dataset} layout: missing "
                f"{str(root / name)!r}. Expected {layout}"
            )
    return root.absolute()


def require_any(root: Path, dataset: str, layout: str, names: Sequence[str]) -> list[str]:
    """The members of `names` present under `root`; raise naming all of them when none is."""
    present = [n for n in names if (root / n).exists()]
    if not present:
        raise LayoutError(
            f"--root {str(root)!r} does not match the {dataset} layout: none of "
            f"{', '.join(names)} is there. Expected {layout}"
        )
    return present


def find_images(folder: Path, suffixes: Iterable[str] | None = None) -> list[Path]:
    """Radiographs under `folder` by `regionnet.data.files.list_radiographs` (recursive, sorted;
    hidden files and folders skipped): every radiograph file (DICOM also without suffix), or
    only those with one of `suffixes` (an adapter that knows its publisher's format). A folder
    that does not exist holds none."""
    if not folder.is_dir():
        return []
    return list_radiographs(folder, suffixes)


class Excluded:
    """Counts of rows an adapter left out, by reason, with one example each; logged once."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def add(self, reason: str, example: object, n: int = 1) -> None:
        self.counts[reason] += n
        self.examples.setdefault(reason, str(example))

    def report(self, source: str) -> dict[str, int]:
        for reason, n in self.counts.items():
            log.warning("%s: excluded %d: %s (e.g. %s)", source, n, reason, self.examples[reason])
        return dict(self.counts)


def existing(rows: list[dict], listed_in: str | Path, excluded: Excluded) -> list[dict]:
    """Rows whose file exists; the others are counted as 'listed in <csv> but missing'."""
    keep = []
    for row in rows:
        if Path(row["path"]).is_file():
            keep.append(row)
        else:
            excluded.add(f"listed in {listed_in} but the file is missing", row["path"])
    return keep


def build_manifest(
    rows: list[dict],
    source: str,
    excluded: Excluded | None = None,
    label_source: str = "dataset",
    where: str = "",
) -> pd.DataFrame:
    """A validated manifest frame from adapter rows (dicts with at least path and region).

    Fills `source`, `label_source`, empty `view`/`original_label`; prefixes `patient_id` with
    the source (the file stem where a row has none). `df.attrs["excluded"]` holds the counts of
    rows left out, which are also logged.
    """
    counts = (excluded or Excluded()).report(source)
    if not rows:
        raise ValueError(
            f"{where or source}: no radiographs to index"
            + (f" (excluded: {counts})" if counts else "")
        )
    df = pd.DataFrame(rows)
    df["path"] = [os.path.normpath(Path(p).absolute()) for p in df["path"]]
    df["source"] = source
    if "label_source" not in df:
        df["label_source"] = label_source
    for col in ("view", "original_label", "patient_id"):
        if col not in df:
            df[col] = ""
        df[col] = df[col].fillna("").astype(str)
    stems = df["path"].map(lambda p: Path(p).stem)
    df["patient_id"] = df["patient_id"].where(df["patient_id"] != "", stems)
    df["patient_id"] = source + "-" + df["patient_id"]
    df = df[[c for c in MANIFEST_COLUMNS if c in df] + [c for c in df if c not in MANIFEST_COLUMNS]]
    df = validate_manifest(df.reset_index(drop=True), where or source)
    df.attrs["excluded"] = counts
    log.info("%s: %d radiographs of %d patients", source, len(df), df["patient_id"].nunique())
    return df


def region_columns(df: pd.DataFrame) -> list[str]:
    """The 0/1 per-region columns of a multi-label manifest (known region names, in order)."""
    return [r.name for r in KNOWN_REGIONS if r.name in df.columns]


def is_multilabel(df: pd.DataFrame) -> bool:
    return "region" not in df and bool(region_columns(df))


def validate_manifest(df: pd.DataFrame, where: str = "manifest") -> pd.DataFrame:
    """Check a manifest's columns and values; raise naming the column and the fix."""
    required = [c for c in MANIFEST_COLUMNS if c != "region" and c not in OPTIONAL_COLUMNS]
    missing = [c for c in required if c not in df]
    if missing:
        raise ValueError(
            f"{where}: missing columns {missing}; a regionnet manifest has {required} and "
            f"'region' (or 0/1 region columns), optionally {list(OPTIONAL_COLUMNS)}"
            " (write one with `regionnet-data index`)"
        )
    if "region" in df:
        bad = sorted({r for r in df["region"].astype(str) if not _NAME.fullmatch(r)})
        if bad:
            raise ValueError(
                f"{where}: region values {bad[:5]} are not region names (lower-case, e.g. knee, "
                f"wrist, {OTHER}); map them with a label map"
            )
        unknown = sorted({r for r in df["region"] if r != OTHER and region_info(r) is None})
        if unknown:
            log.info("%s: user-defined regions %s (not built-in anatomy)", where, unknown)
    else:
        cols = region_columns(df)
        if not cols:
            raise ValueError(
                f"{where}: needs a 'region' column or 0/1 columns named by region "
                f"(e.g. {', '.join(r.name for r in KNOWN_REGIONS[:5])}); has {list(df.columns)}"
            )
        if not df[cols].isin([0, 1]).all().all():
            raise ValueError(f"{where}: region columns {cols} must hold 0 or 1")
    if (df["patient_id"].astype(str).str.strip() == "").any():
        raise ValueError(f"{where}: every row needs a patient_id (splits group by patient)")
    if "label_source" in df:
        bad_ls = sorted(set(df["label_source"].astype(str)) - {*LABEL_SOURCES, ""})
        if bad_ls:
            raise ValueError(
                f"{where}: label_source {bad_ls}; allowed {list(LABEL_SOURCES)} or empty"
            )
    dupes = df["path"][df["path"].duplicated()]
    if len(dupes):
        raise ValueError(
            f"{where}: {len(dupes)} paths listed twice (e.g. {dupes.iloc[0]}); "
            "index each dataset once"
        )
    return df


def write_manifest(df: pd.DataFrame, out: str | Path) -> Path:
    """Validate and write a manifest CSV (parent folders are created)."""
    out = Path(out).expanduser()
    validate_manifest(df, str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    log.info("wrote %s (%d rows)", out, len(df))
    return out


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and validate a manifest CSV (text columns stay text; empty cells are '')."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for col in region_columns(df) if "region" not in df else []:
        df[col] = pd.to_numeric(df[col], errors="coerce").fillna(-1).astype(int)
    return validate_manifest(df, str(path))


def strata(df: pd.DataFrame) -> pd.Series:
    """One label per row for balancing and counting: the region, or for multi-label rows the
    positive regions joined by '+' (`other` when none)."""
    if "region" in df:
        return df["region"].astype(str)
    cols = region_columns(df)
    values = df[cols].to_numpy()
    return pd.Series(
        ["+".join(c for c, v in zip(cols, row, strict=True) if v == 1) or OTHER for row in values],
        index=df.index,
    )


def to_multilabel(df: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    """A single-label manifest as 0/1 region columns (`other` -> all zeros)."""
    user = sorted({r for r in df["region"] if r != OTHER and region_info(r) is None})
    if user:
        raise ValueError(
            f"cannot merge user-defined regions {user} into a multi-label manifest; "
            "map them to built-in region names first"
        )
    out = df.drop(columns="region")
    for col in cols:
        out[col] = (df["region"] == col).astype(int)
    return out


def balance_patients(
    df: pd.DataFrame, per_region: int | None = None, seed: int = 0
) -> pd.DataFrame:
    """Downsample whole patients so each region (stratum) keeps at most `per_region` images.

    `per_region=None` balances to the smallest region. A patient belongs to their most common
    region; patients are drawn in a seeded random order and kept while they fit, so a patient's
    radiographs are never split up (at least one patient per region is kept).
    """
    label = strata(df)
    counts = pd.DataFrame({"patient_id": df["patient_id"], "stratum": label})
    per = counts.groupby(["patient_id", "stratum"]).size().rename("n").reset_index()
    per = per.sort_values(["patient_id", "n", "stratum"], ascending=[True, False, True])
    home = per.drop_duplicates("patient_id").set_index("patient_id")["stratum"]
    sizes = counts.groupby("patient_id").size()
    cap = int(per_region if per_region is not None else label.value_counts().min())
    if cap < 1:
        raise ValueError(f"--per-region {cap}: must be at least 1")
    rng = np.random.default_rng(seed)
    keep: set[str] = set()
    for stratum in sorted(home.unique()):
        patients = sorted(home.index[home == stratum])
        total = 0
        for i in rng.permutation(len(patients)):
            pid = patients[i]
            if total == 0 or total + sizes[pid] <= cap:
                keep.add(pid)
                total += int(sizes[pid])
            if total >= cap:
                break
    out = df[df["patient_id"].isin(keep)].reset_index(drop=True)
    log.info("balanced to <= %d images per region: %d of %d rows kept", cap, len(out), len(df))
    return out


def merge_manifests(
    frames: Sequence[pd.DataFrame],
    balance: bool = False,
    per_region: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Concatenate manifests (union of columns, '' where a column is absent).

    Single-label and multi-label manifests merge into a multi-label one. `balance` downsamples
    patients to the smallest region's count, `per_region` to at most that many images per
    region (both seeded; see `balance_patients`).
    """
    if not frames:
        raise ValueError("merge needs at least one manifest")
    if any(is_multilabel(f) for f in frames):
        cols = [
            r.name
            for r in KNOWN_REGIONS
            if any(r.name in f.columns or ("region" in f and (f["region"] == r.name).any())
                   for f in frames)
        ]  # fmt: skip
        frames = [to_multilabel(f, cols) if "region" in f else f.copy() for f in frames]
        for f in frames:
            for c in cols:
                if c not in f:
                    f[c] = 0
    df = pd.concat(frames, ignore_index=True, sort=False)
    text = [c for c in df.columns if c not in region_columns(df) or "region" in df]
    df[text] = df[text].fillna("")
    dupes = df["path"].duplicated()
    if dupes.any():
        log.warning("merge: dropped %d rows whose path was already listed", int(dupes.sum()))
        df = df[~dupes].reset_index(drop=True)
    if balance or per_region is not None:
        df = balance_patients(df, per_region, seed)
    return validate_manifest(df, "merged manifest")


def stats_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Image counts per region (rows) x source (columns) with totals; a multi-label image counts
    once under each of its regions."""
    if "region" in df:
        long = df[["region", "source"]]
    else:
        cols = region_columns(df)
        melted = df[["source", *cols]].melt(id_vars="source", var_name="region")
        long = melted[melted["value"] == 1][["region", "source"]]
        none = df[(df[cols] == 0).all(axis=1)]
        long = pd.concat([long, pd.DataFrame({"region": OTHER, "source": none["source"]})])
    return pd.crosstab(long["region"], long["source"], margins=True, margins_name="total")


def print_stats(df: pd.DataFrame, title: str = "radiographs per region x source") -> None:
    """A rich table of `stats_frame` plus patient counts per source."""
    from rich.console import Console
    from rich.table import Table

    counts = stats_frame(df)
    table = Table(title=title)
    table.add_column("region")
    for col in counts.columns:
        table.add_column(str(col), justify="right")
    for region, row in counts.iterrows():
        style = "bold" if region == "total" else None
        table.add_row(str(region), *(str(int(v)) for v in row), style=style)
    patients = df.groupby("source")["patient_id"].nunique()
    table.add_row(
        "patients",
        *(str(int(patients.get(c, df["patient_id"].nunique()))) for c in counts.columns),
        style="dim",
    )
    Console().print(table)
