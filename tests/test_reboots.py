"""The reboot job on simulated devices: maintenance windows and a suspend across one on a virtual clock
(tests/seams.py), FleetLock against the project's FleetLock server on 127.0.0.1 (agent/tools/fleetlockserver.py),
shutdown inhibitors, postponement, and the one-shot run.

The daemon runs in-process without its schedule loop: checks are submitted to the owner, so the virtual clock
moves only by the reboot job's own waits. logind cannot run here (it needs systemd as PID 1), so the inhibitor
tests hand the reboot job a list in logind's shape instead of reading logind; the QEMU test reads the real one."""
import asyncio
import datetime as dt
import json
import random
from datetime import timezone

import pytest

from agent.boot.sim import SimBoot
from agent.config import load
from agent.daemon import Agent
from agent.logind import Inhibitor
from agent.machine import Check, Operation, PostponeReboot, Reboot, Refuse, Reset
from agent.tools.fleetlockserver import FleetLockServer

from .seams import FakeClock
from .simdevice import Device

QUIET = "schedule: {initial_delay: 3600}\ndbus: {enabled: false}\n"
FRIDAY_NOON = dt.datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc).timestamp()


def window(day: str, minutes: int, more: str = "") -> str:
    """The windows policy with one weekly window at 02:00 UTC."""
    return f"{{policy: windows, {more}windows: [{{days: [{day}], start: '02:00', length: {minutes}}}]}}"


def utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, timezone.utc)


async def until(predicate, what: str, timeout: float = 30.0):
    for _ in range(int(timeout * 100)):  # bounded in count and in real time
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Sim:
    """A simulated device driven through its owner, on a virtual clock; ``rebooted_at`` records each reboot."""

    def __init__(self, tmp_path, url, reboot: str, clock: FakeClock, name: str = "dev", inhibitors=None,
                 extra: str = ""):
        (tmp_path / name).mkdir(exist_ok=True)
        self.dir = tmp_path / name
        self.machine_id = self.dir / "machine-id"
        self.machine_id.write_text(random.Random(name).randbytes(16).hex() + "\n")
        self.dev = Device(self.dir, url, after="start", extra=QUIET + extra, reboot=reboot.replace("MACHINE_ID", str(
            self.machine_id)))
        self.clock, self.inhibitors = clock, inhibitors
        self.rebooted_at: list[float] = []
        self.agent: Agent | None = None

    async def start(self) -> Agent:
        self.agent = Agent(load(self.dev.config), clock=self.clock, rng=random.Random(3))
        if self.inhibitors is not None:
            self.agent.owner.rebooter.inhibitors = self.inhibitors
        boot = self.agent.ctx.boot
        real = boot.reboot

        async def recording_reboot():
            self.rebooted_at.append(self.clock.now())
            return await real()
        boot.reboot = recording_reboot
        await self.agent.start()
        return self.agent

    async def install(self) -> None:
        reply = await self.agent.submit(Check(True))
        outcome = await asyncio.wait_for(reply.job, 60)
        assert outcome.ok, outcome.message
        await until(lambda: self.op() is not Operation.FINALIZING and self.agent.owner.job is not reply.job,
                    "the update job to end")

    def op(self) -> Operation:
        return self.agent.status.operation

    async def stop(self) -> None:
        if self.agent is not None:
            await self.agent.close()
            self.agent = None

    async def boot_new_slot(self) -> Agent:
        """The reboot happened: the daemon starts on the new slot, confirms it (health.after: start), reports."""
        await self.stop()
        agent = await self.start()
        await until(lambda: agent.status.operation is Operation.IDLE and agent.owner.job is None, "the trial settled")
        return agent


@pytest.fixture
def clock():
    return FakeClock(FRIDAY_NOON)


@pytest.fixture
async def devices():
    """Makes ``Sim`` devices and stops each one's daemon at the end of the test."""
    made: list[Sim] = []

    def make(*args, **kw) -> Sim:
        made.append(Sim(*args, **kw))
        return made[-1]
    yield make
    for sim in made:
        await sim.stop()


@pytest.fixture
async def locks():
    srv = FleetLockServer(slots=1)
    await srv.start()
    yield srv
    await srv.stop()


# ---------------------------------------------------------------------------------------------- windows
async def test_the_windows_policy_installs_at_once_and_reboots_at_the_next_window_opening(
        tmp_path, server, clock, devices):
    sim = devices(tmp_path, server.url, window("sat", 120), clock)
    await sim.start()
    await sim.install()
    assert sim.op() is Operation.REBOOT_PENDING
    snap = sim.agent.snapshot()
    assert snap["reboot_version"] == "2.0.0" and utc(snap["reboot_time"]) == dt.datetime(
        2026, 11, 28, 2, 0, tzinfo=timezone.utc) and snap["reboot_waiting_for"] == "the maintenance window"
    reply = await sim.agent.submit(Check(True))  # a check goes on while it waits (issue 27 row 2)
    assert reply.acted and "already installed and waits" in (await sim.agent.owner.finished(reply.job)).message
    assert sim.op() is Operation.REBOOT_PENDING and sim.agent.snapshot()["reboot_time"] == snap["reboot_time"]
    await until(lambda: sim.rebooted_at, "the reboot", 60)
    assert utc(sim.rebooted_at[0]).replace(second=0) == dt.datetime(2026, 11, 28, 2, 0, tzinfo=timezone.utc)
    await until(lambda: sim.op() is Operation.NEED_REBOOT, "the reboot job to end")


async def test_a_suspend_across_the_window_moves_the_reboot_to_the_next_week_window(tmp_path, server, clock, devices):
    sim = devices(tmp_path, server.url, window("sat", 60), clock)
    saturday_2am = dt.datetime(2026, 11, 28, 2, 0, tzinfo=timezone.utc).timestamp()
    clock.suspend(saturday_2am - 600, 4 * 3600)  # asleep from 01:50 to 05:50: the window came and went
    await sim.start()
    await sim.install()
    await until(lambda: sim.rebooted_at, "the reboot", 120)
    assert utc(sim.rebooted_at[0]).date() == dt.date(2026, 12, 5)  # the next Saturday, inside its window
    assert 0 <= sim.rebooted_at[0] - (saturday_2am + 7 * 86400) < 3600


async def test_a_notice_announces_the_reboot_ahead_and_postponement_is_bounded(tmp_path, server, clock, devices):
    sim = devices(tmp_path, server.url, "{policy: immediate, notice: 600, max_postpone: 1800}", clock)
    agent = await sim.start()
    announced = []
    agent.listeners.append(lambda s: s["reboot_time"] and announced.append((clock.now(), s["reboot_time"])))
    clock.held = True  # the notice's time does not pass before the test has postponed
    await sim.install()
    planned = agent.snapshot()["reboot_time"]
    assert planned >= FRIDAY_NOON + 600 and announced and announced[0][0] < planned
    reply = await agent.submit(PostponeReboot(900))
    assert reply.acted and agent.snapshot()["reboot_time"] == planned + 900, reply.message
    reply = await agent.submit(PostponeReboot(3600))  # past the bound: cut to it
    assert reply.acted and "the most reboot.max_postpone allows" in reply.message
    assert agent.snapshot()["reboot_time"] == planned + 1800
    reply = await agent.submit(PostponeReboot(60))
    assert isinstance(reply.result, Refuse) and reply.result.kind == "PostponeLimit"
    clock.held = False
    await until(lambda: sim.rebooted_at, "the reboot", 60)
    assert sim.rebooted_at[0] >= planned + 1800


async def installed_with_notice(sim) -> float:
    """Starts ``sim``, installs 2.0.0 and returns the reboot's planned time; the clock is held (no time passes
    before the test acts: it releases it)."""
    agent = await sim.start()
    sim.clock.held = True
    await sim.install()
    return agent.snapshot()["reboot_time"]


async def test_a_postponement_survives_a_restart_and_stays_bounded_from_the_first_planned_time(
        tmp_path, server, clock, devices):
    sim = devices(tmp_path, server.url, "{policy: immediate, notice: 600, max_postpone: 3600}", clock)
    planned = await installed_with_notice(sim)
    assert (await sim.agent.submit(PostponeReboot(1800))).acted
    await sim.stop()  # the daemon restarts (an upgrade of itself, a crash) before the reboot
    clock.t += 60
    agent = await sim.start()
    assert sim.op() is Operation.REBOOT_PENDING
    assert agent.snapshot()["reboot_time"] == planned + 1800  # not a fresh notice from now
    reply = await agent.submit(PostponeReboot(7200))  # the bound still counts from the first planned time
    assert reply.acted and agent.snapshot()["reboot_time"] == planned + 3600, reply.message
    # a reset drops the postponement with the plan: the next start plans afresh from the policy
    assert (await agent.submit(Reset())).acted
    await sim.stop()
    restarted = clock.now()
    agent = await sim.start()
    assert agent.snapshot()["reboot_time"] == restarted + 600
    clock.held = False
    await until(lambda: sim.rebooted_at, "the reboot", 60)


async def test_a_saved_postponement_never_goes_past_the_configured_bound_and_ends_when_the_new_slot_boots(
        tmp_path, server, clock, devices):
    sim = devices(tmp_path, server.url, "{policy: immediate, notice: 600, max_postpone: 3600}", clock)
    planned = await installed_with_notice(sim)
    await sim.stop()
    # a record that claims more than reboot.max_postpone (edited by hand, or the setting lowered since)
    path = sim.dir / "state" / "state.json"
    state = json.loads(path.read_text())
    state["postponed"] = {"version": "2.0.0", "at": planned + 30 * 86400, "first": planned}
    path.write_text(json.dumps(state))
    agent = await sim.start()
    assert agent.snapshot()["reboot_time"] == planned + 3600
    # the power goes and the device boots the armed slot before the postponed time: the new slot's start drops
    # the record, so this version (installed again one day after a rollback, say) would not inherit its bound
    await sim.stop()
    assert SimBoot(str(sim.dir / "bootenv.json")).reboot() == "b"
    await sim.boot_new_slot()
    assert json.loads(path.read_text())["postponed"] is None
    assert not sim.rebooted_at  # (the agent never asked for that reboot)


async def test_reset_drops_a_planned_reboot_and_an_operator_reboot_skips_the_window(tmp_path, server, clock, devices):
    sim = devices(tmp_path, server.url, window("sun", 60), clock)
    agent = await sim.start()
    await sim.install()
    assert sim.op() is Operation.REBOOT_PENDING
    assert (await agent.submit(Reset())).acted
    await until(lambda: sim.op() is Operation.IDLE, "idle after the reset")
    assert agent.snapshot()["reboot_time"] == 0 and not sim.rebooted_at
    assert isinstance((await agent.submit(PostponeReboot(60))).result, Refuse)
    # the update stays armed: a restart finds it waiting and plans its reboot again
    await sim.stop()
    agent = await sim.start()
    assert sim.op() is Operation.REBOOT_PENDING
    before = clock.now()
    assert (await agent.submit(Reboot())).acted
    await until(lambda: sim.rebooted_at, "the operator's reboot")
    assert sim.rebooted_at[0] - before < 5  # now, not on Sunday


async def test_the_manual_policy_plans_nothing_and_postpone_is_refused(tmp_path, server, clock, devices):
    sim = devices(tmp_path, server.url, "{policy: manual}", clock)
    agent = await sim.start()
    await sim.install()
    assert sim.op() is Operation.NEED_REBOOT and agent.snapshot()["reboot_time"] == 0
    reply = await agent.submit(PostponeReboot(60))
    assert isinstance(reply.result, Refuse) and reply.result.kind == "NothingToPostpone"
    assert not sim.rebooted_at


async def test_a_one_shot_run_under_the_windows_policy_says_when_and_does_not_wait(tmp_path, server):
    dev = Device(tmp_path, server.url, extra=QUIET, reboot="{policy: windows, windows: [{days: [mon, tue, wed, thu, "
                                                         "fri, sat, sun], start: '00:00', length: 1}]}")
    rc, out, err = await dev.once()
    assert rc == 0, err
    assert "installed 2.0.0 on slot b" in out and "reboot into 2.0.0 planned for" in out, out
    assert dev.boot.booted_slot() == "a"  # nothing rebooted


# ---------------------------------------------------------------------------------------------- inhibitors
def blocker(who="backup", pid=4242):
    return Inhibitor("shutdown:sleep", who, "nightly backup running", "block", 0, pid)


async def test_a_block_inhibitor_holds_the_reboot_back_until_it_is_released(tmp_path, server, clock, devices):
    held = [blocker(), Inhibitor("shutdown", "omaha-agent", "mine", "delay", 0, 1), Inhibitor("sleep", "x", "y",
                                                                                              "block", 0, 2)]
    reads = []

    async def inhibitors():  # the backup's lock goes away at the fifth read
        reads.append(clock.now())
        return held[1:] if len(reads) >= 5 else list(held)

    sim = devices(tmp_path, server.url, "{policy: immediate}", clock, inhibitors=inhibitors)
    await sim.start()
    await sim.install()
    await until(lambda: "backup (pid 4242: nightly backup running)" in sim.agent.snapshot()["reboot_waiting_for"]
                or sim.rebooted_at, "the inhibitor to show")
    await until(lambda: sim.rebooted_at, "the reboot")
    assert len(reads) == 5 and sim.rebooted_at[0] >= reads[3]  # not before the block lock went


async def test_an_inhibitor_held_past_the_maximum_delay_moves_the_reboot_to_the_next_window(
        tmp_path, server, clock, devices):
    saturday_2am = dt.datetime(2026, 11, 28, 2, 0, tzinfo=timezone.utc).timestamp()

    async def inhibitors():  # held all through this Saturday's window, gone by the next one
        return [blocker()] if clock.now() < saturday_2am + 86400 else []

    sim = devices(tmp_path, server.url, window("sat", 120, "max_inhibit_delay: 900, "), clock, inhibitors=inhibitors)
    await sim.start()
    await sim.install()
    await until(lambda: sim.rebooted_at, "the reboot", 120)
    assert utc(sim.rebooted_at[0]).date() == dt.date(2026, 12, 5)  # never forced, never outside a window
    assert 0 <= sim.rebooted_at[0] - (saturday_2am + 7 * 86400) < 7200


# ---------------------------------------------------------------------------------------------- FleetLock
FLEET = "{policy: immediate, fleetlock: {url: 'URL', group: workers, machine_id: MACHINE_ID}}"


async def test_fleetlock_granted_reboots_and_the_lock_is_given_back_only_after_the_3_2(
        tmp_path, server, clock, devices, locks):
    seen_at_release = []
    sim = devices(tmp_path, server.url, FLEET.replace("URL", locks.url), clock)
    await sim.start()
    await sim.install()
    await until(lambda: sim.rebooted_at, "the reboot")
    taken = locks.requests("pre-reboot", 200)
    assert len(taken) == 1 and taken[0]["group"] == "workers" and len(taken[0]["id"]) == 32
    assert taken[0]["id"] not in sim.machine_id.read_text()  # an app-specific hash, never the machine ID
    assert sim.dev.state()["fleet_lock"] == "workers" and locks.holders["workers"] == [taken[0]["id"]]
    assert not locks.requests("steady-state")  # not before the new slot is confirmed
    locks.observe = lambda entry: seen_at_release.append(server.event_codes())
    await sim.boot_new_slot()
    await until(lambda: locks.requests("steady-state", 200), "the lock given back")
    assert "3/2" in seen_at_release[0] and locks.holders["workers"] == []
    await until(lambda: sim.dev.state()["fleet_lock"] == "", "the state to forget the lock")


async def test_fleetlock_refused_keeps_the_device_waiting_and_retrying_with_the_servers_reason(
        tmp_path, server, clock, devices, locks):
    locks.holders["workers"] = ["another-node"]
    sim = devices(tmp_path, server.url, FLEET.replace("URL", locks.url), clock)
    agent = await sim.start()
    await sim.install()
    await until(lambda: len(locks.requests("pre-reboot", 409)) >= 3, "three refused attempts")
    snap = agent.snapshot()
    assert sim.op() is Operation.REBOOT_PENDING and not sim.rebooted_at
    assert "failed_lock_semaphore_full" in snap["last_error"] and "fleet lock" in snap["reboot_waiting_for"]
    times = [r["time"] for r in locks.requests("pre-reboot")]
    assert all(b > a for a, b in zip(times, times[1:]))
    locks.holders["workers"] = []  # the other node is done
    await until(lambda: sim.rebooted_at, "the reboot once the slot is free")


async def test_fleetlock_server_down_waits_then_reboots_when_it_answers(tmp_path, server, clock, devices, locks):
    port = locks.port
    await locks.stop()  # nothing listens there now: connection refused
    sim = devices(tmp_path, server.url, FLEET.replace("URL", f"http://127.0.0.1:{port}"), clock)
    agent = await sim.start()
    await sim.install()
    await until(lambda: "FleetLock server" in agent.snapshot()["last_error"], "the unreachable server in LastError")
    assert sim.op() is Operation.REBOOT_PENDING and not sim.rebooted_at
    await locks.start()  # on the same port
    await until(lambda: sim.rebooted_at, "the reboot once the server answers")
    assert locks.requests("pre-reboot", 200)


async def test_fleetlock_release_is_retried_until_the_server_says_200(tmp_path, server, clock, devices, locks):
    sim = devices(tmp_path, server.url, FLEET.replace("URL", locks.url), clock)
    await sim.start()
    await sim.install()
    await until(lambda: sim.rebooted_at, "the reboot")
    locks.down = True
    agent = await sim.boot_new_slot()
    await until(lambda: len(locks.requests("steady-state", 503)) >= 2, "two failed releases")
    assert "could not give back the fleet lock" in agent.snapshot()["last_error"]
    assert sim.dev.state()["fleet_lock"] == "workers"
    locks.down = False
    await until(lambda: locks.requests("steady-state", 200), "the release")
    await until(lambda: sim.dev.state()["fleet_lock"] == "", "the state to forget the lock")


async def test_two_devices_of_one_group_with_one_slot_never_reboot_together(tmp_path, server, devices, locks):
    clocks = [FakeClock(FRIDAY_NOON), FakeClock(FRIDAY_NOON)]
    sims = [devices(tmp_path, server.url, FLEET.replace("URL", locks.url), clocks[i], name=f"dev{i}") for i in range(2)]
    for sim in sims:
        await sim.start()
    await asyncio.gather(*(sim.install() for sim in sims))
    first = await until(lambda: next((s for s in sims if s.rebooted_at), None), "one reboot")
    other = sims[1 - sims.index(first)]
    await until(lambda: len([r for r in locks.requests("pre-reboot", 409)]) >= 2, "the other refused twice")
    assert not other.rebooted_at and other.op() is Operation.REBOOT_PENDING
    await first.boot_new_slot()  # confirmed: its slot goes back to the group
    await until(lambda: other.rebooted_at, "the second reboot")
    holders = [len(r["holders"]) for r in locks.log]
    assert max(holders) <= 1
    ids = [r["id"] for r in locks.requests("pre-reboot", 200)]
    assert len(set(ids)) == 2 and locks.requests("steady-state", 200)[0]["time"] is not None
    release = locks.log.index(locks.requests("steady-state", 200)[0])
    second = locks.log.index(next(r for r in locks.requests("pre-reboot", 200) if r["id"] != ids[0]))
    assert release < second  # the second lock came only after the first was given back


async def test_the_fleetlock_server_refuses_malformed_requests_and_locks_recursively_with_ownership(locks):
    import aiohttp

    from agent import fleetlock

    async with aiohttp.ClientSession() as session:
        async def post(endpoint, body, header=True):
            headers = {"fleet-lock-protocol": "true"} if header else {}
            async with session.post(f"{locks.url}/v1/{endpoint}", data=body, headers=headers) as resp:
                return resp.status, await resp.json()

        assert (await post("pre-reboot", fleetlock.body("n1", "g"), header=False))[1]["kind"] == "missing_header"
        assert (await post("pre-reboot", b"{not json"))[1]["kind"] == "bad_body"
        assert (await post("pre-reboot", fleetlock.body("n1", "a b")))[1]["kind"] == "bad_group"
        assert (await post("pre-reboot", fleetlock.body("", "g")))[1]["kind"] == "bad_id"
        assert await fleetlock.call(session, locks.url, "pre-reboot", "n1", "g") == fleetlock.Granted()
        assert await fleetlock.call(session, locks.url, "pre-reboot", "n1", "g") == fleetlock.Granted()  # recursive
        refused = await fleetlock.call(session, locks.url, "pre-reboot", "n2", "g")
        assert isinstance(refused, fleetlock.Denied) and refused.status == 409
        assert str(refused).startswith("HTTP 409 (failed_lock_semaphore_full: all 1 reboot slot(s) of group g")
        assert await fleetlock.call(session, locks.url, "steady-state", "n2", "g") == fleetlock.Granted()
        assert locks.holders["g"] == ["n1"]  # only the owner releases its slot
        assert await fleetlock.call(session, locks.url, "pre-reboot", "n2", "other") == fleetlock.Granted()
        assert await fleetlock.call(session, locks.url, "steady-state", "n1", "g") == fleetlock.Granted()
        assert await fleetlock.call(session, locks.url, "pre-reboot", "n2", "g") == fleetlock.Granted()
    assert [r["status"] for r in locks.log] == [400, 400, 400, 400, 200, 200, 409, 200, 200, 200, 200]


def test_the_fleetlock_id_is_an_app_specific_hash_of_the_machine_id(tmp_path):
    from agent import fleetlock

    machine = tmp_path / "machine-id"
    machine.write_text("0123456789abcdef0123456789abcdef\n")
    first = fleetlock.client_id(str(machine))
    assert first == fleetlock.client_id(str(machine)) and len(first) == 32 and first[12] == "4"
    assert "0123456789abcdef" not in first
    machine.write_text("fedcba9876543210fedcba9876543210\n")
    assert fleetlock.client_id(str(machine)) != first
    machine.write_text("not a machine id\n")
    with pytest.raises(ValueError):
        fleetlock.client_id(str(machine))
