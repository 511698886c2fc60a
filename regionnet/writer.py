"""The prediction writer: one row per radiograph, appended and flushed as each batch is done.

A Lightning `BasePredictionWriter` callback (`write_interval="batch"`), so an interrupted run
keeps every finished batch and `resume=true` carries on from there. Output is CSV, or JSON
lines when the file name ends in `.jsonl`. Columns, in order:

- `path`: the input file (absolute path), or `dicomweb://<study>/<series>/<sop>` for an
  instance retrieved over DICOMweb (`input=dicomweb`), which `resume` matches on;
- with `input=dicomweb`: `study_uid`, `series_uid`, `sop_uid` of the instance (also on error
  rows: they come from the QIDO-RS query);
- `p_<region>` per head, in head order: the head's probability;
- `region`: the calling head with the highest probability, or `unknown` when no head passes
  its threshold (see `regionnet.decision`); empty for unreadable files;
- `regions`: every head that passes its threshold, `;`-joined (empty if none);
- `status`: `ok`, or `error: <why>` for a corrupt, empty, non-image or pixel-less file;
- `snomed`, `radlex`, `dicom_body_part`: codes of the predicted region (empty for unknown);
- with `audit=true`: `header_region`, `mismatch`, `study_uid`, `series_uid`, `sop_uid`
  (see `regionnet.dicom_tags`; empty for non-DICOM files and where not comparable; the UIDs
  are not repeated for `input=dicomweb`).
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter

from regionnet.decision import decide
from regionnet.dicom_tags import AUDIT_COLUMNS, audit, mirrored_path, write_body_part
from regionnet.io import is_dicom
from regionnet.regions import UNKNOWN, region_info

log = logging.getLogger(__name__)

CODE_COLUMNS = ("snomed", "radlex", "dicom_body_part")
UID_COLUMNS = ("study_uid", "series_uid", "sop_uid")
DICOMWEB_SCHEME = "dicomweb://"


def prediction_columns(
    regions: Sequence[str], audit: bool = False, uids: bool = False
) -> list[str]:
    """Output columns in order (see the module docstring); `uids` for `input=dicomweb`."""
    cols = ["path", *(UID_COLUMNS if uids else ())]
    cols += [*(f"p_{r}" for r in regions), "region", "regions", "status", *CODE_COLUMNS]
    return cols + [c for c in AUDIT_COLUMNS if c not in cols] if audit else cols


def uri_uids(path: str) -> dict[str, str]:
    """The UID columns of a `dicomweb://<study>/<series>/<sop>` path."""
    parts = path[len(DICOMWEB_SCHEME) :].split("/") if path.startswith(DICOMWEB_SCHEME) else []
    if len(parts) != 3:
        raise ValueError(f"{path!r} is not a {DICOMWEB_SCHEME}<study>/<series>/<sop> path")
    return dict(zip(UID_COLUMNS, parts))


def region_codes(region: str) -> dict[str, str]:
    """SNOMED CT, RadLex and DICOM BodyPartExamined codes of a region ('' where none)."""
    info = region_info(region) if region and region != UNKNOWN else None
    if info is None:
        return dict.fromkeys(CODE_COLUMNS, "")
    return {"snomed": info.snomed, "radlex": info.radlex, "dicom_body_part": info.dicom}


def is_jsonl(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".jsonl"


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return v


def read_done(path: str | Path, columns: Sequence[str]) -> set[str]:
    """Paths already in an output file (for `resume=true`).

    A last line cut short by an interruption is removed from the file: its radiograph is
    predicted again. A CSV written with other columns (another model or `audit` setting)
    cannot be continued and raises.
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping an incomplete last line left by an interrupted run", path)
        with path.open("r+b") as fh:
            fh.truncate(end)
    text = data[:end].decode("utf-8")
    if is_jsonl(path):
        return {json.loads(line)["path"] for line in text.splitlines() if line.strip()}
    rows = csv.reader(text.splitlines())
    header = next(rows, None)
    if header is not None and header != list(columns):
        raise ValueError(
            f"resume=true: {path} has columns {header}, this run writes {list(columns)} "
            "(another model or audit setting); write to a new output file instead"
        )
    return {row[0] for row in rows if row}


class PredictionWriter(BasePredictionWriter):
    """Turns each predict batch into rows (see module docstring) and appends them to `output`.

    Optional side effects per readable DICOM: the audit columns (`audit`) and a copy with
    `BodyPartExamined` set to the predicted region (`body_part_dir`, mirroring the layout
    under `input_root`). `cam_items` collects (path, region, head index) of readable
    radiographs for class activation maps drawn after the loop. `uids` (input=dicomweb):
    rows carry the UID columns, and the audit reads the headers the batch brings along
    (`batch["headers"]`: path -> tags) instead of files.
    """

    def __init__(
        self,
        output: str | Path,
        regions: Sequence[str],
        thresholds: Sequence[float],
        *,
        append: bool = False,
        audit: bool = False,
        body_part_dir: str | Path | None = None,
        input_root: str | Path | None = None,
        collect_cam: bool = False,
        uids: bool = False,
    ):
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.regions = list(regions)
        self.thresholds = [float(t) for t in thresholds]
        self.append = append
        self.audit = audit
        self.body_part_dir = Path(body_part_dir) if body_part_dir else None
        self.input_root = Path(input_root) if input_root else None
        self.collect_cam = collect_cam
        self.uids = uids
        self.columns = prediction_columns(self.regions, audit, uids)
        self.jsonl = is_jsonl(self.output)
        self.counts: Counter[str] = Counter()
        self.cam_items: list[tuple[str, str, int]] = []
        self._fh = None
        self._csv = None

    # -- file ----------------------------------------------------------------------------
    def _open(self) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        fresh = not (self.append and self.output.is_file() and self.output.stat().st_size > 0)
        self._fh = self.output.open("w" if fresh else "a", newline="", encoding="utf-8")
        if not self.jsonl:
            self._csv = csv.DictWriter(self._fh, fieldnames=self.columns)
            if fresh:
                self._csv.writeheader()
        self._fh.flush()

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = self._csv = None

    def on_predict_start(self, trainer, pl_module) -> None:
        self._open()

    def on_predict_end(self, trainer, pl_module) -> None:
        self._close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._close()  # also after an exception or Ctrl-C: rows written so far stay

    def write_rows(self, rows: list[dict]) -> None:
        if self._fh is None:
            self._open()
        for row in rows:
            if self.jsonl:
                self._fh.write(json.dumps(row) + "\n")
            else:
                self._csv.writerow({k: _csv_value(v) for k, v in row.items()})
        self._fh.flush()

    # -- rows ----------------------------------------------------------------------------
    def _audit(self, path: str, region: str, header: dict | None) -> dict[str, object]:
        if self.uids:  # over DICOMweb the header comes with the batch; the URI has the UIDs
            found = audit(path, region, self.regions, header) if header else {}
            return {c: found.get(c) for c in AUDIT_COLUMNS if c not in UID_COLUMNS}
        return audit(path, region, self.regions)

    def ok_row(self, path: str, probabilities: Sequence[float], header: dict | None = None) -> dict:
        region, above = decide(probabilities, self.thresholds, self.regions)
        row: dict[str, Any] = {"path": path, **(uri_uids(path) if self.uids else {})}
        row.update({f"p_{r}": round(float(p), 6) for r, p in zip(self.regions, probabilities)})
        row.update(region=region, regions=";".join(above), status="ok", **region_codes(region))
        if self.audit:
            row.update(self._audit(path, region, header))
        self.counts["ok"] += 1
        self.counts[f"region:{region}"] += 1
        if self.collect_cam:
            # unknown: show what the most probable head looked at
            head = max(range(len(self.regions)), key=lambda k: probabilities[k])
            self.cam_items.append((path, region, head))
        if self.body_part_dir is not None and region != UNKNOWN:
            self._copy_with_body_part(path, region)
        return row

    def error_row(self, path: str, reason: str, header: dict | None = None) -> dict:
        row: dict[str, Any] = dict.fromkeys(self.columns)
        row.update(path=path, region="", regions="", status=f"error: {' '.join(reason.split())}")
        row.update(region_codes(""), **(uri_uids(path) if self.uids else {}))
        if self.audit:
            row.update(self._audit(path, "", header))
        self.counts["error"] += 1
        return {k: row[k] for k in self.columns}

    def _copy_with_body_part(self, path: str, region: str) -> None:
        term = region_codes(region)["dicom_body_part"]
        if not term or path.startswith("phantom://") or not is_dicom(path):
            return
        dst = mirrored_path(path, self.input_root, self.body_part_dir)
        try:
            write_body_part(path, dst, term)
            self.counts["body_part_written"] += 1
        except Exception as e:  # one unwritable copy must not stop the run
            log.warning("dicom.write_body_part: could not write %s: %s", dst, e)
            self.counts["body_part_failed"] += 1

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        probs = prediction["probs"].float().tolist()
        headers = batch.get("headers", {}) if isinstance(batch, dict) else {}
        rows = [
            self.ok_row(p, pr, headers.get(p))
            for p, pr in zip(prediction["path"], probs, strict=True)
        ]
        rows += [self.error_row(p, why, headers.get(p)) for p, why in prediction["errors"]]
        self.write_rows(rows)
