"""The Omaha HTTP adapter: POST a request, get a decoded response and the server's X-Retry-After."""
from __future__ import annotations

import asyncio
import errno
import re
from dataclasses import dataclass

from .omaha import ProtocolError, Request, Response, decode_response, encode_request
from .omaha import urls
from .omaha.headers import parse_retry_after, request_headers
from .text import clean

MAX_RESPONSE = 1 << 20


class OmahaHttpError(Exception):
    def __init__(self, message: str, status: int | None = None, retry_after: int | None = None,
                 trusted: bool = False):
        super().__init__(clean(message, 600))  # it may quote the server (a decode error, a redirect's Location)
        self.status = status
        self.retry_after = retry_after
        self.trusted = trusted  # the answer came over verified TLS: its X-Retry-After may be honoured


_LENGTH = re.compile(r"Not enough data to satisfy content length header \(received (\d+) of (\d+) bytes\)")
_ENCODING = re.compile(r"Can not decode content-encoding: ?([\w-]*)")
_TOO_LONG = re.compile(r"Got more than (\d+) bytes when reading")


def describe_error(exc: BaseException, timed_out: str = "timed out") -> str:
    """A transfer error in one short line a user can act on (aiohttp's own texts span lines, nest their causes,
    or say no more than ``400, message:``); whatever of it a server sent is cleaned (``text.clean``)."""
    from .proxy import redact
    return clean(redact(_describe(exc, timed_out)), 300)


def _describe(exc: BaseException, timed_out: str) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return timed_out
    refused = exc if isinstance(exc, LinkLocalRefused) else getattr(exc, "os_error", None) or exc.__cause__
    if isinstance(refused, LinkLocalRefused):
        return refused.strerror
    proxy = _proxy_reason(exc)
    if proxy:
        return proxy
    tls = _tls_reason(exc)
    if tls:
        return tls
    text = " ".join(f"{exc} {exc.__cause__ or ''}".split())
    if m := _LENGTH.search(text):
        return f"the connection closed before the end of the body ({m[1]} of {m[2]} bytes)"
    if m := _TOO_LONG.search(text):
        return (f"its answer has a header (or status line) over {m[1]} bytes, the most the agent reads: a fault "
                "of the server or of a proxy on the way")
    if m := _ENCODING.search(text):
        return f"its Content-Encoding {m[1] or ''} does not decode (a corrupt or mislabelled body)".replace("  ", " ")
    cause = getattr(exc.__cause__, "message", None) or getattr(exc, "message", None)
    if re.fullmatch(r"\d{3}, message[:=]\s*'?'?", text.strip()) or not text:
        text = f"{type(exc).__name__}{': ' + str(cause) if cause else ''}"
    return text[:200]


def _proxy_reason(exc: BaseException) -> str | None:
    """A proxy that cannot be reached, or that refused the request, said so (not mistaken for the server)."""
    import aiohttp
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        hint = ": check the user and password in the proxy URL" if exc.status in (401, 407) else ""
        return f"the proxy refused: HTTP {exc.status} {clean(exc.message or '', 60)}".rstrip() + hint
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        why = getattr(exc, "strerror", None) or getattr(exc.os_error, "strerror", None) or type(exc.os_error).__name__
        return f"cannot connect to the proxy {exc.host}:{exc.port}: {why}"
    return None


def _tls_reason(exc: BaseException) -> str | None:
    """A TLS failure named by its cause, with what to check."""
    import ssl
    err = exc if isinstance(exc, ssl.SSLError) else getattr(exc, "certificate_error", None) or exc.__cause__ or \
        getattr(exc, "os_error", None)
    if not isinstance(err, (ssl.SSLError, ssl.CertificateError)):
        return None
    text = getattr(err, "verify_message", None) or getattr(err, "reason", None) or str(err)
    text = str(text)
    low = text.lower()
    if "expired" in low:
        return f"TLS: the server's certificate has expired ({text[:80]})"
    if "mismatch" in low or "not valid for" in low:
        return f"TLS: the server's certificate is not for this host name or address ({text[:100]})"
    if "self-signed" in low or "unable to get local issuer" in low or "verify failed" in low:
        return f"TLS: the server's certificate is not signed by a trusted CA ({text[:80]}); check server.ca_file"
    if "certificate required" in low or "certificate_required" in low or "handshake failure" in low:
        return f"TLS: the server asks for a client certificate ({text[:60]}); set server.client_cert and client_key"
    return f"TLS: {text[:150]}"


@dataclass(frozen=True)
class Answer:
    response: Response
    retry_after: int | None
    trusted: bool = False  # over verified TLS: its X-Retry-After may be honoured (a CUP proof covers no header)


class LinkLocalRefused(OSError):
    """A host name resolved to a link-local address: no connection is made."""

    def __init__(self, message: str):
        super().__init__(errno.EACCES, message)  # aiohttp quotes the strerror in its connection error


class RefusingResolver:
    """aiohttp's resolver interface around another resolver (the system's by default): a host name any of whose
    addresses is link-local is refused before any connection (a name is no safer than the literal address
    ``omaha.urls`` refuses: metadata services answer at 169.254.169.254 under names of their own)."""

    def __init__(self, inner=None):
        if inner is None:
            import aiohttp
            inner = aiohttp.DefaultResolver()
        self.inner = inner

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict]:
        addresses = await self.inner.resolve(host, port, family)
        for address in addresses:
            if urls.link_local(str(address.get("host", ""))):
                raise LinkLocalRefused(f"refused: {urls.short(host, 60)} resolves to the link-local address "
                                       f"{address['host']} (a metadata service, not an update server)")
        return addresses

    async def close(self) -> None:
        await self.inner.close()


def make_session(ca_file: str | None = None, timeout: float = 30.0, client_cert: str | None = None,
                 client_key: str | None = None, resolver=None, route=None):
    """An aiohttp session (aiohttp is imported here, when the first check runs, not at start-up); its TLS settings
    (the extra CA, the device's certificate) and its proxies (``route``, a ``proxy.Route``) apply to every request
    made with it: the checks, the events, the payloads and their signatures, the fleet lock. Host names (a
    proxy's too) are resolved by ``resolver`` (the system's by default) through ``RefusingResolver``."""
    import aiohttp

    ssl_context = True  # aiohttp's own verifying context (ssl.create_default_context(), made when aiohttp is
    # imported): a context of our own would load the system's CA bundle once more (~0.1 s, ~0.7 MiB)
    if ca_file or (client_cert and client_key):
        import ssl
        ssl_context = ssl.create_default_context()
        if ca_file:
            ssl_context.load_verify_locations(ca_file)
        if client_cert and client_key:
            ssl_context.load_cert_chain(client_cert, client_key)
    connector = _connector_class()(ssl=ssl_context, limit=4, resolver=RefusingResolver(resolver))
    extra = {}
    if route is not None and (route.https or route.http):
        from .proxy import request_class
        extra["request_class"] = request_class(route)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                                                                   sock_read=timeout), **extra)


_CONNECTOR = None


def _connector_class():
    """aiohttp's ``TCPConnector`` that never hands out a connection whose reading is paused. aiohttp before 3.11.11
    (Debian 12 ships 3.8.4) pools a connection paused when its answer ended while the reader was behind (the whole
    body buffered, above the high-water mark); the next request on it then waits for an answer it never reads
    until its timeout (aiohttp issue 10169): an adaptive install's fetch of a drifted chunk, made while the range
    answer before it waited in its buffer, was cut this way until it gave up. Nobody reads a pooled connection's
    old answer any more, so resuming it is always right."""
    global _CONNECTOR
    if _CONNECTOR is None:
        import aiohttp

        class Connector(aiohttp.TCPConnector):
            async def connect(self, *args, **kwargs):
                conn = await super().connect(*args, **kwargs)
                protocol = conn.protocol
                if protocol is not None and getattr(protocol, "_reading_paused", False):
                    protocol.resume_reading()
                return conn

        _CONNECTOR = Connector
    return _CONNECTOR


async def _read_body(resp, limit: int) -> bytes:
    """The whole body, however many pieces it arrives in; more than ``limit`` bytes is refused without reading
    further (a server that never stops sending cannot make the agent grow)."""
    declared = resp.content_length
    if declared is not None and declared > limit:
        raise OmahaHttpError(f"unusable answer from the update server: its body of {declared} bytes is over "
                             f"the {limit}-byte limit", resp.status)
    parts, size = [], 0
    while piece := await resp.content.read(65536):
        size += len(piece)
        if size > limit:
            raise OmahaHttpError(f"unusable answer from the update server: its body is over the {limit}-byte "
                                 "limit", resp.status)
        parts.append(piece)
    return b"".join(parts)


async def post(session, url: str, req: Request, *, interactive: bool | None, request_age: int | None = None,
               timeout: float = 30.0, allow_http: bool = True, cup=None, client_cert: bool = False) -> Answer:
    """POSTs ``req`` to ``url``. A redirect is followed (with the same body) only to a URL the agent may use
    (``omaha.urls``: no https to http, no other scheme, no metadata address), at most ``urls.MAX_REDIRECTS``
    times; the refusal comes before any connection to the new URL. With ``cup`` (the server's public key and
    its version) the request carries a fresh CUP challenge and the answer is refused without a valid proof."""
    import aiohttp

    headers = request_headers(req, interactive, request_age)
    request = encode_request(req)
    challenge = None
    if cup is not None:
        from . import cup as cupmod
        challenge = cupmod.challenge(cup[1], request)
        url = challenge.url(url)
    try:
        for _ in range(urls.MAX_REDIRECTS + 1):
            async with session.post(url, data=request, headers=headers, allow_redirects=False,
                                    timeout=aiohttp.ClientTimeout(total=timeout * 2)) as resp:
                if resp.status in urls.REDIRECT_STATUSES:
                    try:
                        url = urls.redirect(url, resp.headers.get("Location"), allow_http=allow_http)
                    except ValueError as exc:
                        raise OmahaHttpError(f"update server: {exc}", resp.status) from None
                    continue
                retry_after = parse_retry_after(resp.headers.get("X-Retry-After"))
                tls = resp.url.scheme == "https"
                if resp.status != 200:
                    raise OmahaHttpError(f"server answered HTTP {resp.status}", resp.status, retry_after, tls)
                body = await _read_body(resp, MAX_RESPONSE)
                proof = cupmod.proof_from(resp.headers) if challenge is not None else None
                break
        else:
            raise OmahaHttpError(f"the update server redirected more than {urls.MAX_REDIRECTS} times (last to "
                                 f"{urls.short(url)}): check server.url")
    except OmahaHttpError:
        raise
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        why = describe_error(exc)
        dropped = isinstance(exc, aiohttp.ServerDisconnectedError) or getattr(exc, "errno", None) == errno.ECONNRESET
        if dropped and url.lower().startswith("https:") and not client_cert:
            # TLS 1.3 servers refuse a missing client certificate after the handshake, by closing the connection
            why = ("TLS: the server closed the connection after the handshake; if it asks for a client certificate, "
                   f"set server.client_cert and server.client_key ({why})")
        if _TOO_LONG.search(f"{exc} {exc.__cause__ or ''}"):
            raise OmahaHttpError(f"unusable answer from the update server: {why}") from None
        raise OmahaHttpError(f"cannot reach the update server: {why}") from None
    if challenge is not None:
        try:
            cupmod.verify(cup[0], challenge, body, proof)
        except cupmod.CupError as exc:  # not trusted: like a malformed answer, and its headers count for nothing
            raise OmahaHttpError(f"unusable answer from the update server: {exc}", 200) from None
    # a CUP proof covers the request and the body, never a header: over plain http, X-Retry-After (or any other
    # header) could have been added on the way, so it binds only over verified TLS
    trusted = tls
    try:
        return Answer(decode_response(body), retry_after, trusted)
    except ProtocolError as exc:
        raise OmahaHttpError(f"unusable answer from the update server: {exc}", 200, retry_after, trusted) from None


class RedirectRefused(Exception):
    """A payload redirect the agent does not follow (``omaha.urls``), or too many of them."""


async def open_get(session, url: str, *, headers: dict, timeout):
    """The response to a GET of ``url`` (for ``async with``), redirects followed only to URLs the agent may use
    (at most ``urls.MAX_REDIRECTS``); ``RedirectRefused`` before connecting anywhere else."""
    for _ in range(urls.MAX_REDIRECTS + 1):
        resp = await session.get(url, headers=headers, timeout=timeout, allow_redirects=False)
        if resp.status not in urls.REDIRECT_STATUSES:
            return resp
        location = resp.headers.get("Location")
        resp.release()
        try:
            url = urls.redirect(url, location, allow_http=True)
        except ValueError as exc:
            raise RedirectRefused(str(exc)) from None
    raise RedirectRefused(f"redirected more than {urls.MAX_REDIRECTS} times (last to {urls.short(url)})")


class FetchError(Exception):
    """A small file could not be fetched: ``missing`` when the server answered that it has none (4xx), so
    trying again later will not help; otherwise a transfer failure worth retrying."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(clean(message, 600))
        self.missing = missing


async def fetch_small(session, url: str, limit: int, timeout: float = 30.0) -> bytes:
    """GETs ``url`` (a signature file), at most ``limit`` bytes. Raises ``FetchError``."""
    import aiohttp
    try:
        async with await open_get(session, url, headers={"Accept-Encoding": "identity"},
                                  timeout=aiohttp.ClientTimeout(total=timeout * 2, sock_read=timeout)) as resp:
            if resp.status != 200:
                raise FetchError(f"{url}: HTTP {resp.status}", missing=400 <= resp.status < 500)
            try:
                return await _read_body(resp, limit)
            except OmahaHttpError:
                raise FetchError(f"{url}: larger than {limit} bytes", missing=True) from None
    except RedirectRefused as exc:
        raise FetchError(f"{url}: {exc}", missing=True) from None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise FetchError(f"{url}: {describe_error(exc, 'timed out')}") from None


class BodyCut(OSError):
    """The connection ended before the end of a body read by ``DirectBody`` (an ``OSError``: the transfer
    errors' handlers take it like a reset)."""


class DirectBody(asyncio.BufferedProtocol):
    """The rest of a response body read from the socket straight into the caller's buffers (``recv_into``: no
    bytes object per read, no copy out of aiohttp's queue). ``take`` switches an aiohttp response's connection
    over to it after aiohttp parsed the status line and the headers, so the request, the redirect policy
    (``open_get``) and TLS stay aiohttp's; the connection is closed afterwards, never reused.

    Only for a body of a declared length, sent as is (no chunked transfer coding, no content coding): it reads
    exactly that many bytes and never more, whatever the server sends after them. A connection that ends early
    raises ``BodyCut``; no byte for ``timeout`` seconds while it waits for data raises ``asyncio.TimeoutError``.

    Reading goes on from one ``fill`` to the next without pausing the transport (a pause and a resume cost two
    system calls per buffer). Bytes the transport delivers while the caller holds no buffer here go to a small
    spill buffer, and reading pauses until the next ``fill``, which takes them first: memory stays bounded."""

    SPILL = 256 << 10  # at most what one read of the transport delivers (asyncio's TLS reads 256 KiB at most)

    def __init__(self, transport, length: int, received: int, timeout: float):
        self.transport = transport
        self.length = length  # the declared body length
        self.received = received  # bytes of it received so far (the ones aiohttp had already parsed included)
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.view: memoryview | None = None  # where the next bytes go
        self.pos = 0
        self.landed = 0  # after a cancelled ``fill``: how many bytes it had put in the view
        self.spill = bytearray()  # received while no view was given (in order, before whatever comes next)
        self.into: memoryview | None = None  # what the last get_buffer handed out
        self.waiter: asyncio.Future | None = None
        self.error: BaseException | None = None
        self.last = self.loop.time()
        self.watchdog = None

    @property
    def remaining(self) -> int:
        """Bytes of the body not received yet."""
        return self.length - self.received

    @property
    def left(self) -> int:
        """Bytes of the body not handed to the caller yet."""
        return self.length - self.received + len(self.spill)

    @classmethod
    def take(cls, resp, timeout: float) -> "tuple[bytes, DirectBody | None]":
        """The body bytes aiohttp already holds, and the reader of the rest (``None`` when the whole body is in
        those bytes, or when the connection cannot be taken over: then read on through ``resp.content``)."""
        conn, length = resp.connection, resp.content_length
        transport = conn.transport if conn is not None else None
        coded = "Transfer-Encoding" in resp.headers or \
            resp.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")
        if (length is None or coded or transport is None or transport.is_closing()
                or resp.content.exception() is not None):
            return b"", None
        head = resp.content.read_nowait(-1)  # what the parser already queued
        if len(head) >= length or resp.content.is_eof():
            return head, None
        conn.protocol.pause_reading()  # aiohttp's handler stops (its sock_read timer too) ...
        body = cls(transport, length, len(head), timeout)
        transport.set_protocol(body)  # ... and this one takes over, with nothing read in between
        transport.pause_reading()
        return head, body

    # -- what the caller awaits
    async def fill(self, view: memoryview) -> int:
        """Reads into ``view`` until it is full or the body ends; the count of bytes put there."""
        view = view[:self.left]
        n = min(len(self.spill), len(view))
        if n:  # what arrived in between comes first
            view[:n] = self.spill[:n]
            del self.spill[:n]
        if n == len(view):
            return n
        if self.error is not None:
            if n:
                return n
            raise self.error
        self.view, self.pos = view, n
        self.waiter = self.loop.create_future()
        self.last = self.loop.time()
        if self.watchdog is None:
            self.watchdog = self.loop.call_later(self.timeout, self._watch)
        self.transport.resume_reading()  # (nothing to do unless it was paused)
        try:
            await self.waiter
        except asyncio.CancelledError:
            self.transport.pause_reading()
            self.landed = self.pos  # bytes already in ``view``: the caller keeps them (a cancel saves them)
            raise
        except Exception:
            self.transport.pause_reading()
            if not self.pos:
                raise  # else the bytes that did arrive count first; the next call raises
        finally:
            self.view, self.waiter = None, None
        return self.pos

    def pause(self) -> None:
        """The caller will not come back at once (it waits for a buffer): stop reading until the next ``fill``
        rather than spill."""
        if self.waiter is None:
            self.transport.pause_reading()

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        self.transport.close()

    def _wake(self, error: BaseException | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        if self.waiter is not None and not self.waiter.done():
            if self.error is not None:
                self.waiter.set_exception(self.error)
            else:
                self.waiter.set_result(None)

    def _watch(self) -> None:
        self.watchdog = None
        if self.waiter is None or self.error is not None:
            return
        idle = self.loop.time() - self.last
        if idle >= self.timeout:
            self._wake(asyncio.TimeoutError())
            self.transport.abort()
        else:
            self.watchdog = self.loop.call_later(self.timeout - idle, self._watch)

    # -- the protocol
    def get_buffer(self, sizehint: int):
        if self.view is not None and self.pos < len(self.view) and not self.waiter.done():
            self.into = self.view
            return self.view[self.pos:]
        self.transport.pause_reading()  # no buffer of the caller's: this read, then none until the next fill
        room = min(self.SPILL, self.remaining)
        self.into = memoryview(bytearray(room if room > 0 else 4096))  # past the declared body: dropped
        return self.into  # (a memoryview: asyncio's TLS reads on into slices of what it gets here)

    def buffer_updated(self, nbytes: int) -> None:
        if self.into is not None and self.into is self.view:
            self.pos += nbytes
            self.received += nbytes
            self.last = self.loop.time()
            if self.pos == len(self.view):
                self._wake()
        elif self.remaining > 0:
            self.spill += self.into[:nbytes]
            self.received += nbytes
            self.last = self.loop.time()
        self.into = None

    def eof_received(self):
        if self.remaining:
            self._wake(BodyCut(f"the connection closed before the end of the body ({self.received} of "
                               f"{self.length} bytes)"))
        return False  # close the transport

    def connection_lost(self, exc) -> None:
        if self.remaining:
            self._wake(BodyCut(f"the connection closed before the end of the body ({self.received} of "
                               f"{self.length} bytes)" + (f": {exc}" if exc else "")))
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
