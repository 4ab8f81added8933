"""The D-Bus API, the client CLI and sd_notify, against a real daemon process on a private dbus-daemon configured
like the system bus (with the project's policy), updating a simulated device from the real development server."""
import asyncio
import json
import os
import shutil
import socket
import sys
import tempfile
import time

import pytest

from agent.dbus.client import Client, ClientError
from agent.tools.devserver import DevServer, Faults

from .conftest import PrivateBus, need_tool
from .simdevice import ROOT, Device, image
from .unprivileged import NobodyPython

BUS_NAME, PATH = "org.omaha_agent.Agent1", "/org/omaha_agent/Agent1"
PROPERTIES = ["Operation", "Progress", "CurrentVersion", "NewVersion", "NewSize", "BytesDownloaded", "LastCheckTime",
              "NextCheckTime", "BootedSlot", "LastError", "Slots", "RebootVersion", "RebootTime", "RebootWaitingFor",
              "PlannedBytes", "SavedBytes"]
METHODS = ["CheckForUpdate", "Cancel", "GetStatus", "MarkGood", "Reboot", "ConfirmBoot", "PostponeReboot", "Rollback",
           "Apply"]


class Daemon:
    """``omaha-agent daemon`` as a child process, with a notify socket the way systemd gives it one."""

    def __init__(self, dev: Device, watchdog_usec: int = 0):
        self.dev = dev
        self.watchdog_usec = watchdog_usec
        self.dir = tempfile.mkdtemp(prefix="omaha-notify-")  # short: socket paths are limited to 107 bytes
        self.log = dev.dir / f"daemon-{time.monotonic_ns()}.log"
        self.messages: list[str] = []

    async def start(self, timeout: float = 30) -> str:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(os.path.join(self.dir, "notify"))
        self.sock.setblocking(False)
        env = dict(os.environ, PYTHONPATH=ROOT, NOTIFY_SOCKET=os.path.join(self.dir, "notify"))
        if self.watchdog_usec:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        self.stderr = open(self.log, "wb")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli", "daemon", "-v", "--config", self.dev.config, env=env, cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL, stderr=self.stderr)
        return await self.wait_for("READY=1", timeout)

    async def wait_for(self, needle: str, timeout: float) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                msg = (await asyncio.wait_for(loop.sock_recv(self.sock, 4096), deadline - loop.time())).decode()
            except asyncio.TimeoutError:
                break
            self.messages.append(msg)
            if needle in msg:
                return msg
        raise AssertionError(f"no {needle!r} from the daemon in {timeout} s; log:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 30)
        self.stderr.close()
        try:
            while True:
                self.messages.append(self.sock.recv(4096).decode())
        except OSError:  # drained
            pass
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


async def run(*argv, timeout=30, env=None, cwd=ROOT):
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env=env or dict(os.environ, PYTHONPATH=ROOT), cwd=cwd)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


def cli(*args, **kw):
    return run(sys.executable, "-m", "agent.cli", *args, **kw)


async def wait_status(client: Client, predicate, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = await client.status()
        if predicate(status):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"status never matched; last: {status}")


@pytest.fixture
async def running(tmp_path, server, system_bus):
    dev = Device(tmp_path, server.url, after="boot-complete", extra="schedule: {initial_delay: 3600}\n")
    daemon = Daemon(dev)
    await daemon.start()
    client = await Client.connect()
    yield dev, daemon, client
    client.close()
    await daemon.stop()


async def test_daemon_tells_systemd_ready_status_and_keeps_the_watchdog_fed(tmp_path, server, system_bus):
    dev = Device(tmp_path, server.url, extra="schedule: {initial_delay: 3600}\n")
    daemon = Daemon(dev, watchdog_usec=400_000)
    try:
        ready = await daemon.start()
        assert "STATUS=idle, running 1.0.0" in ready and f"MAINPID={daemon.proc.pid}" in ready
        client = await Client.connect()  # READY=1 comes after the name is owned: this call must succeed now
        assert (await client.status())["operation"] == "idle"
        client.close()
        for _ in range(3):  # WATCHDOG=1 every 0.2 s, sent from the event loop
            await daemon.wait_for("WATCHDOG=1", 2)
    finally:
        await daemon.stop()
    assert "STOPPING=1" in daemon.messages[-1]


async def test_busctl_introspects_reads_every_property_and_calls_every_read_method(running):
    need_tool("busctl")
    dev, daemon, client = running
    addr = f"--address={os.environ['DBUS_SYSTEM_BUS_ADDRESS']}"
    rc, out, err = await run("busctl", addr, "introspect", BUS_NAME, PATH, BUS_NAME)
    assert rc == 0, err
    for member in PROPERTIES + METHODS + ["StatusChanged"]:
        assert f".{member} " in out, member
    values = {}
    for prop in PROPERTIES:
        rc, out, err = await run("busctl", addr, "get-property", BUS_NAME, PATH, BUS_NAME, prop)
        assert rc == 0, (prop, err)
        values[prop] = out.strip()
    assert values["Operation"] == 's "idle"' and values["CurrentVersion"] == 's "1.0.0"'
    assert values["BootedSlot"] == 's "a"' and values["NewSize"] == "t 0" and values["Progress"] == "d 0"
    assert values["PlannedBytes"] == values["SavedBytes"] == "t 0"  # no install running
    assert values["Slots"].startswith("a{sa{sv}} 2 ") and '"state" s "good"' in values["Slots"]
    assert int(values["NextCheckTime"].split()[1]) > time.time() + 60  # initial_delay 3600, jittered
    rc, out, err = await run("busctl", addr, "--json=short", "call", BUS_NAME, PATH, BUS_NAME, "GetStatus")
    assert rc == 0, err
    status = json.loads(out)["data"][0]
    assert status["operation"]["data"] == "idle" and status["slots"]["data"]["a"]["state"]["data"] == "good"


async def test_a_download_at_full_speed_sends_throttled_signals_and_methods_still_answer(tmp_path, system_bus):
    big = image(tmp_path, "2.0.0", size=192 << 20)
    srv = DevServer([big], log_path=str(tmp_path / "server.jsonl"))
    await srv.start()
    dev = Device(tmp_path, srv.url, after="boot-complete", extra="schedule: {initial_delay: 3600}\n",
                 slot_size=256 << 20)
    daemon = Daemon(dev)
    client = None
    try:
        await daemon.start()
        client = await Client.connect()
        await client.subscribe()
        assert await client.call("CheckForUpdate", "b", [True]) is True
        latencies, signals, during = [], [], []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            status = await client.status()
            if status["operation"] == "downloading":
                latencies.append(time.perf_counter() - t0)
                during.append(status["bytes_downloaded"])
            while not client.signals.empty():
                signals.append(client.signals.get_nowait())
            if status["operation"] == "updated-need-reboot":
                break
            await asyncio.sleep(0.005)
        while not client.signals.empty():
            signals.append(client.signals.get_nowait())
        assert status["operation"] == "updated-need-reboot", daemon.tail()
        ops = [s["operation"] for s in signals]
        for op in ("checking", "update-available", "downloading", "verifying", "finalizing", "updated-need-reboot"):
            assert op in ops, ops
        downloading = [s for s in signals if s["operation"] == "downloading"]
        progress = [s["progress"] for s in downloading]
        assert progress == sorted(progress) and len(during) >= 3, (progress, len(during))
        print(f"\n{len(latencies)} GetStatus calls during a {big.size >> 20} MiB download: max "
              f"{max(latencies) * 1000:.1f} ms, median {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms; "
              f"{len(downloading)} StatusChanged signals while downloading")
        assert max(latencies) < 5, "a method call waited behind the download"  # liveness, not a speed goal
        # the signals are throttled: a 192 MiB download makes ~192 progress callbacks, far fewer signals
        assert len(downloading) < 60, len(downloading)
        await wait_status(client, lambda s: s["pending_events"] == 0)  # 3/1 goes out just after the transition
        assert srv.event_codes() == ["13/1", "14/1", "3/1"]
    finally:
        if client:
            client.close()
        await daemon.stop()
        await srv.stop()


async def test_reboot_then_confirm_boot_after_boot_complete_reports_3_2(running, server):
    dev, daemon, client = running
    await client.call("CheckForUpdate", "b", [False])
    await wait_status(client, lambda s: s["operation"] == "updated-need-reboot")
    assert "rebooting into 2.0.0" in await client.call("Reboot")  # at once; the reboot job follows
    await wait_status(client, lambda s: s["operation"] == "updated-need-reboot" and dev.boot.booted_slot() == "b")
    await daemon.stop()  # the sim bootloader took the trial

    second = Daemon(dev)  # the daemon after the reboot, on slot b
    await second.start()
    try:
        status = await wait_status(client, lambda s: s["waiting_for_boot_complete"])  # settled just after READY
        assert status["booted_slot"] == "b"
        assert status["slots"]["b"]["state"] == "trial" and "3/2" not in server.event_codes()
        rc, out, err = await cli("confirm-boot")  # what omaha-agent-confirm.service runs
        assert rc == 0 and "checking the health of slot b" in out, err
        status = await wait_status(client, lambda s: s["slots"]["b"]["state"] == "good" and not s["pending_events"])
        assert server.event_codes()[-1] == "3/2" and server.event_codes().count("3/2") == 1
        rc, out, err = await cli("confirm-boot")
        assert rc == 0 and "no trial boot waits" in out
    finally:
        await second.stop()


async def test_mark_good_confirms_a_trial_without_waiting_for_boot_complete(running, server):
    dev, daemon, client = running
    await client.call("CheckForUpdate", "b", [True])
    await wait_status(client, lambda s: s["operation"] == "updated-need-reboot")
    await client.call("Reboot")
    await wait_status(client, lambda s: s["operation"] == "updated-need-reboot" and dev.boot.booted_slot() == "b")
    await daemon.stop()
    second = Daemon(dev)
    await second.start()
    try:
        rc, out, err = await cli("mark-good")
        assert rc == 0 and "slot b marked good" in out, err
        await wait_status(client, lambda s: not s["pending_events"] and not s["waiting_for_boot_complete"])
        assert server.event_codes().count("3/2") == 1 and dev.boot.status()["b"].state.value == "good"
    finally:
        await second.stop()


async def test_cancel_stops_a_download_and_keeps_its_checkpoint(tmp_path, system_bus):
    srv = DevServer([image(tmp_path, "2.0.0", size=6 << 20)], log_path=str(tmp_path / "server.jsonl"),
                    faults=Faults(drip_delay=0.02))
    await srv.start()
    dev = Device(tmp_path, srv.url, extra="schedule: {initial_delay: 3600}\n")
    daemon = Daemon(dev)
    try:
        await daemon.start()
        client = await Client.connect()
        with pytest.raises(ClientError, match="no download is running"):
            await client.call("Cancel")
        await client.call("CheckForUpdate", "b", [True])
        await wait_status(client, lambda s: s["operation"] == "downloading" and s["bytes_downloaded"] > 1 << 20)
        assert "resumes" in await client.call("Cancel")
        status = await wait_status(client, lambda s: s["operation"] == "idle")
        assert status["new_version"] == "" and srv.event_codes() == ["13/1"]
        assert dev.state()["download"]["received"] >= 1 << 20  # the checkpoint survives for the next check
        with pytest.raises(ClientError, match="no update waits for a reboot"):
            await client.call("Reboot")
        client.close()
    finally:
        await daemon.stop()
        await srv.stop()


async def test_flatcar_update_engine_interface(tmp_path, server, system_bus):
    need_tool("busctl")
    dev = Device(tmp_path, server.url, extra="schedule: {initial_delay: 3600}\ndbus: {flatcar_compat: true}\n")
    daemon = Daemon(dev)
    await daemon.start()
    from dbus_next import BusType, Message
    from dbus_next.aio import MessageBus
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        seen = []
        bus.add_message_handler(lambda m: seen.append(m.body[2]) if m.member == "StatusUpdate" else None)
        await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                               interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                               body=["type='signal',interface='com.coreos.update1.Manager',member='StatusUpdate'"]))
        addr = f"--address={os.environ['DBUS_SYSTEM_BUS_ADDRESS']}"
        flatcar = ("com.coreos.update1", "/com/coreos/update1", "com.coreos.update1.Manager")
        rc, out, err = await run("busctl", addr, "call", *flatcar, "GetStatus")
        assert rc == 0 and out.startswith('xdssx ') and '"UPDATE_STATUS_IDLE" "" 0' in out, (out, err)
        rc, out, err = await run("busctl", addr, "call", *flatcar, "AttemptUpdate")
        assert rc == 0, err
        for _ in range(300):
            if "UPDATE_STATUS_UPDATED_NEED_REBOOT" in seen:
                break
            await asyncio.sleep(0.1)
        for status in ("UPDATE_STATUS_CHECKING_FOR_UPDATE", "UPDATE_STATUS_DOWNLOADING",
                       "UPDATE_STATUS_UPDATED_NEED_REBOOT"):
            assert status in seen, seen
        rc, out, err = await run("busctl", addr, "call", *flatcar, "GetStatus")
        assert '"UPDATE_STATUS_UPDATED_NEED_REBOOT" "2.0.0" 3145728' in out, out
        rc, out, err = await run("busctl", addr, "call", *flatcar, "ResetStatus")
        assert rc == 0, err
        rc, out, err = await run("busctl", addr, "call", *flatcar, "GetStatus")
        assert '"UPDATE_STATUS_IDLE"' in out
        assert dev.boot.status()["b"].state.value == "trial"  # like Flatcar: the installed update stays armed
    finally:
        bus.disconnect()
        await daemon.stop()


async def test_policy_lets_anyone_read_but_only_root_and_the_group_act(tmp_path, server):
    need_tool("dbus-daemon")
    need_tool("busctl")
    need_tool("setpriv")
    if os.geteuid() != 0:
        pytest.skip("needs root to call as user nobody")
    bus = PrivateBus(group="users")  # group omaha-agent's rule, tried with a group every Debian host has
    dev = Device(tmp_path, server.url, extra="schedule: {initial_delay: 3600}\n")
    daemon = Daemon(dev)
    try:
        await daemon.start()
        addr = f"--address={bus.address}"
        nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        member = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--groups=users"]
        target = (BUS_NAME, PATH, BUS_NAME)
        rc, out, err = await run(*nobody, "busctl", addr, "call", *target, "CheckForUpdate", "b", "false")
        assert rc != 0 and "Access denied" in err, (out, err)
        rc, out, err = await run(*nobody, "busctl", addr, "call", *target, "MarkGood")
        assert rc != 0 and "Access denied" in err
        rc, out, err = await run(*nobody, "busctl", addr, "call", *target, "Rollback")
        assert rc != 0 and "Access denied" in err, (out, err)
        rc, out, err = await run(*member, "busctl", addr, "call", *target, "Rollback")  # allowed, then refused
        assert rc != 0 and "slot b is bad or empty" in err and "Access denied" not in err, (out, err)
        rc, out, err = await run(*nobody, "busctl", addr, "call", *target, "Apply")
        assert rc != 0 and "Access denied" in err, (out, err)
        rc, out, err = await run(*member, "busctl", addr, "call", *target, "Apply")  # allowed, then refused
        assert rc != 0 and "no update is staged" in err and "Access denied" not in err, (out, err)
        rc, out, err = await run(*nobody, "busctl", addr, "call", *target, "GetStatus")
        assert rc == 0 and "a{sv}" in out, err
        rc, out, err = await run(*nobody, "busctl", addr, "get-property", *target, "Operation")
        assert rc == 0 and out.strip() == 's "idle"', err
        rc, out, err = await run(*member, "busctl", addr, "call", *target, "CheckForUpdate", "b", "false")
        assert rc == 0 and out.strip() == "b true", err
        unprivileged = NobodyPython(ROOT)  # the checkout may be where nobody cannot read it (/root/project)
        try:
            env = dict(unprivileged.env, DBUS_SYSTEM_BUS_ADDRESS=bus.address)
            rc, out, err = await run(*unprivileged.argv("mark-good"), env=env, cwd=unprivileged.dir)
        finally:
            unprivileged.close()
        assert rc == 1 and "not allowed to call MarkGood: run it as root or as a member of group omaha-agent" in err
        assert "Traceback" not in err
    finally:
        await daemon.stop()
        bus.close()


async def test_cli_check_stages_and_apply_arms_the_staged_update(tmp_path, server, system_bus):
    """issue 27 row 1: under install.arm: on-apply, check --wait ends with the update staged (slot b still bad), and
    omaha-agent apply arms it (before: no such command or key)."""
    dev = Device(tmp_path, server.url, extra="schedule: {initial_delay: 3600}\ninstall: {arm: on-apply}\n")
    daemon = Daemon(dev)
    try:
        await daemon.start()
        rc, out, err = await cli("apply")
        assert rc == 1 and err.strip() == ("omaha-agent: no update is staged: nothing to apply (a check stages one "
                                           "under install.arm: on-apply)"), err
        rc, out, err = await cli("check", "--wait", timeout=120)
        assert rc == 0 and out.splitlines()[-1] == "2.0.0 is staged; omaha-agent apply arms it", (out, err)
        assert dev.boot.status()["b"].state.value == "bad"
        rc, out, err = await cli("status", "--json")
        assert json.loads(out)["operation"] == "staged"
        rc, out, err = await cli("apply")
        assert rc == 0 and out.strip() == "2.0.0 armed on slot b; it boots on the next reboot (omaha-agent reboot)", err
        assert dev.boot.status()["b"].state.value == "trial"
        rc, out, err = await cli("apply")
        assert rc == 0 and "waits for its reboot already" in out, err
    finally:
        await daemon.stop()


async def test_cli_status_check_and_watch(running, server):
    dev, daemon, client = running
    rc, out, err = await cli("status")
    assert rc == 0, err
    assert "operation:      idle" in out and "running:        1.0.0 on slot a" in out and "a  good" in out
    # watches until the daemon stops (the limit only bounds the test); its first line (the status it starts from)
    # comes once it has subscribed, so the check starts after that and every change reaches it
    watcher = await asyncio.create_subprocess_exec(sys.executable, "-m", "agent.cli", "watch", "--limit", "300",
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                   env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    first = (await asyncio.wait_for(watcher.stdout.readline(), 60)).decode()
    assert first.startswith("idle"), first
    watch = asyncio.create_task(asyncio.wait_for(watcher.communicate(), 320))
    rc, out, err = await cli("check", "--wait", timeout=120)
    assert rc == 0, err
    lines = out.splitlines()
    assert "checking" in lines and "verifying (2.0.0)" in lines, lines
    assert any(line.startswith("downloading 2.0.0:") for line in lines)
    assert lines[-1] == "2.0.0 is installed; it boots on trial after a reboot (omaha-agent reboot)"
    rc, out, err = await cli("status", "--json")
    status = json.loads(out)
    assert status["operation"] == "updated-need-reboot" and status["new_version"] == "2.0.0"
    assert status["slots"]["b"] == {"state": "trial", "tries_left": 2, "version": "2.0.0"}
    rc, out, err = await cli("check", "--wait")  # a check goes on while it waits: the same version is not taken
    assert rc == 0 and out.splitlines()[-1] == "2.0.0 is installed; it boots on trial after a reboot (omaha-agent reboot)"
    stopped = time.monotonic()
    daemon.proc.terminate()
    await daemon.proc.wait()
    wout, err = (part.decode() for part in await watch)
    rc = watcher.returncode
    assert "checking" in wout and "updated-need-reboot (2.0.0)" in wout
    assert rc == 1 and err.strip().splitlines() == [
        "omaha-agent: omaha-agent stopped (it left the system bus); see: journalctl -u omaha-agent"], err
    assert time.monotonic() - stopped < 60  # when the daemon left, not at the limit


async def test_client_commands_without_a_daemon_say_so_in_one_line(system_bus):
    for command in (["status"], ["check"], ["mark-good"], ["reboot"]):
        rc, out, err = await cli(*command)
        assert rc == 1, command
        assert err.strip().splitlines() == ["omaha-agent: omaha-agent is not running (nobody owns "
                                            "org.omaha_agent.Agent1 on the system bus); start it with: systemctl "
                                            "start omaha-agent"], err
    env = dict(os.environ, PYTHONPATH=ROOT, DBUS_SYSTEM_BUS_ADDRESS="unix:path=/nonexistent/bus")
    rc, out, err = await cli("status", env=env)
    assert rc == 1 and "cannot reach the system bus" in err and "Traceback" not in err


def ui_client():
    return asyncio.create_subprocess_exec(sys.executable, os.path.join(ROOT, "examples", "ui_client.py"),
                                          stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                          stderr=asyncio.subprocess.PIPE)


async def test_example_ui_client_updates_and_restarts(running, server):
    dev, daemon, client = running
    proc = await ui_client()
    try:
        proc.stdin.write(b"u\n")  # "Update now"
        await proc.stdin.drain()
        await wait_status(client, lambda s: s["operation"] == "updated-need-reboot")
        await asyncio.sleep(0.5)  # let the last StatusChanged reach the UI
        proc.stdin.write(b"r\n")  # "Restart"
        await proc.stdin.drain()
        await wait_status(client, lambda s: dev.boot.booted_slot() == "b")
        proc.stdin.close()
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    screen = out.decode()
    assert proc.returncode == 0, err.decode()
    assert "Up to date: 1.0.0" in screen and "Version 2.0.0 is ready. Type 'r' to restart now." in screen
    assert "rebooting into 2.0.0" in screen


async def test_a_planned_reboot_is_announced_by_signal_and_properties_and_postponed_within_its_bound(tmp_path, server):
    """reboot.notice gives a UI time to warn: RebootScheduled and the Reboot* properties say which version and
    when; PostponeReboot moves it (cut at reboot.max_postpone, then refused); the CLI shows the plan; an
    unprivileged caller may read it but not postpone it."""
    need_tool("dbus-daemon")
    bus = PrivateBus(group="users")
    dev = Device(tmp_path, server.url, extra="schedule: {initial_delay: 3600}\n",
                 reboot="{policy: immediate, notice: 3600, max_postpone: 5400}")
    daemon = Daemon(dev)
    raw = None
    try:
        await daemon.start()
        from dbus_next import BusType, Message
        from dbus_next.aio import MessageBus
        raw = await MessageBus(bus_type=BusType.SYSTEM).connect()
        scheduled: list = []
        raw.add_message_handler(lambda m: scheduled.append(m.body) if m.member == "RebootScheduled" else None)
        await raw.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                               interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                               body=[f"type='signal',interface='{BUS_NAME}',member='RebootScheduled'"]))
        client = await Client.connect()
        try:
            await client.call("CheckForUpdate", "b", [True])
            status = await wait_status(client, lambda s: s["operation"] == "reboot-pending", 60)
            planned = status["reboot_time"]
            assert status["reboot_version"] == "2.0.0" and status["reboot_waiting_for"] == "its time"
            assert 3500 < planned - time.time() <= 3600
            rc, out, err = await run("busctl", f"--address={bus.address}", "get-property", BUS_NAME, PATH, BUS_NAME,
                                     "RebootTime")
            assert rc == 0 and out.strip() == f"x {planned}", (out, err)
            for _ in range(100):
                if scheduled:
                    break
                await asyncio.sleep(0.05)
            assert scheduled and scheduled[0] == ["2.0.0", planned]

            reply = await client.call("PostponeReboot", "u", [1800])
            assert "postponed to" in reply, reply
            assert (await client.status())["reboot_time"] == planned + 1800
            rc, out, err = await cli("postpone", "2h", env=dict(os.environ, PYTHONPATH=ROOT))
            assert rc == 0 and "the most reboot.max_postpone allows" in out, (out, err)
            assert (await client.status())["reboot_time"] == planned + 5400
            rc, out, err = await cli("postpone", "60")
            assert rc == 1 and "already postponed as far as this device allows" in err and "Traceback" not in err
            for _ in range(100):
                if len(scheduled) >= 3:
                    break
                await asyncio.sleep(0.05)
            assert [s[1] for s in scheduled[:3]] == [planned, planned + 1800, planned + 5400]
            rc, out, err = await cli("status")
            assert rc == 0 and "reboot:         into 2.0.0 at" in out and "waiting for its time" in out, out

            if os.geteuid() == 0 and shutil.which("setpriv") and shutil.which("busctl"):
                nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
                rc, out, err = await run(*nobody, "busctl", f"--address={bus.address}", "call", BUS_NAME, PATH,
                                         BUS_NAME, "PostponeReboot", "u", "60")
                assert rc != 0 and "Access denied" in err, (out, err)
                rc, out, err = await run(*nobody, "busctl", f"--address={bus.address}", "get-property", BUS_NAME,
                                         PATH, BUS_NAME, "RebootWaitingFor")
                assert rc == 0 and out.strip() == 's "its time"', (out, err)
        finally:
            client.close()
    finally:
        if raw is not None:
            raw.disconnect()
        await daemon.stop()
        bus.close()


async def test_example_ui_client_counts_down_a_planned_reboot_and_postpones_it(tmp_path, server, system_bus):
    dev = Device(tmp_path, server.url, extra="schedule: {initial_delay: 3600}\n",
                 reboot="{policy: immediate, notice: 1200}")
    daemon = Daemon(dev)
    await daemon.start()
    client = await Client.connect()
    proc = await ui_client()
    try:
        proc.stdin.write(b"u\n")
        await proc.stdin.drain()
        planned = (await wait_status(client, lambda s: s["operation"] == "reboot-pending", 60))["reboot_time"]
        await asyncio.sleep(3)  # a tick or two of the countdown (it moves once a second)
        proc.stdin.write(b"l\n")  # "later"
        await proc.stdin.drain()
        await wait_status(client, lambda s: s["reboot_time"] == planned + 3600)
        proc.stdin.close()
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        client.close()
        await daemon.stop()
    screen = out.decode()
    assert proc.returncode == 0, err.decode()
    assert "Restarting into 2.0.0 in 19:" in screen and "(waiting for its time). 'l': later (1 h)" in screen, screen
    assert "reboot into 2.0.0 postponed to" in screen and dev.boot.booted_slot() == "a"
