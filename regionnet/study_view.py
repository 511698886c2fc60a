"""The study view for hanging protocols: one row per study from the per-image predictions.

`regionnet-predict ... group_by=study` writes, beside `output`, `<stem>_studies<suffix>`
(CSV, or JSON lines for .jsonl) from the whole prediction file (rows of earlier runs kept by
`resume=true` included). Columns:

- `study_uid`;
- `images`: images of the study with a prediction; `errors`: unreadable ones;
- `regions`: the predicted regions found, head order, then `unknown`, `;`-joined;
- `n_<region>` per head and `n_unknown`: images per predicted region;
- `mismatched`: SOP Instance UIDs (the path where a file has none) whose header region
  (BodyPartExamined, else the descriptions) disagrees with the prediction, `;`-joined: the
  audit of `regionnet.dicom_tags`, so `group_by=study` turns `audit` on;
- `n_mismatched`.

Images without a Study Instance UID (PNG, JPEG) belong to no study and are left out.
The CSV is written like the prediction file (`regionnet.writer`): text cells a spreadsheet
would run as a formula get a leading `'`, file names keep their bytes (surrogateescape), and
the prediction CSV is read back with those undone, so the study rows hold the real values.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from regionnet.regions import UNKNOWN
from regionnet.writer import ENCODING, ERRORS, csv_safe, csv_unsafe, is_jsonl

log = logging.getLogger(__name__)

GROUP_BY = (None, "study")


def study_output(output: str | Path) -> Path:
    """Where the study rows of the prediction file `output` go."""
    output = Path(output)
    return output.with_name(f"{output.stem}_studies{output.suffix}")


def study_columns(regions: Sequence[str]) -> list[str]:
    counts = [f"n_{r}" for r in (*regions, UNKNOWN)]
    return ["study_uid", "images", "errors", "regions", *counts, "mismatched", "n_mismatched"]


def _read(path: Path) -> pd.DataFrame:
    if is_jsonl(path):  # json.dumps escapes every line break inside a value
        lines = path.read_text(encoding=ENCODING, errors=ERRORS).split("\n")
        return pd.DataFrame([json.loads(line) for line in lines if line.strip()])
    df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding_errors=ERRORS)
    return df.apply(lambda col: col.map(csv_unsafe))


def _true(value) -> bool:
    return value is True or str(value).lower() == "true"


def study_rows(predictions: pd.DataFrame, regions: Sequence[str]) -> pd.DataFrame:
    """One row per study of an (audited) prediction table; see the module docstring."""
    df = predictions.fillna("").astype({"study_uid": str})
    no_study = df["study_uid"] == ""
    if no_study.any():
        log.info("group_by=study: %d images without a Study Instance UID left out", no_study.sum())
    rows = []
    for study, group in df[~no_study].groupby("study_uid", sort=True):
        ok = group[group["status"] == "ok"]
        counts = ok["region"].value_counts()
        found = [r for r in (*regions, UNKNOWN) if counts.get(r, 0)]
        off = group[group["mismatch"].map(_true)]
        ids = [s or p for s, p in zip(off["sop_uid"], off["path"])]
        rows.append(
            {
                "study_uid": study,
                "images": len(ok),
                "errors": len(group) - len(ok),
                "regions": ";".join(found),
                **{f"n_{r}": int(counts.get(r, 0)) for r in (*regions, UNKNOWN)},
                "mismatched": ";".join(ids),
                "n_mismatched": len(ids),
            }
        )
    return pd.DataFrame(rows, columns=study_columns(regions))


def write_study_view(predictions: str | Path, regions: Sequence[str]) -> tuple[Path, pd.DataFrame]:
    """Write the study rows of the prediction file `predictions`; (their file, the rows)."""
    predictions = Path(predictions)
    df = _read(predictions)
    missing = {"study_uid", "sop_uid", "mismatch"} - set(df.columns)
    if len(df) and missing:
        raise ValueError(
            f"group_by=study: {predictions} has no {sorted(missing)} columns; it was written "
            "without audit (resume into a new output file)"
        )
    rows = study_rows(df, regions) if len(df) else pd.DataFrame(columns=study_columns(regions))
    out = study_output(predictions)
    if is_jsonl(out):
        out.write_text("".join(json.dumps(r) + "\n" for r in rows.to_dict("records")))
    else:
        safe = rows.apply(lambda col: col.map(lambda v: csv_safe(v) if isinstance(v, str) else v))
        safe.to_csv(out, index=False, encoding=ENCODING, errors=ERRORS)
    return out, rows
