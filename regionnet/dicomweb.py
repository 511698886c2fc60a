"""Radiographs straight from a PACS over DICOMweb: QIDO-RS finds them, WADO-RS fetches them.

    regionnet-predict ckpt_path=best.ckpt input=dicomweb output=preds.csv \\
        dicomweb.url=https://pacs.example.org/dicom-web dicomweb.study_uid=1.2.840...

`find_instances` asks for the studies that match the filters (StudyInstanceUID, PatientID,
a StudyDate range; one query per `ModalitiesInStudy` value, CR and DX by default), then for
their series, keeping only series whose Modality is one of those (so the SRs regionnet writes
back, Modality SR, are never classified), then for the series' instances. `DicomWebDataset`
retrieves one instance per item with WADO-RS into memory (dicomweb-client hands the multipart
body to pydicom through BytesIO; nothing is written to disk) and decodes it with the reader
and transforms that files go through, so an instance gives the probabilities its file gives.

A failed retrieve (404, a server error for that instance, a body pydicom cannot parse) is an
error row and the run goes on; a request still failing after its retries names the HTTP
status of the last answer ("HTTP 503 Service Unavailable after 4 attempts"), and
`resume=retry_errors` tries such rows again. An instance sent without the 128-byte preamble
and `DICM` prefix (dicomweb-client's own `store_instances` writes them so, and servers that
keep what they receive send them back so) is read with pydicom's `force=True` when the
response names its transfer syntax (`transfer-syntax=` of the part's Content-Type).
The server going away or refusing the credentials stops the run with a `DicomWebError` naming
the URL: every later instance would fail the same way, and `resume=true` carries on from the
rows already written.

Credentials come only from environment variables whose *names* the config holds
(`dicomweb.auth.username_env`/`password_env` for HTTP basic, `token_env` for a bearer token);
a URL with `user:password@` is refused. TLS certificates are verified unless
`dicomweb.verify_tls=false`; `dicomweb.ca_bundle` names a site CA. Those two settings win
over the environment: requests would otherwise let `REQUESTS_CA_BUNDLE`/`CURL_CA_BUNDLE`
replace them on every request. With `verify_tls=true` and no `ca_bundle`, those variables
apply as usual (else certifi's CAs); proxies come from the environment as usual. dicomweb-client and
highdicom come with the `pacs` extra (`pip install -e ".[pacs]"`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from typing import Any
from urllib.parse import quote, urlsplit

import pydicom
import requests
import torch
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from torch.utils.data import Dataset as TorchDataset

from regionnet.data.dataset import collate
from regionnet.io import RadiographReadError, dataset_header, dicom_pixels
from regionnet.writer import DICOMWEB_SCHEME, uri_uids

log = logging.getLogger(__name__)

AUTH_TYPES = ("none", "basic", "bearer")
QIDO_PAGE = 500  # results per QIDO-RS request (limit/offset paging; servers may cap pages)


class DicomWebError(RuntimeError):
    """The DICOMweb server cannot be used: unreachable, refusing credentials, TLS failing."""


@dataclass(frozen=True)
class InstanceRef:
    """One instance found by QIDO-RS; `uri` is its `path` in the output."""

    study_uid: str
    series_uid: str
    sop_uid: str

    @property
    def uri(self) -> str:
        return f"{DICOMWEB_SCHEME}{self.study_uid}/{self.series_uid}/{self.sop_uid}"

    @classmethod
    def from_uri(cls, uri: str) -> InstanceRef:
        uids = uri_uids(uri)
        return cls(uids["study_uid"], uids["series_uid"], uids["sop_uid"])


class BearerAuth(requests.auth.AuthBase):
    """`Authorization: Bearer <token>` on every request; its repr never shows the token."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(<token from the environment>)"


class ConfigVerifySession(requests.Session):
    """A requests session whose `verify` (the config's `verify_tls`/`ca_bundle`) is not
    replaced by `REQUESTS_CA_BUNDLE`/`CURL_CA_BUNDLE`: requests merges those into every
    request over `session.verify` while `trust_env` is on (it stays on for the proxies).
    `pinned=False` (verify_tls=true without ca_bundle) keeps requests' behaviour."""

    def __init__(self, pinned: bool = True):
        super().__init__()
        self.pinned = pinned

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if self.pinned and verify is None:  # not set for this one request: the config's
            settings["verify"] = self.verify
        return settings


def _require_client():
    try:
        import dicomweb_client
    except ImportError as e:
        raise ImportError(
            "input=dicomweb needs dicomweb-client and highdicom: pip install -e '.[pacs]'"
        ) from e
    return dicomweb_client


@dataclass(frozen=True)
class Server:
    """A DICOMweb root and how to talk to it. Holds the names of the environment variables
    with the credentials, never their values, so it pickles safely into loader workers."""

    url: str
    auth: str = "none"
    username_env: str | None = None
    password_env: str | None = None
    token_env: str | None = None
    verify_tls: bool = True
    ca_bundle: str | None = None
    timeout: float = 60.0
    retries: int = 3
    key: str = "dicomweb.url"  # the config key named in messages

    @classmethod
    def from_config(cls, section: Mapping, url: str | None = None, key: str = "dicomweb.url"):
        url = str(url if url is not None else section.get("url") or "").strip().rstrip("/")
        if not url:
            raise ValueError(
                f"input=dicomweb needs {key}=https://<server>/<dicomweb root> "
                "(Orthanc: http://127.0.0.1:8042/dicom-web)"
            )
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{key}={url!r} is not an http(s) URL")
        if parts.username or parts.password:
            raise ValueError(
                f"{key} must not hold credentials (user:password@); put them in environment "
                "variables named by dicomweb.auth.username_env/password_env or token_env"
            )
        auth = dict(section.get("auth") or {})
        kind = str(auth.get("type") or "none").lower()
        if kind not in AUTH_TYPES:
            raise ValueError(f"dicomweb.auth.type={kind!r}: choose one of {', '.join(AUTH_TYPES)}")
        if parts.scheme == "http" and kind != "none" and parts.hostname not in _LOOPBACK:
            log.warning("%s: credentials over plain http to %s; use https", key, parts.hostname)
        verify = bool(section.get("verify_tls", True))
        if not verify:
            log.warning("dicomweb.verify_tls=false: the server's certificate is not checked")
        ca_bundle = section.get("ca_bundle")
        return cls(
            url=url,
            auth=kind,
            username_env=auth.get("username_env"),
            password_env=auth.get("password_env"),
            token_env=auth.get("token_env"),
            verify_tls=verify,
            ca_bundle=str(ca_bundle) if ca_bundle else None,
            timeout=float(section.get("timeout") or 60),
            retries=max(0, int(section.get("retries") or 0)),
            key=key,
        )

    def env_names(self) -> list[str]:
        """The environment variables this server's credentials come from."""
        if self.auth == "basic":
            return [str(self.username_env), str(self.password_env)]
        return [str(self.token_env)] if self.auth == "bearer" else []

    def session(self) -> requests.Session:
        """A requests session with the credentials (read now from the environment) and the
        TLS settings."""
        verify: bool | str = self.verify_tls
        if self.ca_bundle and self.verify_tls:
            verify = os.path.expanduser(os.path.expandvars(self.ca_bundle))
            if not os.path.isfile(verify):
                raise ValueError(f"dicomweb.ca_bundle: CA bundle file does not exist: {verify}")
        session = ConfigVerifySession(pinned=verify is not True)
        session.verify = verify
        if self.auth == "basic":
            user = _secret(self.username_env, "username_env")
            password = _secret(self.password_env, "password_env")
            session.auth = requests.auth.HTTPBasicAuth(user, password)
        elif self.auth == "bearer":
            session.auth = BearerAuth(_secret(self.token_env, "token_env"))
        return session

    def client(self):
        """A `dicomweb_client.DICOMwebClient` for this server. It retries a request that
        fails to connect or gets 408/429/503/504 `retries` times, waiting 2, 4, 8, ... s."""
        dicomweb_client = _require_client()
        client = dicomweb_client.DICOMwebClient(
            self.url, session=self.session(), timeout=self.timeout
        )
        client.set_http_retry_params(retry=self.retries > 0, max_attempts=self.retries + 1)
        return client


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _secret(env: str | None, key: str) -> str:
    if not env:
        raise ValueError(
            f"dicomweb.auth.{key} is empty: name the environment variable that holds the secret"
        )
    value = os.environ.get(str(env), "")
    if not value:
        raise ValueError(
            f"dicomweb.auth.{key}: environment variable {env} is not set; export it before "
            "running (credentials are never taken from the command line or the config)"
        )
    return value


def retry_failure(e: Exception) -> tuple[str, int] | None:
    """(`HTTP <status> <reason>`, attempts) of a request that dicomweb-client's retrying gave
    up on (its `RetryError` holds the last response), else None."""
    attempt = getattr(e, "last_attempt", None)
    if attempt is None or type(e).__name__ != "RetryError":
        return None
    number = int(getattr(attempt, "attempt_number", 0) or 0)
    value = getattr(attempt, "value", None)
    if getattr(attempt, "has_exception", False):
        error = value[1] if isinstance(value, tuple) and len(value) > 1 else value
        return f"{type(error).__name__}: {error}", number
    if isinstance(value, requests.Response):
        return f"HTTP {value.status_code} {value.reason or ''}".strip(), number
    return repr(value), number


def _network_reason(e: Exception) -> str:
    """'[Errno 111] Connection refused' out of urllib3's nested message."""
    found = re.search(r"\[Errno -?\d+\][^'\")]*", str(e))
    return found.group(0).strip() if found else type(e).__name__


@contextmanager
def reporting(server: Server, action: str) -> Iterator[None]:
    """Turn a request that cannot reach or is refused by the server into a `DicomWebError`
    naming the config key and URL; never prints credentials (none are in URLs)."""
    where = f"{server.key}={server.url}"
    try:
        yield
    except requests.exceptions.SSLError as e:
        raise DicomWebError(
            f"{action}: TLS verification failed for {where} ({_network_reason(e)}); set "
            "dicomweb.ca_bundle=<your site's CA .pem> (dicomweb.verify_tls=false only for tests)"
        ) from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        raise DicomWebError(
            f"{action}: cannot reach {where} ({_network_reason(e)}); check the URL and that "
            "the server is running"
        ) from None
    except requests.exceptions.HTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        if status in (401, 403):
            names = server.env_names()
            hint = (
                f"check the values of the environment variables {', '.join(names)} "
                f"(dicomweb.auth.type={server.auth})"
                if names
                else "the server wants credentials: set dicomweb.auth.type=basic or bearer "
                "and the environment variables it names"
            )
            raise DicomWebError(
                f"{action}: {where} refused the request (HTTP {status} "
                f"{'Unauthorized' if status == 401 else 'Forbidden'}); {hint}"
            ) from None
        raise DicomWebError(f"{action}: {where} answered HTTP {status} ({e})") from None
    except Exception as e:  # dicomweb-client's RetryError: its last answer
        failure = retry_failure(e)
        if failure is None:
            raise
        raise DicomWebError(
            f"{action}: {where} answered {failure[0]} after {failure[1]} attempts "
            "(dicomweb.retries); try again later"
        ) from None


# ------------------------------------------------------------------------------- QIDO-RS
def study_date_range(date_from: Any = None, date_to: Any = None) -> str | None:
    """The QIDO-RS StudyDate range ('20240101-20241231', either end open) or None."""

    def norm(value: Any, key: str) -> str:
        if value is None or str(value).strip() == "":
            return ""
        text = str(value).strip().replace("-", "")
        if not re.fullmatch(r"\d{8}", text):
            raise ValueError(f"dicomweb.{key}={value!r}: give a date as YYYYMMDD or YYYY-MM-DD")
        return text

    lo, hi = norm(date_from, "date_from"), norm(date_to, "date_to")
    if lo and hi and lo > hi:
        raise ValueError(f"dicomweb.date_from={lo} is after dicomweb.date_to={hi}")
    return f"{lo}-{hi}" if lo or hi else None


def study_filters(section: Mapping) -> dict[str, str]:
    """QIDO-RS study-level search filters from the `dicomweb` config section."""
    filters = {}
    if section.get("study_uid"):
        filters["StudyInstanceUID"] = str(section["study_uid"])
    if section.get("patient_id"):
        filters["PatientID"] = str(section["patient_id"])
    dates = study_date_range(section.get("date_from"), section.get("date_to"))
    if dates:
        filters["StudyDate"] = dates
    return filters


def _paged(search: Callable[..., list], uid: str, **kwargs) -> Iterator[Dataset]:
    """Every result of a QIDO-RS search, page by page (limit/offset); stops if a server
    ignores `offset` and sends the same page again."""
    offset, seen = 0, set()
    while True:
        page = [
            Dataset.from_json(item) for item in search(limit=QIDO_PAGE, offset=offset, **kwargs)
        ]
        new = [ds for ds in page if ds.get(uid) not in seen]
        if page and not new:
            log.warning("QIDO-RS: the server repeats results and ignores offset; stopping")
            return
        for ds in new:
            seen.add(ds.get(uid))
            yield ds
        if len(page) < QIDO_PAGE:
            return
        offset += len(page)


def find_instances(client, section: Mapping) -> list[InstanceRef]:
    """The instances of CR/DX (dicomweb.modalities) series in the matching studies, sorted."""
    modalities = [str(m).upper() for m in section.get("modalities") or ()]
    if not modalities:
        raise ValueError("dicomweb.modalities is empty; give e.g. [CR, DX]")
    filters = study_filters(section)
    studies: set[str] = set()
    for modality in modalities:  # one value per query: servers differ on lists
        query = {**filters, "ModalitiesInStudy": modality}
        for ds in _paged(client.search_for_studies, "StudyInstanceUID", search_filters=query):
            studies.add(str(ds.StudyInstanceUID))
    refs = []
    for study in sorted(studies):
        for series in _paged(
            client.search_for_series, "SeriesInstanceUID", study_instance_uid=study
        ):
            if str(series.get("Modality", "")).upper() not in modalities:
                continue  # e.g. the SR series regionnet stores
            uid = str(series.SeriesInstanceUID)
            found = _paged(
                client.search_for_instances,
                "SOPInstanceUID",
                study_instance_uid=study,
                series_instance_uid=uid,
            )
            refs += [InstanceRef(study, uid, str(ds.SOPInstanceUID)) for ds in found]
    log.info(
        "QIDO-RS: %d instances in %d studies (%s, modalities %s)",
        len(refs),
        len(studies),
        filters or "no filters",
        "/".join(modalities),
    )
    return sorted(refs, key=lambda r: (r.study_uid, r.series_uid, r.sop_uid))


# ------------------------------------------------------------------------------- WADO-RS
RETRIEVE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _content_type(value: str) -> tuple[str, dict[str, str]]:
    """(media type, {parameter: value}) of a Content-Type header, lower-case names."""
    media, *params = (p.strip() for p in value.split(";"))
    out = {}
    for item in params:
        name, _, val = item.partition("=")
        out[name.strip().lower()] = val.strip().strip('"')
    return media.lower(), out


def _multipart(body: bytes, boundary: str) -> Iterator[tuple[dict[str, str], bytes]]:
    """(headers with lower-case names, content) of each part of a multipart body."""
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    for chunk in (b"\r\n" + body).split(delimiter)[1:]:  # [0]: the preamble
        if chunk.startswith(b"--"):  # the close delimiter
            return
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        headers = {}
        for line in head.split(b"\r\n")[1:]:  # [0]: the rest of the delimiter line
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        yield headers, content


def read_instance(content: bytes, transfer_syntax: str | None = None) -> Dataset:
    """A retrieved instance as a pydicom Dataset. Without the preamble and `DICM` prefix
    pydicom refuses the bytes; when the response named their transfer syntax they are read
    with `force=True`, which stands in for missing file meta information."""
    try:
        return pydicom.dcmread(BytesIO(content))
    except InvalidDicomError:
        if not transfer_syntax:
            raise
    ds = pydicom.dcmread(BytesIO(content), force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(transfer_syntax)
    return ds


def retrieve_instance(client, url: str, ref: InstanceRef) -> Dataset:
    """WADO-RS Retrieve Instance of `ref` from the DICOMweb root `url` through `client`'s
    session and retries, read by `read_instance` (dicomweb-client's own `retrieve_instance`
    parses without the response's transfer syntax, so it cannot read such instances)."""
    get = getattr(client, "_http_get", None)
    if get is None:  # a dicomweb-client without it: its own reader
        return client.retrieve_instance(ref.study_uid, ref.series_uid, ref.sop_uid)
    uids = (quote(u, safe="") for u in (ref.study_uid, ref.series_uid, ref.sop_uid))
    response = get(
        "{}/studies/{}/series/{}/instances/{}".format(url, *uids),
        headers={"Accept": RETRIEVE_ACCEPT},
    )
    media, params = _content_type(response.headers.get("Content-Type", ""))
    if media == "multipart/related" and params.get("boundary"):
        parts = list(_multipart(response.content, params["boundary"]))
    else:  # a single part sent bare, which some servers do
        parts = [({"content-type": response.headers.get("Content-Type", "")}, response.content)]
    if len(parts) != 1:
        raise ValueError(f"the server sent {len(parts)} instances for one SOP Instance UID")
    headers, content = parts[0]
    syntax = _content_type(headers.get("content-type", ""))[1].get("transfer-syntax")
    syntax = syntax or params.get("transfer-syntax")
    return read_instance(content, syntax if syntax and syntax != "*" else None)


def retrieve_error(e: Exception) -> str:
    """Why one instance could not be retrieved, in one line; after retries, the HTTP status
    of the last answer."""
    if isinstance(e, requests.exceptions.HTTPError) and e.response is not None:
        return f"WADO-RS retrieve failed: HTTP {e.response.status_code} {e.response.reason}"
    failure = retry_failure(e)
    if failure is not None:
        return f"WADO-RS retrieve failed: {failure[0]} after {failure[1]} attempts"
    return f"WADO-RS retrieve failed: {type(e).__name__}: {e}"


def server_failure(e: Exception) -> bool:
    """Whether a failed request says the server (not one instance) cannot be used: no
    connection, TLS failing, credentials refused. A read timeout is the instance's."""
    if isinstance(e, requests.exceptions.ConnectionError):  # includes SSL and connect timeouts
        return True
    response = getattr(e, "response", None)
    return (
        isinstance(e, requests.exceptions.HTTPError)
        and response is not None
        and (response.status_code in (401, 403))
    )


class DicomWebDataset(TorchDataset):
    """Instances retrieved one per item with WADO-RS, decoded like files.

    A sample is the `RadiographDataset` sample plus `header` (the audit tags); unreadable
    pixels give `{path, index, error, header}`, a failed retrieve `{path, index, error}`.
    `keep_datasets` adds `dataset`, the instance without its pixel data, for the SR; `target`
    decodes at reduced size for a model of that `image_size`, as `RadiographDataset` does.
    """

    def __init__(
        self,
        server: Server,
        paths: Sequence[str],
        transform: Callable[[torch.Tensor], torch.Tensor],
        keep_datasets: bool = False,
        target: int | None = None,
    ):
        self.server = server
        self.paths = list(paths)
        self.refs = [InstanceRef.from_uri(p) for p in self.paths]
        self.transform = transform
        self.keep_datasets = keep_datasets
        # the model's image_size: decoded at reduced size exactly as files on disk are
        # (read_radiograph(path, target=)), so an instance and its file give the same row
        self.target = target
        self._client = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.refs)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = state["_pid"] = None  # each loader worker opens its own session
        return state

    def client(self):
        if self._client is None or self._pid != os.getpid():
            self._client, self._pid = self.server.client(), os.getpid()
        return self._client

    def __getitem__(self, i: int) -> dict:
        ref, path = self.refs[i], self.paths[i]
        try:
            ds = retrieve_instance(self.client(), self.server.url, ref)
        except Exception as e:
            if server_failure(e):  # every later instance would fail too: stop
                with reporting(self.server, "WADO-RS retrieve"):
                    raise
            # 404 or a server error for this instance, a body pydicom cannot parse: a row
            return self._failed(path, i, retrieve_error(e), e)
        sample: dict = {"path": path, "index": i, "header": dataset_header(ds)}
        try:
            pixels = dicom_pixels(ds, path, target=self.target)
        except RadiographReadError as e:
            log.warning("skipping unreadable instance: %s", e)
            sample["error"] = e.reason
        else:
            sample["image"] = self.transform(torch.from_numpy(pixels)[None])
            sample["labels"] = torch.zeros(0)  # no labels at prediction time
        if self.keep_datasets:
            for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
                if tag in ds:
                    delattr(ds, tag)
            sample["dataset"] = ds
        return sample

    @staticmethod
    def _failed(path: str, i: int, why: str, e: Exception) -> dict:
        log.warning("%s: %s", path, why)
        log.debug("retrieve of %s failed", path, exc_info=e)
        return {"path": path, "index": i, "error": why}


def dicomweb_collate(samples: list[dict]) -> dict:
    """`collate` plus `headers` and `datasets` (path -> value) for the writer and the SRs."""
    batch = collate(samples)
    batch["headers"] = {s["path"]: s["header"] for s in samples if "header" in s}
    batch["datasets"] = {s["path"]: s["dataset"] for s in samples if "dataset" in s}
    return batch


def dicomweb_inputs(section: Mapping) -> tuple[Server, list[str]]:
    """(the server, the `dicomweb://` paths of the matching instances) for `input=dicomweb`."""
    for name in ("dicomweb_client", "highdicom"):  # a line per request / copied attribute
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)
    server = Server.from_config(section)
    client = server.client()
    with reporting(server, "QIDO-RS query"):
        refs = find_instances(client, section)
    if not refs:
        log.warning("%s: no %s instances match the filters", server.url, section.get("modalities"))
    return server, [r.uri for r in refs]
