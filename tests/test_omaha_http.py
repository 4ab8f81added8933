"""The Omaha HTTP adapter against real aiohttp servers on 127.0.0.1 that answer the way real networks and
hostile servers do: in pieces, slowly, too much, or not at all."""
import asyncio
import os

import pytest
from aiohttp import web

from agent import http
from agent.omaha.request import ClientInfo, update_check

from .childmem import in_child

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "omaha")
RESPONSE = open(os.path.join(DATA, "coreos_update_response.xml"), "rb").read()
APPID = "e96281a6-d1af-4bde-9a0a-97b76e56dc57"


async def _serve(handler):
    app = web.Application()
    app.router.add_post("/v1/update/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1/update/"


async def _check(handler, timeout=5.0):
    runner, url = await _serve(handler)
    req = update_check(ClientInfo(appid=APPID, version="1.0.0"), requestid="r", sessionid="s", interactive=False,
                       ping=None)
    try:
        async with http.make_session(timeout=timeout) as session:
            return await asyncio.wait_for(http.post(session, url, req, interactive=False, timeout=timeout), 30)
    finally:
        await runner.cleanup()


def _pieces(body, sizes, pause=0.05, chunked=True):
    async def handler(request):
        await request.read()
        headers = {"Content-Type": "text/xml"}
        if not chunked:
            headers["Content-Length"] = str(len(body))
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        at = 0
        for size in sizes:
            await resp.write(body[at:at + size])
            at += size
            await asyncio.sleep(pause)
        await resp.write(body[at:])
        await resp.write_eof()
        return resp
    return handler


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
async def test_a_response_arriving_in_pieces_is_read_whole(chunked):
    # a real network delivers a body of a few KiB in several segments; each piece here is a separate write
    # with a pause between, so the client sees them one at a time
    sizes = [1, 40, 200, 7] + [100] * 5
    answer = await _check(_pieces(RESPONSE, sizes, chunked=chunked))
    app = answer.response.apps[0]
    assert app.appid == APPID and app.updatecheck.status == "ok"
    assert app.updatecheck.manifest.version


async def test_a_declared_body_over_the_limit_is_refused_without_reading_it():
    sent = []

    async def handler(request):
        await request.read()
        resp = web.StreamResponse(headers={"Content-Length": str(50 << 20)})
        await resp.prepare(request)
        for _ in range(50):
            try:
                await resp.write(b" " * (1 << 20))
            except (ConnectionError, RuntimeError):
                break
            sent.append(1)
        return resp

    with pytest.raises(http.OmahaHttpError) as info:
        await _check(handler)
    assert "over the 1048576-byte limit" in str(info.value) and "52428800 bytes" in str(info.value)
    assert len(sent) < 50


async def test_an_endless_body_is_cut_at_the_limit_with_bounded_memory():
    async def handler(request):
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/xml"})
        await resp.prepare(request)
        await resp.write(b'<response protocol="3.0">')
        for _ in range(4096):  # 256 MiB if the client read it all
            try:
                await resp.write(b"<x/>" * 16384)
            except (ConnectionError, RuntimeError):
                break
        return resp

    runner, url = await _serve(handler)
    try:  # the client in a child process, whose own peak RSS is measured; this loop serves meanwhile
        error, grown = await asyncio.to_thread(in_child, "tests.test_omaha_http", "post_error", url)
    finally:
        await runner.cleanup()
    assert "over the 1048576-byte limit" in error
    assert grown < 64, grown  # MiB: the 1 MiB cap and aiohttp's buffers, never the 256 MiB sent


async def post_error(url: str) -> str:
    """(Run in a child process by ``in_child``.) The error the adapter's check at ``url`` ends with."""
    req = update_check(ClientInfo(appid=APPID, version="1.0.0"), requestid="r", sessionid="s", interactive=False,
                       ping=None)
    try:
        async with http.make_session(timeout=5.0) as session:
            await asyncio.wait_for(http.post(session, url, req, interactive=False, timeout=5.0), 30)
    except http.OmahaHttpError as exc:
        return str(exc)
    return "no error"


async def test_a_server_that_stops_mid_body_times_out_with_a_clear_error():
    async def handler(request):
        await request.read()
        resp = web.StreamResponse(headers={"Content-Length": str(len(RESPONSE))})
        await resp.prepare(request)
        await resp.write(RESPONSE[:100])
        await asyncio.sleep(3)  # well past the 0.5 s read timeout; short so the server shuts down quickly
        return resp

    with pytest.raises(http.OmahaHttpError) as info:
        await _check(handler, timeout=0.5)
    assert str(info.value) == "cannot reach the update server: timed out"


async def test_a_connection_closed_mid_body_is_a_clear_error_not_half_a_response():
    async def handler(request):
        await request.read()
        resp = web.StreamResponse(headers={"Content-Length": str(len(RESPONSE))})
        await resp.prepare(request)
        await resp.write(RESPONSE[:len(RESPONSE) // 2])
        request.transport.close()
        return resp

    with pytest.raises(http.OmahaHttpError) as info:
        await _check(handler)
    assert str(info.value).startswith("cannot reach the update server:")


async def test_an_error_status_keeps_the_retry_after():
    async def handler(request):
        await request.read()
        return web.Response(status=503, text="busy", headers={"X-Retry-After": "120"})

    with pytest.raises(http.OmahaHttpError) as info:
        await _check(handler)
    assert (str(info.value), info.value.status, info.value.retry_after) == ("server answered HTTP 503", 503, 120)


class _Names:
    """A resolver answering from a table (the system's resolver is not asked): names that resolve to link-local
    addresses without a DNS server. Unknown names fail as a lookup does."""

    def __init__(self, table: dict[str, str]):
        self.table, self.asked = table, []

    async def resolve(self, host, port=0, family=0):
        import socket
        self.asked.append(host)
        if host not in self.table:
            raise OSError(f"no such name: {host}")
        address = self.table[host]
        fam = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [{"hostname": host, "host": address, "port": port, "family": fam, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}]

    async def close(self):
        pass


@pytest.fixture
def connects(monkeypatch):
    """Every socket connection attempted in the test (one outside 127.0.0.1 is stopped)."""
    import socket
    seen, real = [], socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        seen.append(host)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host != "127.0.0.1":
            raise OSError(f"test guard: no connection to {host} outside 127.0.0.1")
        return real(sock, address)
    monkeypatch.setattr(socket.socket, "connect", guarded)
    return seen


@pytest.mark.parametrize("address", ["169.254.169.254", "169.254.0.1", "fe80::1", "::ffff:169.254.169.254"])
async def test_a_server_name_resolving_to_a_link_local_address_is_refused_before_connecting(address, connects):
    names = _Names({"metadata.test": address, "updates.test": "127.0.0.1"})

    async def handler(request):
        await request.read()
        return web.Response(body=RESPONSE, content_type="text/xml")
    runner, url = await _serve(handler)
    port = url.split(":")[2].split("/")[0]
    req = update_check(ClientInfo(appid=APPID, version="1.0.0"), requestid="r", sessionid="s", interactive=False,
                       ping=None)
    try:
        async with http.make_session(timeout=5, resolver=names) as session:
            with pytest.raises(http.OmahaHttpError) as info:
                await http.post(session, f"http://metadata.test:{port}/v1/update/", req, interactive=False, timeout=5)
            # a payload GET through the same session is refused the same way
            with pytest.raises(OSError, match="link-local"):
                async with session.get(f"http://metadata.test:{port}/payload"):
                    pass
            # the same session still reaches a name that resolves to an ordinary address
            answer = await http.post(session, f"http://updates.test:{port}/v1/update/", req, interactive=False,
                                     timeout=5)
    finally:
        await runner.cleanup()
    message = str(info.value)
    assert message.startswith("cannot reach the update server: refused: 'metadata.test' resolves to the link-local "
                              f"address {address} (a metadata service") and "\n" not in message, message
    assert answer.response.apps and names.asked.count("metadata.test") == 2
    assert connects == ["127.0.0.1"], connects  # only the ordinary name was connected to
