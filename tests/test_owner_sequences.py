"""Random sequences against the owner, on the virtual clock: commands (fired together or one by one) × job ends ×
cancels × failed saves × bootloader faults × a stop (SIGTERM) at any step, over an update and the trial boot that
follows (armed at once, or staged and then applied, or armed by the reboot job: ``install.arm``),
in-process against a simulated device and the development server on 127.0.0.1. (``test_interleavings``
does the same over D-Bus with a real daemon process and a real-time clock, fewer runs.)

After each step and at the end of each sequence:

* every command is answered, a stop included ("the agent is stopping");
* a Cancel that said it cancelled the running download or check did: that job's task ends cancelled;
* every operation change is one ``machine.TRANSITIONS`` has, and no command or job ended in an internal error;
* a trial whose health step failed reboots back to the good slot under a policy other than manual;
* every armed update gets exactly one final report (3/2, or 3/0 with code 44 or 45; a resend keeps its request id
  and counts once); an unarmed one none;
* so does an operator's rollback to 1.0.0 (``Rollback`` is among the commands until one acted): armed (the sim
  bootloader says so), it boots and gets exactly one report of 1.0.0 (3/2 from 2.0.0, or 3/0 with code 44 or 45,
  then the way back to slot b); not armed, none.

A full disk is an ``OSError`` raised where the store writes its file, and a bootloader fault is ``FaultyBoot``
(tests/seams.py) around the real sim backend: neither can be made real at a chosen step here.
``OWNER_SEQUENCES=N`` sets the count (default 500); ``OWNER_SEEDS=3,17`` replays seeds.
"""
import asyncio
import errno
import logging
import os
import random
import time

import pytest

from agent.config import load
from agent.daemon import Agent
from agent.machine import (
    TRANSITIONS, Action, Apply, Cancel, Check, ConfirmBoot, MarkGood, Operation, PostponeReboot, Reboot, Reset, Rollback,
)
from agent.owner import Failed
from agent.tools.devserver import DevServer

from .conftest import record_count
from .seams import FakeClock, FaultyBoot
from .simdevice import Device, image
from .test_interleavings import Errors, trial_reports

RUNS = int(os.environ.get("OWNER_SEQUENCES", "500"))
QUIET = "schedule: {initial_delay: 3600}\ndbus: {enabled: false}\n"
COMMANDS = [Check(True), Check(False), Cancel(), Cancel(), MarkGood(), Reset(), Reboot(), ConfirmBoot(),
            PostponeReboot(60), Rollback(), Apply()]
FAULTS = ["disk full", "disk back", "bootloader fault", "bootloader back"]
ROLLED_BACK: list[int] = []  # the seeds whose sequence armed a rollback (printed with the count)


class Disk:
    """The store's file writes, failing with ENOSPC while ``full``."""

    def __init__(self, store):
        self.full, self.real = False, store._write
        store._write = self.write

    def write(self, data: bytes) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.real(data)


class Life:
    """One daemon lifetime on the simulated device, with what the invariants need recorded."""

    def __init__(self, dev, boot: FaultyBoot, clock, rng, problems: list, rollback: bool = True):
        self.commands = COMMANDS if rollback else [c for c in COMMANDS if not isinstance(c, Rollback)]
        self.agent = Agent(load(dev.config), clock=clock, boot=boot, rng=random.Random(rng.random()),
                           boot_timeout=0.5)
        self.boot, self.problems, self.sent = boot, problems, []
        self.disk = Disk(self.agent.ctx.store)
        self.cancelled: list[asyncio.Task] = []
        flow, changed = self.agent.status.flow, self.agent.status.flow.on_change

        def on_change(old, new):
            if new not in TRANSITIONS[old]:
                problems.append(f"{old.value} -> {new.value} is no transition of the table")
            changed(old, new)
        flow.on_change = on_change
        owner, act = self.agent.owner, self.agent.owner._act

        async def recording_act(action, command):  # which job a Cancel said it cancelled
            job = owner.job
            message, started = await act(action, command)
            if action is Action.CANCEL_JOB and "cancelled" in message:
                self.cancelled.append(job)
            return message, started
        owner._act = recording_act

    def fire(self, command) -> None:
        self.sent.append((type(command).__name__, asyncio.ensure_future(self.agent.submit(command))))

    async def step(self, rng) -> None:
        what = rng.choice(self.commands * 2 + FAULTS)
        if what == "disk full":
            self.disk.full = True
        elif what == "disk back":
            self.disk.full = False
        elif what == "bootloader fault":
            self.boot.fail(rng.choice(["status", "mark_bad", "mark_good", "set_trial"]), "error")
        elif what == "bootloader back":
            self.boot.faults.clear()
        else:
            self.fire(what)
        await asyncio.sleep(rng.choice([0, 0, 0.001, 0.004]))

    async def settle(self, drive) -> None:
        """Heals every fault and drives the device to a settled state (bounded in count and real time)."""
        self.disk.full = False
        self.boot.faults.clear()
        agent, checks = self.agent, 0
        for _ in range(600):
            await self.answered()
            op, job = agent.status.operation, agent.owner.job
            if job is not None:
                await asyncio.wait_for(agent.owner.finished(job), 30)
                continue
            if op is Operation.AWAITING_BOOT_COMPLETE:
                self.fire(ConfirmBoot())
            elif op is Operation.IDLE and drive and agent.ctx.state.trial is None and checks < 2:
                checks += 1
                self.fire(Check(True))
            elif op is Operation.STAGED and drive and checks < 3:
                checks += 1
                self.fire(Apply())  # (otherwise it stays staged: unarmed, so no report)
            elif op in (Operation.IDLE, Operation.NEED_REBOOT, Operation.STAGED):
                if not agent.ctx.state.events:
                    return
                await agent._flush()  # as the schedule loop does before its next check
            await asyncio.sleep(0.002)
        raise AssertionError(f"never settled: {agent.status.operation.value}, job {agent.owner.job}")

    async def answered(self) -> None:
        pending = [task for _, task in self.sent]
        if pending:
            done, late = await asyncio.wait(pending, timeout=20)
            if late:
                self.problems.append(f"{len(late)} command(s) never answered")

    async def stop(self) -> None:
        await self.agent.close()
        await self.answered()
        for job in self.cancelled:
            if job is not None and job.done() and not job.cancelled():
                self.problems.append(f"a Cancel said it cancelled a job that then ended with {job.result()}")


async def lifetime(dev, boot, clock, rng, problems, drive: bool, rollback: bool = True) -> bool:
    """Starts the daemon (which sends what is queued, as ``run_forever`` does), runs random steps, then settles
    it, unless it was stopped half-way (as by SIGTERM) or rebooted the device. Returns whether the daemon starts
    again (a stop or a reboot, or a start-up that could not settle the last update: that waits for the next start,
    which comes here too)."""
    life = Life(dev, boot, clock, rng, problems, rollback)
    booted = boot.sim.booted_slot()
    settled = await life.agent.start(wait_for_boot_complete=rng.random() < 0.5)
    unsettled = isinstance(settled.result, Failed)  # (a bootloader fault left from the life before)
    await life.agent._flush()
    stopped = False
    try:
        for _ in range(rng.randint(2, 10)):
            await life.step(rng)
            if boot.sim.booted_slot() != booted:  # the reboot job rebooted the device: this life is over
                break
            if rng.random() < 0.04:
                stopped = True
                break
        if not stopped and boot.sim.booted_slot() == booted:
            await life.settle(drive)
    finally:
        await life.stop()
    return stopped or unsettled or boot.sim.booted_slot() != booted


async def sequence(seed: int, root, server, errors: Errors) -> list[str]:
    rng = random.Random(seed)
    work = root / str(seed)
    work.mkdir()
    policy = rng.choice(["manual", "immediate"])
    healthy = rng.random() < 0.6
    arm = rng.choice(["immediately", "on-apply", "in-window" if policy != "manual" else "on-apply"])
    dev = Device(work, server.url, policy=policy, health="true" if healthy else "exit 3", slot_size=1 << 20,
                 extra=QUIET + f"install: {{arm: {arm}}}\n")
    boot, clock, problems = FaultyBoot(dev.boot), FakeClock(), []
    server.events.clear()
    errors.records.clear()
    sim = dev.boot
    for _ in range(3):  # a stop half-way starts the daemon again; a reboot ends the first phase
        if not await lifetime(dev, boot, clock, rng, problems, drive=True) or sim.booted_slot() != "a":
            break
    armed = any((e["eventtype"], e["eventresult"]) == (3, 1) for e in server.events) or (
        dev.state()["trial"] or {}).get("armed")
    if not armed and (sim.booted_slot() != "a" or sim.status()["b"].state.value == "trial"):
        problems.append("an update never armed (staged, or failed before) is bootable or booted")
    if armed and sim.booted_slot() == "a" and sim.status()["b"].state.value == "trial":
        sim.reboot()  # the device reboots into its trial
    rolled_back = False  # at most one rollback per sequence: once armed, the lifetimes that follow send none
    if armed:
        # the trial boot, and after a reboot back the start that sends its report; a start stopped while its
        # verdict is on the way (a failed save, the boot-complete timer firing as the stop comes) leaves it to the
        # next start, so a few more starts are given before "no report" is a finding
        for _ in range(8):
            going_on = await lifetime(dev, boot, clock, rng, problems, drive=False, rollback=not rolled_back)
            rolled_back = rolled_back or rollback_armed(sim)
            if not going_on:
                break
    if rolled_back and sim.booted_slot() == "b" and sim.status()["a"].state.value == "trial":
        sim.reboot()  # the reboot into the rollback (the manual policy, or a stop before the reboot job asked)
    if rolled_back:
        ROLLED_BACK.append(seed)
        for _ in range(4):
            if not await lifetime(dev, boot, clock, rng, problems, drive=False, rollback=False):
                break
    back = list({e["requestid"]: e for e in rollback_reports(server.events)}.values())
    if rolled_back and len(back) != 1:
        problems.append(f"an armed rollback got {codes_of(back) or 'no report'}")
    if not rolled_back and back:
        problems.append(f"an unarmed rollback got {codes_of(back)}")
    if back and back[-1]["errorcode"] == 45 and policy != "manual" and sim.booted_slot() != "b":
        problems.append("a failed rollback trial did not reboot back")
    # a resend (its delivery was not saved: a full disk, a stop) keeps its request id: the server counts it once
    reports = list({e["requestid"]: e for e in trial_reports(server.events)}.values())
    codes = codes_of(reports)
    if armed and len(reports) != 1:
        problems.append(f"an armed trial got {codes or 'no report'}")
    if not armed and reports:
        problems.append(f"an unarmed trial got {codes}")
    if reports and reports[-1]["errorcode"] == 45 and policy != "manual" and sim.booted_slot() != "a":
        problems.append("a failed trial did not reboot back")
    if errors.records:
        problems.append(f"internal errors: {errors.records[:2]}")
    if problems:
        events = [(e["eventtype"], e["eventresult"], e["errorcode"]) for e in server.events]
        return [f"seed {seed}: {'; '.join(problems[:3])} (policy {policy}, arm {arm}, health {'passes' if healthy else 'fails'},"
                f" events {events})"]
    return []


def rollback_armed(sim) -> bool:
    """After 2.0.0 booted on slot b, only a rollback puts slot a on trial, or boots slot a with b still good (a
    failed 2.0.0 is marked bad before the reboot back)."""
    states = {slot: status.state.value for slot, status in sim.status().items()}
    booted = sim.booted_slot()
    return (booted == "b" and states["a"] == "trial") or (booted == "a" and states["b"] == "good")


def rollback_reports(events) -> list:
    return [e for e in events if e["nextversion"] == "1.0.0" and e["previousversion"] == "2.0.0"
            and e["eventtype"] == 3 and (e["eventresult"] == 2 or (e["eventresult"] == 0 and e["errorcode"] in (44, 45)))]


def codes_of(reports) -> list[str]:
    return [f"3/{e['eventresult']}" + (f"({e['errorcode']})" if e["eventresult"] == 0 else "") for e in reports]


@pytest.mark.timeout(900)
async def test_random_owner_sequences_keep_every_invariant(tmp_path, capsys):
    server = DevServer([image(tmp_path, "2.0.0", size=256 << 10)])
    server.faults.drip_delay = 0.002  # a download lasts a few steps
    await server.start()
    errors = Errors()
    logger = logging.getLogger("omaha-agent")
    logger.addHandler(errors)
    seeds = [int(s) for s in os.environ.get("OWNER_SEEDS", "").split(",") if s] or list(range(RUNS))
    failures, started = [], time.monotonic()
    ROLLED_BACK.clear()
    try:
        for seed in seeds:
            try:
                failures += await sequence(seed, tmp_path, server, errors)
            except AssertionError as exc:
                failures.append(f"seed {seed}: {exc}")
    finally:
        logger.removeHandler(errors)
        await server.stop()
    line = (f"{len(seeds)} in {time.monotonic() - started:.0f} s ({len(ROLLED_BACK)} armed a rollback), "
            f"{len(failures)} broke an invariant")
    record_count("owner sequences", line)
    with capsys.disabled():
        print(f"\nowner sequences: {line}")
    assert len(seeds) >= 500 or os.environ.get("OWNER_SEQUENCES") or os.environ.get("OWNER_SEEDS")
    assert not failures, "\n".join(failures[:5]) + "\nreplay with OWNER_SEEDS=" + ",".join(
        f.split(":")[0].split()[1] for f in failures)
