"""A small DICOMweb client: QIDO-RS to find, WADO-RS to retrieve, STOW-RS to store.

Only what the PACS round trip needs, over plain HTTP with httpx, so it works against Orthanc's
DICOMweb plugin or any other DICOMweb server (dcm4chee, Google Healthcare, Azure, ...).
Authentication: HTTP basic (user + password) or a bearer token. A PACS that is down or
overloaded (connection refused, timeouts, HTTP 502/503/504) is retried with exponential
backoff up to `patience` seconds, then `PacsUnavailable` says so; any other failure is a
`DicomWebError` naming the request and the server's answer.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from pydicom.dataset import Dataset

from covid_cxr.errors import CovidCxrError

DICOM_JSON = "application/dicom+json"
RETRYABLE = {502, 503, 504}


class DicomWebError(CovidCxrError):
    """The DICOMweb server refused or failed a request."""


class PacsUnavailable(DicomWebError):
    """The server could not be reached (or kept answering 'unavailable') within the patience."""


@dataclass(frozen=True)
class Auth:
    """Basic (user and password) or bearer-token authentication; empty for none."""

    user: str | None = None
    password: str | None = None
    token: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def basic(self) -> tuple[str, str] | None:
        return (self.user, self.password or "") if self.user else None


@dataclass
class Backoff:
    """Waits 1, 2, 4, ... seconds (at most `cap`) between tries, for at most `patience` s."""

    patience: float = 30.0
    first: float = 1.0
    cap: float = 30.0

    def delays(self) -> Iterator[float]:
        waited, delay = 0.0, self.first
        while waited < self.patience:
            step = min(delay, self.cap, self.patience - waited)
            yield step
            waited += step
            delay *= 2


class DicomWebClient:
    """DICOMweb at `url` (e.g. http://pacs:8042/dicom-web)."""

    def __init__(
        self,
        url: str,
        auth: Auth | None = None,
        *,
        timeout: float = 60.0,
        backoff: Backoff | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url.rstrip("/")
        self.backoff = backoff or Backoff()
        self._sleep = sleep
        auth = auth or Auth()
        self._http = httpx.Client(auth=auth.basic(), headers=auth.headers(), timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ QIDO-RS

    def search_studies(self, **match: str) -> list[Dataset]:
        return self._search("studies", match)

    def search_series(self, study: str, **match: str) -> list[Dataset]:
        return self._search(f"studies/{study}/series", match)

    def search_instances(self, study: str, series: str) -> list[Dataset]:
        return self._search(f"studies/{study}/series/{series}/instances", {})

    def _search(self, path: str, match: Mapping[str, str]) -> list[Dataset]:
        response = self._request("GET", path, params=dict(match), headers={"Accept": DICOM_JSON})
        if response.status_code == 204 or not response.content:
            return []
        return [Dataset.from_json(item) for item in response.json()]

    # ------------------------------------------------------------ WADO-RS

    def retrieve_instance(self, study: str, series: str, instance: str) -> bytes:
        """The instance as a DICOM Part 10 file, in memory."""
        path = f"studies/{study}/series/{series}/instances/{instance}"
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        response = self._request("GET", path, headers={"Accept": accept})
        parts = list(split_multipart(response.headers.get("content-type", ""), response.content))
        if len(parts) != 1:
            raise DicomWebError(f"WADO-RS {path}: expected one DICOM part, got {len(parts)}")
        return parts[0]

    # ------------------------------------------------------------ STOW-RS

    def store(self, files: list[bytes]) -> None:
        """STOW-RS the DICOM Part 10 files; fails unless the server accepted every one."""
        boundary = uuid.uuid4().hex
        body = b"".join(
            b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f + b"\r\n"
            for f in files
        )
        body += b"--" + boundary.encode() + b"--\r\n"
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        response = self._request(
            "POST",
            "studies",
            content=body,
            headers={"Content-Type": content_type, "Accept": DICOM_JSON},
        )
        failed = _failed_sop_count(response)
        if failed:
            raise DicomWebError(f"STOW-RS: the server refused {failed} of {len(files)} object(s)")

    # ------------------------------------------------------------ transport

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = f"{self.url}/{path}"
        delays = self.backoff.delays()
        while True:
            try:
                response = self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code not in RETRYABLE:
                    return _checked(method, path, response)
                problem = f"HTTP {response.status_code}"
            delay = next(delays, None)
            if delay is None:
                raise PacsUnavailable(
                    f"{method} {url}: the PACS is unavailable ({problem}) after "
                    f"{self.backoff.patience:g} s of retries; check that it is running and "
                    "reachable"
                )
            self._sleep(delay)


def _checked(method: str, path: str, response: httpx.Response) -> httpx.Response:
    if response.status_code in (401, 403):
        raise DicomWebError(
            f"{method} {path}: HTTP {response.status_code}: the PACS refused the credentials "
            "(set --user with COVID_CXR_PACS_PASSWORD, or COVID_CXR_PACS_TOKEN)"
        )
    if response.status_code >= 400:
        raise DicomWebError(
            f"{method} {path}: HTTP {response.status_code}: {response.text[:300].strip()}"
        )
    return response


def _failed_sop_count(response: httpx.Response) -> int:
    """Entries in the STOW-RS response's FailedSOPSequence (00081198)."""
    if not response.content or "json" not in response.headers.get("content-type", ""):
        return 0
    answer = response.json()
    failed = answer.get("00081198", {}).get("Value", []) if isinstance(answer, dict) else []
    return len(failed)


def split_multipart(content_type: str, body: bytes) -> Iterator[bytes]:
    """The bodies of a multipart/related message (WADO-RS answers one part per instance)."""
    boundary = next(
        (
            part.split("=", 1)[1].strip().strip('"')
            for part in content_type.split(";")
            if part.strip().lower().startswith("boundary=")
        ),
        None,
    )
    if not boundary:
        raise DicomWebError(f"expected a multipart/related answer, got {content_type!r}")
    delimiter = b"--" + boundary.encode()
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            return
        headers_end = chunk.find(b"\r\n\r\n")
        if headers_end < 0:
            raise DicomWebError("malformed multipart part (no blank line after its headers)")
        part = chunk[headers_end + 4 :]
        yield part[:-2] if part.endswith(b"\r\n") else part
