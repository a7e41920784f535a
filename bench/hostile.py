"""Hostile and abusive HTTP requests, each with the answer the status-code contract promises, sent over a raw
socket: an HTTP library would refuse to send a lying Content-Length, stall mid-body or hang up while queued."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from PIL import Image

MiB = 1024 * 1024
CHUNK = 256 * 1024


@dataclass
class Answer:
    status: int  # 0: the server closed the connection without an answer
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> dict:
        return json.loads(self.body)


async def post(host: str, port: int, path: str, headers: dict[str, str], body: bytes | AsyncIterator[bytes] = b"",
               *, timeout_s: float = 60.0) -> Answer:  # fmt: skip
    """One HTTP/1.1 POST on its own connection. A bytes body is sent with its Content-Length unless `headers` sets
    one (a lie is allowed); an iterator's chunks are sent as they come, chunked unless a Content-Length is given.
    The server may answer before the body is all sent (413, 503): sending stops there and the answer is read."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        async with asyncio.timeout(timeout_s):
            chunked = not isinstance(body, bytes) and "Content-Length" not in headers
            head = {"Host": f"{host}:{port}", "Connection": "close", **headers}
            if isinstance(body, bytes):
                head.setdefault("Content-Length", str(len(body)))
            if chunked:
                head["Transfer-Encoding"] = "chunked"
            writer.write(_request_head("POST", path, head))
            if head.get("Expect") == "100-continue" and (early := await _unless_continued(reader)) is not None:
                return early  # refused on its headers: the body was never sent, as curl does for large bodies
            answer = asyncio.ensure_future(_read_answer(reader))
            # the server may answer and close before taking the rest: the answer says why
            with contextlib.suppress(ConnectionError, OSError):
                await _send_body(writer, body, chunked, answer)
            return await answer
    finally:
        writer.close()


async def hang_up_after_sending(host: str, port: int, path: str, headers: dict[str, str], body: bytes,
                                wait_s: float) -> None:  # fmt: skip
    """Send a whole request, wait `wait_s` (long enough for it to be queued), then close without reading."""
    reader, writer = await asyncio.open_connection(host, port)
    head = {"Host": f"{host}:{port}", "Content-Length": str(len(body)), **headers}
    writer.write(_request_head("POST", path, head) + body)
    await writer.drain()
    await asyncio.sleep(wait_s)
    writer.close()


def _request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1")


async def _send_body(writer: asyncio.StreamWriter, body, chunked: bool, answer: asyncio.Future) -> None:
    if isinstance(body, bytes):
        for start in range(0, len(body), CHUNK):
            if answer.done():
                return
            writer.write(body[start : start + CHUNK])
            await writer.drain()
        return
    async for chunk in body:
        if answer.done():
            return
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
        await writer.drain()
    if chunked:
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def _unless_continued(reader: asyncio.StreamReader) -> Answer | None:
    """None once the server said 100 Continue (send the body now), else its final answer."""
    status_line = await reader.readline()
    if status_line.split()[1:2] == [b"100"]:
        await reader.readline()  # the blank line that ends the interim answer
        return None
    return await _read_answer(reader, status_line)


async def _read_answer(reader: asyncio.StreamReader, status_line: bytes | None = None) -> Answer:
    try:
        status_line = status_line or await reader.readline()
        if not status_line:
            return Answer(0)
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        return Answer(int(status_line.split()[1]), await reader.readexactly(length), headers)
    except (ConnectionError, asyncio.IncompleteReadError):
        return Answer(0)


async def zeros(total: int, pause_s: float = 0.0, chunk: int = CHUNK) -> AsyncIterator[bytes]:
    """`total` bytes of zeros in `chunk` pieces, optionally `pause_s` apart (a slow client)."""
    for start in range(0, total, chunk):
        yield bytes(min(chunk, total - start))
        if pause_s:
            await asyncio.sleep(pause_s)


@dataclass
class Probe:
    """One abusive request and the statuses the contract allows for it (503 too when `may_shed`: overload
    protection refusing it first is a correct answer)."""

    name: str
    path: str
    headers: dict[str, str]
    body: bytes | Callable[[], AsyncIterator[bytes]]  # a function: a fresh stream for every send
    expected: tuple[int, ...]
    may_shed: bool = True

    async def send(self, host: str, port: int, request_id: str | None = None) -> Answer:
        headers = self.headers | ({"X-Request-ID": request_id} if request_id else {})
        return await post(host, port, self.path, headers, self.body if isinstance(self.body, bytes) else self.body())

    def allows(self, status: int) -> bool:
        return status in self.expected or (self.may_shed and status == 503)


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, "PNG")
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG declaring width x height with the start of its pixel data: a decompression bomb's first bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(bytes(4096)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + pixels + chunk(b"IEND", b"")


def _tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "TIFF")
    return buf.getvalue()


def _multipart(parts: int) -> tuple[dict[str, str], bytes]:
    boundary = "srvitboundary"
    image = _png(8, 8)
    body = b"".join(
        b'--%s\r\nContent-Disposition: form-data; name="image"; filename="%d.png"\r\nContent-Type: image/png\r\n\r\n'
        b"%s\r\n" % (boundary.encode(), i, image)
        for i in range(parts)
    )
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body + b"--%s--\r\n" % boundary.encode()


def v2_bytes_request(image: bytes, **fields) -> tuple[dict[str, str], bytes]:
    """A V2 infer request with one BYTES image in the binary tensor extension, as tritonclient sends it; `fields`
    (id, parameters, outputs) join its JSON header."""
    element = struct.pack("<I", len(image)) + image
    header = {**fields, "inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES",
                                    "parameters": {"binary_data_size": len(element)}}]}  # fmt: skip
    text = json.dumps(header).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(text))}
    return headers, text + element


def probes(model: str, max_body_bytes: int) -> list[Probe]:
    """The hostile set: every row is a request some client will send one day, with the contract's answer."""
    png = {"Content-Type": "image/png"}
    classify, infer = "/classify", f"/v2/models/{model}/infer"
    huge = 4 * max_body_bytes
    bomb_png = _png_header(30_000, 30_000)
    v2_headers, v2_body = v2_bytes_request(bomb_png)
    mp_headers, mp_body = _multipart(40)
    gz_bomb = gzip.compress(bytes(huge), compresslevel=9)

    json_gzip = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    declared_huge = png | {"Content-Length": str(huge), "Expect": "100-continue"}
    return [
        Probe("garbage bytes", classify, png, b"not an image at all " * 50, (400,)),
        Probe("truncated PNG", classify, png, _png(64, 64)[:60], (400,)),
        Probe("refused format (TIFF)", classify, png, _tiff(), (415,)),
        Probe("PNG declaring 900 megapixels", classify, png, bomb_png, (422,)),
        Probe("1 x 100000 strip", classify, png, _png(1, 100_000), (422,)),  # too many pixels once resized
        Probe("wrong content type", classify, {"Content-Type": "text/plain"}, b"hello", (415,)),
        Probe("gzip on /classify", classify, png | {"Content-Encoding": "gzip"}, gzip.compress(b"x"), (415,)),
        Probe("depth out of range", f"{classify}?depth=99", png, _png(8, 8), (422,)),
        Probe("40 image parts", classify, mp_headers, mp_body, (400,)),
        Probe("declared 4x the body limit", classify, declared_huge, lambda: zeros(huge), (413,)),
        # The server answers 413 after max_body_bytes and closes while the client still sends: the client's socket
        # may be reset before it reads the answer (0), as with any HTTP/1.1 server that stops reading.
        Probe("chunked 4x the body limit", classify, png, lambda: zeros(huge), (413, 0)),
        Probe("Content-Length shorter than the body", classify, png | {"Content-Length": "10"}, _png(32, 32), (400,)),
        Probe("V2: JSON that is not JSON", infer, {"Content-Type": "application/json"}, b"{inputs: [", (400,)),
        Probe("V2: BYTES image declaring 900 megapixels", infer, v2_headers, v2_body, (422,)),
        Probe("V2: gzip bomb", infer, json_gzip, gz_bomb, (413,)),
        Probe("V2: binary part shorter than declared", infer, v2_headers, v2_body[:-5], (400,)),
    ]
