"""regionnet-predict against a real DICOMweb server (regionnet.dicomweb, regionnet.sr,
regionnet.study_view).

The module starts its own Orthanc with the DICOMweb plugin (Debian packages `orthanc` and
`orthanc-dicomweb`, which .ci/run installs): throw-away storage in tmp, an HTTP port free at
run time, no DICOM port, remote access off (loopback only), HTTP basic auth on with a random
password. It uploads generated DX/CR instances with STOW-RS (MONOCHROME1 and 2, one without
pixel data, one out-of-set chest, an OT study that must not be queried), predicts through
QIDO-RS/WADO-RS with SRs stored back, and stops the server. Bearer auth goes through a small
local proxy that checks the token and forwards with basic auth (Orthanc has no bearer tokens of
its own); `dicomweb.sr_url` stores SRs into a second Orthanc. Where Orthanc or its plugin is
missing, the server tests skip; the tests of the parts run anyway.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import requests
from dicom_factory import make_dicom
from phantom_model import phantom_checkpoint  # noqa: F401  (session fixture)
from pydicom.sr.codedict import codes

import regionnet.dicomweb as dicomweb
from regionnet.config import compose_config
from regionnet.data.phantom import render_phantom
from regionnet.dicomweb import BearerAuth, DicomWebError, Server, find_instances, study_date_range
from regionnet.io import dicom_pixels, read_radiograph
from regionnet.predict import predict
from regionnet.regions import REGIONS, UNKNOWN, region_info
from regionnet.study_view import study_output
from regionnet.writer import prediction_columns

dicomweb_client = pytest.importorskip("dicomweb_client", reason="needs the pacs extra")
hsr = pytest.importorskip("highdicom.sr", reason="needs the pacs extra")

# /usr/sbin is not on every user's PATH
ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
PLUGINS = sorted(
    glob.glob("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*")
    + glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*")
)
needs_orthanc = pytest.mark.skipif(
    ORTHANC is None or not PLUGINS,
    reason="Orthanc or its DICOMweb plugin is not installed "
    "(apt-get install orthanc orthanc-dicomweb; .ci/run does it)",
)
USER_ENV, PASSWORD_ENV = "REGIONNET_TEST_DICOMWEB_USER", "REGIONNET_TEST_DICOMWEB_PASSWORD"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
SIZE = 64


# ------------------------------------------------------------------------------ server
class Orthanc:
    """A running Orthanc: its REST root, DICOMweb root and test credentials."""

    def __init__(self, port: int, user: str, password: str):
        self.root = f"http://127.0.0.1:{port}"
        self.dicomweb = f"{self.root}/dicom-web"
        self.user, self.password = user, password

    def rest(self, method: str, path: str, **kwargs) -> requests.Response:
        """Orthanc's own REST API (test bookkeeping only; regionnet speaks DICOMweb)."""
        r = requests.request(
            method, self.root + path, auth=(self.user, self.password), timeout=10, **kwargs
        )
        r.raise_for_status()
        return r

    def client(self):
        session = requests.Session()
        session.auth = (self.user, self.password)
        return dicomweb_client.DICOMwebClient(self.dicomweb, session=session)

    def file_hashes(self) -> dict[str, tuple[str, str]]:
        """SOP Instance UID -> (Modality, SHA-256 of the stored file) for every instance."""
        out = {}
        for item in self.rest("GET", "/instances", params={"expand": ""}).json():
            data = self.rest("GET", f"/instances/{item['ID']}/file").content
            tags = self.rest("GET", f"/instances/{item['ID']}/simplified-tags").json()
            out[tags["SOPInstanceUID"]] = (
                tags.get("Modality", ""),
                hashlib.sha256(data).hexdigest(),
            )
        return out

    def delete_instance(self, sop_uid: str) -> None:
        (found,) = self.rest("POST", "/tools/lookup", data=sop_uid).json()
        self.rest("DELETE", f"/instances/{found['ID']}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_orthanc(tmp: Path, user: str, password: str) -> Iterator[Orthanc]:
    """Start an Orthanc with the DICOMweb plugin in `tmp` (throw-away storage, loopback only,
    basic auth for `user`); stop it on exit."""
    port = free_port()
    config = {
        "Name": "regionnet-test",
        "StorageDirectory": str(tmp / "storage"),
        "IndexDirectory": str(tmp / "storage"),
        "HttpPort": port,
        "DicomServerEnabled": False,  # no DICOM port: DICOMweb and REST over HTTP only
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,  # connections from 127.0.0.1 only
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "Plugins": [PLUGINS[0]],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "SaveJobs": False,
        "HttpThreadsCount": 8,
    }
    (tmp / "orthanc.json").write_text(json.dumps(config))
    log = (tmp / "orthanc.log").open("w")
    proc = subprocess.Popen(
        [ORTHANC, str(tmp / "orthanc.json")], cwd=tmp, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        server = Orthanc(port, user, password)
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Orthanc exited with {proc.returncode}:\n{_tail(tmp)}")
            try:
                server.rest("GET", "/system")
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    pytest.fail(f"Orthanc did not answer on port {port} in 30 s:\n{_tail(tmp)}")
                time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    if ORTHANC is None or not PLUGINS:
        pytest.skip("Orthanc or its DICOMweb plugin is not installed")
    tmp = tmp_path_factory.mktemp("orthanc")
    with running_orthanc(tmp, "regionnet-test", secrets.token_urlsafe(16)) as server:
        yield server


def _tail(tmp: Path) -> str:
    return (tmp / "orthanc.log").read_text(errors="replace")[-3000:]


class BearerProxy:
    """A bearer-token front door to an Orthanc, as a site's API gateway or auth proxy in front
    of a PACS is (Orthanc itself has only basic auth): a request needs `Authorization: Bearer
    <token>`, else it gets 401 with `WWW-Authenticate: Bearer`; an accepted one is forwarded to
    Orthanc with Orthanc's basic credentials. `seen` records (method, path, token accepted,
    auth scheme sent) per request."""

    def __init__(self, target: Orthanc, token: str):
        self.target, self.token = target, token
        self.seen: list[tuple[str, str, bool, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as dicomweb-client's session expects

            def log_message(self, *args) -> None:  # quiet
                pass

            def body(self) -> bytes:
                if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = []  # dicomweb-client sends large STOW-RS bodies chunked
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(parts)

            def reply(self, status: int, headers: dict, body: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def forward(self) -> None:
                body = self.body()
                sent = self.headers.get("Authorization", "")
                ok = secrets.compare_digest(sent.encode(), f"Bearer {proxy.token}".encode())
                proxy.seen.append((self.command, self.path, ok, sent.split(" ")[0]))
                if not ok:
                    challenge = {"WWW-Authenticate": 'Bearer realm="dicom-web"'}
                    self.reply(401, challenge, b"a valid bearer token is required")
                    return
                hop = {"host", "authorization", "content-length", "transfer-encoding",
                       "connection", "keep-alive", "accept-encoding", "cache-control"}  # fmt: skip
                headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
                answer = requests.request(
                    self.command, target.root + self.path, data=body, headers=headers,
                    auth=(target.user, target.password), timeout=60,
                )  # fmt: skip
                drop = {"content-length", "transfer-encoding", "connection", "content-encoding"}
                out = {k: v for k, v in answer.headers.items() if k.lower() not in drop}
                self.reply(answer.status_code, out, answer.content)

            do_GET = do_POST = do_PUT = do_DELETE = forward

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.dicomweb = f"http://127.0.0.1:{self.httpd.server_address[1]}/dicom-web"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


# -------------------------------------------------------------------------------- data
def _u16(region: str, seed: int) -> np.ndarray:
    return (render_phantom(region, seed, SIZE) * 4095).round().astype(np.uint16)


def write_instances(root: Path) -> dict[str, pydicom.Dataset]:
    """The uploaded instances, also kept as files; name -> dataset (header only)."""
    uid = pydicom.uid.generate_uid
    a, b, c = ({"StudyInstanceUID": uid(), "SeriesInstanceUID": uid()} for _ in range(3))
    study_a = dict(a, PatientID="RN-A", StudyDate="20240110", StudyTime="101500",
                   AccessionNumber="ACC-A", StudyID="1", PatientSex="F")  # fmt: skip
    study_b = dict(b, PatientID="RN-B", StudyDate="20230505", Modality="CR", SOPClassUID=CR_IMAGE)
    specs = {
        "knee.dcm": (_u16("knee", 8101), "MONOCHROME2", dict(study_a, BodyPartExamined="KNEE")),
        # MONOCHROME1 stores bone dark: the reader inverts it back
        "hand_m1.dcm": (4095 - _u16("hand", 8102), "MONOCHROME1", dict(study_a)),
        "hand_says_knee.dcm": (
            _u16("hand", 8103),
            "MONOCHROME2",
            dict(study_a, BodyPartExamined="KNEE"),
        ),  # fmt: skip
        "no_pixels.dcm": (None, "MONOCHROME2", dict(study_a, BodyPartExamined="CHEST")),
        "doomed.dcm": (_u16("elbow", 8104), "MONOCHROME2", dict(study_a)),
        "chest.dcm": (_u16("chest", 8105), "MONOCHROME2", dict(study_b, BodyPartExamined="CHEST")),
        "shoulder.dcm": (4095 - _u16("shoulder", 8106), "MONOCHROME1", dict(study_b)),
        "secondary.dcm": (_u16("pelvis", 8107), "MONOCHROME2", dict(c, Modality="OT")),
    }
    out = {}
    for name, (pixels, photometric, tags) in specs.items():
        path = make_dicom(root / name, pixels, photometric, **tags)
        ds = pydicom.dcmread(path)
        if ds.SOPClassUID != ds.file_meta.MediaStorageSOPClassUID:  # CR: keep meta in step
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.save_as(path, enforce_file_format=True)
        out[name] = ds
    return out


@pytest.fixture(scope="module")
def pacs(orthanc, tmp_path_factory):
    """The instances uploaded with STOW-RS; the files stay in `folder` for the disk run."""
    folder = tmp_path_factory.mktemp("pacs_files")
    instances = write_instances(folder)
    response = orthanc.client().store_instances(list(instances.values()))
    assert not response.get("FailedSOPSequence"), response
    return {"folder": folder, "instances": instances, "before": orthanc.file_hashes()}


def uri(ds: pydicom.Dataset) -> str:
    return f"dicomweb://{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}"


def web_config(ckpt, output: Path, url: str, *overrides: str):
    return compose_config(
        "predict",
        [
            f"ckpt_path={ckpt}",
            "input=dicomweb",
            f"output={output}",
            f"dicomweb.url={url}",
            "dicomweb.auth.type=basic",
            f"dicomweb.auth.username_env={USER_ENV}",
            f"dicomweb.auth.password_env={PASSWORD_ENV}",
            "accelerator=cpu",
            "num_workers=0",
            "batch_size=4",
            *overrides,
        ],
    )


def read_output(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@contextlib.contextmanager
def credentials(orthanc: Orthanc, password: str | None = None):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(USER_ENV, orthanc.user)
        mp.setenv(PASSWORD_ENV, password or orthanc.password)
        yield


class LogLines(logging.Handler):
    """Every log record, formatted, at DEBUG and above."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def web_run(phantom_checkpoint, orthanc, pacs, tmp_path_factory):  # noqa: F811
    """One DICOMweb run storing SRs, with the study view; `doomed.dcm` is deleted between
    the QIDO-RS query and its WADO-RS retrieve. Logs (DEBUG), stdout, stderr captured."""
    out = tmp_path_factory.mktemp("web_run")
    doomed = pacs["instances"]["doomed.dcm"].SOPInstanceUID
    query = dicomweb.find_instances

    def query_then_delete(client, section):
        refs = query(client, section)
        orthanc.delete_instance(doomed)
        return refs

    handler = LogLines()
    root = logging.getLogger()
    level = root.level
    stdout, stderr = io.StringIO(), io.StringIO()
    cfg = web_config(phantom_checkpoint, out / "preds.csv", orthanc.dicomweb,
                     "audit=true", "group_by=study", "dicomweb.store_sr=true")  # fmt: skip
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    client_log = logging.getLogger("dicomweb_client")  # logs each request and its headers
    client_log.setLevel(logging.DEBUG)
    try:
        with credentials(orthanc), pytest.MonkeyPatch.context() as mp:
            mp.setattr(dicomweb, "find_instances", query_then_delete)
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                summary = predict(cfg)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        client_log.setLevel(logging.NOTSET)
    df = read_output(out / "preds.csv")
    return {"summary": summary, "df": df.set_index("sop_uid"), "out": out, "logs": handler.lines,
            "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}  # fmt: skip


# ------------------------------------------------------------------------------ the run
@needs_orthanc
def test_rows_carry_uids_errors_and_the_header_audit(web_run, pacs):
    df, inst, s = web_run["df"], pacs["instances"], web_run["summary"]
    cols = read_output(web_run["out"] / "preds.csv").columns.tolist()
    assert cols == prediction_columns(REGIONS, audit=True, uids=True)
    queried = {n: ds for n, ds in inst.items() if n != "secondary.dcm"}  # OT: not CR/DX
    assert sorted(df.index) == sorted(ds.SOPInstanceUID for ds in queried.values())
    for name, ds in queried.items():
        r = df.loc[ds.SOPInstanceUID]
        assert r["path"] == uri(ds)
        assert (r["study_uid"], r["series_uid"]) == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
        if name not in ("no_pixels.dcm", "doomed.dcm"):
            assert r["status"] == "ok", (name, r["status"])
    assert "no pixel data" in df.loc[inst["no_pixels.dcm"].SOPInstanceUID, "status"]
    gone = df.loc[inst["doomed.dcm"].SOPInstanceUID]
    assert gone["status"].startswith("error: WADO-RS retrieve failed: HTTP 404"), gone["status"]
    assert gone["p_knee"] == "" and gone["region"] == ""
    # the audit reads the retrieved headers: no file behind a dicomweb:// path
    assert df.loc[inst["hand_says_knee.dcm"].SOPInstanceUID, "header_region"] == "knee"
    assert df.loc[inst["no_pixels.dcm"].SOPInstanceUID, "header_region"] == "chest"
    assert (s["ok"], s["errors"]) == (len(queried) - 2, 2)
    assert "radiographs/s" in web_run["stdout"]


@needs_orthanc
def test_dicomweb_predictions_equal_those_of_the_files_on_disk(
    phantom_checkpoint,  # noqa: F811
    web_run,
    orthanc,
    pacs,
    tmp_path,
):
    web, client = web_run["df"], orthanc.client()
    both = [u for u in web.index if web.loc[u, "status"] == "ok"]
    # the same pixels: WADO-RS bytes decoded in memory == the file read from disk
    for name, ds in pacs["instances"].items():
        if ds.SOPInstanceUID in both:
            got = client.retrieve_instance(
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
            )
            assert np.array_equal(dicom_pixels(got, name), read_radiograph(pacs["folder"] / name))
    cfg = compose_config(
        "predict",
        [f"ckpt_path={phantom_checkpoint}", f"input={pacs['folder']}",
         f"output={tmp_path / 'disk.csv'}", "audit=true", "accelerator=cpu", "num_workers=0",
         "batch_size=3"],
    )  # fmt: skip
    predict(cfg)
    disk = read_output(tmp_path / "disk.csv").set_index("sop_uid")
    assert len(both) == 5 and all(disk.loc[u, "status"] == "ok" for u in both)
    for u in both:
        for head in REGIONS:
            # 1e-6, plus float noise: both outputs are rounded to 6 decimals, and other batch
            # compositions can move a probability across a rounding boundary
            diff = abs(float(web.loc[u, f"p_{head}"]) - float(disk.loc[u, f"p_{head}"]))
            assert diff <= 1e-6 + 1e-12, (u, head, diff)
        assert web.loc[u, ["region", "regions", "header_region", "mismatch"]].tolist() == (
            disk.loc[u, ["region", "regions", "header_region", "mismatch"]].tolist()
        )


def _stored_srs(orthanc: Orthanc, studies) -> list[pydicom.Dataset]:
    client, out = orthanc.client(), []
    for study in studies:
        for series in client.search_for_series(study, search_filters={"Modality": "SR"}):
            series_uid = pydicom.Dataset.from_json(series).SeriesInstanceUID
            for item in client.search_for_instances(study, series_uid):
                sop = pydicom.Dataset.from_json(item).SOPInstanceUID
                out.append(client.retrieve_instance(study, series_uid, sop))
    return out


@needs_orthanc
def test_stored_srs_reference_the_source_and_carry_the_region_code(web_run, orthanc, pacs):
    df, summary = web_run["df"], web_run["summary"]
    ok = df[df["status"] == "ok"]
    assert (summary["sr_stored"], summary["sr_failed"]) == (len(ok), 0)
    srs = _stored_srs(orthanc, sorted(set(df["study_uid"])))
    assert len(srs) == len(ok)  # one per classified instance, none for error rows
    classes = {ds.SOPInstanceUID: ds.SOPClassUID for ds in pacs["instances"].values()}
    seen = set()
    for ds in srs:
        sr = hsr.Comprehensive3DSR.from_dataset(ds)
        (group,) = sr.content.get_image_measurement_groups()
        (source,) = group.source_images
        src = source.referenced_sop_instance_uid
        seen.add(src)
        row = ok.loc[src]
        assert source.referenced_sop_class_uid == classes[src]
        assert sr.StudyInstanceUID == row["study_uid"] and sr.Modality == "SR"
        (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
        refs = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence
        assert [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in refs] == [
            (classes[src], src)
        ]
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.name.value == "123014"  # DCM Target Region
        expected = "261665006" if row["region"] == UNKNOWN else region_info(row["region"]).snomed
        assert (evaluation.value.value, evaluation.value.scheme_designator) == (expected, "SCT")
        probs = {m.finding_sites[0].value.value: m.value for m in group.get_measurements()}
        assert len(probs) == len(REGIONS)
        for head in REGIONS:
            assert abs(float(probs[region_info(head).snomed]) - float(row[f"p_{head}"])) <= 1e-6
        items = group[0].ContentSequence  # the group's container
        (name,), (version,) = (
            items.find(c) for c in (codes.DCM.AlgorithmName, codes.DCM.AlgorithmVersion)
        )
        assert name.TextValue.startswith("regionnet/") and " model:" in version.TextValue
    assert seen == set(ok.index)


@needs_orthanc
def test_source_instances_are_unchanged(web_run, orthanc, pacs):
    before, after = pacs["before"], orthanc.file_hashes()
    doomed = pacs["instances"]["doomed.dcm"].SOPInstanceUID  # deleted by the test itself
    for sop, digest in before.items():
        if sop != doomed:
            assert after[sop] == digest, f"source instance {sop} changed"
    added = {sop: modality for sop, (modality, _) in after.items() if sop not in before}
    assert set(added.values()) == {"SR"} and len(added) == web_run["summary"]["sr_stored"]


@needs_orthanc
def test_group_by_study_writes_one_row_per_study(web_run):
    df = web_run["df"]
    path = study_output(web_run["out"] / "preds.csv")
    assert web_run["summary"]["study_output"] == str(path)
    studies = read_output(path).set_index("study_uid")
    assert sorted(studies.index) == sorted(set(df["study_uid"]))  # the OT study: not queried
    for study, rows in df.groupby("study_uid"):
        got, ok = studies.loc[study], rows[rows["status"] == "ok"]
        assert (int(got["images"]), int(got["errors"])) == (len(ok), len(rows) - len(ok))
        for region in (*REGIONS, UNKNOWN):
            assert int(got[f"n_{region}"]) == (ok["region"] == region).sum()
        assert set(filter(None, got["regions"].split(";"))) == set(ok["region"])
        off = sorted(rows.index[rows["mismatch"] == "true"])
        assert sorted(filter(None, got["mismatched"].split(";"))) == off
        assert int(got["n_mismatched"]) == len(off)


@needs_orthanc
def test_credentials_never_reach_logs_or_outputs(web_run, orthanc):
    secret = orthanc.password
    basic = base64.b64encode(f"{orthanc.user}:{secret}".encode()).decode()
    logs = "\n".join(web_run["logs"])
    assert "QIDO-RS" in logs and "GET: " in logs and "POST: " in logs  # HTTP DEBUG captured
    texts = [logs, web_run["stdout"], web_run["stderr"]]
    texts += [f.read_text() for f in web_run["out"].rglob("*") if f.is_file()]
    for text in texts:
        assert secret not in text and basic not in text


@needs_orthanc
def test_resume_skips_done_instances_and_takes_new_ones(
    phantom_checkpoint,  # noqa: F811
    web_run,
    orthanc,
    tmp_path,
):
    out = tmp_path / "preds.csv"
    shutil.copy(web_run["out"] / "preds.csv", out)
    done = len(web_run["df"])
    with credentials(orthanc):
        args = (phantom_checkpoint, out, orthanc.dicomweb, "audit=true", "resume=true")
        again = predict(web_config(*args))
        # doomed.dcm is gone from the server; the stored SRs are not queried
        assert (again["resumed"], again["ok"], again["errors"]) == (done - 1, 0, 0)
        new = make_dicom(tmp_path / "new.dcm", _u16("knee", 8201), PatientID="RN-D")
        orthanc.client().store_instances([pydicom.dcmread(new)])
        more = predict(web_config(*args))
    assert (more["resumed"], more["ok"] + more["errors"]) == (done - 1, 1)
    df = read_output(out)
    assert df["path"].is_unique and len(df) == done + 1
    assert df["path"].iloc[-1] == uri(pydicom.dcmread(new))


@needs_orthanc
def test_qido_filters_patient_dates_modalities_and_study(orthanc, pacs):
    inst = pacs["instances"]
    client = orthanc.client()

    def sops(**section):
        refs = find_instances(client, {"modalities": ["CR", "DX"], **section})
        return {r.sop_uid for r in refs}

    study_b = {inst[n].SOPInstanceUID for n in ("chest.dcm", "shoulder.dcm")}
    assert sops(patient_id="RN-B") == study_b
    assert sops(modalities=["CR"]) == study_b
    in_2024 = sops(date_from="2024-01-01", date_to=20241231)
    assert inst["knee.dcm"].SOPInstanceUID in in_2024 and not in_2024 & study_b
    assert sops(study_uid=inst["chest.dcm"].StudyInstanceUID) == study_b
    assert sops(modalities=["OT"]) == {inst["secondary.dcm"].SOPInstanceUID}


TOKEN_ENV = "REGIONNET_TEST_DICOMWEB_TOKEN"


@pytest.fixture
def bearer(orthanc):
    """A `BearerProxy` in front of the module's Orthanc, with a fresh random token."""
    proxy = BearerProxy(orthanc, secrets.token_urlsafe(24))
    try:
        yield proxy
    finally:
        proxy.close()


def bearer_config(ckpt, output: Path, url: str, *overrides: str):
    return web_config(ckpt, output, url, "dicomweb.auth.type=bearer",
                      f"dicomweb.auth.token_env={TOKEN_ENV}", *overrides)  # fmt: skip


@contextlib.contextmanager
def captured_logs() -> Iterator[list[str]]:
    """Every log line at DEBUG (dicomweb-client logs each request with its headers)."""
    handler, root = LogLines(), logging.getLogger()
    level, client_log = root.level, logging.getLogger("dicomweb_client")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    client_log.setLevel(logging.DEBUG)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        client_log.setLevel(logging.NOTSET)


def classified_sops(orthanc: Orthanc) -> set[str]:
    return {r.sop_uid for r in find_instances(orthanc.client(), {"modalities": ["CR", "DX"]})}


@needs_orthanc
def test_bearer_token_from_token_env_authorises_every_request(
    phantom_checkpoint,  # noqa: F811
    orthanc,
    pacs,
    bearer,
    tmp_path,
    monkeypatch,
):
    """dicomweb.auth.type=bearer: QIDO-RS, WADO-RS and the SRs' STOW-RS all carry
    `Authorization: Bearer <the value of token_env>`, through a bearer-checking proxy to the
    real Orthanc; the token is never logged or written."""
    expected, before = classified_sops(orthanc), orthanc.file_hashes()
    monkeypatch.setenv(TOKEN_ENV, bearer.token)
    for name in (USER_ENV, PASSWORD_ENV):  # no basic credentials to fall back on
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "preds.csv"
    stdout, stderr = io.StringIO(), io.StringIO()
    with (
        captured_logs() as logs,
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        summary = predict(bearer_config(phantom_checkpoint, out, bearer.dicomweb,
                                        "dicomweb.store_sr=true"))  # fmt: skip
    df = read_output(out).set_index("sop_uid")
    assert set(df.index) == expected
    no_pixels = pacs["instances"]["no_pixels.dcm"].SOPInstanceUID
    ok = df[df["status"] == "ok"]
    assert set(df.index) - set(ok.index) == {no_pixels}, df["status"].to_dict()
    assert (summary["sr_stored"], summary["sr_failed"]) == (len(ok), 0)
    assert set(ok["sr_status"]) == {"stored"}
    # every request reached the proxy with the token; reads and the SRs' writes
    assert bearer.seen and all(accepted for _, _, accepted, _ in bearer.seen), bearer.seen
    methods = {(m, "/studies" in p) for m, p, _, _ in bearer.seen}
    assert ("GET", True) in methods and ("POST", True) in methods
    # the SRs went through the proxy into Orthanc; the sources are unchanged
    after = orthanc.file_hashes()
    added = {sop for sop in after if sop not in before}
    assert all(after[sop] == before[sop] for sop in before)
    assert len(added) == len(ok) and {after[sop][0] for sop in added} == {"SR"}
    texts = ["\n".join(logs), stdout.getvalue(), stderr.getvalue()]
    texts += [f.read_text(errors="replace") for f in tmp_path.rglob("*") if f.is_file()]
    assert "GET: " in texts[0] and "POST: " in texts[0]  # the request log was captured
    assert not any(bearer.token in text for text in texts)
    for sop in added:  # leave the server as the other tests expect it
        orthanc.delete_instance(sop)


@needs_orthanc
def test_a_wrong_bearer_token_is_a_clear_401_without_the_token(
    phantom_checkpoint,  # noqa: F811
    orthanc,
    bearer,
    tmp_path,
    monkeypatch,
):
    wrong = "not-" + secrets.token_urlsafe(16)
    monkeypatch.setenv(TOKEN_ENV, wrong)
    out = tmp_path / "preds.csv"
    with pytest.raises(DicomWebError, match="HTTP 401") as err:
        predict(bearer_config(phantom_checkpoint, out, bearer.dicomweb))
    assert TOKEN_ENV in str(err.value) and bearer.dicomweb in str(err.value)
    assert wrong not in str(err.value) and not out.exists()
    assert bearer.seen and not any(accepted for _, _, accepted, _ in bearer.seen)
    assert {scheme for *_, scheme in bearer.seen} == {"Bearer"}
    # the right token straight to Orthanc (basic auth only) is refused too: only the proxy
    # turns it into access, so the proxy run above really went through the token
    monkeypatch.setenv(TOKEN_ENV, bearer.token)
    with pytest.raises(DicomWebError, match="HTTP 401"):
        predict(bearer_config(phantom_checkpoint, out, orthanc.dicomweb))


@pytest.fixture(scope="module")
def sr_orthanc(orthanc, tmp_path_factory):
    """A second Orthanc (same credentials: dicomweb.sr_url shares dicomweb.auth) for SRs."""
    tmp = tmp_path_factory.mktemp("orthanc_sr")
    with running_orthanc(tmp, orthanc.user, orthanc.password) as server:
        yield server


@needs_orthanc
def test_srs_go_to_sr_url_and_not_to_the_source_server(
    phantom_checkpoint,  # noqa: F811
    orthanc,
    sr_orthanc,
    pacs,
    tmp_path,
):
    before = orthanc.file_hashes()
    assert sr_orthanc.file_hashes() == {}
    out = tmp_path / "preds.csv"
    with credentials(orthanc):
        summary = predict(web_config(phantom_checkpoint, out, orthanc.dicomweb,
                                     "dicomweb.store_sr=true",
                                     f"dicomweb.sr_url={sr_orthanc.dicomweb}"))  # fmt: skip
    df = read_output(out).set_index("sop_uid")
    ok = df[df["status"] == "ok"]
    assert len(ok) >= 5 and set(ok["sr_status"]) == {"stored"}
    assert (summary["sr_stored"], summary["sr_failed"]) == (len(ok), 0)
    assert orthanc.file_hashes() == before  # nothing stored on the source server
    stored = sr_orthanc.file_hashes()
    assert len(stored) == len(ok) and {m for m, _ in stored.values()} == {"SR"}
    srs = _stored_srs(sr_orthanc, sorted(set(ok["study_uid"])))
    assert sorted(ds.SOPInstanceUID for ds in srs) == sorted(stored)
    sources = set()
    for ds in srs:
        (group,) = hsr.Comprehensive3DSR.from_dataset(ds).content.get_image_measurement_groups()
        (source,) = group.source_images
        src = source.referenced_sop_instance_uid
        sources.add(src)
        # in the source's study, on the other server
        assert ds.StudyInstanceUID == ok.loc[src, "study_uid"]
    assert sources == set(ok.index)


def test_server_down_names_the_url(phantom_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    """Needs no Orthanc: nothing listens at the URL."""
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    cfg = web_config(phantom_checkpoint, tmp_path / "p.csv", url, "dicomweb.retries=0")
    monkeypatch.setenv(USER_ENV, "regionnet")
    monkeypatch.setenv(PASSWORD_ENV, secrets.token_urlsafe(12))
    with pytest.raises(DicomWebError, match="cannot reach") as err:
        predict(cfg)
    assert url in str(err.value) and "dicomweb.url" in str(err.value)
    assert not (tmp_path / "p.csv").exists()


@needs_orthanc
def test_wrong_password_is_a_clear_401_without_the_secret(
    phantom_checkpoint,  # noqa: F811
    orthanc,
    pacs,
    tmp_path,
):
    wrong = "not-" + secrets.token_urlsafe(12)
    exe = shutil.which("regionnet-predict")
    cmd = (
        [exe] if exe else [sys.executable, "-c", "from regionnet.cli import predict_main as m; m()"]
    )
    args = [
        f"ckpt_path={phantom_checkpoint}",
        "input=dicomweb",
        f"dicomweb.url={orthanc.dicomweb}",
        "dicomweb.auth.type=basic",
        f"dicomweb.auth.username_env={USER_ENV}",
        f"dicomweb.auth.password_env={PASSWORD_ENV}",
        "output=preds.csv",
        "accelerator=cpu",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    env = dict(os.environ, **{USER_ENV: orthanc.user, PASSWORD_ENV: wrong})
    done = subprocess.run(cmd + args, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    text = done.stdout + done.stderr
    assert done.returncode != 0
    assert "HTTP 401" in text and orthanc.dicomweb in text and PASSWORD_ENV in text, text[-2000:]
    assert wrong not in text
    for f in tmp_path.rglob("*"):
        assert not f.is_file() or wrong not in f.read_text(errors="replace"), f
    assert not (tmp_path / "preds.csv").exists()


# ---------------------------------------------------------------------------- the parts
def test_server_settings_refuse_secrets_in_the_url_and_name_missing_variables(monkeypatch):
    with pytest.raises(ValueError, match="must not hold credentials"):
        Server.from_config({"url": "https://me:pw@pacs.example.org/dicom-web"})
    with pytest.raises(ValueError, match="http"):
        Server.from_config({"url": "pacs.example.org/dicom-web"})
    with pytest.raises(ValueError, match="dicomweb.url"):
        Server.from_config({})
    with pytest.raises(ValueError, match="auth.type"):
        Server.from_config({"url": "https://pacs.example.org", "auth": {"type": "kerberos"}})
    server = Server.from_config(
        {
            "url": "https://pacs.example.org/dicom-web/",
            "auth": {"type": "bearer", "token_env": "RN_TEST_TOKEN"},
        }  # fmt: skip
    )
    assert server.url == "https://pacs.example.org/dicom-web" and server.verify_tls is True
    monkeypatch.delenv("RN_TEST_TOKEN", raising=False)
    with pytest.raises(ValueError, match="RN_TEST_TOKEN is not set"):
        server.session()
    monkeypatch.setenv("RN_TEST_TOKEN", "tok-123-secret")
    session = server.session()
    assert session.verify is True and "tok-123-secret" not in repr(session.auth)
    request = session.auth(requests.Request("GET", server.url).prepare())
    assert request.headers["Authorization"] == "Bearer tok-123-secret"
    assert isinstance(session.auth, BearerAuth)
    missing_ca = {"url": "https://pacs.example.org", "ca_bundle": "/nowhere/ca.pem"}
    with pytest.raises(ValueError, match="ca_bundle"):
        Server.from_config(missing_ca).session()


def test_study_date_ranges():
    assert study_date_range("2024-01-01", 20241231) == "20240101-20241231"
    assert study_date_range(None, "2024-02-01") == "-20240201"
    assert study_date_range("20240101", None) == "20240101-"
    assert study_date_range(None, None) is None
    with pytest.raises(ValueError, match="date_from"):
        study_date_range("Jan 2024", None)
    with pytest.raises(ValueError, match="after"):
        study_date_range("20250101", "20240101")


def test_region_concepts_code_unknown_and_local_regions():
    from regionnet.sr import LOCAL_SCHEME, region_concept

    knee = region_concept("knee")
    assert (knee.value, knee.scheme_designator) == (region_info("knee").snomed, "SCT")
    unknown = region_concept(UNKNOWN)
    assert (unknown.value, unknown.scheme_designator, unknown.meaning) == (
        "261665006", "SCT", "Unknown"
    )  # fmt: skip
    assert region_concept("paw").scheme_designator == LOCAL_SCHEME


def test_file_only_options_are_refused_for_dicomweb(tmp_path):
    cfg = compose_config(
        "predict",
        ["ckpt_path=none.ckpt", "input=dicomweb", f"output={tmp_path / 'p.csv'}",
         f"dicom.write_body_part={tmp_path / 'copies'}"],
    )  # fmt: skip
    with pytest.raises(ValueError, match="store_sr"):
        predict(cfg)
