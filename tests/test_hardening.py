"""Regression tests for issue 16's table, one or more per row, driven as a user meets them: the CLI (`daemon
--once`, the forever daemon, `config check`) against the development server on 127.0.0.1."""
import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time

import pytest
from aiohttp import web

from agent.tools.devserver import Image

from .simdevice import APP, ROOT, Device


def one_line(err: str) -> str:
    """The one-line verdict ``--once`` and ``config check`` end with on failure (log lines of the run may come
    before it; a traceback may not)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("omaha-agent: "), err
    return lines[-1]


def set_server(dev: Device, line: str) -> None:
    """Replaces the config's ``server:`` line (the simulated device writes a plain-http one)."""
    with open(dev.config) as f:
        lines = f.read().splitlines(keepends=True)
    assert lines[0].startswith("server:")
    lines[0] = line.rstrip("\n") + "\n"
    with open(dev.config, "w") as f:
        f.writelines(lines)


class Forever:
    """``omaha-agent daemon`` (forever, no D-Bus) as a subprocess, its stderr read line by line."""

    def __init__(self, dev: Device):
        self.dev, self.lines, self.proc = dev, [], None

    async def start(self):
        with open(self.dev.config, "a") as f:
            f.write("schedule: {initial_delay: 1, interval: 3600, backoff_base: 1, backoff_cap: 60}\n"
                    "dbus: {enabled: false}\n")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli", "daemon", "--config", self.dev.config,
            env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)

    async def wait_for(self, text: str, limit: float = 30) -> str:
        async def scan():
            while True:
                line = (await self.proc.stderr.readline()).decode()
                assert line, "the daemon exited:\n" + "".join(self.lines)
                self.lines.append(line)
                if text in line:
                    return line
        return await asyncio.wait_for(scan(), limit)

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(self.proc.communicate(), 30)
        self.lines.extend(err.decode().splitlines(keepends=True))
        return self.proc.returncode


def downloads(tmp_path) -> list[dict]:
    with open(tmp_path / "server.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == "download"]


# ------------------------------------------------------------------------------------------------ row 1
async def test_row1_an_offer_of_size_0_is_refused_and_slot_b_is_never_set_bootable(tmp_path, server):
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    server.images = [Image(str(empty), "2.0.0", APP)]  # size 0, hash_sha256 of nothing
    dev = Device(tmp_path, server.url)
    with open(dev.slots["b"], "r+b") as f:
        f.write(b"STALE BYTES OF AN OLD IMAGE")
    rc, out, err = await dev.once()
    assert rc == 1 and "has size 0" in one_line(err)
    slots = await dev.slots_json()
    assert slots["slots"]["b"]["state"] != "trial" and slots["slots"]["a"]["state"] == "good"
    assert server.event_codes() == [] and downloads(tmp_path) == []


# ------------------------------------------------------------------------------------------------ row 2
def long_version_image(tmp_path, version: str) -> Image:
    path = tmp_path / "long-version.img"
    path.write_bytes(os.urandom(1 << 20))
    return Image(str(path), version, APP)


async def test_row2_a_version_of_5000_digits_is_a_one_line_error_with_once(tmp_path, server):
    server.images = [long_version_image(tmp_path, "9" * 5000)]
    dev = Device(tmp_path, server.url)
    rc, out, err = await dev.once()
    assert rc == 1 and "is not a version" in one_line(err) and len(err) < 400
    assert (await dev.slots_json())["slots"]["b"]["state"] != "trial"


async def test_row2_the_forever_daemon_survives_a_5000_digit_version_and_checks_again(tmp_path, server):
    server.images = [long_version_image(tmp_path, "1" + "0" * 5000)]
    dev = Device(tmp_path, server.url)
    daemon = Forever(dev)
    await daemon.start()
    try:
        await daemon.wait_for("is not a version")
        await daemon.wait_for("backoff after 1 failed check(s)")
        await daemon.wait_for("is not a version")  # it checked again: still alive
        assert daemon.proc.returncode is None
    finally:
        assert await daemon.stop() == 0
    assert not any("Traceback" in line for line in daemon.lines)
    assert len([r for r in server.requests if r["apps"][0]["updatecheck"]]) >= 2


# ------------------------------------------------------------------------------------------------ row 3
@pytest.fixture
def tls(tmp_path):
    """A self-signed certificate for 127.0.0.1 (openssl), its key, and the CA file the agent is given."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


async def https_redirector(tls, location: str):
    """An https server on 127.0.0.1 that answers every POST with 307 to ``location``."""
    hits = []

    async def handle(request):
        hits.append(request.path)
        return web.Response(status=307, headers={"Location": location})
    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls[0]), str(tls[1]))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    return runner, f"https://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1/update/", hits


async def test_row3_an_https_check_redirected_to_http_is_refused_before_connecting(tmp_path, server, tls):
    runner, url, hits = await https_redirector(tls, server.url)  # the plain-http dev server
    try:
        dev = Device(tmp_path, url)
        set_server(dev, f'server: {{url: "{url}", ca_file: "{tls[0]}", timeout: 5}}')
        rc, out, err = await dev.once()
    finally:
        await runner.cleanup()
    line = one_line(err)
    assert rc == 1 and "refused a redirect" in line and "plain http" in line
    assert hits and server.requests == [] and server.events == []  # the http server was never reached
    assert (await dev.slots_json())["slots"]["b"]["state"] != "trial"


async def test_row13_a_redirect_loop_says_too_many_redirects_and_where(tmp_path, server):
    server.faults.redirect_check = server.url  # the server redirects to itself
    dev = Device(tmp_path, server.url)
    rc, out, err = await dev.once()
    line = one_line(err)
    assert rc == 1 and "redirected more than 5 times" in line and "check server.url" in line


# ------------------------------------------------------------------------------------------------ row 4
async def test_row4_a_gzip_encoding_server_that_drops_once_still_installs_in_one_run(tmp_path, server):
    server.faults.gzip_encoding = True
    server.faults.reset_after, server.faults.resets = 1 << 20, 1
    dev = Device(tmp_path, server.url)
    rc, out, err = await dev.once()
    assert rc == 0 and "installed 2.0.0 on slot b" in out, err
    got = downloads(tmp_path)
    assert got and all(d.get("accept_encoding") == "identity" and "encoding" not in d for d in got)
    assert len(got) == 2 and got[1]["start"] > 0  # resumed with a Range, in bytes as sent
    with open(server.images[0].path, "rb") as f, open(dev.slots["b"], "rb") as g:
        want = f.read()
        assert g.read(len(want)) == want


# ------------------------------------------------------------------------------------------------ rows 5, 6, 7, 13: config
GOOD = """\
server: {url: "https://updates.example.com/v1/update/", timeout: 30}
app: {id: "{X}", version: "1.0.0"}
slots:
  a: {file: /tmp/omaha-test-a.img}
  b: {file: /tmp/omaha-test-b.img}
boot: {backend: sim, env: /tmp/omaha-test-env.json}
install: {read_timeout: 60}
"""


def config_check(tmp_path, text: str | bytes):
    path = tmp_path / "agent.yaml"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "config", "check", "--config", str(path)],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started


def test_the_good_config_used_below_passes_config_check(tmp_path):
    rc, out, err, _ = config_check(tmp_path, GOOD)
    assert rc == 0 and ": ok (" in out, err


@pytest.mark.parametrize("key,line", [("timeout: 30", 1), ("read_timeout: 60", 7)])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e-300", "0"])
def test_row5_a_duration_that_is_not_a_finite_positive_number_is_a_config_error(tmp_path, key, line, value):
    name = key.split(":")[0]
    rc, out, err, _ = config_check(tmp_path, GOOD.replace(key, f"{name}: {value}"))
    section = "server" if name == "timeout" else "install"
    assert rc != 0 and f"agent.yaml:{line}: {section}.{name}: must be" in one_line(err)


BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


@pytest.mark.parametrize("key", ["app: {id: ", "track", "server: {url: "])
def test_row6_a_yaml_anchor_bomb_is_refused_at_once_with_a_short_message(tmp_path, key):
    text = BOMB + GOOD
    if key == "track":
        text = text.replace('version: "1.0.0"}', 'version: "1.0.0", track: *i}')
    elif key.startswith("app"):
        text = text.replace('app: {id: "{X}"', "app: {id: *i")
    else:
        text = text.replace('server: {url: "https://updates.example.com/v1/update/"', "server: {url: *i")
    rc, out, err, took = config_check(tmp_path, text)
    line = one_line(err)
    assert rc != 0 and "YAML aliases (*a) are not allowed" in line and len(line) < 200 and took < 20


def test_row6_a_huge_value_is_refused_and_quoted_by_a_short_prefix(tmp_path):
    rc, out, err, _ = config_check(tmp_path, GOOD.replace("version: \"1.0.0\"", "track: " + "x" * 500_000))
    line = one_line(err)
    assert rc != 0 and "app.track: is 500000 characters long" in line and len(line) < 300


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace("https://updates.example.com/v1/update/", "http://[::1"), "server.url: 'http://[::1' is not a valid URL"),
    (lambda t: t.replace("https://updates.example.com/v1/update/", "ftp://x/"), "is not an http(s) URL"),
    (lambda t: t.replace("https://updates.example.com/v1/update/", "https://169.254.169.254/"), "link-local"),
    (lambda t: t.replace("https://updates.example.com/v1/update/", "https://h:99999/"), "is not a valid URL"),
])
def test_row7_an_invalid_server_url_is_a_config_error(tmp_path, edit, message):
    rc, out, err, _ = config_check(tmp_path, edit(GOOD))
    assert rc != 0 and message in one_line(err) and "agent.yaml:1: server.url" in err


def test_row7_a_ca_file_that_is_not_pem_is_a_config_error(tmp_path):
    bogus = tmp_path / "ca.pem"
    bogus.write_text("this is not a certificate\n")
    rc, out, err, _ = config_check(tmp_path, GOOD.replace("timeout: 30}", f'timeout: 30, ca_file: "{bogus}"}}'))
    assert rc != 0 and "server.ca_file:" in one_line(err) and "is not a PEM bundle" in err


def test_row7_a_config_file_over_1_mib_is_an_error_not_a_truncation(tmp_path):
    padded = GOOD.replace("boot: {backend: sim, env: /tmp/omaha-test-env.json}",
                          "boot: {backend: sim, env: /tmp/omaha-test-env.json}\n" + "#" * (1 << 20))
    rc, out, err, _ = config_check(tmp_path, padded)
    assert rc != 0 and "larger than 1 MiB" in one_line(err)


@pytest.mark.parametrize("b", ["/tmp/omaha-test-a.img", "/tmp/../tmp/omaha-test-a.img", "LINK"])
def test_row13_slots_a_and_b_naming_the_same_file_are_refused(tmp_path, b):
    if b == "LINK":
        b = str(tmp_path / "link.img")
        os.symlink("/tmp/omaha-test-a.img", b)
    rc, out, err, _ = config_check(tmp_path, GOOD.replace("b: {file: /tmp/omaha-test-b.img}", f"b: {{file: {b}}}"))
    assert rc != 0 and "agent.yaml:5: slots.b: slots a and b are the same" in one_line(err)


def test_row13_a_duplicate_key_is_an_error_naming_both_lines(tmp_path):
    rc, out, err, _ = config_check(tmp_path, GOOD + "install: {read_timeout: 5}\n")
    assert rc != 0 and "agent.yaml:8: install: duplicate key (also on line 7)" in one_line(err)


# ------------------------------------------------------------------------------------------------ row 8
async def test_row8_a_900k_cohort_is_neither_stored_nor_sent_back(tmp_path, server):
    server.images[0].version = "1.0.0"  # no update: only the checks and their cohorts matter here
    server.faults.cohort = "c" * 900_000
    dev = Device(tmp_path, server.url)
    rc, out, err = await dev.once()
    assert rc == 0, err
    assert "cohort of 900000 characters is not kept" in err
    assert "cohort" not in dev.state()["cohort"]
    server.faults.cohort = "beta-1"
    rc, out, err = await dev.once()
    assert rc == 0 and dev.state()["cohort"] == {"cohort": "beta-1"}, err
    with open(tmp_path / "server.jsonl", "rb") as f:
        assert all(len(line) < 20_000 for line in f)


# ------------------------------------------------------------------------------------------------ rows 9, 10, 11 (state)
async def test_row9_a_state_file_nested_100000_deep_is_set_aside_without_a_traceback(tmp_path, server):
    dev = Device(tmp_path, server.url)
    os.makedirs(dev.dir / "state")
    (dev.dir / "state" / "state.json").write_text("[" * 100_000 + "]" * 100_000)
    rc, out, err = await dev.once()
    assert rc == 0 and "Traceback" not in err, err
    assert "unreadable" in err and "installed 2.0.0 on slot b" in out


async def test_row10_a_state_file_that_cannot_be_read_stops_the_daemon_and_is_not_overwritten(tmp_path, server):
    dev = Device(tmp_path, server.url)
    os.makedirs(dev.dir / "state" / "state.json")  # EISDIR: exists, cannot be read (as root, EACCES cannot be made)
    (dev.dir / "state" / "state.json" / "keep").write_text("x")
    rc, out, err = await dev.once()
    assert rc == 1 and "refusing to start and overwrite it" in one_line(err)
    assert (dev.dir / "state" / "state.json" / "keep").read_text() == "x"
    assert server.requests == []


async def test_row10_a_state_file_nobody_may_read_eacces_stops_the_daemon_and_is_not_overwritten(server):
    import pathlib
    import shutil
    import tempfile

    from .conftest import need_tool
    from .unprivileged import NobodyPython
    need_tool("setpriv")
    if os.geteuid() != 0:
        pytest.skip("needs root to run the daemon as user nobody")
    home = pathlib.Path(tempfile.mkdtemp(prefix="omaha-eacces-"))
    unprivileged = NobodyPython(ROOT)
    try:
        os.chmod(home, 0o755)
        dev = Device(home, server.url)
        os.makedirs(home / "state")
        (home / "state" / "state.json").write_text('{"events": []}')
        os.chmod(home / "state" / "state.json", 0o600)  # root's: nobody gets EACCES
        for path in [home / "state", *(home / n for n in ("slot-a.img", "slot-b.img", "bootenv.json", "agent.yaml"))]:
            os.chown(path, 65534, 65534)
        proc = await asyncio.create_subprocess_exec(
            *unprivileged.argv("daemon", "--once", "--config", dev.config), env=unprivileged.env,
            cwd=unprivileged.dir, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        line = one_line(err.decode())
        assert proc.returncode == 1 and "Permission denied" in line and "refusing to start and overwrite it" in line
        assert (home / "state" / "state.json").read_text() == '{"events": []}' and server.requests == []
    finally:
        unprivileged.close()
        shutil.rmtree(home, ignore_errors=True)


async def test_row11_an_event_resent_after_sigkill_keeps_its_requestid_and_says_its_age(tmp_path, server):
    dev = Device(tmp_path, server.url)
    server.faults.event_stall = True  # the server records the event but never acknowledges it
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "daemon", "--once", "--config", dev.config,
        env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not server.events and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    proc.kill()  # SIGKILL while the acknowledgement is pending
    await proc.wait()
    assert server.events, "the event never reached the server"
    first = server.events[0]
    assert first["request_age"] is None
    server.faults.event_stall = False
    await asyncio.sleep(1.1)
    rc, out, err = await dev.once()
    resent = [e for e in server.events[1:] if e["requestid"] == first["requestid"]]
    assert len(resent) == 1 and resent[0]["request_age"] is not None and int(resent[0]["request_age"]) >= 1


# ------------------------------------------------------------------------------------------------ row 13: cancel line
async def test_row13_a_sigterm_during_a_download_logs_the_checkpoint_actually_saved(tmp_path, server):
    server.faults.drip_delay = 0.1  # 64 KiB every 100 ms: the 3 MiB take about 5 s
    dev = Device(tmp_path, server.url)
    daemon = Forever(dev)
    await daemon.start()
    try:
        await daemon.wait_for("downloading 2.0.0")
        await asyncio.sleep(0.6)
    finally:
        assert await daemon.stop() == 0
    line = next((x for x in daemon.lines if "download cancelled" in x), "")
    saved = dev.state()["download"]
    assert saved is not None and saved["received"] > 0, "".join(daemon.lines)
    assert f"{saved['received']} of {saved['size']} bytes are saved" in line, "".join(daemon.lines)


# ------------------------------------------------------------------------------------------------ row 12
def test_row12_nobody_runs_the_cli_even_from_a_checkout_only_root_can_enter(tmp_path):
    from .conftest import need_tool
    from .unprivileged import AS_NOBODY, NobodyPython
    need_tool("setpriv")
    if os.geteuid() != 0:
        pytest.skip("needs root to run as user nobody")
    private = tmp_path / "root-home"  # stands in for /root (mode 700) holding the clone
    private.mkdir(mode=0o700)
    import shutil
    shutil.copytree(os.path.join(ROOT, "agent"), private / "agent")
    where = ["-c", "import agent, agent.cli; print(agent.__file__)"]
    naive = subprocess.run([*AS_NOBODY, sys.executable, *where], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(private)), cwd="/", timeout=60)
    # what the policy test did before: nobody cannot read the clone, so it fails to import the package or
    # silently imports another copy (an editable install elsewhere), never the code under test
    assert naive.returncode != 0 or not naive.stdout.startswith(str(private))
    unprivileged = NobodyPython(str(private))
    try:
        found = subprocess.run([*AS_NOBODY, unprivileged.python, *where], capture_output=True, text=True,
                               env=unprivileged.env, cwd=unprivileged.dir, timeout=60)
        proc = subprocess.run(unprivileged.argv("--help"), capture_output=True, text=True, env=unprivileged.env,
                              cwd=unprivileged.dir, timeout=60)
    finally:
        unprivileged.close()
    assert found.returncode == 0 and found.stdout.startswith(unprivileged.dir), found.stderr
    assert proc.returncode == 0 and "config" in proc.stdout, proc.stderr
