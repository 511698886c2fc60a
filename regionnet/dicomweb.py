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
error row and the run goes on. The server going away or refusing the credentials stops the
run with a `DicomWebError` naming the URL: every later instance would fail the same way, and
`resume=true` carries on from the rows already written.

Credentials come only from environment variables whose *names* the config holds
(`dicomweb.auth.username_env`/`password_env` for HTTP basic, `token_env` for a bearer token);
a URL with `user:password@` is refused. TLS certificates are verified unless
`dicomweb.verify_tls=false`; `dicomweb.ca_bundle` names a site CA. dicomweb-client and
highdicom come with the `pacs` extra (`pip install -e ".[pacs]"`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
import torch
from pydicom import Dataset
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
        from dicomweb_client.session_utils import (
            add_certs_to_session,
            create_session,
            create_session_from_auth,
        )

        if self.auth == "basic":
            user = _secret(self.username_env, "username_env")
            password = _secret(self.password_env, "password_env")
            session = create_session_from_auth(requests.auth.HTTPBasicAuth(user, password))
        elif self.auth == "bearer":
            session = create_session_from_auth(BearerAuth(_secret(self.token_env, "token_env")))
        else:
            session = create_session()
        session.verify = self.verify_tls
        if self.ca_bundle and self.verify_tls:
            try:
                add_certs_to_session(session, ca_bundle=self.ca_bundle)
            except OSError as e:
                raise ValueError(f"dicomweb.ca_bundle: {e}") from None
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
def retrieve_error(e: Exception) -> str:
    """Why one instance could not be retrieved, in one line."""
    if isinstance(e, requests.exceptions.HTTPError) and e.response is not None:
        return f"WADO-RS retrieve failed: HTTP {e.response.status_code} {e.response.reason}"
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
    `keep_datasets` adds `dataset`, the instance without its pixel data, for the SR.
    """

    def __init__(
        self,
        server: Server,
        paths: Sequence[str],
        transform: Callable[[torch.Tensor], torch.Tensor],
        keep_datasets: bool = False,
    ):
        self.server = server
        self.paths = list(paths)
        self.refs = [InstanceRef.from_uri(p) for p in self.paths]
        self.transform = transform
        self.keep_datasets = keep_datasets
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
            ds = self.client().retrieve_instance(ref.study_uid, ref.series_uid, ref.sop_uid)
        except Exception as e:
            if server_failure(e):  # every later instance would fail too: stop
                with reporting(self.server, "WADO-RS retrieve"):
                    raise
            # 404 or a server error for this instance, a body pydicom cannot parse: a row
            return self._failed(path, i, retrieve_error(e), e)
        sample: dict = {"path": path, "index": i, "header": dataset_header(ds)}
        try:
            pixels = dicom_pixels(ds, path)
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
