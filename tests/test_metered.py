"""Metered connections (agent/network.py, install.on_metered) against a stand-in for NetworkManager on a private
system bus: NetworkManager needs its own daemon, netlink and root and cannot run here, so the stand-in exports
the one property the agent reads, ``Metered`` on org.freedesktop.NetworkManager, and emits PropertiesChanged when
the test changes it, as NetworkManager does. The update job runs in-process, driven through its owner."""
import asyncio
import random

import pytest
from dbus_next import BusType, PropertyAccess
from dbus_next.aio import MessageBus
from dbus_next.service import ServiceInterface, dbus_property

from agent import network
from agent.clock import SYSTEM
from agent.config import load
from agent.daemon import Agent
from agent.machine import Cancel, Check, Operation

from .conftest import PrivateBus, need_tool
from .seams import FakeClock
from .simdevice import Device
from .test_reboots import QUIET, until

NM_POLICY = """<policy context="default">
    <allow own="org.freedesktop.NetworkManager"/>
    <allow send_destination="org.freedesktop.NetworkManager"/>
  </policy>"""

YES, NO, GUESS_YES, GUESS_NO = 1, 2, 3, 4


class StandInNetworkManager(ServiceInterface):
    def __init__(self, metered: int):
        super().__init__("org.freedesktop.NetworkManager")
        self.metered = metered

    @dbus_property(access=PropertyAccess.READ)
    def Metered(self) -> "u":
        return self.metered

    def set(self, value: int) -> None:
        self.metered = value
        self.emit_properties_changed({"Metered": value})


@pytest.fixture
async def nm():
    need_tool("dbus-daemon")
    bus = PrivateBus(extra=NM_POLICY)
    service = await MessageBus(bus_type=BusType.SYSTEM).connect()
    stand_in = StandInNetworkManager(YES)
    service.export("/org/freedesktop/NetworkManager", stand_in)
    await service.request_name("org.freedesktop.NetworkManager")
    yield stand_in
    service.disconnect()
    bus.close()


async def test_yes_and_guess_yes_are_metered_and_anything_else_is_not(nm):
    seen = {}
    for value in (0, YES, NO, GUESS_YES, GUESS_NO):
        nm.metered = value
        seen[value] = await network.metered()
    assert seen == {0: False, YES: True, NO: False, GUESS_YES: True, GUESS_NO: False}


async def test_without_networkmanager_on_the_bus_the_connection_is_unmetered(system_bus):
    assert await network.metered() is False
    calls = []
    assert await network.wait_unmetered(lambda: calls.append(1), 60, SYSTEM) is False and calls == []


async def test_the_property_change_wakes_the_wait(nm, monkeypatch):
    monkeypatch.setattr(network, "POLL", 3600.0)  # only the signal can end this wait in time
    waiting = asyncio.Event()

    async def on_wait():
        waiting.set()

    task = asyncio.ensure_future(network.wait_unmetered(on_wait, 7200, SYSTEM))
    await asyncio.wait_for(waiting.wait(), 30)
    assert not task.done()
    nm.set(GUESS_NO)
    assert await asyncio.wait_for(task, 30) is True


class Job:
    """An in-process agent whose update job the test starts in the background (``Check(interactive=False)``)."""

    def __init__(self, tmp_path, url, clock=SYSTEM, extra=""):
        self.dev = Device(tmp_path, url, after="start", extra=QUIET + extra)
        self.clock = clock
        self.agent = None

    async def __aenter__(self):
        self.agent = Agent(load(self.dev.config), clock=self.clock, rng=random.Random(3))
        await self.agent.start()
        return self

    async def __aexit__(self, *exc):
        await self.agent.close()

    def last_error(self) -> str:
        return self.agent.snapshot()["last_error"]


async def test_a_background_download_waits_for_an_unmetered_connection_and_the_change_starts_it(tmp_path, server,
                                                                                                 nm):
    async with Job(tmp_path, server.url) as job:
        reply = await job.agent.submit(Check(interactive=False))
        await until(lambda: network.WAITING in job.last_error(), "the job to say it waits")
        assert job.last_error().startswith("waiting for an unmetered connection: the download of 2.0.0 starts when")
        assert job.agent.status.operation is Operation.UPDATE_AVAILABLE and server.streams == []
        nm.set(NO)
        outcome = await asyncio.wait_for(reply.job, 60)
        assert outcome.ok and "installed 2.0.0 on slot b" in outcome.message, outcome.message
        assert job.last_error() == "" and server.streams[-1]["done"]


async def test_an_interactive_check_downloads_on_a_metered_connection(tmp_path, server, nm):
    async with Job(tmp_path, server.url) as job:
        outcome = await asyncio.wait_for((await job.agent.submit(Check(interactive=True))).job, 60)
        assert outcome.ok and "installed 2.0.0" in outcome.message and nm.metered == YES


async def test_an_interactive_check_while_a_background_download_waits_starts_it_on_the_metered_link(tmp_path, server,
                                                                                                    nm):
    async with Job(tmp_path, server.url) as job:
        background = await job.agent.submit(Check(interactive=False))
        await until(lambda: network.WAITING in job.last_error(), "the job to say it waits")
        again = await job.agent.submit(Check(interactive=False))  # the schedule's: nothing changes
        assert not again.acted and server.streams == []
        asked = await job.agent.submit(Check(interactive=True))
        assert asked.acted and asked.message == "the download that waited for an unmetered connection starts now"
        outcome = await asyncio.wait_for(background.job, 60)
        assert outcome.ok and "installed 2.0.0 on slot b" in outcome.message and nm.metered == YES
        assert job.last_error() == "" and server.streams[-1]["done"]


async def test_on_metered_allow_lets_a_background_download_go_ahead(tmp_path, server, nm):
    async with Job(tmp_path, server.url, extra="install: {on_metered: allow}\n") as job:
        outcome = await asyncio.wait_for((await job.agent.submit(Check(interactive=False))).job, 60)
        assert outcome.ok and "installed 2.0.0" in outcome.message


async def test_cancel_ends_the_wait_and_clears_what_it_said(tmp_path, server, nm):
    async with Job(tmp_path, server.url) as job:
        reply = await job.agent.submit(Check(interactive=False))
        await until(lambda: network.WAITING in job.last_error(), "the job to say it waits")
        assert (await job.agent.submit(Cancel())).acted
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(reply.job, 30)
        await until(lambda: job.agent.owner.job is None, "the job to end")
        assert network.WAITING not in job.last_error() and server.streams == []


async def test_a_wait_is_bounded_by_the_check_interval_on_the_virtual_clock(tmp_path, server, nm):
    clock = FakeClock()
    async with Job(tmp_path, server.url, clock=clock) as job:
        started = clock.now()
        outcome = await asyncio.wait_for((await job.agent.submit(Check(interactive=False))).job, 60)
        assert not outcome.ok and "still metered after 18000 s; the next check tries again" in outcome.message
        assert clock.now() - started >= 18000 and server.streams == []
        assert job.last_error() == outcome.message
