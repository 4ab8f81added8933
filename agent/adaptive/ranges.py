"""Byte ranges of the chunk data file, many per request (``multipart/byteranges``), as any static server answers.

``RangeFetcher.pieces(ranges)`` yields ``(offset, bytes)`` covering exactly the ranges asked for, in ascending
order, whatever the server sends in between (bytes of a gap it coalesced are dropped). Modes, tried in order:

* ``multi``: up to ``max_ranges`` ranges in one request; a 206 ``multipart/byteranges`` answer is parsed as it
  streams (a single-part 206 is one part);
* ``single``: one range per request, on the session's keep-alive connections: when the server answers a
  multi-range request with ``200`` (it ignores them, or has ``max_ranges 1``), ``416``, another 4xx, or a
  single part that covers only the first ranges (the rest is fetched one by one);
* none: a server that answers a single range with anything but its 206 does not do ranges (``RangeError`` with
  ``unsupported``): the caller takes the full download.

The answer is held to what was asked: each part's ``Content-Range`` names the data file's signed size, parts come
in ascending order without overlap, each holds bytes asked for and nothing beyond the last range; no more parts
than ranges; headers and preamble are bounded. Anything else is refused with a one-line reason.
"""
from __future__ import annotations

import asyncio
import re

from ..text import clean

MAX_RANGES = 64  # per request (the Range header stays under 2 KiB: well inside any server's header limit)
MAX_LINE = 1024
MAX_HEADERS = 16
MAX_PREAMBLE = 4  # lines before the first delimiter
_CR = re.compile(r"^bytes (\d{1,19})-(\d{1,19})/(\d{1,19})$")
_BOUNDARY = re.compile(r"""^[0-9A-Za-z'()+_,\-./:=?]{1,70}$""")


class RangeError(Exception):
    """The ranges could not be fetched; ``unsupported``: the server does not serve ranges (take the full path);
    ``hostile``: its answer broke the rules (not worth another try)."""

    def __init__(self, message: str, unsupported: bool = False, hostile: bool = False):
        super().__init__(clean(message, 400))
        self.unsupported = unsupported
        self.hostile = hostile


class _Want:
    """The ranges of one request and how far the answer has covered them."""

    def __init__(self, ranges: list[tuple[int, int]], size: int):
        self.ranges, self.size = ranges, size
        self.k = 0  # the range being filled
        self.pos = ranges[0][0]  # the next byte wanted
        self.last_end = 0  # the end of the previous part

    @property
    def done(self) -> bool:
        return self.k >= len(self.ranges)

    def rest(self) -> list[tuple[int, int]]:
        """The ranges (or their ends) not covered yet."""
        return [(self.pos, self.ranges[self.k][1])] + self.ranges[self.k + 1:] if not self.done else []

    def part(self, value: str | None) -> tuple[int, int]:
        """Checks a part's Content-Range; returns its [first, end)."""
        m = _CR.match((value or "").strip())
        if m is None:
            raise RangeError(f"a part's Content-Range {clean(value or '', 60)!r} is not 'bytes FIRST-LAST/SIZE'",
                             hostile=True)
        a, b, total = (int(g) for g in m.groups())
        if total != self.size:
            raise RangeError(f"a part is of a {total}-byte file; the chunk data file has {self.size}", hostile=True)
        if not a <= b < total:
            raise RangeError(f"a part's range {a}-{b} is not within the file", hostile=True)
        if self.done:
            raise RangeError("the answer holds more parts than ranges were asked for", hostile=True)
        if a < self.last_end:
            raise RangeError(f"the answer's parts overlap or come out of order (bytes {a}-{b} after byte "
                             f"{self.last_end - 1})", hostile=True)
        if a > self.pos:
            raise RangeError(f"the answer leaves out bytes asked for (a part starts at {a}, byte {self.pos} was "
                             "asked for)", hostile=True)
        if b < self.pos:
            raise RangeError(f"the answer holds a part not asked for (bytes {a}-{b})", hostile=True)
        if b >= self.ranges[-1][1]:
            raise RangeError(f"a part reaches beyond the ranges asked for (bytes {a}-{b})", hostile=True)
        self.last_end = b + 1
        return a, b + 1

    def take(self, at: int, data: bytes):
        """The pieces of ``data`` (at file offset ``at``) that were asked for, as (offset, bytes)."""
        end = at + len(data)
        while not self.done and self.pos < end:
            lo, hi = self.ranges[self.k]
            start = max(self.pos, at)
            stop = min(hi, end)
            if start < stop:
                yield start, data[start - at:stop - at]
                self.pos = stop
            if self.pos >= hi:
                self.k += 1
                if not self.done:
                    self.pos = self.ranges[self.k][0]
            else:
                break


class _Stream:
    """Bounded reads from an aiohttp body: lines (with a length limit) and runs of bytes."""

    def __init__(self, content, limiter=None, timeout: float | None = None):
        self.content = content
        self.limiter = limiter
        self.timeout = timeout
        self.buf = bytearray()
        self.taken = 0

    async def _more(self) -> None:
        data = await _within(self.content.readany(), self.timeout)
        if not data:
            raise RangeError("the answer ended in the middle of its parts")
        self.taken += len(data)
        self.buf += data
        if self.limiter is not None:  # a capped download: the link's bytes wait for their tokens
            await self.limiter.spend(len(data))

    async def line(self) -> bytes:
        while (end := self.buf.find(b"\n")) < 0:
            if len(self.buf) > MAX_LINE:
                raise RangeError(f"a multipart line is longer than {MAX_LINE} bytes", hostile=True)
            await self._more()
        if end > MAX_LINE:
            raise RangeError(f"a multipart line is longer than {MAX_LINE} bytes", hostile=True)
        line = bytes(self.buf[:end])
        del self.buf[:end + 1]
        return line.rstrip(b"\r")

    async def run(self, n: int):
        while n > 0:
            if not self.buf:
                await self._more()
            piece = bytes(self.buf[:n])
            del self.buf[:len(piece)]
            n -= len(piece)
            yield piece


async def _within(awaitable, seconds: float | None):
    """``awaitable``'s result, or ``asyncio.TimeoutError`` after ``seconds`` (``asyncio.wait``: a cancel of the
    caller is never swallowed, as Python 3.11's ``wait_for`` can)."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    finally:
        if not task.done():
            task.cancel()
    if not done:
        raise asyncio.TimeoutError()
    return task.result()


def _boundary(content_type: str) -> str | None:
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/byteranges":
        return None
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            value = value.strip().strip('"')
            return value if _BOUNDARY.match(value) else None
    return None


class RangeFetcher:
    def __init__(self, session, url: str, size: int, *, read_timeout: float = 60.0, headers: dict | None = None,
                 max_ranges: int = MAX_RANGES, limiter=None):
        self.session = session
        self.limiter = limiter  # install.max_rate's token bucket (``ratelimit``), shared with the full path
        self.url = url
        self.size = size  # the data file's signed size
        self.read_timeout = read_timeout
        self.headers = dict(headers or {})
        self.max_ranges = max_ranges
        self.mode = "multi"
        self.taken = 0  # body bytes received (what the link carried, multipart headers and gaps included)
        self.requests = 0

    async def pieces(self, ranges: list[tuple[int, int]]):
        """(offset, bytes) covering ``ranges`` (ascending ``[first, end)``), in order."""
        i = 0
        while i < len(ranges):
            if self.mode == "multi" and i + 1 < len(ranges):
                batch = ranges[i:i + self.max_ranges]
                try:
                    async for piece in self._request(batch):
                        yield piece
                except _Degrade as exc:
                    self.mode = "single"
                    if exc.rest is None:
                        continue
                    for lo, hi in exc.rest:  # the server answered the first range only: the others one by one
                        async for piece in self._request([(lo, hi)], single=True):
                            yield piece
            else:
                batch = ranges[i:i + 1]
                async for piece in self._request(batch, single=True):
                    yield piece
            i += len(batch)

    async def _request(self, batch: list[tuple[int, int]], single: bool = False):
        import aiohttp
        from ..http import RedirectRefused, describe_error, open_get
        want = _Want(batch, self.size)
        headers = dict(self.headers, **{"Accept-Encoding": "identity",
                                        "Range": "bytes=" + ",".join(f"{lo}-{hi - 1}" for lo, hi in batch)})
        # no socket read timer: it would also run while this side is behind (the answer waits in the socket while
        # the writer copies local chunks, slower than read_timeout on a slow device), and cut a healthy transfer;
        # read_timeout counts only the time spent waiting for the headers and for each piece of the body
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
        self.requests += 1
        try:
            opened = await _within(open_get(self.session, self.url, headers=headers, timeout=timeout),
                                   self.read_timeout)
            async with opened as resp:
                encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
                if resp.status == 206 and encoding not in ("", "identity"):
                    raise RangeError(f"the server encoded its ranges ({clean(encoding, 30)})", unsupported=True)
                if resp.status != 206:
                    resp.close()  # never read a whole file we did not ask for
                    if len(batch) > 1 and (resp.status == 200 or 400 <= resp.status < 500):
                        raise _Degrade()
                    if resp.status == 200 or 400 <= resp.status < 500:
                        raise RangeError(f"the server does not serve byte ranges of {clean(self.url, 200)} "
                                         f"(HTTP {resp.status} to a Range request)", unsupported=True)
                    raise RangeError(f"HTTP {resp.status} {clean(resp.reason or '', 60)}".strip())
                stream = _Stream(resp.content, self.limiter, self.read_timeout)
                try:
                    boundary = _boundary(resp.headers.get("Content-Type", ""))
                    if boundary is None:
                        a, end = want.part(resp.headers.get("Content-Range"))
                        async for piece in self._part(stream, want, a, end):
                            yield piece
                        if len(batch) > 1 and not want.done:
                            raise _Degrade(want.rest())
                    else:
                        async for piece in self._multipart(stream, want, boundary):
                            yield piece
                finally:
                    self.taken += stream.taken
                if not want.done:
                    raise RangeError("the answer ended before all the ranges asked for", hostile=True)
        except RedirectRefused as exc:
            raise RangeError(str(exc), unsupported=True) from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise RangeError(f"{clean(self.url, 200)}: {describe_error(exc, 'timed out waiting for data')}") \
                from None

    async def _part(self, stream: _Stream, want: _Want, a: int, end: int):
        at = a
        async for data in stream.run(end - a):
            for piece in want.take(at, data):
                yield piece
            at += len(data)

    async def _multipart(self, stream: _Stream, want: _Want, boundary: str):
        delimiter = b"--" + boundary.encode()
        for _ in range(MAX_PREAMBLE + 1):
            line = await stream.line()
            if line == delimiter:
                break
        else:
            raise RangeError("the multipart answer does not start with its boundary", hostile=True)
        while True:
            fields = {}
            for _ in range(MAX_HEADERS + 1):
                line = await stream.line()
                if not line:
                    break
                name, sep, value = line.decode("latin-1").partition(":")
                if not sep:
                    raise RangeError("a multipart part header is not 'Name: value'", hostile=True)
                fields[name.strip().lower()] = value.strip()
            else:
                raise RangeError(f"a multipart part has more than {MAX_HEADERS} headers", hostile=True)
            a, end = want.part(fields.get("content-range"))
            async for piece in self._part(stream, want, a, end):
                yield piece
            if await stream.line() != b"":
                raise RangeError("a multipart part is longer than its Content-Range", hostile=True)
            line = await stream.line()
            if line == delimiter + b"--":
                return
            if line != delimiter:
                raise RangeError("a multipart part is not followed by the boundary", hostile=True)


class _Degrade(Exception):
    """The server does not take this many ranges in one request: one range per request from now on (``rest``:
    what is left of the batch, when the server answered part of it)."""

    def __init__(self, rest: "list[tuple[int, int]] | None" = None):
        super().__init__()
        self.rest = rest
