"""Text and files from outside the agent: a server's reason phrase, a FleetLock answer, a state file holding what
such text left, and the files an offline install names. Real parts throughout: aiohttp servers and the project's
FleetLock server on 127.0.0.1, a private dbus-daemon, the daemon as a child process, FIFOs and sparse files."""
import asyncio
import json
import os
import sys
import threading

import pytest

from agent.config import load
from agent.daemon import Agent
from agent.machine import InstallFile, Operation
from agent.text import is_clean

from .simdevice import APP, Device, image
from .test_logind import login1  # noqa: F401 - the fixture: a stand-in for logind on a private bus
from .test_reboots import FLEET, FRIDAY_NOON, devices, locks, until  # noqa: F401 (devices, locks: fixtures)
from .seams import FakeClock

QUIET = "schedule: {initial_delay: 3600}\ndbus: {enabled: false}\n"


# ---------------------------------------------------------------------------------------------- FleetLock
NESTED = b"[" * 60000
ESCAPES = json.dumps({"kind": "\x1b[2J" * 10, "value": "\x1b]0;owned\x07\x9b31m\udc9b" + "v" * 5000}).encode()


@pytest.mark.parametrize("body", [NESTED, ESCAPES, b"\xff\xfe\x9b not json"], ids=["nested", "escapes", "bytes"])
async def test_a_malformed_fleetlock_refusal_keeps_the_plan_and_is_retried_with_backoff(tmp_path, server, locks,
                                                                                        devices, body):
    """issue 25 row 5: a 409 of 60 000 nested "[" raised RecursionError out of the reboot job, which dropped the
    plan (RebootTime 0, no retry); and row 2/7: its kind and value went raw into LastError and the status."""
    locks.holders["workers"], locks.refusal = ["another-node"], body
    sim = devices(tmp_path, server.url, FLEET.replace("URL", locks.url), FakeClock(FRIDAY_NOON))
    agent = await sim.start()
    await sim.install()
    await until(lambda: len(locks.requests("pre-reboot", 409)) >= 3, "three refused attempts")
    snap = agent.snapshot()
    assert sim.op() is Operation.REBOOT_PENDING and snap["reboot_time"] > 0 and not sim.rebooted_at
    assert "fleet lock" in snap["reboot_waiting_for"] and "HTTP 409" in snap["last_error"]
    assert is_clean(snap["last_error"], 2000) and is_clean(snap["reboot_waiting_for"], 2000), snap
    times = [r["time"] for r in locks.requests("pre-reboot")]
    assert all(b > a for a, b in zip(times, times[1:]))  # spaced by the backoff
    locks.holders["workers"], locks.refusal = [], None
    await until(lambda: sim.rebooted_at, "the reboot once the slot is free")


async def test_a_malformed_fleetlock_answer_to_the_release_is_retried_until_200(tmp_path, server, locks, devices):
    """issue 25 row 5: on steady-state the RecursionError ended the release: the lock was never given back."""
    sim = devices(tmp_path, server.url, FLEET.replace("URL", locks.url), FakeClock(FRIDAY_NOON))
    await sim.start()
    await sim.install()
    await until(lambda: sim.rebooted_at, "the reboot")
    locks.down, locks.refusal = True, NESTED
    agent = await sim.boot_new_slot()
    await until(lambda: len(locks.requests("steady-state", 503)) >= 2, "two refused releases")
    assert "could not give back the fleet lock: HTTP 503" in agent.snapshot()["last_error"]
    locks.down, locks.refusal = False, None
    await until(lambda: locks.requests("steady-state", 200), "the release")
    await until(lambda: sim.dev.state()["fleet_lock"] == "", "the state to forget the lock")


# ---------------------------------------------------------------------------------------------- offline installs
async def _agent(dev: Device) -> Agent:
    agent = Agent(load(dev.config))
    await agent.start()
    await until(lambda: agent.status.operation is Operation.IDLE, "the agent to settle")
    return agent


async def _install(agent: Agent, path: str, signature: str = "", version: str = "") -> tuple[bool, str]:
    """(ok, message) of an offline install through the owner, as the D-Bus Install method submits it."""
    reply = await agent.submit(InstallFile(path, signature, version))
    assert reply.job is not None, reply.message
    outcome = await asyncio.wait_for(agent.owner.finished(reply.job), 60)  # the job, and the owner's save of its end
    return outcome.ok, outcome.message


def _fifo(path) -> str:
    os.mkfifo(path)
    return str(path)


def _busy_threads(function: str) -> list[str]:
    """Threads whose stack is inside ``function`` right now."""
    return [t.name for t in threading.enumerate() for f in [sys._current_frames().get(t.ident)] if f is not None
            and any(frame.f_code.co_name == function for frame in _frames(f))]


def _frames(frame):
    while frame is not None:
        yield frame
        frame = frame.f_back


@pytest.fixture
async def offline(tmp_path, server):
    dev = Device(tmp_path, server.url, extra=QUIET)
    agent = await _agent(dev)
    yield dev, agent
    await agent.close()


async def test_offline_install_refuses_fifos_and_devices_at_once_and_a_stop_still_stops(tmp_path, offline):
    """issue 25 row 4: a FIFO or /dev/zero as the payload left the job in checking forever, its worker thread
    blocked (six of them exhausted the default pool: state saves queued forever) and SIGTERM ignored."""
    dev, agent = offline
    before = open(dev.slots["b"], "rb").read()
    for i in range(8):  # more than the default pool's threads on two cores
        ok, message = await _install(agent, _fifo(tmp_path / f"fifo{i}"), version="2.0.0")
        assert not ok and "is a FIFO, not a regular file" in message, message
    ok, message = await _install(agent, "/dev/zero", version="2.0.0")
    assert not ok and "/dev/zero is a character device, not a regular file" in message, message
    ok, message = await _install(agent, str(tmp_path), version="2.0.0")
    assert not ok and "is a directory" in message, message
    assert not _busy_threads("_sha256") and open(dev.slots["b"], "rb").read() == before
    await asyncio.wait_for(agent.ctx.store.commit(), 30)  # saves still go through
    ok, message = await _install(agent, image(tmp_path, "2.0.0").path, version="2.0.0")
    assert ok and "installed 2.0.0 on slot b" in message, message
    await asyncio.wait_for(agent.close(), 30)  # and a stop stops


async def test_offline_install_refuses_a_fifo_as_the_signature_envelope(tmp_path, server):
    """issue 25 row 4: a FIFO as PATH.sig (signed mode) blocked the job's thread forever."""
    from .test_trust import openssl_key, signed_device
    _, public = openssl_key(tmp_path, "p256", "release")
    dev = signed_device(tmp_path, server, public, extra=QUIET)
    agent = await _agent(dev)
    try:
        payload = image(tmp_path, "2.0.0").path
        _fifo(payload + ".sig")
        ok, message = await _install(agent, payload)
        assert not ok and ".sig is a FIFO, not a regular file" in message, message
    finally:
        await agent.close()


async def test_a_sparse_4_gib_file_onto_an_8_mib_slot_is_refused_before_it_is_read(tmp_path, offline):
    """issue 25 row 8: the whole 4 GiB were hashed (16 s) before "larger than slot b"; now the size comes first."""
    dev, agent = offline
    sparse = tmp_path / "huge.img"
    with open(sparse, "wb") as f:
        f.truncate(4 << 30)
    read_before = _read_bytes()
    ok, message = await _install(agent, str(sparse), version="2.0.0")
    assert not ok and "payload of 4294967296 bytes is larger than slot b" in message, message
    assert _read_bytes() - read_before < 1 << 20  # (rchar: bytes this process read; the file was never read)


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


async def test_hashing_a_local_file_stops_at_the_next_chunk_when_cancelled(tmp_path):
    """issue 25 row 8: Cancel did not stop the hashing of a local file; now the thread stops and is waited for."""
    from agent import localfile
    sparse = tmp_path / "big.img"
    with open(sparse, "wb") as f:
        f.truncate(64 << 30)  # far more than can be hashed before the cancel lands
    fd, size = localfile.open_regular(str(sparse))
    try:
        task = asyncio.ensure_future(localfile.sha256(fd, size))
        await until(lambda: _busy_threads("_sha256"), "the hashing thread to start")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _busy_threads("_sha256") == []  # no thread left reading once the cancel returned
    finally:
        os.close(fd)


@pytest.mark.parametrize("version,says", [
    ("2.0.0\n\x1b[31mRED", "is not a version"), ("9" * (1 << 20), "is not a version"),
    ("2.0.\udc9b", "is not a version"), ("", "give its version")])
async def test_an_offline_version_argument_follows_the_version_rule_and_is_never_stored(tmp_path, offline, version,
                                                                                        says):
    """issue 25 row 6: such a version went into every event (HTTP 400 for each) and the state (a 1 MiB version made
    state.json 4.2 MB; 5 MiB dropped the whole file on restart); now the rule online offers have refuses it."""
    dev, agent = offline
    ok, message = await _install(agent, image(tmp_path, "2.0.0").path, version=version)
    assert not ok and says in message and is_clean(message, 2000), message[:300]
    assert agent.ctx.state.events == [] and os.path.getsize(dev.dir / "state" / "state.json") < 64 << 10


async def test_an_offline_install_refuses_relative_paths(tmp_path, offline):
    """issue 25 minor: a relative path resolved against the daemon's working directory; and row 2: a file name
    is outside text too."""
    dev, agent = offline
    ok, message = await _install(agent, "v2.0.0.img", version="2.0.0")
    assert not ok and "give absolute paths" in message, message
    ok, message = await _install(agent, image(tmp_path, "2.0.0").path, "v2.0.0.img.sig", "2.0.0")
    assert not ok and "give absolute paths" in message, message
    ok, message = await _install(agent, str(tmp_path / "v\x1b[2J\x9b.img"), version="2.0.0")
    assert not ok and "a path with control characters" in message and is_clean(message), message


async def test_signed_mode_refuses_a_version_argument_and_a_same_size_wrong_file_before_writing(tmp_path, server):
    """issue 25 minor: in signed mode the version argument was silently ignored, and a file of the signed size but
    other bytes was streamed onto slot b before the digest mismatch; both are refused before the slot is touched."""
    from agent import trust

    from .test_trust import openssl_key, signed_device
    private, public = openssl_key(tmp_path, "p256", "release")
    dev = signed_device(tmp_path, server, public, extra=QUIET)
    agent = await _agent(dev)
    try:
        payload = image(tmp_path, "2.0.0").path
        with open(payload + ".sig", "wb") as f:
            f.write(trust.sign_file(payload, trust.load_private_key(private), APP, "2.0.0", "stable"))
        ok, message = await _install(agent, payload, version="3.0.0")
        assert not ok and "give no version: signatures are required" in message, message
        before = open(dev.slots["b"], "rb").read()
        state_before = dev.boot.status()["b"]
        with open(payload, "r+b") as f:  # other bytes, same size: the signed size matches
            f.write(b"OTHER")
        ok, message = await _install(agent, payload)
        assert not ok and "is not the signed" in message, message
        assert open(dev.slots["b"], "rb").read() == before and dev.boot.status()["b"] == state_before
    finally:
        await agent.close()


# ---------------------------------------------------------------------------------------------- the daemon
def _raw_503(reason: bytes):
    from aiohttp import web

    async def handler(srv, request):
        request.transport.write(b"HTTP/1.1 503 " + reason + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        request.transport.close()
        return web.Response()
    return handler


async def test_a_reason_phrase_with_c1_bytes_keeps_the_bus_status_and_restarts_working(tmp_path, system_bus):
    """issue 25 row 2: "503 Service \\x9bUnavailable" from a payload server put a lone surrogate in LastError and
    state.json: GetStatus, the properties and `omaha-agent status` failed, and every restart exited before READY.
    Row 7: ESC and U+009B reached the terminal raw."""
    from agent.dbus.client import Client
    from agent.tools.devserver import Image

    from .test_dbus import Daemon, cli, wait_status
    from .test_hostile_server import Hostile
    srv = Hostile([Image(image(tmp_path, "2.0.0").path, "2.0.0", APP)])
    srv.on_payload = _raw_503(b"Service \x9bUnavailable \x1b[31mRED\x1b]0;owned\x07")
    await srv.start()
    dev = Device(tmp_path, srv.url, extra="schedule: {initial_delay: 3600}\n")
    daemon = Daemon(dev)
    try:
        await daemon.start()
        client = await Client.connect()
        try:
            await client.call("CheckForUpdate", "b", [True])
            status = await wait_status(client, lambda s: "HTTP 503" in s["last_error"] and s["operation"] == "idle",
                                       60)
            assert is_clean(status["last_error"], 2000) and "Service \\x9bUnavailable \\x1b[31mRED" in \
                status["last_error"], status["last_error"]
        finally:
            client.close()
        rc, out, err = await cli("status")
        assert rc == 0 and "Traceback" not in err and "HTTP 503 Service \\x9bUnavailable" in out, (out, err)
        assert not any(c in out for c in "\x1b\x9b\x07"), out
        await daemon.stop()
        assert "\\x9b" in dev.state()["last_error"]
        again = Daemon(dev)
        await again.start()  # READY=1: the saved LastError no longer stops the start
        await again.stop()
    finally:
        await daemon.stop()
        await srv.stop()


async def test_a_state_file_holding_surrogates_and_escapes_starts_to_ready_repaired(tmp_path, server, system_bus):
    """issue 25 row 2: the state loader repairs or drops outside text instead of letting it stop the daemon."""
    from agent.dbus.client import Client

    from .test_dbus import Daemon, cli
    dev = Device(tmp_path, server.url, extra="schedule: {initial_delay: 3600}\n")
    os.makedirs(dev.dir / "state")
    (dev.dir / "state" / "state.json").write_bytes(
        b'{"last_error": "HTTP 503 Service \\udc9bUnavailable \\u001b[31mRED \xff\xfe", "failures": 2, '
        b'"blocked": {"version": "2.0\\u001b[0m", "until": 1e10}, "fleet_lock": "wor\\ud800kers", '
        b'"events": [{"requestid": "{r}", "created": 1, "version": "1.0.0\\n\\u009b", '
        b'"event": {"eventtype": 3, "eventresult": 2}}]}')
    daemon = Daemon(dev)
    try:
        await daemon.start()
        client = await Client.connect()
        try:
            status = await client.status()
            assert is_clean(status["last_error"], 2000) and "\\x9bUnavailable \\x1b[31mRED \\xff\\xfe" in \
                status["last_error"], status["last_error"]
            assert status["pending_events"] == 0
        finally:
            client.close()
        rc, out, err = await cli("status")
        assert rc == 0 and "Traceback" not in err and not any(c in out for c in "\x1b\x9b"), (out, err)
    finally:
        await daemon.stop()
    log = daemon.log.read_text()
    assert "last_error's unprintable text (repaired)" in log and "blocked" in log and "fleet_lock" in log, log[-2000:]


# ---------------------------------------------------------------------------------------------- other entry points
def test_a_signed_statement_follows_the_version_rule(tmp_path):
    """issue 25 row 6: the version in a signed statement was not validated (the online offer's rule was not
    applied to it); now a release signed as "2.0.0\\n\\x1b[31mRED" is refused like such an offer."""
    from agent import trust

    from .test_trust import openssl_key
    private, public = openssl_key(tmp_path, "ed25519", "release")
    payload = image(tmp_path, "2.0.0").path
    for version in ("2.0.0\n\x1b[31mRED", "9" * 200, "2.0.\x9b"):
        envelope = trust.sign_file(payload, trust.load_private_key(private), APP, version, "stable")
        with pytest.raises(trust.SignatureError, match="the signed statement's version .* is not a version"):
            trust.open_envelope(envelope, trust.load_public_keys([public]))


async def test_inhibitor_holders_and_reasons_from_logind_are_cleaned(login1):
    """issue 25 rows 2 and 7: a holder's who and why (anyone may take an inhibitor lock) reached RebootWaitingFor,
    the log and the terminal raw."""
    from agent import logind
    login1.listed = [["shutdown", "\x1b[2Jevil\x9b", "why\x1b]0;owned\x07" + "w" * 5000, "block", 1000, 4242]]
    blocker, = logind.blocking_shutdown(await logind.inhibitors())
    assert str(blocker).startswith("\\x1b[2Jevil\\x9b (pid 4242: why\\x1b]0;owned\\x07www") and is_clean(str(blocker))
    assert len(blocker.why) <= 120


async def test_omaha_agent_status_escapes_control_characters_on_output(monkeypatch, capsys):
    """issue 25 row 7: `omaha-agent status` printed ESC and U+009B from FleetLock answers, reason phrases and
    inhibitor holders raw (terminal escape injection). The daemon cleans such text where it enters now, so it
    cannot produce an unclean status: a stand-in client plays an agent that does (an older one, for instance)."""
    from agent import console
    from agent.dbus import client as client_module

    class OlderAgent:
        async def status(self):
            return {"operation": "reboot-pending", "current_version": "1.0.0", "booted_slot": "a",
                    "new_version": "2.0.0\x1b[8m", "last_error": "HTTP 409 (kind\x1b[2J: \x9b31mred)",
                    "reboot_time": 1, "reboot_version": "2.0.0", "reboot_waiting_for": "held by \x1b]0;x\x07",
                    "slots": {"a": {"state": "good", "version": "1.0.0\x1b[1A"}}}

        def close(self):
            pass

    async def connect():
        return OlderAgent()
    monkeypatch.setattr(client_module.Client, "connect", staticmethod(connect))
    assert await console.status(False) == 0
    out = capsys.readouterr().out
    assert "HTTP 409 (kind\\x1b[2J: \\x9b31mred)" in out and "held by \\x1b]0;x\\x07" in out, out
    assert not any(c in out for c in "\x1b\x9b\x07"), out
