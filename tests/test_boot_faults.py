"""A bootloader that fails on demand (an error, a hang, a corrupt env at a chosen call) and a state directory that
cannot be written, used through the running daemon: each fails the command with a one-line LastError, the
daemon keeps running, and the update goes through once the fault is gone."""
import asyncio
import os

import pytest

from agent.config import load
from agent.daemon import Agent
from agent.machine import Check, Operation

from .seams import FaultyBoot
from .simdevice import Device


async def running(dev: Device, boot: FaultyBoot, timeout: float = 0.5):
    agent = Agent(load(dev.config), boot=boot, boot_timeout=timeout)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run_forever(stop))
    for _ in range(500):
        if agent.status.operation is not Operation.STARTING:
            break
        await asyncio.sleep(0.01)
    return agent, stop, task


async def check(agent) -> tuple[bool, str]:
    reply = await agent.submit(Check(True))
    assert reply.job is not None, reply
    outcome = await asyncio.wait_for(reply.job, 60)
    for _ in range(200):  # the job's end is the owner's next command
        if agent.status.operation is not Operation.CHECKING and agent.owner.job is None:
            break
        await asyncio.sleep(0.01)
    return outcome.ok, outcome.message


@pytest.mark.parametrize("method,mode,says", [
    ("status", "error", "injected failure in status"),
    ("mark_bad", "error", "could not mark slot b bad before writing"),
    ("set_trial", "error", "could not set slot b for a trial boot"),
    ("status", "corrupt", "unreadable simulated bootloader env"),
    ("mark_bad", "hang", "did not answer within 0.5 s"),
    ("set_trial", "corrupt", "could not set slot b for a trial boot"),
])
async def test_a_bootloader_fault_fails_the_check_and_the_next_check_installs(tmp_path, server, method, mode, says):
    dev = Device(tmp_path, server.url, extra="schedule: {initial_delay: 3600}\ndbus: {enabled: false}\n")
    boot = FaultyBoot(dev.boot)
    agent, stop, task = await running(dev, boot)
    try:
        boot.fail(method, mode)
        ok, message = await check(agent)
        assert not ok and says in message and "\n" not in message, message
        assert says in agent.snapshot()["last_error"]
        assert agent.status.operation is Operation.IDLE and not task.done()
        boot.heal()
        assert dev.boot.status()["b"].state.value == "bad"  # marked bad before writing, or never touched
        if mode == "hang":
            await asyncio.sleep(boot.hang_s)  # the stuck call returns; the worker thread is free again
        ok, message = await check(agent)
        assert ok and "installed 2.0.0 on slot b" in message, message
        assert agent.status.operation is Operation.NEED_REBOOT and agent.snapshot()["last_error"] == ""
        assert dev.boot.status()["b"].state.value == "trial"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert "3/1" in server.event_codes()


async def test_a_state_directory_that_cannot_be_written_fails_the_check_not_the_daemon(tmp_path, server):
    dev = Device(tmp_path, server.url, extra="schedule: {initial_delay: 3600}\ndbus: {enabled: false}\n")
    agent, stop, task = await running(dev, FaultyBoot(dev.boot))
    blocker = dev.dir / "state" / "state.json"
    try:
        if blocker.exists():
            blocker.unlink()
        os.makedirs(blocker)  # the atomic rename onto it fails: EISDIR, as a full or read-only disk would fail
        ok, message = await check(agent)
        assert not ok and "state.json" in message, message
        assert not task.done() and agent.status.operation is Operation.IDLE
        assert dev.boot.status()["b"].state.value != "trial"  # nothing armed without its record saved
        os.rmdir(blocker)
        ok, message = await check(agent)
        assert ok and "installed 2.0.0" in message, message
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
