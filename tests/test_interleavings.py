"""Randomized interleavings: D-Bus commands fired at random moments of an update (during the check and the
download; the update armed at once, or staged and applied: ``install.arm``) and of the trial boot that follows
(during the settle, the wait for boot-complete and the health step), against the daemon on a private system bus,
a simulated device and the development server. After each run:

* every armed trial gets exactly one final report (3/2, or 3/0 with code 44 or 45), never both, never twice;
  an unarmed one gets none;
* the slot the report names is in the state it says (3/2: good; 3/0: bad);
* the booted slot is never marked bad, except by its own failed health step;
* a trial is never marked good without a passing health step or an accepted MarkGood;
* no command ended in an internal error, the daemon was alive until it was stopped, and the state file loads.

``INTERLEAVINGS=N`` sets the number of seeded runs (default 200); ``INTERLEAVING_SEEDS=3,17`` replays seeds.
"""
import asyncio
import logging
import os
import random
import time

import pytest
from dbus_next import BusType, Message, MessageType
from dbus_next.aio import MessageBus

from agent.boot.sim import PANIC_MAGIC
from agent.config import load
from agent.daemon import Agent
from agent.dbus import DbusUnavailable, publish
from agent.machine import Operation
from agent.state import Store
from agent.tools.devserver import DevServer, Faults

from .simdevice import Device, image

RUNS = int(os.environ.get("INTERLEAVINGS", "200"))
AGENT1 = ("org.omaha_agent.Agent1", "/org/omaha_agent/Agent1", "org.omaha_agent.Agent1")
FLATCAR = ("com.coreos.update1", "/com/coreos/update1", "com.coreos.update1.Manager")
COMMANDS = [
    (AGENT1, "CheckForUpdate", "b", [True]), (AGENT1, "CheckForUpdate", "b", [False]), (AGENT1, "Cancel", "", []),
    (AGENT1, "MarkGood", "", []), (AGENT1, "Reboot", "", []), (AGENT1, "ConfirmBoot", "", []),
    (FLATCAR, "ResetStatus", "", []), (FLATCAR, "AttemptUpdate", "", []), (AGENT1, "GetStatus", "", []),
    (AGENT1, "PostponeReboot", "u", [60]), (AGENT1, "Apply", "", []),
]


class RecordingBoot:
    """The sim bootloader, recording every write with the slot that was booted at the time."""

    name = "sim"

    def __init__(self, sim, log: list):
        self.sim, self.log = sim, log

    def _write(self, method, slot, *args):
        self.log.append((method, slot, self.sim.booted_slot()))
        return getattr(self.sim, method)(slot, *args)

    def status(self):
        return self.sim.status()

    def booted_slot(self):
        return self.sim.booted_slot()

    def mark_bad(self, slot):
        return self._write("mark_bad", slot)

    def mark_good(self, slot):
        return self._write("mark_good", slot)

    def set_trial(self, slot, tries, version=None):
        return self._write("set_trial", slot, tries, version)

    def reboot(self):
        self.log.append(("reboot", None, self.sim.booted_slot()))
        return self.sim.reboot()


class Errors(logging.Handler):
    """Counts log records that say a command or job failed unexpectedly (a bug, not a contained fault)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record):
        text = record.getMessage()
        if "unexpectedly" in text or "internal error" in text or record.exc_info:
            self.records.append(text)


async def call(bus, target, member, signature, body):
    name, path, interface = target
    reply = await asyncio.wait_for(bus.call(Message(destination=name, path=path, interface=interface, member=member,
                                                    signature=signature, body=body)), 20)
    if reply.message_type == MessageType.ERROR:
        return "error", reply.body[0] if reply.body else reply.error_name
    return "ok", reply.body[0] if reply.body else None


async def phase(dev, boot, bus, rng, wait, commands, log, settle_until_armed: bool):
    """One daemon lifetime: start, fire ``commands`` random D-Bus calls at random moments, then drive it to a
    settled state; returns the replies and whether the daemon stayed alive."""
    agent = Agent(load(dev.config), boot=boot, rng=random.Random(rng.random()))
    stop, services = asyncio.Event(), []

    async def on_ready():
        for _ in range(100):  # the previous run's connection may still own the names for a moment
            try:
                services.append(await publish(agent, True))
                return
            except DbusUnavailable:
                await asyncio.sleep(0.02)
        raise AssertionError("could not own the bus names")

    task = asyncio.create_task(agent.run_forever(stop, on_ready, wait))
    replies = []
    try:
        for _ in range(500):
            if services or task.done():
                break
            await asyncio.sleep(0.01)
        assert services, "the daemon did not become ready"

        async def fire(delay, command):
            await asyncio.sleep(delay)
            replies.append((command[1], *await call(bus, *command)))

        await asyncio.gather(*(fire(rng.uniform(0, 0.25), rng.choice(COMMANDS)) for _ in range(commands)))
        checks, deadline = 0, time.monotonic() + 30
        while time.monotonic() < deadline:  # drive to a settled state
            s = agent.snapshot()
            op, busy = s["operation"], agent.owner.job is not None
            if op == Operation.AWAITING_BOOT_COMPLETE.value:
                replies.append(("ConfirmBoot", *await call(bus, AGENT1, "ConfirmBoot", "", [])))
            elif op == "staged" and not busy and settle_until_armed and checks < 3:
                checks += 1
                replies.append(("Apply", *await call(bus, AGENT1, "Apply", "", [])))
            elif op in ("idle", "updated-need-reboot", "staged") and not busy and not s["pending_events"]:
                armed = agent.ctx.state.trial is not None
                if settle_until_armed and op == "idle" and not armed and checks < 2:
                    checks += 1
                    replies.append(("CheckForUpdate", *await call(bus, AGENT1, "CheckForUpdate", "b", [True])))
                else:
                    break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"never settled: {agent.snapshot()['operation']}, job {agent.owner.job}, "
                                 f"{agent.snapshot()['pending_events']} events pending, {replies}")
        alive = not task.done() and agent.owner._runner is not None and not agent.owner._runner.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        for service in services:
            service.close()
    return replies, alive


def trial_reports(events) -> list:
    return [e for e in events if e["nextversion"] == "2.0.0" and e["eventtype"] == 3
            and (e["eventresult"] == 2 or (e["eventresult"] == 0 and e["errorcode"] in (44, 45)))]


async def one_run(seed: int, root, server, bus, errors: Errors) -> list[str]:
    rng = random.Random(seed)
    work = root / str(seed)
    work.mkdir()
    panics = rng.random() < 0.15
    server.images = [image(work, "2.0.0", head=PANIC_MAGIC if panics else b"IMAGE", size=512 << 10)]
    server.events.clear()
    server.requests.clear()
    healthy = rng.random() < 0.7
    health = "sleep 0.1" if healthy else "sleep 0.1; exit 3"
    arm = rng.choice(["immediately", "on-apply"])  # on-apply: staged, then Apply (among the commands too)
    dev = Device(work, server.url, health=health, slot_size=1 << 20,
                 extra=f"schedule: {{initial_delay: 3600}}\ndbus: {{flatcar_compat: true}}\ninstall: {{arm: {arm}}}\n")
    log: list = []
    boot = RecordingBoot(dev.boot, log)
    errors.records.clear()
    problems = []
    first, alive1 = await phase(dev, boot, bus, rng, rng.random() < 0.5, rng.randint(3, 9), log, True)
    marked_at = len(log)
    armed = any((e["eventtype"], e["eventresult"]) == (3, 1) for e in server.events)
    second, alive2 = [], True
    sim = dev.boot
    if armed:  # the device reboots into its trial (unless a Reboot above did), and the daemon starts again
        if sim.booted_slot() == "a" and sim.status()["b"].state.value == "trial":
            boot.reboot()
        second, alive2 = await phase(dev, boot, bus, rng, rng.random() < 0.5, rng.randint(2, 7), log, False)
    reports = trial_reports(server.events)
    codes = [f"3/{e['eventresult']}" + (f"({e['errorcode']})" if e["eventresult"] == 0 else "") for e in reports]
    if armed and len(reports) != 1:
        problems.append(f"an armed trial got {codes or 'no report'}")
    if not armed and reports:
        problems.append(f"an unarmed trial got {codes}")
    status = sim.status()["b"].state.value
    if reports and reports[-1]["eventresult"] == 2 and status != "good":
        problems.append(f"3/2 reported but slot b is {status}")
    if reports and reports[-1]["eventresult"] == 0 and status != "bad":
        problems.append(f"3/0 reported but slot b is {status}")
    unhealthy = bool(reports) and reports[-1]["eventresult"] == 0 and reports[-1]["errorcode"] == 45
    for i, (method, slot, booted) in enumerate(log):
        if method == "mark_bad" and slot == booted and not (unhealthy and i >= marked_at):
            problems.append(f"the booted slot {slot} was marked bad")
    accepted = any(name == "MarkGood" and result == "ok" and "marked good" in str(body) for name, result, body in second)
    for i, (method, slot, booted) in enumerate(log):
        if method == "mark_good" and slot == "b" and not (i >= marked_at and (healthy or accepted)):
            problems.append("slot b was marked good without a passing health step or an accepted MarkGood")
    if not (alive1 and alive2):
        problems.append("the daemon died")
    if errors.records:
        problems.append(f"internal errors: {errors.records[:2]}")
    store = Store(str(work / "state"))
    if store.load() is not None:
        problems.append("the state file did not load cleanly")
    if problems:
        story = [f"phase 1: {first}", f"phase 2: {second}", f"bootloader writes: {log}",
                 f"events: {[(e['eventtype'], e['eventresult'], e['errorcode'], e['nextversion']) for e in server.events]}",
                 f"arm {arm}, health {'passes' if healthy else 'fails'}, image {'panics' if panics else 'boots'}"]
        return [f"seed {seed}: " + "; ".join(problems) + "\n    " + "\n    ".join(story)]
    return []


@pytest.mark.timeout(900)  # 200 seeds take 2-4 min; far longer only on a machine busy with other work
async def test_random_interleavings_keep_every_invariant(tmp_path, system_bus):
    server = DevServer([image(tmp_path, "2.0.0")], faults=Faults(drip_delay=0.004))
    await server.start()
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    errors = Errors()
    logging.getLogger("omaha-agent").addHandler(errors)
    quiet = logging.getLogger("omaha-agent").level
    seeds = [int(s) for s in os.environ.get("INTERLEAVING_SEEDS", "").split(",") if s] or list(range(RUNS))
    failures, started = [], time.monotonic()
    try:
        for seed in seeds:
            try:
                failures += await one_run(seed, tmp_path, server, bus, errors)
            except AssertionError as exc:
                failures.append(f"seed {seed}: {exc}")
    finally:
        logging.getLogger("omaha-agent").removeHandler(errors)
        logging.getLogger("omaha-agent").setLevel(quiet)
        bus.disconnect()
        await server.stop()
    print(f"\n{len(seeds)} interleavings in {time.monotonic() - started:.0f} s, {len(failures)} broke an invariant")
    assert not failures, "\n".join(failures[:5]) + "\nreplay with INTERLEAVING_SEEDS=" + ",".join(
        f.split(":")[0].split()[1] for f in failures)
