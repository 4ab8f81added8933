"""A hostile local user against the agent's bus connection: the real daemon (``omaha-agent daemon`` in a child
process) on a private dbus-daemon with the project's policy, the attacker (tests/bus_attacker.py) running as user
``nobody``. The daemon's event-loop stall is read from its own watchdog pings (WATCHDOG_USEC=20 ms: a ping every
10 ms from the loop, so the longest gap between two pings, less 10 ms, is the longest the loop was held) and its
memory from its own /proc/PID/status; both are printed."""
import asyncio
import os
import shutil
import sys
import time

import pytest

from agent.dbus.client import Client

from .conftest import PrivateBus, need_tool
from .simdevice import ROOT, Device
from .test_dbus import Daemon, run
from .unprivileged import AS_NOBODY, NobodyPython

WATCHDOG_USEC = 20_000
PERIOD = WATCHDOG_USEC / 1e6 / 2
PEAK_BOUND_MIB = 32  # before the guard: +1 GiB (31 MiB "av" call), +250 MiB (three 30 MiB "ai" signals)


def _mib(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


class Watched(Daemon):
    """The daemon, with every WATCHDOG=1 it sends timestamped as it arrives."""

    async def start(self, timeout: float = 30) -> str:
        ready = await super().start(timeout)
        self.pings: list[float] = []
        self.reader = asyncio.create_task(self._collect())
        return ready

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            msg = (await loop.sock_recv(self.sock, 4096)).decode()
            if "WATCHDOG=1" in msg:
                self.pings.append(time.monotonic())

    def stall_ms(self, since: float) -> float:
        times = [t for t in self.pings if t >= since]
        gaps = [b - a for a, b in zip(times, times[1:])]
        return max(0.0, (max(gaps) - PERIOD) * 1000) if gaps else float("inf")

    async def stop(self) -> None:
        self.reader.cancel()
        await super().stop()


@pytest.fixture
async def attacked(tmp_path, server):
    """(bus, daemon, attack): ``await attack(*args)`` runs tests/bus_attacker.py as user nobody and returns its
    JSON line; the figures are measured around it."""
    need_tool("dbus-daemon")
    need_tool("setpriv")
    if os.geteuid() != 0:
        pytest.skip("needs root to attack as user nobody")
    bus = PrivateBus()
    dev = Device(tmp_path, server.url, after="boot-complete", extra="schedule: {initial_delay: 3600}\n")
    daemon = Watched(dev, watchdog_usec=WATCHDOG_USEC)
    nobody = NobodyPython(ROOT)
    script = os.path.join(nobody.dir, "bus_attacker.py")
    shutil.copy(os.path.join(ROOT, "tests", "bus_attacker.py"), script)
    os.chmod(script, 0o644)

    async def attack(*args, timeout=240, as_root=False) -> dict:
        import json
        user = [sys.executable] if as_root else [*AS_NOBODY, nobody.python]
        rc, out, err = await run(*user, script, bus.address, *map(str, args), timeout=timeout,
                                 env=dict(os.environ), cwd=nobody.dir)
        assert rc == 0, err[-2000:]
        return json.loads(out.strip().splitlines()[-1])

    try:
        await daemon.start()
        yield bus, daemon, attack
    finally:
        await daemon.stop()
        nobody.close()
        bus.close()


async def get_status() -> dict:
    client = await asyncio.wait_for(Client.connect(), 30)
    try:
        return await client.call("GetStatus", timeout=30)
    finally:
        client.close()


async def measured(daemon: Watched, attack, *args, during: float | None = None) -> tuple[dict, dict]:
    """Runs the attack (and a GetStatus as root ``during`` seconds into it, if given), then a GetStatus as root
    (answered: the agent is still on the bus and hears it); returns the attacker's report and the figures: loop
    stall, RSS before and after, peak RSS growth."""
    pid = daemon.proc.pid
    await asyncio.sleep(0.5)
    before, hwm_before = _mib(pid, "VmRSS"), _mib(pid, "VmHWM")
    quiet = daemon.stall_ms(time.monotonic() - 0.4)
    started = time.monotonic()
    running = asyncio.ensure_future(attack(*args))
    if during is not None:
        await asyncio.sleep(during)
        assert not running.done(), "the attack ended before the probe: nothing was measured under it"
        assert (await get_status())["operation"] == "idle"
    report = await running
    assert (await get_status())["operation"] == "idle"
    await asyncio.sleep(0.3)  # a few more pings after the attack
    figures = {"stall_ms": daemon.stall_ms(started), "quiet_stall_ms": quiet, "rss_before": before,
               "rss_after": _mib(pid, "VmRSS"), "peak_growth": max(_mib(pid, "VmHWM"), hwm_before) - before}
    print(f"\n{report['attack']}: loop stall {figures['stall_ms']:.1f} ms (idle: {quiet:.1f} ms); RSS "
          f"{before:.1f} -> {figures['rss_after']:.1f} MiB (+{figures['rss_after'] - before:.1f}), peak "
          f"+{figures['peak_growth']:.1f} MiB; attacker: {report}")
    return report, figures


async def test_a_caller_flooding_getstatus_without_reading_replies_leaves_the_agent_on_the_bus_and_answering(
        attacked):
    bus, daemon, attack = attacked
    report, figures = await measured(daemon, attack, "flood", 4, 300, 3, during=1.5)
    assert report["calls_sent"] == 1200
    assert daemon.proc.returncode is None and "lost the connection" not in daemon.tail()
    assert figures["peak_growth"] < PEAK_BOUND_MIB


async def test_a_31_mib_getstatus_of_the_wrong_signature_is_refused_without_decoding_its_body(attacked):
    bus, daemon, attack = attacked
    report, figures = await measured(daemon, attack, "big_call", "v", 31 << 20)
    assert report["error"] == "org.freedesktop.DBus.Error.InvalidArgs", report
    assert 'takes signature "", not "av"' in report["text"]
    assert figures["peak_growth"] < PEAK_BOUND_MIB, figures


async def test_an_install_call_larger_than_any_path_is_refused_unread_even_from_root(attacked):
    """The policy keeps nobody from calling Install; the size bound holds for any caller."""
    bus, daemon, attack = attacked
    report = await attack("big_install", 8 << 20, as_root=True)
    assert report["error"] == "org.freedesktop.DBus.Error.LimitsExceeded", report
    assert "larger than the 65536 bytes taken" in report["text"]
    status = await get_status()
    assert status["operation"] == "idle" and status["last_error"] == ""  # refused before it became a command


async def test_30_mib_unicast_signals_nobody_subscribed_to_are_read_past_unread(attacked):
    bus, daemon, attack = attacked
    report, figures = await measured(daemon, attack, "signals", 3, 30 << 20)
    assert report["ping_error"] == "", report  # the agent answered the Ping sent after the three signals
    assert figures["peak_growth"] < PEAK_BOUND_MIB, figures


async def test_the_daemon_logs_and_exits_non_zero_when_its_bus_connection_ends(tmp_path, server):
    """The bus daemon goes away under the agent: it must not stay up deaf, but say why and exit 1 (systemd's
    Restart=on-failure starts it again)."""
    need_tool("dbus-daemon")
    bus = PrivateBus()
    dev = Device(tmp_path, server.url, extra="schedule: {initial_delay: 3600}\n")
    daemon = Daemon(dev)
    try:
        await daemon.start()
        bus.proc.kill()
        await asyncio.wait_for(daemon.proc.wait(), 30)
        log = daemon.tail()
        assert daemon.proc.returncode == 1, log
        assert "D-Bus: lost the connection to the system bus" in log
        assert log.strip().splitlines()[-1].startswith("omaha-agent: lost the connection to the system bus: ")
        assert log.strip().splitlines()[-1].endswith("exiting so that systemd restarts the service")
        assert "Traceback" not in log
    finally:
        await daemon.stop()
        bus.close()


class _Connection:
    """What the writer uses of its bus (socket, loop, state), around one end of a socketpair: a stand-in,
    because a real dbus-daemon reads the agent's socket too fast to keep it full for a test."""

    def __init__(self, sock):
        self._sock, self._fd, self._loop = sock, sock.fileno(), asyncio.get_running_loop()
        self.unique_name, self._disconnected, self.finalized = ":1.1", False, []

    def _finalize(self, err=None):
        self.finalized.append(err)


async def test_the_writer_waits_on_a_full_socket_and_bounds_only_the_replies_of_a_caller_that_does_not_read():
    import socket as socketlib

    from dbus_next import Message, MessageType

    from agent.dbus.guard import PEER_QUEUE, _Writer

    ours, theirs = socketlib.socketpair()
    ours.setblocking(False)
    bus = _Connection(ours)
    writer = _Writer(bus)

    def reply(destination: str, serial: int) -> Message:
        return Message(message_type=MessageType.METHOD_RETURN, destination=destination, reply_serial=serial,
                       serial=serial, signature="s", body=["x" * 1000])

    for serial in range(1, 3001):  # 3 MB of replies to a caller that reads none: far past the socket's buffer
        writer.schedule_write(reply(":1.66", serial))
    await asyncio.sleep(0.1)  # the loop tries to write: the socket fills, EAGAIN
    writer.schedule_write(reply(":1.7", 1))  # another caller's reply, and a broadcast signal
    writer.schedule_write(Message.new_signal("/org/omaha_agent/Agent1", "org.omaha_agent.Agent1", "StatusChanged"))
    await asyncio.sleep(0.1)
    assert bus.finalized == [], "a full socket ended the connection"
    assert writer.per_peer[":1.66"] <= PEER_QUEUE and writer.dropped > 2000
    queued = {entry[2] for entry in writer.queue}
    assert ":1.7" in queued and None in queued  # not dropped: they wait behind the socket

    theirs.setblocking(False)
    received = bytearray()
    for _ in range(200):  # the peer reads now: everything still queued goes out, in order
        try:
            received += theirs.recv(1 << 20)
        except BlockingIOError:
            if not writer.queue:
                break
            await asyncio.sleep(0.01)
    assert not writer.queue and not writer.watching and bus.finalized == []
    assert b"StatusChanged" in received and received.count(b"x" * 1000) == 3000 - writer.dropped + 1
    print(f"\nwriter: {writer.dropped} of 3000 replies to a caller that read none dropped, "
          f"{len(received) >> 10} KiB sent once it read")
    ours.close()
    theirs.close()
