"""Receiving a classification body: capped while streaming, timed, and split into image bytes and form fields."""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from service.errors import (
    BadRequest,
    ClientClosedRequest,
    InvalidParameter,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)

RAW_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif", "application/octet-stream")
MULTIPART = "multipart/form-data"
IMAGE_FIELD = "image"
COMPRESSIONS = ("gzip", "deflate")
MAX_FORM_FIELDS = 8  # depth, top_k, model, timeout_ms, and a little slack for the client's own extras

T = TypeVar("T")
Hold = Callable[[int], None]  # reserves room for a body of up to so many bytes, or raises Overloaded


class RequestTimeout(ServiceError):
    """The client took longer than body_timeout_s to send its body (a slow or stalled upload)."""

    status, code = 408, "request_timeout"


@dataclass
class Body:
    images: list[bytes]
    fields: dict[str, str] = field(default_factory=dict)


async def read_body(request: Request, max_bytes: int, timeout_s: float, max_images: int, hold: Hold) -> Body:
    """The images and form fields of a POST /classify, or the client error that explains why not."""
    kind = media_type(request.headers)
    check_encoding(request.headers)
    data = await receive(request, max_bytes, timeout_s, hold=hold)
    if kind == MULTIPART:
        return await parse_multipart(request.headers, data, max_images)
    return Body([data])


def media_type(headers: Headers) -> str:
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != MULTIPART and kind not in RAW_TYPES:
        shown = kind or "no Content-Type"
        raise UnsupportedMediaType(
            f"{shown} is not accepted: send the image as the body with Content-Type one of {', '.join(RAW_TYPES)}, "
            f"or as {MULTIPART} with the file in a field named {IMAGE_FIELD!r}"
        )
    return kind


def check_encoding(headers: Headers) -> None:
    """A gzip body would be a second decompression bomb in front of the image decoder: refuse it."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding} is not accepted: send the body uncompressed")


def compression(headers: Headers) -> str | None:
    """The V2 endpoints take a body compressed as tritonclient sends it (gzip or zlib-wrapped deflate)."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding not in COMPRESSIONS:
        raise UnsupportedMediaType(f"Content-Encoding {encoding} is not accepted: send gzip, deflate or identity")
    return encoding


def _trailing() -> BadRequest:
    return BadRequest("the compressed body has data after its compressed stream: send one gzip or zlib stream")


class Inflater:
    """Inflates chunk by chunk, never producing more than `max_bytes` in all: a 1 KiB body that would inflate
    to 1 GiB stops at the limit (413), holding at most the limit in memory."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.size = max_bytes, 0
        self._z = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header, told apart by its magic

    def __call__(self, chunk: bytes) -> list[bytes]:
        pieces = []
        if chunk and self._z.eof:
            raise _trailing()
        try:
            while chunk and not self._z.eof:
                piece = self._z.decompress(chunk, self.max_bytes - self.size + 1)
                self.size += len(piece)
                if self.size > self.max_bytes:
                    raise PayloadTooLarge(f"the body inflates to more than the limit of {self.max_bytes} bytes")
                pieces.append(piece)
                chunk = self._z.unconsumed_tail
        except zlib.error as e:
            raise BadRequest(f"the compressed body is damaged ({e})") from None
        return pieces

    def finish(self) -> None:
        if not self._z.eof:
            raise BadRequest("the compressed body ends before its compressed stream does")
        if self._z.unused_data:
            raise _trailing()


async def receive(request: Request, max_bytes: int, timeout_s: float, encoding: str | None = None,
                  hold: Hold | None = None) -> bytes:  # fmt: skip
    """Counted chunk by chunk, so a lying or missing Content-Length cannot get more than max_bytes in; a
    compressed body (`encoding` from `compression`) is limited both as sent and as inflated. `hold` reserves
    the most the body can grow to before a byte is read: its Content-Length, else max_bytes."""
    declared = request.headers.get("content-length", "")
    if is_byte_count(declared) and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    if hold is not None:
        hold(int(declared) if is_byte_count(declared) and encoding is None else max_bytes)
    inflate = None if encoding is None else Inflater(max_bytes)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(size, max_bytes)
                chunks.extend(inflate(chunk) if inflate else [chunk])
            if inflate:
                inflate.finish()
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {timeout_s:g} s: send it faster") from None
    except ClientDisconnect:
        raise BadRequest("the client closed the connection before sending the whole body") from None
    return b"".join(chunks)


def is_byte_count(value: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts "²", which int() refuses."""
    return re.fullmatch(r"[0-9]{1,15}", value) is not None


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled if the client goes away first, so a gone client's images leave the queue and the
    rest of their batch runs without them. Call it once the body has been read."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        raise ClientClosedRequest("the client closed the connection before the answer was ready")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _too_large(size: int, max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the body is {size}+ bytes; the limit is {max_bytes} bytes: send a smaller image")


async def parse_multipart(headers: Headers, data: bytes, max_images: int) -> Body:
    """`image` parts in order, plus the text fields; the parts are capped, any other file part is refused."""

    async def stream():
        yield data

    parser = MultiPartParser(headers, stream(), max_files=max_images, max_fields=MAX_FORM_FIELDS,
                             max_part_size=64 * 1024)  # fmt: skip
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise BadRequest(f"bad multipart body: {e.message} (at most {max_images} image parts)") from e
    try:
        body = await _collect(form)
    finally:
        await form.close()
    if not body.images:
        raise BadRequest(f"the multipart body has no file in a field named {IMAGE_FIELD!r}")
    return body


async def _collect(form: FormData) -> Body:
    body = Body([])
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            body.images.append(await _file_part(name, value))
        elif name == IMAGE_FIELD:
            raise BadRequest(
                f"the {IMAGE_FIELD!r} part has no filename, so it arrived as text: send it as a "
                f"file (curl -F {IMAGE_FIELD}=@photo.jpg)"
            )
        elif name in body.fields:
            raise InvalidParameter(f"form field {name!r} given more than once: give each parameter once")
        else:
            body.fields[name] = value
    return body


async def _file_part(name: str, upload: UploadFile) -> bytes:
    if name != IMAGE_FIELD:
        raise BadRequest(f"file part {name!r} is not accepted: send images in fields named {IMAGE_FIELD!r}")
    return await upload.read()
