"""Reading a multipart/form-data upload as it arrives: the file part goes straight to a
``FileWriter`` (so into Redis, chunk by chunk), the small text fields are collected.

Starlette's own form parser would first spool the whole file to a temporary file; this one
holds at most one chunk of it. A request over its byte budget is refused as soon as it
passes it, yet a file somewhat over the limit is read to its end (and dropped) so the
error can name its size and the client reads the answer instead of a reset connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from tokenrelay.queueing.files import FileWriter

from .errors import APIError

FIELD_BYTES = 1024  # each text field (purpose, expires_after[...])
MAX_FIELDS = 16
OVERHEAD_BYTES = 64 * 1024  # boundaries, part headers and the text fields
DRAIN_BYTES = 16 << 20  # read past the limit to name the file's size, then stop


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None  # set once the part named "file" has begun


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    is_file: bool = False
    data: bytearray = field(default_factory=bytearray)


class _Collector:
    """python-multipart's callbacks (synchronous): they record what the parser saw; the
    async loop then hands the file's bytes to the writer."""

    def __init__(self, upload: Upload) -> None:
        self.upload = upload
        self.part = _Part()
        self.header_name = b""
        self.header_value = b""
        self.file_data: list[bytes] = []
        self.ended = False

    def callbacks(self) -> dict[str, object]:
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
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.part.headers[self.header_name.lower()] = self.header_value
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.headers.get(b"content-disposition"))
        self.part.name = options.get(b"name", b"").decode("utf-8", "replace")
        if self.part.name == "file" and b"filename" in options:
            if self.upload.filename is not None:
                raise bad_upload("The request has more than one 'file' part.", "file")
            self.part.is_file = True
            filename = options[b"filename"].decode("utf-8", "replace")
            self.upload.filename = filename.replace("\\", "/").rsplit("/", 1)[-1][:255]
        elif len(self.upload.fields) >= MAX_FIELDS:
            raise bad_upload(f"The request has more than {MAX_FIELDS} form fields.")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part.is_file:
            self.file_data.append(data[start:end])
            return
        self.part.data += data[start:end]
        if len(self.part.data) > FIELD_BYTES:
            raise bad_upload(
                f"The form field '{self.part.name}' is over {FIELD_BYTES} bytes.", self.part.name
            )

    def on_part_end(self) -> None:
        if not self.part.is_file and self.part.name:
            self.upload.fields[self.part.name] = self.part.data.decode("utf-8", "replace")

    def on_end(self) -> None:
        self.ended = True


def bad_upload(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, code="invalid_upload", param=param)


def _boundary(request: Request) -> bytes:
    kind, options = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise bad_upload(
            "POST /v1/files takes a multipart/form-data body with a 'file' part and a "
            "'purpose' field."
        )
    return options[b"boundary"]


async def read_upload(request: Request, writer: FileWriter) -> Upload:
    """Parse the upload, writing its file part to ``writer`` (which the caller commits or
    aborts). Raises APIError(400) for a malformed body or one over the byte budget."""
    budget = writer.max_bytes + OVERHEAD_BYTES + DRAIN_BYTES if writer.max_bytes else 0
    declared = request.headers.get("content-length", "")
    if budget and declared.isdecimal() and int(declared) > budget:
        raise too_large(writer.max_bytes, int(declared), at_least=True)
    upload = Upload()
    collector = _Collector(upload)
    parser = MultipartParser(_boundary(request), collector.callbacks())  # type: ignore[arg-type]
    received = 0
    try:
        async for data in request.stream():
            received += len(data)
            if budget and received > budget:
                raise too_large(writer.max_bytes, received, at_least=True)
            parser.write(data)
            try:
                for piece in collector.file_data:
                    await writer.write(piece)
            except Exception:
                await _discard(request, DRAIN_BYTES)  # Redis failed: answer once read
                raise
            collector.file_data.clear()
        parser.finalize()
    except MultipartParseError as exc:
        raise bad_upload(f"The multipart body is malformed: {exc}.") from exc
    except ClientDisconnect as exc:
        raise bad_upload("The client disconnected before the upload ended.") from exc
    if not collector.ended:
        raise bad_upload("The multipart body ended before its closing boundary.")
    return upload


async def _discard(request: Request, limit: int) -> None:
    """Read and drop up to ``limit`` more bytes of the body, so that an error answered
    midway reaches a client still sending (else its connection may be reset first)."""
    dropped = 0
    try:
        async for data in request.stream():
            dropped += len(data)
            if dropped > limit:
                return
    except ClientDisconnect:
        return


def too_large(limit: int, size: int, at_least: bool = False) -> APIError:
    """The 400 for a file over ``limit``: ``size`` is the file's, or with ``at_least`` the
    request's bytes so far (the rest was not read)."""
    what = f"The upload is at least {size} bytes" if at_least else f"The file is {size} bytes"
    return APIError(
        400,
        f"{what}; this server accepts files up to {limit} bytes "
        "(`tokenrelay api --max-file-size`).",
        code="file_too_large",
        param="file",
    )
