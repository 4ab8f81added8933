"""The owner owns the operation and the saves: each test drives one defect of a job protocol that sent its own end
and of saves with five error policies, in-process against a simulated device, the development server and (for the
fleet's lock) the project's FleetLock server, all on 127.0.0.1. A full disk is an ``OSError`` raised where the
store writes its file (no real full disk can be made here without root); the owner's queue is held busy by
wrapping its command handler (a bootloader that hangs is what holds it in the field)."""
import asyncio
import errno
import json
import threading

from agent.config import load
from agent.daemon import Agent
from agent.machine import Cancel, Check, MarkGood, Operation, Reboot, Reset

from .seams import FaultyBoot
from .simdevice import Device, image
from .test_boot_faults import running
from .test_reboots import FLEET, blocker, clock, devices, locks, until  # noqa: F401 - fixtures

QUIET = "schedule: {initial_delay: 3600}\ndbus: {enabled: false}\n"


def full_disk(store, when=lambda data: True):
    """Makes the store's file writes fail with ENOSPC while ``when(the JSON written)`` holds; returns the undo."""
    real = store._write

    def write(data: bytes) -> None:
        if when(json.loads(data)):
            raise OSError(errno.ENOSPC, "No space left on device", store.path)
        real(data)
    store._write = write
    return lambda: setattr(store, "_write", real)


async def ended(agent, job) -> None:
    """Waits for ``job`` and for the owner to have left its operation."""
    await asyncio.wait({job}, timeout=60)
    await until(lambda: agent.owner.job is not job, "the owner to apply the job's end")


async def test_a_cancel_that_reaches_the_owner_after_the_check_ended_is_a_no_op_and_the_next_cancel_works(
        tmp_path, server):
    """issue 24 row 1: the check ends while the owner is busy with a command and a Cancel waits behind it: the
    Cancel is a no-op and the check keeps its Outcome; the Cancel of a later download cancels it (before: the
    first Cancel cancelled the ended check and every later Cancel answered "already cancelling")."""
    dev = Device(tmp_path, server.url, extra=QUIET)
    agent, stop, task = await running(dev, FaultyBoot(dev.boot))
    try:
        owner, gate = agent.owner, asyncio.Event()
        real = owner._handle

        async def busy(command):  # a MarkGood the owner spends a while on
            if isinstance(command, MarkGood):
                await gate.wait()
            return await real(command)
        owner._handle = busy
        images, server.images = server.images, []  # nothing offered
        check = await agent.submit(Check(True))
        mark_good = asyncio.ensure_future(agent.submit(MarkGood()))
        await until(lambda: owner._queue.empty(), "the owner to take the MarkGood")
        cancel = asyncio.ensure_future(agent.submit(Cancel()))
        await until(lambda: owner._queue.qsize() >= 2, "the check to end behind the queued Cancel")
        gate.set()
        late = await cancel
        await mark_good
        # the owner applied the check's end first: the table's answer in idle (or a no-op, had nothing ended it)
        assert not late.acted and ("nothing to cancel" in late.message or "no download is running" in late.message)
        await asyncio.wait({check.job}, timeout=30)
        assert not check.job.cancelled() and check.job.result().ok  # the check keeps its Outcome
        await until(lambda: agent.status.operation is Operation.IDLE and owner.job is None, "idle")
        server.images = images
        server.faults.drip_delay = 0.01  # a download that lasts
        download = await agent.submit(Check(True))
        await until(lambda: agent.status.operation is Operation.DOWNLOADING, "the download")
        cancelled = await agent.submit(Cancel())
        assert cancelled.acted and "download cancelled" in cancelled.message, cancelled
        await ended(agent, download.job)
        assert download.job.cancelled() and agent.status.operation is Operation.IDLE
        assert agent.ctx.state.trial is None  # not installed
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_failed_trial_reboots_back_even_when_its_state_cannot_be_saved(tmp_path, server):
    """issue 24 row 2: the health step fails under the immediate policy while the disk is full: slot b is marked
    bad and the device reboots back to a; LastError names the health failure and, beside it, the failed save
    (before: the save raised before the reboot, and the device stayed on the bad slot)."""
    dev = Device(tmp_path, server.url, policy="immediate", health="exit 3", extra=QUIET)
    assert (await dev.once())[0] == 0 and dev.boot.booted_slot() == "b"  # installed, rebooted into its trial
    agent = Agent(load(dev.config))
    full_disk(agent.ctx.store)
    try:
        settled = await agent.start()
        assert settled.job is not None
        await ended(agent, settled.job)
        assert dev.boot.booted_slot() == "a" and dev.boot.status()["b"].state.value == "bad"
        last_error = agent.snapshot()["last_error"]
        assert "health check failed on 2.0.0" in last_error and "No space left on device" in last_error, last_error
    finally:
        await agent.close()


async def test_a_cancel_while_an_armed_update_is_being_replaced_keeps_it_reported_when_it_falls_back(
        tmp_path, server):
    """issue 24 row 3: ResetStatus leaves 2.0.0 armed; a check installs 3.0.0 over it; a Cancel lands while the
    record says 2.0.0 is being replaced, before its slot is marked bad: 2.0.0 stays installed and recorded as such,
    so when it then fails to boot it is reported (3/0 code 44) and blocked (before: the record kept
    ``replaced`` and the fallback was dropped silently)."""
    dev = Device(tmp_path, server.url, extra=QUIET)
    assert (await dev.once())[0] == 0 and dev.state()["trial"]["armed"]
    agent, stop, task = await running(dev, FaultyBoot(dev.boot))
    try:
        assert (await agent.submit(Reset())).acted and agent.status.operation is Operation.IDLE
        server.images = [image(tmp_path, "3.0.0")]
        store, loop = agent.ctx.store, asyncio.get_running_loop()
        real, saving, release = store._write, asyncio.Event(), threading.Event()

        def slow(data: bytes) -> None:  # a slow disk while the replaced record is saved
            if (json.loads(data).get("trial") or {}).get("replaced"):
                loop.call_soon_threadsafe(saving.set)
                release.wait(10)
            real(data)
        store._write = slow
        check = await agent.submit(Check(True))
        await asyncio.wait_for(saving.wait(), 30)
        assert (await agent.submit(Cancel())).acted
        release.set()
        await ended(agent, check.job)
        store._write = real
        trial = agent.ctx.state.trial
        assert trial is not None and trial.version == "2.0.0" and trial.armed and not trial.replaced
        assert dev.boot.status()["b"].state.value == "trial"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert dev.state()["trial"]["replaced"] is False
    dev.boot.mark_bad("b")  # 2.0.0 panicked on both tries: the bootloader fell back to a
    agent, stop, task = await running(dev, FaultyBoot(dev.boot))
    try:
        await until(lambda: not agent.ctx.state.events, "the events sent")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    fell_back = [e for e in server.events if (e["eventtype"], e["eventresult"], e["errorcode"]) == (3, 0, 44)]
    assert [e["nextversion"] for e in fell_back] == ["2.0.0"] and dev.state()["blocked"]["version"] == "2.0.0"


async def test_a_failed_save_before_the_fleet_lock_keeps_the_reboot_pending_and_retried(
        tmp_path, server, clock, devices, locks):
    """issue 24 row 4: the save that records a fleet lock may be held fails: the reboot stays in reboot-pending
    and is retried; once the disk recovers the lock is taken and the device reboots (before: the reboot job
    failed into updated-need-reboot and nothing planned it again)."""
    sim = devices(tmp_path, server.url, FLEET.replace("URL", locks.url), clock)
    agent = await sim.start()
    heal = full_disk(agent.ctx.store, lambda data: data.get("fleet_lock") == "workers")
    await sim.install()
    await until(lambda: "could not save" in agent.snapshot()["last_error"] or sim.op() is not Operation.REBOOT_PENDING,
                "the failed save")
    before = len(locks.requests("pre-reboot"))
    await until(lambda: agent.snapshot()["reboot_waiting_for"].startswith("the fleet lock")
                or sim.op() is not Operation.REBOOT_PENDING, "the retry")
    assert sim.op() is Operation.REBOOT_PENDING and not sim.rebooted_at
    assert len(locks.requests("pre-reboot")) == before == 0  # no lock asked for before the state says so
    heal()
    await until(lambda: sim.rebooted_at, "the reboot once the state is saved", 60)
    assert sim.dev.state()["fleet_lock"] == "workers" and len(locks.requests("pre-reboot", 200)) == 1


async def test_an_operators_reboot_while_the_inhibitors_are_read_is_not_held_by_them(
        tmp_path, server, clock, devices):
    """issue 24 row 5: Reboot() while the reboot job reads logind's inhibitors: the reboot comes at once, without
    the inhibitor's wait (before: the job kept the old plan, showed the inhibitor and lost the wake-up)."""
    reading, answer = asyncio.Event(), asyncio.Event()

    async def inhibitors():  # logind answers once the operator's Reboot is in
        reading.set()
        await answer.wait()
        return [blocker()]

    sim = devices(tmp_path, server.url, "{policy: immediate}", clock, inhibitors=inhibitors)
    agent = await sim.start()
    await sim.install()
    await asyncio.wait_for(reading.wait(), 30)
    asked = clock.now()
    assert (await agent.submit(Reboot())).acted
    answer.set()
    await until(lambda: sim.rebooted_at, "the operator's reboot")
    assert sim.rebooted_at[0] - asked < 1  # not after the inhibitor poll (15 s)
    assert "inhibitor" not in agent.snapshot()["reboot_waiting_for"]


async def test_reset_then_the_next_check_plans_the_reboot_again_by_the_policy(tmp_path, server, clock, devices):
    """issue 24 row 6: ResetStatus in reboot-pending under the immediate policy, then the next check: the reboot
    is planned again by the policy and the version is named (before: updated-need-reboot with nothing planned
    and an empty NewVersion)."""
    sim = devices(tmp_path, server.url, "{policy: immediate, notice: 86400}", clock)
    agent = await sim.start()
    await sim.install()
    assert sim.op() is Operation.REBOOT_PENDING
    assert (await agent.submit(Reset())).acted
    await until(lambda: sim.op() is Operation.IDLE, "idle after the reset")
    reply = await agent.submit(Check(True))
    await ended(agent, reply.job)
    snap = agent.snapshot()
    assert sim.op() is Operation.REBOOT_PENDING and snap["new_version"] == "2.0.0", snap
    assert snap["reboot_version"] == "2.0.0" and snap["reboot_time"] > 0
    await until(lambda: sim.rebooted_at, "the reboot", 60)


async def test_commands_queued_while_the_daemon_stops_are_all_answered(tmp_path, server):
    """issue 24 row 7: commands waiting in the owner's queue when it stops each get "the agent is stopping"
    (before: only the one being handled was answered; the queued callers waited for ever)."""
    dev = Device(tmp_path, server.url, extra=QUIET)
    agent, stop, task = await running(dev, FaultyBoot(dev.boot))
    owner, gate = agent.owner, asyncio.Event()
    real = owner._handle

    async def busy(command):
        if isinstance(command, MarkGood):
            await gate.wait()
        return await real(command)
    owner._handle = busy
    first = asyncio.ensure_future(agent.submit(MarkGood()))
    await until(lambda: owner._queue.empty(), "the owner to take the MarkGood")
    queued = [asyncio.ensure_future(agent.submit(c)) for c in (Check(True), Cancel(), Reset())]
    await until(lambda: owner._queue.qsize() == 3, "the commands queued")
    stop.set()
    await asyncio.wait_for(task, 30)
    done, pending = await asyncio.wait([first, *queued], timeout=10)
    assert not pending, "a queued command was never answered"
    assert all("stopping" in t.result().message for t in done)


def dead(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet (PID 1 in a container may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


async def test_a_stop_during_the_health_step_kills_the_health_commands_process_group(tmp_path, server):
    """issue 24 row 8: the daemon stops while the health command runs: the command and what it started are
    killed with it (before: the shell and its children outlived the daemon)."""
    pidfile = tmp_path / "child.pid"
    dev = Device(tmp_path, server.url, health=f"sleep 60 & echo $! > {pidfile}; wait", extra=QUIET)
    assert (await dev.once())[0] == 0
    dev.boot.reboot()  # into the trial: its health step runs at start-up
    agent = Agent(load(dev.config))
    settled = await agent.start()
    try:
        assert settled.job is not None and agent.status.operation is Operation.HEALTH_CHECK
        await until(lambda: pidfile.exists() and pidfile.read_text().strip(), "the health command's child")
        child = int(pidfile.read_text())
        assert not dead(child)
    finally:
        await agent.close()
    await until(lambda: dead(child), "the health command's child to be killed", 10)


async def test_the_http_library_is_imported_before_the_daemon_says_it_is_ready(tmp_path, server):
    """issue 24 row 11: aiohttp (a third of a second to import) is imported off the event loop during start-up,
    so the first check does not stall the loop on it (before: imported on the loop at the first check). Run in a
    child process: this one imported it long ago."""
    import sys
    dev = Device(tmp_path, server.url, extra=QUIET)
    script = f"""
import asyncio, sys
from agent.config import load
from agent.daemon import Agent

async def main():
    agent = Agent(load({dev.config!r}))
    seen = []

    async def ready():
        seen.append("aiohttp" in sys.modules)
    await agent.start(ready)
    await agent.close()
    print("imported" if seen == [True] else "not imported")
asyncio.run(main())
"""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert out.decode().strip() == "imported"


async def test_postpone_and_reset_are_refused_while_the_reboot_is_being_asked_for(tmp_path, server, clock, devices):
    """issue 24 (suspected): PostponeReboot or Reset while the reboot call is in flight is refused (the reboot
    cannot be taken back), then the reboot happens."""
    from agent.machine import PostponeReboot, Refuse
    sim = devices(tmp_path, server.url, "{policy: immediate}", clock)
    agent = await sim.start()
    asking, answer = asyncio.Event(), asyncio.Event()
    real = agent.ctx.boot.reboot

    async def slow_reboot():  # logind takes its time to answer
        asking.set()
        await answer.wait()
        return await real()
    agent.ctx.boot.reboot = slow_reboot
    await sim.install()
    await asyncio.wait_for(asking.wait(), 30)
    for command in (PostponeReboot(600), Reset()):
        reply = await agent.submit(command)
        assert isinstance(reply.result, Refuse) and "can no longer be moved or dropped" in reply.message, reply
    answer.set()
    await until(lambda: sim.op() is Operation.NEED_REBOOT and agent.owner.job is None, "the reboot job's end")
    assert dev_booted(sim) == "b"


def dev_booted(sim) -> str:
    return sim.dev.boot.booted_slot()


async def test_mark_good_is_answered_when_only_the_save_after_the_mark_failed(tmp_path, server):
    """issue 24 (suspected): MarkGood on a trial waiting for boot-complete while the disk is full: the slot is
    marked good and the answer says so (the failed save is shown in LastError), not Failed."""
    dev = Device(tmp_path, server.url, extra=QUIET)
    assert (await dev.once())[0] == 0
    dev.boot.reboot()
    agent = Agent(load(dev.config))
    await agent.start(wait_for_boot_complete=True)
    try:
        assert agent.status.operation is Operation.AWAITING_BOOT_COMPLETE
        full_disk(agent.ctx.store)
        reply = await agent.submit(MarkGood())
        assert reply.acted and "marked good" in reply.message, reply
        assert dev.boot.status()["b"].state.value == "good" and agent.status.operation is Operation.IDLE
        assert "No space left on device" in agent.snapshot()["last_error"]
    finally:
        await agent.close()


async def test_a_bootloader_call_after_the_worker_closed_is_a_boot_error(device):
    """issue 24 (suspected): a call that reaches the bootloader worker after the daemon closed it fails like any
    bootloader error (a ``BootError`` every caller handles), not with the executor's RuntimeError."""
    import pytest

    from agent.boot import BootError
    from agent.boot.worker import BootWorker
    sim, _ = device
    worker = BootWorker(sim, 5)
    assert (await worker.status())["a"].state.value == "good"
    worker.close()
    with pytest.raises(BootError, match="no longer open"):
        await worker.status()


async def test_a_start_on_a_slot_that_failed_here_reboots_back_unless_the_policy_is_manual(tmp_path, server):
    """A stop between marking a failed trial bad and the reboot back (found by the owner sequences, seed 307):
    the next start, on the bad slot, reboots back under the immediate policy (before: it stayed there)."""
    dev = Device(tmp_path, server.url, policy="immediate", extra=QUIET)
    assert (await dev.once())[0] == 0 and dev.boot.booted_slot() == "b"
    state = dev.state()
    state["trial"], state["blocked"] = None, {"version": "2.0.0", "until": 4e9, "count": 1}
    (dev.dir / "state" / "state.json").write_text(json.dumps(state))  # the failed verdict was saved
    dev.boot.mark_bad("b")  # and written; then the daemon was stopped before it rebooted
    agent = Agent(load(dev.config))
    try:
        await agent.start()
        assert dev.boot.booted_slot() == "a"
    finally:
        await agent.close()
