"""The Omaha HTTP adapter: POST a request, get a decoded response and the server's X-Retry-After."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .omaha import ProtocolError, Request, Response, decode_response, encode_request
from .omaha.headers import parse_retry_after, request_headers

MAX_RESPONSE = 1 << 20


class OmahaHttpError(Exception):
    def __init__(self, message: str, status: int | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class Answer:
    response: Response
    retry_after: int | None


def make_session(ca_file: str | None = None, timeout: float = 30.0):
    """An aiohttp session (aiohttp is imported here, when the first check runs, not at start-up)."""
    import ssl

    import aiohttp

    ssl_context = ssl.create_default_context()
    if ca_file:
        ssl_context.load_verify_locations(ca_file)
    connector = aiohttp.TCPConnector(ssl=ssl_context, limit=4)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                                                                   sock_read=timeout))


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
               timeout: float = 30.0) -> Answer:
    import aiohttp

    headers = request_headers(req, interactive, request_age)
    try:
        async with session.post(url, data=encode_request(req), headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout * 2)) as resp:
            retry_after = parse_retry_after(resp.headers.get("X-Retry-After"))
            if resp.status != 200:
                raise OmahaHttpError(f"server answered HTTP {resp.status}", resp.status, retry_after)
            body = await _read_body(resp, MAX_RESPONSE)
    except OmahaHttpError:
        raise
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        text = "timed out" if isinstance(exc, asyncio.TimeoutError) else (str(exc).splitlines() or [type(exc).__name__])[0]
        raise OmahaHttpError(f"cannot reach the update server: {text[:200]}") from None
    try:
        return Answer(decode_response(body), retry_after)
    except ProtocolError as exc:
        raise OmahaHttpError(f"unusable answer from the update server: {exc}", 200, retry_after) from None


class FetchError(Exception):
    """A small file could not be fetched: ``missing`` when the server answered that it has none (4xx), so
    trying again later will not help; otherwise a transfer failure worth retrying."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


async def fetch_small(session, url: str, limit: int, timeout: float = 30.0) -> bytes:
    """GETs ``url`` (a signature file), at most ``limit`` bytes. Raises ``FetchError``."""
    import aiohttp
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout * 2, sock_read=timeout),
                               headers={"Accept-Encoding": "identity"}) as resp:
            if resp.status != 200:
                raise FetchError(f"{url}: HTTP {resp.status}", missing=400 <= resp.status < 500)
            try:
                return await _read_body(resp, limit)
            except OmahaHttpError:
                raise FetchError(f"{url}: larger than {limit} bytes", missing=True) from None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise FetchError(f"{url}: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}") from None
