"""Multipart uploads read from the request stream into memory, under hard limits.

Starlette's `request.form()` spools files above 1 MiB to a temporary file on disk; a
radiograph is patient data and must never touch the disk, so the body is parsed here with
python-multipart's streaming parser, counting bytes as they arrive: the declared
Content-Length is checked first, and a body (or a file) that grows past its limit is cut off
at that point, never read whole.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from covid_cxr.service.responses import ApiError

FILE_FIELDS = ("file", "files")
MAX_FIELD_BYTES = 1024
MAX_PARTS_OVER_FILES = 8
MAX_FILENAME = 200


@dataclass
class UploadedFile:
    filename: str | None
    data: bytes
    too_large: bool = False  # over the per-file limit: its bytes were dropped
    size: int = -1  # bytes received (-1: len(data))

    def __post_init__(self) -> None:
        if self.size < 0:
            self.size = len(self.data)


@dataclass
class Form:
    files: list[UploadedFile] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)


def too_large(what: str, limit: int) -> ApiError:
    return ApiError(
        413,
        "upload_too_large",
        f"{what} is larger than this server's limit of {limit / 2**20:.1f} MiB",
        "send a smaller file (a radiograph rarely needs more than 20 MiB); the limit is "
        "max_upload_mb / max_batch_mb",
    )


def _clean_filename(raw: bytes | None) -> str | None:
    """The base name only, printable, bounded: it is echoed back in results and errors."""
    if not raw:
        return None
    name = raw.decode("utf-8", "replace").replace("\\", "/")
    name = "".join(ch for ch in PurePosixPath(name).name if ch.isprintable())
    return name[:MAX_FILENAME] or None


class _Collector:
    """python-multipart callbacks that keep file parts (up to a size each) and small fields."""

    def __init__(self, max_file: int, max_files: int, known_fields: tuple[str, ...]) -> None:
        self.max_file = max_file
        self.max_files = max_files
        self.known_fields = known_fields
        self.form = Form()
        self.parts = 0
        self.ended = False
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._chunks: list[bytes] = []
        self._size = 0
        self._name = ""
        self._filename: str | None = None
        self._is_file = False
        self._too_large = False

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_files + MAX_PARTS_OVER_FILES:
            raise ApiError(400, "too_many_parts", "the form has too many parts")
        self._headers, self._chunks, self._size, self._too_large = {}, [], 0, False
        self._header_name = self._header_value = b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise ApiError(
                400, "bad_multipart", "a form part has no Content-Disposition: form-data name"
            )
        self._name = options[b"name"].decode("utf-8", "replace")
        self._filename = _clean_filename(options.get(b"filename"))
        self._is_file = self._name in FILE_FIELDS or b"filename" in options
        if self._is_file and len(self.form.files) >= self.max_files:
            raise ApiError(
                400,
                "too_many_files",
                f"more than {self.max_files} file(s) in one request",
                "send one file to /api/v1/predict, or split the batch"
                if self.max_files == 1
                else "split the batch into smaller ones",
            )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        limit = self.max_file if self._is_file else MAX_FIELD_BYTES
        if self._size > limit:
            if not self._is_file:
                raise ApiError(400, "bad_multipart", f"form field {self._name!r} is too long")
            self._too_large, self._chunks = True, []
        if not self._too_large:
            self._chunks.append(data[start:end])

    def on_part_end(self) -> None:
        data = b"".join(self._chunks)
        self._chunks = []
        if self._is_file:
            self.form.files.append(UploadedFile(self._filename, data, self._too_large, self._size))
        elif self._name in self.known_fields:
            self.form.fields[self._name] = data.decode("utf-8", "replace")

    def on_end(self) -> None:
        self.ended = True


@dataclass(frozen=True)
class UploadLimits:
    """How much and how fast: an upload may take `timeout_s` at most, and after the first
    `grace_s` seconds it must keep up an average of `min_rate` bytes/s (0: no minimum), so a
    stalled client is dropped in seconds rather than holding its place and memory."""

    max_body: int
    max_file: int
    max_files: int
    timeout_s: float
    min_rate: float = 0.0
    grace_s: float = 2.0

    def deadline(self, start: float, received: int) -> float:
        """When the next bytes must have arrived, on the event loop's clock."""
        latest = start + self.timeout_s
        if self.min_rate <= 0:
            return latest
        return min(latest, start + self.grace_s + received / self.min_rate)


async def read_form(
    request: Request, limits: UploadLimits, known_fields: tuple[str, ...] = ()
) -> Form:
    """The multipart form of `request`, entirely in memory, or an ApiError (4xx)."""
    content_type, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ApiError(
            415,
            "not_multipart",
            "the request is not multipart/form-data",
            "upload the image as form field 'file', e.g. curl -F file=@image.png URL",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body:
        raise too_large("the request body", limits.max_body)
    collector = _Collector(limits.max_file, limits.max_files, known_fields)
    received = await _receive(request, MultipartParser(boundary, collector.callbacks()), limits)
    if received == 0 or (collector.ended and not collector.form.files):
        raise ApiError(
            400,
            "missing_file",
            "no file in the request",
            "send the image as multipart/form-data field 'file'",
        )
    if not collector.ended:
        raise ApiError(400, "bad_multipart", "the multipart body ended early (truncated upload)")
    return collector.form


async def _receive(request: Request, parser: MultipartParser, limits: UploadLimits) -> int:
    """Feed the body to the parser as it arrives; the byte count, or an ApiError."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    received = 0
    try:
        async with asyncio.timeout(limits.deadline(start, 0)) as timer:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limits.max_body:
                    raise too_large("the request body", limits.max_body)
                parser.write(chunk)
                timer.reschedule(limits.deadline(start, received))
    except TimeoutError as exc:
        raise ApiError(
            408,
            "upload_timeout",
            f"the upload stalled or was too slow ({received} bytes in {loop.time() - start:.1f} s)",
            f"uploads must finish within {limits.timeout_s:g} s and keep up "
            f"{limits.min_rate / 1024:g} KiB/s",
        ) from exc
    except MultipartParseError as exc:
        raise ApiError(
            400, "bad_multipart", "the multipart body is malformed", "let your HTTP client build it"
        ) from exc
    except ClientDisconnect as exc:
        raise ApiError(400, "client_disconnected", "the client went away mid-upload") from exc
    return received
