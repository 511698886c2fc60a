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
- with finding heads (`model.findings`), per finding in declaration order: `p_<finding>`, its
  probability, and `<finding>`, 1 or 0 at the finding's threshold (chosen on validation);
  both filled only where the predicted region is the finding's region, empty otherwise; an
  ordinal finding (`grades`) has `p_<finding>_<grade>` per grade, its probability, and
  `<finding>`, the predicted grade (e.g. `KL2`: the median grade,
  `regionnet.model.ordinal.grade_of`), filled likewise;
- with a composed model (`task=multi`: landmark and box parts on the region backbone):
  `landmarks` (JSON [[x, y], ...] in the film's pixels, the landmark set's order; then `pt`,
  `mt`, `tl` Cobb angles in degrees on spine sets) and `boxes` (JSON [{"label", "score",
  "box": [x1, y1, x2, y2]}], vertebrae, not lesions), filled only on films the parts apply
  to (called the landmark set's region, or `unknown` for a set of no region head), empty
  otherwise (`regionnet.compose.infer.applies`);
- with `audit=true`: `header_region`, `mismatch`, `study_uid`, `series_uid`, `sop_uid`
  (see `regionnet.dicom_tags`; empty for non-DICOM files and where not comparable; the UIDs
  are not repeated for `input=dicomweb`);
- with `input=dicomweb`, after `status`: `sr_status`: `stored` when the DICOM SR of the row
  was stored (`dicomweb.store_sr=true`), `failed: <why>` when it was not, empty when SRs are
  off and on error rows.
- with `dicom.write_body_part=DIR`: `body_part_status`: what happened to the file's copy:
  `written: <why>`, `kept: <why>` (the header was left alone, `dicom.write_body_part_mode`;
  see `regionnet.dicom_tags.body_part_decision`), `skipped: <why>` (not DICOM, unknown
  region) or `failed: <why>`; empty on error rows;
- `model_id`, always last: the model that made the row (`regionnet.model.identity.model_id`: 12 hex
  digits of the SHA-256 of its weights, thresholds and preprocessing), so that rows of two
  models never mix unnoticed; `resume` refuses an output holding another model's rows.

Hostile values. CSV files are opened in spreadsheets, which run a cell starting with `=`,
`+`, `-`, `@`, TAB or CR as a formula (`=HYPERLINK(...)` in a DICOM UID). In CSV output such
a text cell gets a leading `'` (the OWASP rule; a text cell already starting with quotes
before one of those characters gets one more, so `csv_unsafe` gives the exact value back);
numbers (probabilities) and text that is a plain number (`-0.5`) are written as they are.
JSON lines hold every value exactly. File names that are not UTF-8 (bytes a Linux file
system allows, e.g. Latin-1 `\\xe9`) are written as their original bytes (Python's
`surrogateescape`): the CSV `path` is the file's real name; read such a CSV back with
`pd.read_csv(..., encoding_errors="surrogateescape")` or `open(..., errors="surrogateescape")`.
JSON lines escape them as `\\udcXX` (`json.loads` gives the name back, `os.fsencode` its bytes).
Names holding line breaks are quoted by the CSV writer and parsed back with the csv module.

One writer per file: `output_lock` takes an exclusive lock on `<output>.lock` for the run; a
second regionnet-predict on the same output stops with a message naming it. `read_done` (for
`resume`) drops a last record cut short by an interruption and can drop the rows to predict
again (`resume=retry_errors`), rewriting the file atomically.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import socket
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter

from regionnet.decision import decide
from regionnet.dicom_tags import (
    AUDIT_COLUMNS,
    DEFAULT_MISMATCH_MARGIN,
    FILL_EMPTY,
    audit,
    body_part_decision,
    mirrored_path,
    write_body_part,
)
from regionnet.io import RadiographReadError, is_dicom, read_dicom_header
from regionnet.model.ordinal import grade_of
from regionnet.regions import UNKNOWN, region_info

log = logging.getLogger(__name__)

CODE_COLUMNS = ("snomed", "radlex", "dicom_body_part")
UID_COLUMNS = ("study_uid", "series_uid", "sop_uid")
DICOMWEB_SCHEME = "dicomweb://"
SR_STORED = "stored"
BODY_PART_COLUMN = "body_part_status"
MODEL_ID_COLUMN = "model_id"
# file names may hold any byte but '/' and NUL: write and read them back unchanged
ENCODING, ERRORS = "utf-8", "surrogateescape"


def prediction_columns(
    regions: Sequence[str],
    audit: bool = False,
    uids: bool = False,
    body_part: bool = False,
    findings: Sequence[str] | Mapping[str, tuple] = (),
    parts: Sequence[str] = (),
) -> list[str]:
    """Output columns in order (see the module docstring); `uids` for `input=dicomweb`
    (with the `sr_status` column), `body_part` for `dicom.write_body_part`, `findings` the
    finding heads' names, or `regionnet.predict.finding_specs` (needed for ordinal ones),
    `parts` a composed model's part columns (`regionnet.compose.infer.part_columns`)."""
    cols = ["path", *(UID_COLUMNS if uids else ())]
    cols += [*(f"p_{r}" for r in regions), "region", "regions", "status"]
    cols += ["sr_status"] if uids else []
    cols += CODE_COLUMNS
    cols += [c for f, spec in _finding_specs(findings).items() for c in finding_columns(f, spec)]
    cols += list(parts)
    cols += [c for c in AUDIT_COLUMNS if c not in cols] if audit else []
    cols += [BODY_PART_COLUMN] if body_part else []
    return [*cols, MODEL_ID_COLUMN]


def _finding_specs(findings: Sequence[str] | Mapping[str, tuple]) -> dict[str, tuple | None]:
    return dict(findings) if isinstance(findings, Mapping) else dict.fromkeys(findings)


def _grades(spec: tuple | None) -> list[str] | None:
    """The grade labels of an ordinal finding's (region, grades) spec; None for binary."""
    rule = spec[1] if spec is not None else None
    return list(rule) if isinstance(rule, list | tuple) else None


def finding_columns(name: str, spec: tuple | None = None) -> list[str]:
    """`p_<finding>`, `<finding>` (binary) or `p_<finding>_<grade>`..., `<finding>` (ordinal)."""
    grades = _grades(spec)
    return [*(f"p_{name}_{g}" for g in grades), name] if grades else [f"p_{name}", name]


def finding_values(
    findings: dict[str, tuple[str, float | tuple]], region: str, probs: Sequence[float]
) -> dict[str, Any]:
    """Of the findings whose region is the predicted `region`, a binary finding's
    `p_<finding>` (rounded probability) and `<finding>` (1/0 at its threshold), an ordinal
    finding's `p_<finding>_<grade>` and `<finding>` (the predicted grade's label); None (an
    empty cell) for the others. `findings`: name -> (region, threshold) or (region, grades);
    `probs` in the probability layout (`regionnet.model.ordinal`: one per grade)."""
    out: dict[str, Any] = {}
    probs, start = [float(p) for p in probs], 0
    for name, (own, rule) in findings.items():
        here = own == region
        grades = _grades((own, rule))
        if grades:
            p = probs[start : start + len(grades)]
            start += len(grades)
            for g, q in zip(grades, p, strict=True):
                out[f"p_{name}_{g}"] = round(q, 6) if here else None
            out[name] = grades[grade_of(p)] if here else None
        else:
            p = probs[start]
            start += 1
            out[f"p_{name}"] = round(p, 6) if here else None
            out[name] = int(p >= rule) if here else None
    if start != len(probs):
        raise ValueError(f"{len(probs)} finding probabilities for columns of {list(findings)}")
    return out


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


# -- hostile values in CSV cells ----------------------------------------------------------
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def csv_safe(value: str) -> str:
    """A text cell a spreadsheet will not run as a formula (OWASP CSV injection rule).

    A value starting with `= + - @ TAB CR` gets a leading `'`; a plain number (`-0.5`) stays.
    A value that already starts with `'`s before one of those gets one more `'`, so that
    `csv_unsafe` undoes exactly what this did."""
    body = value.lstrip("'")
    if body[:1] in FORMULA_START and not (body == value and _NUMBER.fullmatch(value)):
        return "'" + value
    return value


def csv_unsafe(value: str) -> str:
    """The original of a `csv_safe` cell."""
    if value.startswith("'") and value.lstrip("'")[:1] in FORMULA_START:
        return value[1:]
    return value


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return csv_safe(v)
    return v


# -- reading an output back (resume) -------------------------------------------------------
# One CSV record: unquoted runs and quoted fields (line breaks inside quotes belong to the
# field), up to the newline that ends it. Possessive: no backtracking on a cut last record.
_CSV_RECORD = re.compile(rb'(?:[^"\n]++|"[^"]*+")*+\n')


def _records(data: bytes, jsonl: bool) -> list[bytes]:
    """The complete records of an output file's bytes, each with its line end."""
    if jsonl:  # json.dumps escapes every line break inside a value
        return [r + b"\n" for r in data[: data.rfind(b"\n") + 1].split(b"\n")[:-1]]
    records, pos = [], 0
    while (m := _CSV_RECORD.match(data, pos)) is not None:
        records.append(data[pos : m.end()])
        pos = m.end()
    return records


def _decode(record: bytes) -> str:
    return record.decode(ENCODING, ERRORS)


def _csv_fields(record: bytes) -> list[str]:
    return next(csv.reader(io.StringIO(_decode(record), newline="")), [])


@dataclass
class ResumeState:
    """What `read_done` found in an output: the paths done, and the rows it dropped to be
    predicted again (`redone`), or kept though failed (`errors`, `sr_missing`); `models`:
    rows kept per `model_id` ('' for rows without one); `rows`: path -> row of the rows kept,
    when `read_done(keep_rows=True)`."""

    done: set[str] = field(default_factory=set)
    redone: int = 0
    errors: int = 0
    sr_missing: int = 0
    models: Counter = field(default_factory=Counter)
    rows: dict[str, dict] = field(default_factory=dict)


class OtherModelError(ValueError):
    """`resume` into an output holding rows of another model."""


def read_output_rows(
    path: str | Path, columns: Sequence[str]
) -> tuple[bytes | None, list[tuple[bytes, dict]]]:
    """(the CSV header record or None, the rows as (record bytes, {column: value})) of an
    output file; CSV values as they were before `csv_safe`.

    A last record cut short by an interruption is removed from the file: its radiograph is
    predicted again. A CSV written with other columns (another model, `audit` setting or
    input kind) cannot be continued and raises."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None, []
    data = path.read_bytes()
    jsonl = is_jsonl(path)
    records = _records(data, jsonl)
    end = sum(len(r) for r in records)
    if end < len(data):
        log.warning("%s: dropping an incomplete last line left by an interrupted run", path)
        with path.open("r+b") as fh:
            fh.truncate(end)
    if jsonl:
        return None, [(r, json.loads(r)) for r in records if r.strip()]
    if not records:
        return None, []
    header = _csv_fields(records[0])
    if header != list(columns):
        if MODEL_ID_COLUMN not in header and header == list(columns)[:-1]:
            raise ValueError(
                f"resume: {path} was written before regionnet recorded the model of each row "
                f"(no {MODEL_ID_COLUMN} column), so resuming could mix two models' rows "
                "unnoticed; write to a new output file instead"
            )
        raise ValueError(
            f"resume: {path} has columns {header}, this run writes {list(columns)} "
            "(another model, audit, dicom.write_body_part setting or input kind); write to a "
            "new output file instead"
        )
    rows = []
    for r in records[1:]:
        fields = _csv_fields(r)
        if fields:
            rows.append((r, {k: csv_unsafe(v) for k, v in zip(header, fields)}))
    return records[0], rows


def read_done(
    path: str | Path,
    columns: Sequence[str],
    redo: Callable[[dict], bool] | None = None,
    state: ResumeState | None = None,
    *,
    model_id: str | None = None,
    other_model: bool = False,
    model_source: str = "",
    keep_rows: bool = False,
) -> set[str]:
    """Paths already in an output file (for `resume`).

    `redo(row)` true: the row is removed (the file is rewritten without it, atomically) and
    its path is not done: `resume=retry_errors` predicts it again. `state` (a
    `ResumeState`) also gets the counts (and the rows, with `keep_rows`). With `model_id`,
    rows that stay and were made by another model (or carry no `model_id`) raise
    `OtherModelError` naming both ids before anything is changed, unless `other_model`
    (`resume_other_model=true`); `model_source` says where this run's model came from. See
    `read_output_rows` for cut records and columns."""
    path = Path(path)
    state = state if state is not None else ResumeState()
    header, rows = read_output_rows(path, columns)
    keep = [(raw, row) for raw, row in rows if redo is None or not redo(row)]
    models = Counter(str(row.get(MODEL_ID_COLUMN) or "") for _, row in keep)
    others = {m: n for m, n in models.items() if m != model_id}
    if model_id is not None and others and not other_model:
        found = ", ".join(f"{n} rows by {m or 'no recorded model'}" for m, n in others.items())
        raise OtherModelError(
            f"resume: {path} holds rows of another model ({found}); this run's model "
            f"{model_id}{f' ({model_source})' if model_source else ''} would add its rows to "
            "them and mix two models' predictions in one file. Write to a new output, or set "
            f"resume_other_model=true to append anyway (the {MODEL_ID_COLUMN} column tells the "
            "rows apart)"
        )
    state.models.update(models)
    if redo is not None:
        state.redone = len(rows) - len(keep)
        if state.redone:
            _replace(path, [*([header] if header else []), *(raw for raw, _ in keep)])
    rows = keep
    for _, row in rows:
        state.done.add(row["path"])
        if keep_rows:
            state.rows[row["path"]] = row
        if str(row.get("status", "")).startswith("error"):
            state.errors += 1
        elif row.get("sr_status") not in (None, "", SR_STORED):
            state.sr_missing += 1
    return state.done


def _replace(path: Path, records: Sequence[bytes]) -> None:
    """Write `records` to `path` through a temporary file and a rename: a crash leaves the
    old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.writelines(records)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -- one writer per output ------------------------------------------------------------------
class OutputLockedError(RuntimeError):
    """Another regionnet-predict is writing the same output file."""


def lock_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".lock")


@contextmanager
def output_lock(output: str | Path) -> Iterator[Path]:
    """Hold an exclusive, non-blocking `flock` on `<output>.lock` (holding the pid and host)
    while a run reads and writes `output`; raise `OutputLockedError` when another process
    holds it. The lock file stays (removing it would race with a process opening it); the
    lock ends with the process, also on kill -9. Where `fcntl` is missing (Windows) there is
    no lock, with a warning."""
    path = lock_path(output)
    try:
        import fcntl
    except ImportError:
        log.warning("no file locking on this platform: run one regionnet-predict per output")
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = path.open("a+", encoding=ENCODING, errors=ERRORS)
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown pid"
            raise OutputLockedError(
                f"{output} is being written by another regionnet-predict ({holder}; it holds "
                f"the lock {path}); wait for it to finish or choose another output"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        try:
            yield path
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    finally:
        fh.close()


class PredictionWriter(BasePredictionWriter):
    """Turns each predict batch into rows (see module docstring) and appends them to `output`.

    Optional side effects per readable DICOM: the audit columns (`audit`) and a copy with
    `BodyPartExamined` set to the predicted region (`body_part_dir`, mirroring the layout
    under `input_root`; `body_part_mode`, `mismatch_margin` and `new_series_uid` as in
    `regionnet.dicom_tags`), whose outcome goes to the `body_part_status` column. `cams` (a
    `regionnet.predict.CamMaker`): class activation maps of each batch's readable radiographs,
    made right after the batch's rows are written, from the batch's images on the model's
    device; paths in `cams.only` (rows of an earlier run whose map is missing) get a map and
    no row. `uids` (input=dicomweb): rows carry the UID columns, and the audit reads the
    headers the batch brings along (`batch["headers"]`: path -> tags) instead of files.
    `sr_store` (a `regionnet.sr.SRStore`, `dicomweb.store_sr=true`) stores each batch's SRs
    before its rows are written, so that `sr_status` says what happened. `model_id` fills the
    `model_id` column. `findings`: finding name -> (region, threshold) of the model's binary
    finding heads, (region, grades) of its ordinal ones (`regionnet.predict.finding_specs`);
    their columns come from the batch's `finding_probs`.
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
        body_part_mode: str = FILL_EMPTY,
        mismatch_margin: float = DEFAULT_MISMATCH_MARGIN,
        new_series_uid: bool = False,
        cams=None,
        uids: bool = False,
        sr_store=None,
        model_id: str = "",
        findings: dict[str, tuple[str, float | tuple]] | None = None,
        parts=None,
    ):
        super().__init__(write_interval="batch")
        self.findings = dict(findings or {})
        # a composed model's part columns: `columns`, `cells(prediction, k, region)`
        self.parts = parts
        self.output = Path(output)
        self.regions = list(regions)
        self.thresholds = [float(t) for t in thresholds]
        self.append = append
        self.audit = audit
        self.body_part_dir = Path(body_part_dir) if body_part_dir else None
        self.input_root = Path(input_root) if input_root else None
        self.body_part_mode = body_part_mode
        self.mismatch_margin = float(mismatch_margin)
        self.new_series_uid = new_series_uid
        self.cams = cams
        self.uids = uids
        self.sr_store = sr_store
        self.model_id = model_id
        self.columns = prediction_columns(
            self.regions,
            audit,
            uids,
            body_part=self.body_part_dir is not None,
            findings=self.findings,
            parts=parts.columns if parts is not None else (),
        )
        self.jsonl = is_jsonl(self.output)
        self.counts: Counter[str] = Counter()
        self._fh = None
        self._csv = None

    # -- file ----------------------------------------------------------------------------
    def _open(self) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        fresh = not (self.append and self.output.is_file() and self.output.stat().st_size > 0)
        self._fh = self.output.open(
            "w" if fresh else "a", newline="", encoding=ENCODING, errors=ERRORS
        )
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
                self._fh.write(json.dumps({k: row.get(k) for k in self.columns}) + "\n")
            else:
                self._csv.writerow({k: _csv_value(row.get(k)) for k in self.columns})
        self._fh.flush()

    # -- rows ----------------------------------------------------------------------------
    def _audit(self, path: str, region: str, header: dict | None) -> dict[str, object]:
        if self.uids:  # over DICOMweb the header comes with the batch; the URI has the UIDs
            found = audit(path, region, self.regions, header) if header else {}
            return {c: found.get(c) for c in AUDIT_COLUMNS if c not in UID_COLUMNS}
        return audit(path, region, self.regions)

    def ok_row(
        self,
        path: str,
        probabilities: Sequence[float],
        header: dict | None = None,
        cam_items: list | None = None,
        finding_probs: Sequence[float] = (),
    ) -> dict:
        region, above = decide(probabilities, self.thresholds, self.regions)
        row: dict[str, Any] = {"path": path, **(uri_uids(path) if self.uids else {})}
        row.update({f"p_{r}": round(float(p), 6) for r, p in zip(self.regions, probabilities)})
        row.update(region=region, regions=";".join(above), status="ok", **region_codes(region))
        row.update(finding_values(self.findings, region, finding_probs))
        row[MODEL_ID_COLUMN] = self.model_id
        if self.audit:
            row.update(self._audit(path, region, header))
        self.counts["ok"] += 1
        self.counts[f"region:{region}"] += 1
        if cam_items is not None:
            # unknown: show what the most probable head looked at
            head = self.regions.index(region) if region in self.regions else None
            if head is None:
                head = max(range(len(self.regions)), key=lambda k: probabilities[k])
            cam_items.append((path, region, head, float(probabilities[head])))
        if self.body_part_dir is not None:
            row[BODY_PART_COLUMN] = self._copy_with_body_part(path, region, probabilities)
        return row

    def error_row(self, path: str, reason: str, header: dict | None = None) -> dict:
        row: dict[str, Any] = dict.fromkeys(self.columns)
        row.update(path=path, region="", regions="", status=f"error: {' '.join(reason.split())}")
        row.update(region_codes(""), **(uri_uids(path) if self.uids else {}))
        row[MODEL_ID_COLUMN] = self.model_id
        if self.audit:
            row.update(self._audit(path, "", header))
        if self.body_part_dir is not None:
            row[BODY_PART_COLUMN] = ""
        self.counts["error"] += 1
        return {k: row[k] for k in self.columns}

    def _copy_with_body_part(self, path: str, region: str, probabilities: Sequence[float]) -> str:
        """Write the re-tagged copy of `path` when `body_part_mode` allows; the
        `body_part_status` value, also counted (`body_part_<written|kept|skipped|failed>`)."""
        status = self._body_part(path, region, probabilities)
        self.counts[f"body_part_{status.split(':', 1)[0]}"] += 1
        return status

    def _body_part(self, path: str, region: str, probabilities: Sequence[float]) -> str:
        term = region_codes(region)["dicom_body_part"]
        if region == UNKNOWN:
            return "skipped: region unknown"
        if not term:
            return f"skipped: {region} has no BodyPartExamined term"
        if path.startswith("phantom://") or not is_dicom(path):
            return "skipped: not a DICOM file"
        try:
            header = read_dicom_header(path)
        except RadiographReadError as e:
            log.warning("dicom.write_body_part: cannot read the header of %s: %s", path, e)
            return f"failed: cannot read the header ({e.reason})"
        probs = dict(zip(self.regions, (float(p) for p in probabilities)))
        write, why = body_part_decision(
            header, region, probs, self.body_part_mode, self.mismatch_margin
        )
        if not write:
            return why
        dst = None
        try:  # a path escaping body_part_dir is refused by mirrored_path
            dst = mirrored_path(path, self.input_root, self.body_part_dir)
            note = f"by regionnet model {self.model_id}" if self.model_id else "by regionnet"
            write_body_part(path, dst, term, new_series_uid=self.new_series_uid, description=note)
        except Exception as e:  # one unwritable copy must not stop the run
            log.warning("dicom.write_body_part: no copy of %s (%s): %s", path, dst, e)
            return f"failed: {' '.join(str(e).split())}"
        return why

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        probs = prediction["probs"].float().tolist()
        found = prediction.get("finding_probs")
        found = found.float().tolist() if found is not None else [()] * len(probs)
        headers = batch.get("headers", {}) if isinstance(batch, dict) else {}
        only = self.cams.only if self.cams is not None else {}
        cam_items = [] if self.cams is not None else None
        rows = []
        for k, (p, pr, fp) in enumerate(zip(prediction["path"], probs, found, strict=True)):
            if p in only:  # a row of an earlier run that has no map yet: the map only
                cam_items.append((p, *only[p]))
                continue
            rows.append(self.ok_row(p, pr, headers.get(p), cam_items, fp))
            if self.parts is not None:
                rows[-1].update(self.parts.cells(prediction, k, rows[-1]["region"]))
        if self.sr_store is not None:  # stored before the rows are written: sr_status is true
            datasets = batch.get("datasets", {}) if isinstance(batch, dict) else {}
            stored = self.sr_store.store(prediction["path"], probs, datasets)
            for row in rows:
                row["sr_status"] = stored.get(row["path"], "")
        errors = [(p, why) for p, why in prediction["errors"] if p not in only]
        rows += [self.error_row(p, why, headers.get(p)) for p, why in errors]
        self.write_rows(rows)
        if self.cams is not None:  # after the rows: an interruption here keeps them
            for p, why in prediction["errors"]:
                if p in only:
                    self.cams.failed(p, why)
            images = batch.get("image") if isinstance(batch, dict) else None
            self.cams.make(pl_module, prediction["path"], images, cam_items)
