"""The logind adapter (agent/logind.py) against a stand-in for org.freedesktop.login1 on a private bus: logind
needs systemd as PID 1 and cannot run here (the QEMU test uses the real one). The stand-in answers the three
calls the agent makes with logind's signatures: ListInhibitors, Inhibit (a pipe's write end, as logind hands
out a FIFO's) and Reboot."""
import asyncio
import os
import select

import pytest
from dbus_next import BusType
from dbus_next.aio import MessageBus
from dbus_next.service import ServiceInterface, method

from agent import logind

from .conftest import PrivateBus, need_tool

LOGIN1_POLICY = """<policy context="default">
    <allow own="org.freedesktop.login1"/>
    <allow send_destination="org.freedesktop.login1"/>
  </policy>"""


class StandInLogind(ServiceInterface):
    def __init__(self):
        super().__init__("org.freedesktop.login1.Manager")
        self.locks: list[tuple[int, str, str]] = []  # (read end, why, mode)
        self.reboots: list[bool] = []
        self.listed = [["shutdown:sleep", "backup", "nightly backup", "block", 0, 4242],
                       ["sleep", "player", "playing", "block", 1000, 4343],
                       ["shutdown", "editor", "saving", "delay", 1000, 4444],
                       ["shutdown", "omaha-agent", "writing", "block", 0, os.getpid()]]

    @method()
    def ListInhibitors(self) -> "a(ssssuu)":
        return self.listed

    @method()
    def Inhibit(self, what: "s", who: "s", why: "s", mode: "s") -> "h":
        read, write = os.pipe()
        self.locks.append((read, why, mode))
        asyncio.get_running_loop().call_later(0.5, os.close, write)  # sent by then: the client holds the only copy
        return write

    @method()
    def Reboot(self, interactive: "b"):
        self.reboots.append(interactive)


@pytest.fixture
async def login1():
    need_tool("dbus-daemon")
    bus = PrivateBus(extra=LOGIN1_POLICY)
    service = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
    stand_in = StandInLogind()
    service.export("/org/freedesktop/login1", stand_in)
    await service.request_name("org.freedesktop.login1")
    yield stand_in
    service.disconnect()
    bus.close()
    for read, _, _ in stand_in.locks:
        os.close(read)


def released(read_end: int) -> bool:
    """A lock is released when every copy of its write end is closed: the read end then reads EOF."""
    return bool(select.select([read_end], [], [], 0)[0]) and os.read(read_end, 1) == b""


async def test_the_delay_lock_holds_loginds_descriptor_for_the_block_and_closes_only_that(login1):
    stdin = os.fstat(0)
    async with logind.DelayLock("writing 2.0.0 to slot b") as lock:
        await asyncio.sleep(1)  # the stand-in closed its own copy
        assert lock.fd is not None and lock.fd > 2
        (read, why, mode), = login1.locks
        assert (why, mode) == ("writing 2.0.0 to slot b", "delay") and not released(read)
    assert released(read) and lock.fd is None
    assert os.fstat(0) == stdin  # nothing else was closed


async def test_inhibitors_are_read_and_only_others_block_locks_on_shutdown_hold_a_reboot(login1):
    locks = await logind.inhibitors()
    assert [i.who for i in locks] == ["backup", "player", "editor", "omaha-agent"]
    blockers = logind.blocking_shutdown(locks)
    assert [str(b) for b in blockers] == ["backup (pid 4242: nightly backup)"]


async def test_reboot_asks_logind_non_interactively(login1):
    await logind.reboot()
    assert login1.reboots == [False]


async def test_without_logind_the_calls_fail_in_one_line_and_the_delay_lock_is_skipped():
    need_tool("dbus-daemon")
    bus = PrivateBus()
    try:
        with pytest.raises(logind.LogindError) as info:
            await logind.inhibitors()
        assert "org.freedesktop.DBus.Error.ServiceUnknown" in str(info.value) and "\n" not in str(info.value)
        async with logind.DelayLock("writing") as lock:
            assert lock.fd is None
    finally:
        bus.close()
