"""Hostile inputs to batch prediction (issue 15, parts 3, 4, 7-13).

What a hospital's files and servers can throw at `regionnet-predict`: UIDs that are
spreadsheet formulas, CSV listings that climb out of the output folder with `..`, file names
that are not UTF-8 or hold line breaks, two runs on one output, failures to retry (error rows,
SRs not stored, HTTP 503 after retries), folders that cannot be listed and dangling links,
CA-bundle variables that override the config, and instances served without the DICM
preamble. The DICOMweb cases run against `FakePacs`, a requests adapter mounted on the
session regionnet builds (QIDO-RS, WADO-RS, STOW-RS in memory): no server, no network.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import logging
import os
import time
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd
import pydicom
import pytest
import requests
from dicom_factory import make_dicom
from phantom_model import phantom_checkpoint  # noqa: F401  (session fixture)
from PIL import Image
from requests.structures import CaseInsensitiveDict

import regionnet.dicomweb as dicomweb
import regionnet.writer as writer
from regionnet.config import compose_config
from regionnet.data.phantom import render_phantom
from regionnet.dicom_tags import mirrored_path
from regionnet.predict import predict
from regionnet.regions import REGIONS

SIZE = 64
SURROGATE = dict(encoding_errors="surrogateescape")  # pandas: names that are not UTF-8


def png(path: Path | bytes, region: str = "hand", seed: int = 9001) -> Path | bytes:
    pixels = (render_phantom(region, seed, SIZE) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    with open(path, "wb") as fh:  # bytes paths: names that are not UTF-8
        fh.write(buf.getvalue())
    return path


def u16(region: str, seed: int) -> np.ndarray:
    return (render_phantom(region, seed, SIZE) * 4095).round().astype(np.uint16)


def config(ckpt, input_path, output, *overrides: str):
    return compose_config(
        "predict",
        [f"ckpt_path={ckpt}", f"input={input_path}", f"output={output}", "accelerator=cpu",
         "num_workers=0", "batch_size=4", *overrides],
    )  # fmt: skip


def csv_cells(path: Path) -> list[list[str]]:
    """The raw cells of a CSV as a spreadsheet sees them (no unescaping)."""
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.reader(fh))


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line]


# ------------------------------------------------------------ 3. CSV formula injection
HOSTILE_UIDS = {
    "StudyInstanceUID": '=HYPERLINK("http://evil.example/x","open")',
    "SeriesInstanceUID": "+1+1",
    "SOPInstanceUID": "@SUM(1)",
}


def test_csv_safe_neutralises_formulas_and_keeps_numbers_and_roundtrips():
    for value in ["=1+1", "+1+1", "-1+1", "@SUM(1)", "\tx", "\rx", "=", "-"]:
        assert writer.csv_safe(value) == "'" + value
    for value in ["-0.5", "+3", "-1e-5", "1.2.840.10008", "knee", "", "a=b", "'quoted"]:
        assert writer.csv_safe(value) == value  # numbers and harmless text stay
    for value in ["=x", "'=x", "''=x", "'-1", "-1", "'abc", "@", "'", "-1-1", "x"]:
        safe = writer.csv_safe(value)
        assert writer.csv_unsafe(safe) == value, value
        assert (
            safe.lstrip("'")[:1] not in writer.FORMULA_START
            or safe.startswith("'")
            or (writer._NUMBER.fullmatch(safe))
        )


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_formula_uids_are_neutralised_in_csv_and_exact_in_jsonl(
    phantom_checkpoint,  # noqa: F811
    tmp_path,
    suffix,
):
    folder = tmp_path / "in"
    folder.mkdir()
    make_dicom(folder / "evil.dcm", u16("knee", 9101), BodyPartExamined="HAND", **HOSTILE_UIDS)
    png(folder / "plain.png")
    out = tmp_path / f"audit{suffix}"
    summary = predict(config(phantom_checkpoint, folder, out, "audit=true", "group_by=study"))
    assert summary["ok"] == 2
    studies = Path(summary["study_output"])
    if suffix == ".jsonl":  # JSON lines hold the exact values
        (row,) = [r for r in jsonl_rows(out) if r["path"].endswith("evil.dcm")]
        assert {k: row[c] for k, c in [("StudyInstanceUID", "study_uid"),
                ("SeriesInstanceUID", "series_uid"), ("SOPInstanceUID", "sop_uid")]} == (
            HOSTILE_UIDS
        )  # fmt: skip
        assert isinstance(row["p_knee"], float)
        (study,) = jsonl_rows(studies)
        assert study["study_uid"] == HOSTILE_UIDS["StudyInstanceUID"]
        return
    header, *rows = csv_cells(out)
    (row,) = [dict(zip(header, r)) for r in rows if r[0].endswith("evil.dcm")]
    assert row["study_uid"] == "'" + HOSTILE_UIDS["StudyInstanceUID"]
    assert row["series_uid"] == "'+1+1" and row["sop_uid"] == "'@SUM(1)"
    for cells in (dict(zip(header, r)) for r in rows):
        for head in REGIONS:  # probabilities stay numbers
            assert 0.0 <= float(cells[f"p_{head}"]) <= 1.0
    for cells in rows:  # no cell of the audit may start a formula
        assert all(c[:1] not in writer.FORMULA_START for c in cells), cells
    s_header, *s_rows = csv_cells(studies)
    (study,) = [dict(zip(s_header, r)) for r in s_rows]
    assert study["study_uid"] == "'" + HOSTILE_UIDS["StudyInstanceUID"]
    assert int(study["images"]) == 1  # counts stay numbers
    mismatched = study["mismatched"]  # HAND header: flagged unless predicted hand
    assert mismatched in ("", "'@SUM(1)"), mismatched
    # resume reads the values back unescaped: nothing is predicted twice
    again = predict(config(phantom_checkpoint, folder, out, "audit=true", "resume=true"))
    assert (again["resumed"], again["ok"]) == (2, 0)


# ------------------------------------------------------------------ 4. path traversal
def test_mirrored_paths_never_leave_the_output_folder(tmp_path):
    out = tmp_path / "o"
    root = tmp_path / "in" / "list"
    climbing = f"{root}/{'../' * 40}etc/cron.d/x.dcm"
    dst = mirrored_path(climbing, root, out)
    assert dst.is_relative_to(out) and ".." not in dst.parts
    assert mirrored_path(root / "a" / ".." / "b.dcm", root, out) == out / "b.dcm"
    (out / "link").parent.mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere", out / "etc", target_is_directory=True)
    with pytest.raises(ValueError, match="outside"):  # a folder link leading out of `out`
        mirrored_path(climbing, root, out)


def test_dotdot_paths_in_a_csv_write_copies_and_maps_inside_the_output_folders(
    phantom_checkpoint,  # noqa: F811
    tmp_path,
):
    import regionnet.cam  # noqa: F401 - a broken module must fail here, not skip

    src = tmp_path / "a" / "b"
    src.mkdir(parents=True)
    make_dicom(src / "x.dcm", u16("knee", 9201), BodyPartExamined="")
    png(src / "k.png", "knee", 9202)
    listing = tmp_path / "a" / "list" / "list.csv"
    listing.parent.mkdir()
    pd.DataFrame({"path": ["../b/x.dcm", "../b/k.png"]}).to_csv(listing, index=False)
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "out"
    fixed, cams = out / "fixed", out / "cams"
    summary = predict(
        config(phantom_checkpoint, listing, out / "p.csv", "threshold_override=0.0",
               f"dicom.write_body_part={fixed}", "cam=true", f"cam_dir={cams}")
    )  # fmt: skip
    assert summary["ok"] == 2 and summary["body_part_written"] == 1
    new = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    outside = [p for p in new if not (p.is_relative_to(fixed) or p.is_relative_to(cams))]
    assert sorted(p.name for p in outside) == ["p.csv", "p.csv.lock"], outside
    assert len([p for p in new if p.is_relative_to(cams)]) == 2


# ------------------------------------------------------ 7. names that are not UTF-8
LATIN1 = b"latin1_\xe9.png"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_file_name_that_is_not_utf8_is_written_and_resumed(
    phantom_checkpoint,  # noqa: F811
    tmp_path,
    suffix,
):
    folder = tmp_path / "in"
    folder.mkdir()
    png(folder / "good.png")
    png(os.path.join(os.fsencode(folder), LATIN1), "knee", 9301)
    make_dicom(folder / "IM\udce9", u16("elbow", 9302), suffix="")  # a suffix-less DICOM too
    out = tmp_path / f"p{suffix}"
    summary = predict(config(phantom_checkpoint, folder, out))
    assert (summary["ok"], summary["errors"]) == (3, 0)
    expected = {os.fsdecode(os.path.join(os.fsencode(folder), LATIN1)), str(folder / "good.png"),
                str(folder / "IM\udce9")}  # fmt: skip
    if suffix == ".csv":
        assert LATIN1 in out.read_bytes()  # the real name's bytes
        paths = pd.read_csv(out, dtype=str, **SURROGATE)["path"]
    else:
        paths = pd.Series([r["path"] for r in jsonl_rows(out)])
    assert set(paths) == expected and paths.is_unique
    again = predict(config(phantom_checkpoint, folder, out, "resume=true"))
    assert (again["resumed"], again["ok"] + again["errors"]) == (3, 0)


def test_a_training_split_keeps_a_name_that_is_not_utf8(tmp_path):
    from regionnet.data.datamodule import RegionDataModule

    root = tmp_path / "films"
    for region in ("hand", "knee"):
        (root / region).mkdir(parents=True)
        for i in range(6):
            png(root / region / f"{i}.png", region, 9400 + i)
    odd = os.path.join(os.fsencode(root / "knee"), LATIN1)
    png(odd, "knee", 9410)
    dm = RegionDataModule(source="folder", root=str(root), regions=["hand", "knee"],
                          split_fractions=[0.5, 0.5, 0.0])  # fmt: skip
    split = dm.write_split(tmp_path / "split.csv")
    saved = pd.read_csv(split, dtype=str, **SURROGATE)
    assert os.fsdecode(os.path.realpath(odd)) in set(saved["path"])
    assert len(saved) == 13


# ----------------------------------------------------------- 8. names with line breaks
BREAKS = ["new\nline.png", "carriage\rreturn.png", "crlf\r\nname.png", "ls\u2028name.png",
          "nel\x85name.png", "fs\x1cname.png", '"quoted",comma.png']  # fmt: skip


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_names_with_line_breaks_are_written_once_and_resumed_once(
    phantom_checkpoint,  # noqa: F811
    tmp_path,
    suffix,
):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(BREAKS):
        png(folder / name, "hand", 9500 + i)
    out = tmp_path / f"p{suffix}"
    predict(config(phantom_checkpoint, folder, out))
    for _ in range(2):
        again = predict(config(phantom_checkpoint, folder, out, "resume=true"))
        assert (again["resumed"], again["ok"] + again["errors"]) == (len(BREAKS), 0)
    if suffix == ".csv":
        paths = pd.read_csv(out, dtype=str)["path"].tolist()
    else:
        paths = [r["path"] for r in jsonl_rows(out)]
    assert sorted(paths) == sorted(str(folder / n) for n in BREAKS)


def test_a_record_cut_inside_a_quoted_line_break_is_dropped_on_resume(tmp_path):
    out = tmp_path / "p.csv"
    cols = ["path", "status"]
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([cols, ["/x/a\nb.png", "ok"], ["/x/c\nd.png", "ok"]])
    data = out.read_bytes()
    out.write_bytes(data[: data.rindex(b"d.png")])  # cut after the quoted line break
    assert writer.read_done(out, cols) == {"/x/a\nb.png"}
    assert out.read_bytes() == data[: data.index(b'"/x/c')]


# ------------------------------------------------------------ 9. two writers, one file
def test_a_second_run_on_a_locked_output_stops_and_names_it(
    phantom_checkpoint,  # noqa: F811
    tmp_path,
):
    png(tmp_path / "a.png")
    out = tmp_path / "p.csv"
    lock = tmp_path / "p.csv.lock"
    with lock.open("a+") as held:  # another regionnet-predict holds the output
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on ward-pc\n")
        held.flush()
        with pytest.raises(RuntimeError, match="another regionnet-predict") as err:
            predict(config(phantom_checkpoint, tmp_path / "a.png", out))
        assert str(out) in str(err.value) and "pid 4242" in str(err.value)
        assert not out.exists()
    summary = predict(config(phantom_checkpoint, tmp_path / "a.png", out))
    assert summary["ok"] == 1
    with lock.open("a+") as after:  # released when the run ends
        fcntl.flock(after.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


# -------------------------------------------------------------- 10. retrying failures
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_retry_errors_predicts_error_rows_again(
    phantom_checkpoint,  # noqa: F811
    tmp_path,
    suffix,
):
    folder = tmp_path / "in"
    folder.mkdir()
    png(folder / "good.png")
    (folder / "later.png").write_bytes(b"\x89PNG\r\n\x1a\n half a file")
    out = tmp_path / f"p{suffix}"
    predict(config(phantom_checkpoint, folder, out))
    png(folder / "later.png", "knee", 9601)  # the file is complete now
    first = out.read_bytes()
    kept = predict(config(phantom_checkpoint, folder, out, "resume=true"))
    assert (kept["resumed"], kept["ok"], kept["retried"]) == (2, 0, 0)
    assert out.read_bytes() == first  # resume=true keeps error rows
    again = predict(config(phantom_checkpoint, folder, out, "resume=retry_errors"))
    assert (again["resumed"], again["retried"], again["ok"], again["errors"]) == (1, 1, 1, 0)
    if suffix == ".csv":
        df = pd.read_csv(out, dtype=str, keep_default_na=False)
    else:
        df = pd.DataFrame(jsonl_rows(out))
    assert df["path"].tolist() == [str(folder / "good.png"), str(folder / "later.png")]
    assert (df["status"] == "ok").all()
    good_row = first.split(b"\n")[1 if suffix == ".csv" else 0]
    assert out.read_bytes().startswith(first[: first.index(good_row) + len(good_row)])
    assert not list(tmp_path.glob(".p*.tmp"))  # the rewrite left no temporary file


def test_resume_takes_false_true_or_retry_errors(phantom_checkpoint, tmp_path):  # noqa: F811
    png(tmp_path / "a.png")
    with pytest.raises(ValueError, match="retry_errors"):
        predict(config(phantom_checkpoint, tmp_path / "a.png", tmp_path / "p.csv", "resume=maybe"))


# ------------------------------------------------- 11. skipped paths are counted and logged
def test_a_dangling_link_and_an_unlistable_folder_are_logged_and_counted(
    tmp_path,
    caplog,
    monkeypatch,
):
    from regionnet.data import files

    root = tmp_path / "films"
    (root / "locked").mkdir(parents=True)
    png(root / "a.png")
    png(root / "locked" / "b.png")
    os.symlink(tmp_path / "gone.png", root / "dangling.png")
    (root / "notes.txt").write_text("not a radiograph")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(root / "locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(files.os, "scandir", scandir)  # os.walk lists with os.scandir
    with caplog.at_level(logging.DEBUG, logger="regionnet.data.files"):
        listed = files.list_radiographs(root)
    assert listed == [root / "a.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(root / "dangling.png") in w and "dangling symlink" in w for w in warnings)
    assert any(str(root / "locked") in w and "Permission denied" in w for w in warnings)
    assert any(str(root / "notes.txt") in r.getMessage() for r in caplog.records)
    summary = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()][-1]
    assert "skipped 1 files that are not radiographs" in summary
    assert "1 x dangling symlink" in summary and "1 x cannot list the folder" in summary


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root reads folders and files whatever their mode: chmod 000 cannot block it",
)
def test_chmod_000_folders_and_files_are_logged_as_permission_denied(tmp_path, caplog):
    from regionnet.data import files

    root = tmp_path / "films"
    (root / "locked").mkdir(parents=True)
    png(root / "a.png")
    png(root / "locked" / "b.png")
    make_dicom(root / "IM_LOCKED", u16("knee", 9701), suffix="")
    os.chmod(root / "IM_LOCKED", 0)
    os.chmod(root / "locked", 0)
    try:
        with caplog.at_level(logging.INFO, logger="regionnet.data.files"):
            assert files.list_radiographs(root) == [root / "a.png"]
    finally:
        os.chmod(root / "locked", 0o755)
        os.chmod(root / "IM_LOCKED", 0o644)
    text = caplog.text
    assert str(root / "locked") in text and str(root / "IM_LOCKED") in text
    assert text.count("ermission denied") >= 2


# --------------------------------------------------- 12. the config's TLS settings win
class Recorder(requests.adapters.BaseAdapter):
    """Answers every request with 200 and remembers the `verify` it was sent with."""

    def __init__(self):
        super().__init__()
        self.verify: list = []

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        self.verify.append(verify)
        return _response(request, 200, b"[]")

    def close(self):
        pass


def test_ca_bundle_and_verify_tls_win_over_the_ca_bundle_variables(tmp_path, monkeypatch):
    site = tmp_path / "site-ca.pem"
    site.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/env/requests-ca.pem")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/env/curl-ca.pem")
    url = "https://pacs.example.org/dicom-web"

    def verify_sent(**section):
        adapter = Recorder()
        session = dicomweb.Server.from_config({"url": url, **section}).session()
        session.mount("https://", adapter)
        session.get(f"{url}/studies")
        return adapter.verify[-1]

    assert verify_sent(ca_bundle=str(site)) == str(site)
    assert verify_sent(verify_tls=False) is False
    # no TLS setting in the config: requests' own rule (the environment's bundle) applies
    assert verify_sent() == "/etc/env/requests-ca.pem"


# ------------------------------------------- a DICOMweb server in memory (parts 10, 13)
ROOT = "http://pacs.test/dicom-web"
TS_EXPLICIT = "1.2.840.10008.1.2.1"


def _response(request, status: int, body: bytes = b"", ctype: str = "application/dicom+json"):
    r = requests.Response()
    r.status_code, r._content, r.url, r.request = status, body, request.url, request
    r.reason = HTTPStatus(status).phrase
    r.headers = CaseInsensitiveDict({"Content-Type": ctype})
    return r


class FakePacs(requests.adapters.BaseAdapter):
    """QIDO-RS, WADO-RS and STOW-RS over `instances` (SOP UID -> (dataset, the bytes served
    for it)). `fail` maps "stow" or a SOP UID to HTTP statuses answered (once each) before
    the request succeeds; `sr_sources` lists the source SOP UID of every SR stored."""

    def __init__(self, instances: dict[str, tuple[pydicom.Dataset, bytes]]):
        super().__init__()
        self.instances = instances
        self.fail: dict[str, list[int]] = {}
        self.sr_sources: list[str] = []

    def close(self):
        pass

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        url = urlsplit(request.url)
        parts = url.path[len(urlsplit(ROOT).path) :].strip("/").split("/")
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if request.method == "POST":
            return self._stow(request)
        if int(query.get("offset", 0)):
            return _response(request, 200, b"[]")
        found = [ds for ds, _ in self.instances.values()]
        if parts == ["studies"]:
            modality = query.get("ModalitiesInStudy")
            found = [ds for ds in found if ds.Modality == modality]
            return self._json(request, found, "StudyInstanceUID")
        study = parts[1]
        found = [ds for ds in found if ds.StudyInstanceUID == study]
        if parts[2:] == ["series"]:
            return self._json(request, found, "SeriesInstanceUID", "Modality")
        series = parts[3]
        found = [ds for ds in found if ds.SeriesInstanceUID == series]
        if parts[4:] == ["instances"]:
            return self._json(request, found, "SOPInstanceUID")
        sop = parts[5]
        if self.fail.get(sop):
            return _response(request, self.fail[sop].pop(0))
        if sop not in self.instances:
            return _response(request, 404)
        body = b"".join(
            [b"--B\r\nContent-Type: application/dicom; transfer-syntax=", TS_EXPLICIT.encode(),
             b"\r\n\r\n", self.instances[sop][1], b"\r\n--B--\r\n"]
        )  # fmt: skip
        return _response(request, 200, body, 'multipart/related; type="application/dicom"; '
                         "boundary=B")  # fmt: skip

    def _json(self, request, found, *keywords):
        seen, out = set(), []
        for ds in found:
            item = pydicom.Dataset()
            for k in keywords:
                setattr(item, k, getattr(ds, k))
            key = tuple(getattr(ds, k) for k in keywords)
            if key not in seen:
                seen.add(key)
                out.append(item.to_json_dict())
        return _response(request, 200, json.dumps(out).encode())

    def _stow(self, request):
        if self.fail.get("stow"):
            return _response(request, self.fail["stow"].pop(0))
        body = request.body if isinstance(request.body, bytes) else b"".join(request.body)
        params = dicomweb._content_type(request.headers["Content-Type"])[1]
        for _, content in dicomweb._multipart(body, params["boundary"]):
            sr = pydicom.dcmread(io.BytesIO(content), force=True)
            evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
            ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
            self.sr_sources.append(ref.ReferencedSOPInstanceUID)
        return _response(request, 200, b"")


def _without_preamble(ds: pydicom.Dataset, file_meta: bool) -> bytes:
    """The bytes dicomweb-client's store_instances writes: no preamble, no DICM prefix;
    with `file_meta=False` not even the group 0002 elements."""
    plain = pydicom.Dataset(ds)
    if file_meta:
        plain.file_meta = ds.file_meta
    elif hasattr(plain, "file_meta"):
        del plain.file_meta
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, plain, implicit_vr=False, little_endian=True)
    data = buf.getvalue()
    assert data[128:132] != b"DICM"
    return data


@pytest.fixture
def fake_pacs(tmp_path, monkeypatch):
    """Four DX instances in two studies: knee (a normal file), hand (no preamble), elbow,
    shoulder (no preamble, no file meta). Regionnet's sessions talk to it."""
    instances = {}
    uid = pydicom.uid.generate_uid
    studies = [{"StudyInstanceUID": uid(), "SeriesInstanceUID": uid()} for _ in range(2)]
    specs = [("knee", studies[0], "file"), ("hand", studies[0], "meta"),
             ("elbow", studies[1], "file"), ("shoulder", studies[1], "bare")]  # fmt: skip
    for i, (region, tags, served) in enumerate(specs):
        path = make_dicom(tmp_path / f"{region}.dcm", u16(region, 9800 + i), **tags,
                          PatientID=f"RN-{i}")  # fmt: skip
        ds = pydicom.dcmread(path)
        data = path.read_bytes() if served == "file" else _without_preamble(ds, served == "meta")
        instances[ds.SOPInstanceUID] = (ds, data)
    pacs = FakePacs(instances)
    pacs.names = {region: sop for (region, _, _), sop in zip(specs, instances)}
    make_session = dicomweb.Server.session

    def session(self):
        s = make_session(self)
        s.mount("http://pacs.test/", pacs)
        return s

    monkeypatch.setattr(dicomweb.Server, "session", session)
    monkeypatch.setattr(time, "sleep", lambda s: None)  # retries wait 2, 4, ... s: not here
    return pacs


def web_config(ckpt, output: Path, *overrides: str):
    return compose_config(
        "predict",
        [f"ckpt_path={ckpt}", "input=dicomweb", f"output={output}", f"dicomweb.url={ROOT}",
         "dicomweb.retries=1", "dicomweb.batch_size=1", "accelerator=cpu", "num_workers=0",
         *overrides],
    )  # fmt: skip


def test_instances_without_preamble_are_read_and_a_503_names_its_status(
    phantom_checkpoint,  # noqa: F811
    fake_pacs,
    tmp_path,
):
    names = fake_pacs.names
    fake_pacs.fail[names["elbow"]] = [503, 503]  # both attempts (retries=1)
    out = tmp_path / "p.csv"
    summary = predict(web_config(phantom_checkpoint, out))
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(df.columns) == writer.prediction_columns(REGIONS, uids=True)
    df = df.set_index("sop_uid")
    for region in ("knee", "hand", "shoulder"):  # the DICM preamble is not needed
        assert df.loc[names[region], "status"] == "ok", df.loc[names[region], "status"]
    status = df.loc[names["elbow"], "status"]
    assert status == "error: WADO-RS retrieve failed: HTTP 503 Service Unavailable after 2 attempts"
    assert (summary["ok"], summary["errors"]) == (3, 1)
    assert (df["sr_status"] == "").all()  # SRs off: empty


def test_sr_status_and_retry_errors_store_exactly_the_missing_srs(
    phantom_checkpoint,  # noqa: F811
    fake_pacs,
    tmp_path,
):
    names = fake_pacs.names
    fake_pacs.fail["stow"] = [503, 503]  # the first instance's SR: refused after its retry
    fake_pacs.fail[names["elbow"]] = [503, 503]  # an error row
    out = tmp_path / "p.csv"
    first = predict(web_config(phantom_checkpoint, out, "dicomweb.store_sr=true"))
    assert (first["sr_stored"], first["sr_failed"], first["errors"]) == (2, 1, 1)
    df = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("sop_uid")
    sr = df["sr_status"]
    (refused,) = sr.index[sr.str.startswith("failed: ")]  # the first SR sent
    assert "HTTP 503 Service Unavailable after 2 attempts" in sr[refused], sr[refused]
    assert sr[names["elbow"]] == ""  # an error row has no SR
    stored = sorted(set(names.values()) - {refused, names["elbow"]})
    assert sorted(sr.index[sr == "stored"]) == sorted(fake_pacs.sr_sources) == stored
    # resume=true keeps everything; retry_errors takes the error row and the missing SR
    kept = predict(web_config(phantom_checkpoint, out, "dicomweb.store_sr=true", "resume=true"))
    assert (kept["resumed"], kept["ok"] + kept["errors"]) == (4, 0)
    again = predict(
        web_config(phantom_checkpoint, out, "dicomweb.store_sr=true", "resume=retry_errors")
    )
    assert (again["resumed"], again["retried"], again["ok"], again["sr_stored"]) == (2, 2, 2, 2)
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert df["path"].is_unique and len(df) == 4
    assert (df["status"] == "ok").all() and (df["sr_status"] == "stored").all()
    assert sorted(fake_pacs.sr_sources) == sorted(names.values())  # each SR exactly once


def test_a_query_refused_after_retries_names_the_http_status(
    phantom_checkpoint,  # noqa: F811
    fake_pacs,
    tmp_path,
):
    real_send = fake_pacs.send

    def busy(request, **kwargs):
        if request.method == "GET" and urlsplit(request.url).path.endswith("/studies"):
            return _response(request, 503)
        return real_send(request, **kwargs)

    fake_pacs.send = busy
    with pytest.raises(dicomweb.DicomWebError, match="HTTP 503 Service Unavailable after 2"):
        predict(web_config(phantom_checkpoint, tmp_path / "p.csv"))
