"""Proxies (agent/proxy.py, http.make_session) against a real proxy: Debian's tinyproxy, started here on 127.0.0.1
(``make system-deps`` installs it; the tests skip only when it is not installed). A check and install over https go
through it by CONNECT, TLS end to end to the server and its CA checked; over plain http every request (check,
payload, events) is seen in the proxy's log; a proxy that refuses fails the check in one line and the schedule backs
off; the user and password in the proxy URL never show. tinyproxy cannot be told to cut a transfer, so the
resume-through-a-proxy test uses a small CONNECT proxy of its own (``CuttingProxy``) that ends the first tunnel
once it has carried half the payload."""
import asyncio
import os
import socket
import subprocess
import time

import pytest

from agent import proxy
from agent.tools.devserver import DevServer

from .conftest import need_tool
from .simdevice import Device, image
from .test_tls import Pki
from .test_trust import keys, signed_device, with_release  # noqa: F401 - keys is a fixture

SECRET = "s3cret-Pa55"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tinyproxy:
    """tinyproxy in the foreground on 127.0.0.1, with Basic auth (user alice) and its log in ``log``."""

    def __init__(self, root, auth=True):
        need_tool("tinyproxy")
        self.port = free_port()
        self.log = root / "tinyproxy.log"
        conf = root / "tinyproxy.conf"
        conf.write_text(f"Port {self.port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{self.log}\"\nLogLevel Info\n"
                        f"PidFile \"{root}/tinyproxy.pid\"\nMaxClients 20\nAllow 127.0.0.1\n"
                        + (f"BasicAuth alice {SECRET}\n" if auth else ""))
        self.proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.close()
        pytest.fail("tinyproxy did not start listening within 10 s")

    def url(self, password=SECRET) -> str:
        return f"http://alice:{password}@127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        """The request lines tinyproxy logged (``GET http://...``, ``CONNECT 127.0.0.1:...``)."""
        text = self.log.read_text() if self.log.exists() else ""
        return [line.split("): ", 1)[1] for line in text.splitlines() if "Request (file descriptor" in line]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def tinyproxy(tmp_path):
    p = Tinyproxy(tmp_path)
    yield p
    p.close()


def with_config(dev, old, new):
    text = open(dev.config).read()
    assert old in text
    with open(dev.config, "w") as f:
        f.write(text.replace(old, new))


async def run_with_env(dev, env, *args):
    proc = await asyncio.create_subprocess_exec(
        *(await _argv(dev, args)), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**{k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}, **env,
             "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    return proc.returncode, out.decode(), err.decode()


async def _argv(dev, args):
    import sys
    return [sys.executable, "-m", "agent.cli", *(args or ("daemon", "--once", "--verbose")), "--config", dev.config]


async def https_server(tmp_path, pki):
    srv = DevServer([image(tmp_path, "2.0.0")], ssl_context=pki.server_context(require_client=False))
    await srv.start()
    return srv


def https_device(tmp_path, srv, pki, proxy_line=""):
    dev = Device(tmp_path, srv.url)
    with_config(dev, "insecure_http: true", f"ca_file: {pki.path('ca.pem')}{proxy_line}")
    return dev


async def test_an_https_check_and_install_go_through_the_proxy_by_connect_with_the_servers_ca_checked(
        tmp_path, tinyproxy):
    pki = Pki(tmp_path)
    srv = await https_server(tmp_path, pki)
    try:
        dev = https_device(tmp_path, srv, pki, f", proxy: \"{tinyproxy.url()}\"")
        rc, out, err = await run_with_env(dev, {})
        assert rc == 0 and "installed 2.0.0 on slot b" in out, err
        assert srv.event_codes() == ["13/1", "14/1", "3/1"]
        tunnels = tinyproxy.requests()
        print("proxy saw:", tunnels)
        port = srv.url.split(":")[2].split("/")[0]
        assert tunnels and all(line.startswith(f"CONNECT 127.0.0.1:{port} ") for line in tunnels)
        assert f"through http://127.0.0.1:{tinyproxy.port}" in err and SECRET not in out + err
    finally:
        await srv.stop()


async def test_through_the_proxy_the_servers_certificate_is_still_checked_against_the_ca(tmp_path, tinyproxy):
    pki = Pki(tmp_path)
    srv = await https_server(tmp_path, pki)
    try:
        dev = Device(tmp_path, srv.url)
        with_config(dev, "insecure_http: true", f"ca_file: {pki.path('other-ca.pem')}, proxy: \"{tinyproxy.url()}\"")
        rc, out, err = await run_with_env(dev, {})
        assert rc == 1 and srv.requests == []
        assert "TLS: the server's certificate is not signed by a trusted CA" in err.strip().splitlines()[-1]
        assert tinyproxy.requests()  # it went as far as the tunnel: TLS runs inside it, to the server
    finally:
        await srv.stop()


async def test_over_plain_http_the_environments_http_proxy_carries_every_request(tmp_path, tinyproxy, keys):
    srv = await with_release(tmp_path, keys["ed25519"][0])  # a signed release: its envelope comes through too
    try:
        dev = signed_device(tmp_path, srv, keys["ed25519"][1])
        rc, out, err = await run_with_env(dev, {"http_proxy": tinyproxy.url(), "no_proxy": "example.com"})
        assert rc == 0 and "installed 2.0.0 on slot b" in out, err
        lines = tinyproxy.requests()
        print("proxy saw:", lines)
        base = srv.url.rsplit("/", 3)[0]
        posts = [line for line in lines if line.startswith(f"POST {srv.url} ")]
        gets = [line.split(" ")[1] for line in lines if line.startswith(f"GET {base}/")]
        assert len(posts) == len(srv.requests) >= 2  # the check and the events
        assert any(g.endswith(".sig") for g in gets) and any(not g.endswith(".sig") for g in gets)  # and the payload
        assert SECRET not in out + err
    finally:
        await srv.stop()


async def test_a_proxy_that_refuses_fails_the_check_in_one_line_without_the_password_and_backs_off(
        tmp_path, tinyproxy):
    pki = Pki(tmp_path)
    srv = await https_server(tmp_path, pki)
    try:
        dev = https_device(tmp_path, srv, pki, f", proxy: \"{tinyproxy.url('wrong-' + SECRET)}\"")
        rc, out, err = await run_with_env(dev, {})
        last = err.strip().splitlines()[-1]
        print(last)
        assert rc == 1 and srv.requests == []
        assert "the proxy refused: HTTP 401" in last or "the proxy refused: HTTP 407" in last
        assert "check the user and password in the proxy URL" in last
        state = dev.state()
        assert state["failures"] == 1 and "\n" not in state["last_error"]
        assert "the proxy refused" in state["last_error"]
        for text in (out, err, open(dev.config.replace("agent.yaml", "state/state.json")).read()):
            assert SECRET not in text
        import random

        from agent import schedule  # the next check is the schedule's backoff, not the regular interval
        plan = schedule.next_check(0, random.Random(1), schedule.Policy(), failures=state["failures"])
        assert plan.reason.startswith("backoff after 1 failed check")
    finally:
        await srv.stop()


async def test_a_proxy_nobody_listens_on_is_named_in_one_line(tmp_path, server):
    dev = Device(tmp_path, server.url)
    port = free_port()
    rc, out, err = await run_with_env(dev, {"http_proxy": f"http://bob:{SECRET}@127.0.0.1:{port}"})
    last = err.strip().splitlines()[-1]
    assert rc == 1 and server.requests == [] and f"cannot connect to the proxy 127.0.0.1:{port}" in last, last
    assert SECRET not in out + err and SECRET not in str(dev.state())


async def test_no_proxy_sends_the_listed_hosts_direct(tmp_path, server):
    dev = Device(tmp_path, server.url)
    dead = f"http://127.0.0.1:{free_port()}"  # would fail every request that went to it
    rc, out, err = await run_with_env(dev, {"http_proxy": dead, "https_proxy": dead, "no_proxy": "localhost,127.0.0.1"})
    assert rc == 0 and "installed 2.0.0 on slot b" in out, err


async def test_an_https_proxy_url_is_a_config_error_and_a_bad_environment_one_fails_the_check(tmp_path, server):
    dev = Device(tmp_path, server.url)
    with_config(dev, "insecure_http: true", f"insecure_http: true, proxy: \"https://u:{SECRET}@127.0.0.1:3128\"")
    rc, out, err = await dev.cli("config", "check")
    assert rc == 2 and "server.proxy: 'https://127.0.0.1:3128': TLS to the proxy is not supported" in err, err
    assert SECRET not in err
    (tmp_path / "second").mkdir()
    dev = Device(tmp_path / "second", server.url)
    rc, out, err = await run_with_env(dev, {"http_proxy": f"socks5://u:{SECRET}@127.0.0.1:1080"})
    last = err.strip().splitlines()[-1]
    assert rc == 1 and "http_proxy: 'socks5://127.0.0.1:1080' is not an http:// proxy URL" in last, last
    assert server.requests == [] and SECRET not in out + err


class CuttingProxy:
    """A CONNECT-only proxy (a tunnel of bytes, as tinyproxy's): the first tunnel that has carried ``cut`` bytes
    towards the agent is closed, once; every other tunnel runs to its end."""

    def __init__(self, cut: int):
        self.cut, self.cuts, self.tunnels = cut, 0, []

    async def start(self):
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()

    async def _client(self, reader, writer):
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ")
            self.tunnels.append(f"{method} {target}")
            host, port = target.rsplit(":", 1)
            if method != "CONNECT" or host != "127.0.0.1":
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            up = asyncio.ensure_future(self._pipe(reader, up_writer, None))
            await self._pipe(up_reader, writer, self)
            up.cancel()
            up_writer.close()
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _pipe(reader, writer, counter):
        carried = 0
        while data := await reader.read(65536):
            carried += len(data)
            if counter is not None and not counter.cuts and carried > counter.cut:
                counter.cuts += 1
                writer.transport.abort()
                return
            writer.write(data)
            await writer.drain()


async def test_a_proxy_that_cuts_mid_download_is_resumed_through_the_proxy(tmp_path):
    pki = Pki(tmp_path)
    srv = await https_server(tmp_path, pki)
    cutter = CuttingProxy(cut=3 << 19)  # half the 3 MiB payload
    await cutter.start()
    try:
        dev = https_device(tmp_path, srv, pki, f", proxy: \"http://127.0.0.1:{cutter.port}\"")
        rc, out, err = await run_with_env(dev, {})
        assert rc == 0 and "installed 2.0.0 on slot b" in out, err
        print("tunnels:", cutter.tunnels, "payload streams:", srv.streams)
        assert cutter.cuts == 1
        first, *rest = srv.streams  # (the server may have sent it all: the proxy cut what it had not passed on)
        assert first["start"] == 0 and rest and rest[-1]["done"]
        assert 0 < rest[0]["start"] < 3 << 20  # resumed with a Range, not from byte 0
        assert all(t.startswith("CONNECT 127.0.0.1:") for t in cutter.tunnels) and len(cutter.tunnels) >= 2
    finally:
        await cutter.stop()
        await srv.stop()


async def test_the_fleet_lock_goes_through_the_sessions_proxy(tinyproxy):
    from agent import fleetlock
    from agent.http import make_session
    from agent.tools.fleetlockserver import FleetLockServer
    lock = FleetLockServer(slots=1)
    await lock.start()
    session = make_session(route=proxy.route(None, (), {"http_proxy": tinyproxy.url()}))
    try:
        answer = await fleetlock.call(session, lock.url, "pre-reboot", "device-1", "default")
    finally:
        await session.close()
        await lock.stop()
    assert isinstance(answer, fleetlock.Granted)
    assert [line.split(" ")[:2] for line in tinyproxy.requests()] == [["POST", f"{lock.url}/v1/pre-reboot"]]


# -- the rules, without a network
def test_no_proxy_matches_names_their_subdomains_addresses_blocks_and_ports():
    entries = proxy.no_proxy_list("example.com, .lan *.corp 10.0.0.0/8,::1 updates.io:8443")
    assert proxy.bypassed("example.com", 443, entries) and proxy.bypassed("a.b.example.com", 443, entries)
    assert not proxy.bypassed("badexample.com", 443, entries)
    assert proxy.bypassed("nas.lan", 80, entries) and proxy.bypassed("x.corp", 80, entries)
    assert proxy.bypassed("10.1.2.3", 80, entries) and not proxy.bypassed("11.1.2.3", 80, entries)
    assert proxy.bypassed("[::1]", 80, entries)
    assert proxy.bypassed("updates.io", 8443, entries) and not proxy.bypassed("updates.io", 443, entries)
    assert proxy.bypassed("anything", 1, ("*",))


def test_the_route_prefers_the_config_and_reads_curls_variables_only():
    env = {"HTTPS_PROXY": "http://p1:3128", "HTTP_PROXY": "http://cgi-set:1", "NO_PROXY": "internal"}
    way = proxy.route(None, (), env)
    assert str(way.for_url("https://u.example/x")) == "http://p1:3128"
    assert way.for_url("http://u.example/x") is None  # upper-case HTTP_PROXY is never read
    assert way.for_url("https://internal/x") is None
    way = proxy.route("u:pw@p2:8080", ("direct.example",), env)
    chosen = way.for_url("https://u.example/")
    assert (chosen.url, chosen.user, chosen.password) == ("http://p2:8080", "u", "pw")
    assert way.for_url("https://direct.example/") is None and "pw" not in way.describe()


def test_redact_takes_credentials_out_of_any_url_in_a_text():
    assert proxy.redact(f"to http://alice:{SECRET}@proxy:3128/ failed") == "to http://proxy:3128/ failed"
