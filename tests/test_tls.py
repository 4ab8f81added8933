"""TLS as a device uses it, with certificates made by openssl in the test: the project's CA, a server certificate
for 127.0.0.1, a device (client) certificate. The right CA and certificate work, for the check, the events and the
payload; a wrong CA, an expired certificate, a host name mismatch and a missing client certificate are each
refused with one line that names the cause."""
import asyncio
import os
import ssl
import subprocess

import pytest

from agent.tools.devserver import DevServer

from .conftest import need_tool
from .simdevice import Device, image


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=cwd)


class Pki:
    """Keys and certificates under ``dir``, all made by the openssl command line."""

    def __init__(self, root):
        need_tool("openssl")
        self.dir = root / "pki"
        self.dir.mkdir()
        for ca in ("ca", "other-ca"):
            openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
                    f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}", cwd=self.dir)
        self.leaf("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        self.leaf("elsewhere", "subjectAltName=IP:127.0.0.2,DNS:update.example\nextendedKeyUsage=serverAuth\n")
        self.leaf("client", "extendedKeyUsage=clientAuth\n")
        # an expired server certificate: 'openssl ca' can set the validity dates ('x509 -req' cannot back-date)
        (self.dir / "ca.cnf").write_text(
            "[ca]\ndefault_ca = d\n[d]\ndir = .\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n"
            "default_md = sha256\npolicy = p\ncopy_extensions = copy\n[p]\ncommonName = supplied\n")
        (self.dir / "index.txt").write_text("")
        (self.dir / "serial").write_text("1000\n")
        openssl("ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key", "-in", "server.csr",
                "-out", "expired.pem", "-startdate", "20200101000000Z", "-enddate", "20200102000000Z", "-extfile",
                "server.ext", "-notext", cwd=self.dir)
        os.link(self.dir / "server.key", self.dir / "expired.key")

    def leaf(self, name, ext):
        (self.dir / f"{name}.ext").write_text(ext)
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=self.dir)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=self.dir)

    def path(self, name):
        return str(self.dir / name)

    def server_context(self, cert="server", require_client=True):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.path(f"{cert}.pem"), self.path(f"{cert}.key"))
        if require_client:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self.path("ca.pem"))
        return ctx


@pytest.fixture
def pki(tmp_path):
    return Pki(tmp_path)


def tls_device(tmp_path, srv, pki, ca="ca", client=True):
    dev = Device(tmp_path, srv.url)
    identity = (f", client_cert: {pki.path('client.pem')}, client_key: {pki.path('client.key')}" if client else "")
    text = open(dev.config).read().replace("insecure_http: true", f"ca_file: {pki.path(ca + '.pem')}{identity}")
    with open(dev.config, "w") as f:
        f.write(text)
    return dev


async def serving(tmp_path, ctx):
    srv = DevServer([image(tmp_path, "2.0.0")], ssl_context=ctx)
    await srv.start()
    return srv


async def test_the_right_ca_and_a_device_certificate_update_over_mutual_tls(tmp_path, pki):
    srv = await serving(tmp_path, pki.server_context())
    try:
        assert srv.url.startswith("https://127.0.0.1:")
        dev = tls_device(tmp_path, srv, pki)
        rc, out, err = await dev.once()
        assert rc == 0 and "installed 2.0.0 on slot b" in out, err
        assert srv.event_codes() == ["13/1", "14/1", "3/1"]  # the events and the payload went over the same TLS
    finally:
        await srv.stop()


@pytest.mark.parametrize("case,says", [
    ("wrong ca", "TLS: the server's certificate is not signed by a trusted CA"),
    ("expired", "TLS: the server's certificate has expired"),
    ("other host", "TLS: the server's certificate is not for this host name or address"),
    ("no client certificate", "TLS: the server closed the connection after the handshake; if it asks for a client "
                              "certificate, set server.client_cert"),
])
async def test_each_tls_failure_is_one_line_naming_its_cause(tmp_path, pki, case, says):
    cert = {"expired": "expired", "other host": "elsewhere"}.get(case, "server")
    srv = await serving(tmp_path, pki.server_context(cert))
    try:
        dev = tls_device(tmp_path, srv, pki, ca="other-ca" if case == "wrong ca" else "ca",
                         client=case != "no client certificate")
        rc, out, err = await dev.once()
        assert rc == 1 and "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("omaha-agent: cannot reach the update server: " + says), last
        assert srv.requests == [] and dev.boot.status()["b"].state.value == "bad"
    finally:
        await srv.stop()


async def test_a_client_certificate_without_its_key_is_a_config_error(tmp_path, pki):
    dev = Device(tmp_path, "https://127.0.0.1:9/")
    text = open(dev.config).read().replace("insecure_http: true", f"client_cert: {pki.path('client.pem')}")
    with open(dev.config, "w") as f:
        f.write(text)
    rc, out, err = await dev.cli("config", "check")
    assert rc == 2 and "server.client_key: missing (server.client_cert and server.client_key go together)" in err


async def test_a_payload_read_straight_into_buffers_over_tls_arrives_whole(pki):
    # http.DirectBody under asyncio's TLS transport, which reads on into slices of the buffer it was given: bodies
    # in uneven writes, a reader that sometimes pauses, bytes spilled between buffers; every byte in order
    import hashlib
    import random

    from agent import http as agent_http
    data = os.urandom((3 << 20) + 4321)

    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\n\r\n".encode())
        rng, at = random.Random(3), 0
        while at < len(data):
            n = rng.choice([100, 16384, 65536, 300_000, 1 << 20])
            writer.write(data[at:at + n])
            at += n
            if rng.random() < 0.3:
                await writer.drain()
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=pki.server_context(require_client=False))
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v2.img"
    rng = random.Random(5)
    try:
        for _ in range(3):
            async with agent_http.make_session(ca_file=pki.path("ca.pem")) as session:
                async with session.get(url) as resp:
                    head, body = agent_http.DirectBody.take(resp, 10)
                    assert body is not None
                    got, buffers = hashlib.sha256(head), [bytearray(1 << 20) for _ in range(3)]
                    size, turn = len(head), 0
                    while body.left:
                        if rng.random() < 0.3:  # the ring is full for a moment: no read lands anywhere else
                            body.pause()
                            await asyncio.sleep(0.002)
                        view = memoryview(buffers[turn % 3])
                        turn += 1
                        n = await body.fill(view)
                        got.update(view[:n])
                        size += n
                    body.close()
            assert size == len(data) and got.digest() == hashlib.sha256(data).digest()
    finally:
        server.close()
        await server.wait_closed()
