"""HTTP byte ranges for the development server, answered as nginx answers them (its range filter module):

* ``Range: bytes=a-b,c-,-n`` is parsed into ranges; one that starts past the end (or ends before it starts) is
  dropped; none left, or a malformed set: 416 with ``Content-Range: bytes */SIZE``; a header for another unit
  is ignored (200, the whole file);
* ranges whose lengths add up to more than the file are ignored (200, the whole file), as nginx does against
  overlapping-range floods;
* one range: a plain 206 with ``Content-Range``; several: 206 ``multipart/byteranges`` with nginx's boundary and
  part layout, the ranges in the order asked (not merged, not sorted).

Fault switches (``Faults`` of the devserver): ``ignore_range`` answers 200 with the whole file; ``multi_range``
= ``"whole"`` answers a request for several ranges with 200 and the whole file (nginx with ``max_ranges 1``),
``"first"`` answers only its first range, as a plain 206; ``reset_after``/``resets`` cut the connection after that
many body bytes.
"""
from __future__ import annotations

import re

from aiohttp import web

BOUNDARY = "00000000000000000001"  # nginx: a 20-digit zero-padded number
_SPEC = re.compile(r" *(\d*) *- *(\d*) *")


class Unsatisfiable(Exception):
    pass


def parse(header: str, size: int) -> list[tuple[int, int]] | None:
    """The ranges (first, last inclusive) a ``Range`` header asks of a ``size``-byte file, as nginx reads them;
    None when the header is to be ignored (200, the whole file). Raises ``Unsatisfiable`` (416) for a malformed
    set or one with no range inside the file."""
    if not header.startswith("bytes="):
        return None
    out = []
    for spec in header[6:].split(","):
        m = _SPEC.fullmatch(spec)
        if not m or not m.group(2) and not m.group(1):
            raise Unsatisfiable()
        if not m.group(1):  # suffix: the last n bytes
            first, end = max(0, size - int(m.group(2))), size
        else:
            first = int(m.group(1))
            end = min(int(m.group(2)) + 1, size) if m.group(2) else size
        if first < end:
            out.append((first, end - 1))
        elif first == 0:
            return None  # nginx: "0-" of an empty file
    if not out:
        raise Unsatisfiable()
    if sum(last - first + 1 for first, last in out) > size:
        return None
    return out


def multipart_head(first: int, last: int, size: int, ctype: str) -> bytes:
    return (f"\r\n--{BOUNDARY}\r\nContent-Type: {ctype}\r\nContent-Range: bytes {first}-{last}/{size}\r\n\r\n"
            ).encode()


def multipart_tail() -> bytes:
    return f"\r\n--{BOUNDARY}--\r\n".encode()


async def serve(request: web.Request, path: str, size: int, faults, record: dict) -> web.StreamResponse:
    """Answer ``request`` for the file at ``path`` honouring its ``Range`` header and the faults; ``record`` (a
    dict the caller keeps) gets the status, the ranges served and the body bytes sent."""
    ctype = "application/octet-stream"
    header = request.headers.get("Range", "")
    try:
        ranges = None if faults.ignore_range else parse(header, size)
    except Unsatisfiable:
        record.update(status=416, ranges=[], sent=0)
        return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
    if ranges and len(ranges) > 1 and faults.multi_range == "whole":
        ranges = None
    elif ranges and len(ranges) > 1 and faults.multi_range == "first":
        ranges = ranges[:1]
    pieces: list[tuple[bytes, int, int]] = []  # (part head, first, last) in body order
    if ranges is None:
        resp = web.StreamResponse(status=200)
        pieces.append((b"", 0, size - 1))
        length = size
    elif len(ranges) == 1:
        resp = web.StreamResponse(status=206)
        first, last = ranges[0]
        resp.headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        pieces.append((b"", first, last))
        length = last - first + 1
    else:
        resp = web.StreamResponse(status=206)
        ctype = f"multipart/byteranges; boundary={BOUNDARY}"
        for first, last in ranges:
            pieces.append((multipart_head(first, last, size, "application/octet-stream"), first, last))
        length = sum(len(h) + last - first + 1 for h, first, last in pieces) + len(multipart_tail())
    resp.headers["Content-Type"] = ctype
    if resp.status == 200:
        resp.headers["Accept-Ranges"] = "bytes"  # nginx says so only when it sends the whole file
    resp.content_length = length
    record.update(status=resp.status, ranges=[list(r) for r in ranges] if ranges else None, sent=0, size=size)
    await resp.prepare(request)
    cut = faults.reset_after if faults.resets and faults.reset_after else 0
    sent = 0

    async def send(data: bytes) -> bool:
        nonlocal sent
        if cut and sent + len(data) >= cut:
            await resp.write(data[:cut - sent])
            record["sent"] = cut
            faults.resets -= 1
            if request.transport:
                request.transport.abort()
            return False
        await resp.write(data)
        sent += len(data)
        record["sent"] = sent
        return True

    with open(path, "rb") as f:
        for head, first, last in pieces:
            if head and not await send(head):
                return resp
            f.seek(first)
            left = last - first + 1
            while left:
                data = f.read(min(1 << 16, left))
                if not data:
                    break
                left -= len(data)
                if not await send(data):
                    return resp
        if len(pieces) > 1 and not await send(multipart_tail()):
            return resp
    await resp.write_eof()
    return resp
