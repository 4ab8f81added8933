"""Staged updates and the newest release winning, on simulated devices and the virtual clock (tests/seams.py).

``install.arm: on-apply`` stages an update (written, verified, not armed) until ``Apply``; ``in-window`` has the reboot
job arm it just before the reboot; a reboot in between means the slot is hashed again before it is armed. Checks
go on while an update waits, and a newer offer is installed over the waiting one, so one reboot reaches the newest.
The daemon runs in-process without its schedule loop (as in tests/test_reboots.py): checks are submitted to the
owner, a power cut is the sim bootloader's reboot while the daemon is stopped."""
import datetime as dt
import json
import logging
from datetime import timezone

from agent.boot.sim import SimBoot
from agent.machine import Apply, Check, Operation, Reboot

from .simdevice import image
from .test_reboots import Sim, clock, devices, until, utc, window  # noqa: F401 - the fixtures are used by name

ON_APPLY = "install: {arm: on-apply}\n"
IN_WINDOW = "install: {arm: in-window}\n"


def codes(server, version: str | None = None) -> list[str]:
    """The events the server received (for ``version`` only: those naming it as the next version)."""
    return [f"{e['eventtype']}/{e['eventresult']}" + (f":{e['errorcode']}" if e["errorcode"] else "")
            for e in server.events if version is None or e["nextversion"] == version]


def slot_b(sim) -> tuple[str, str | None]:
    status = SimBoot(str(sim.dir / "bootenv.json")).status()["b"]
    return status.state.value, status.version


async def power_cut(sim) -> str:
    """The daemon dies with the power; the device boots by the bootloader's rules. Returns the slot that came up."""
    await sim.stop()
    return SimBoot(str(sim.dir / "bootenv.json"), sim.dev.slots).reboot()


async def check(sim) -> str:
    reply = await sim.agent.submit(Check(True))
    assert reply.acted, reply.message
    outcome = await sim.agent.owner.finished(reply.job)
    assert outcome is not None and outcome.ok, outcome
    return outcome.message


# ---------------------------------------------------------------------------------------------- row 1: staging
async def test_a_staged_update_is_armed_by_apply_then_boots_on_trial_and_reports_3_2(tmp_path, server, clock, devices):
    sim = devices(tmp_path, server.url, "{policy: manual}", clock, extra=ON_APPLY)
    await sim.start()
    await sim.install()
    assert sim.op() is Operation.STAGED and sim.agent.snapshot()["new_version"] == "2.0.0"
    assert slot_b(sim)[0] == "bad"  # written and verified, but a reboot would not boot it
    assert codes(server) == ["13/1", "14/1"]
    assert json.loads((sim.dir / "state" / "state.json").read_text())["staged"]["version"] == "2.0.0"
    reply = await sim.agent.submit(Apply())
    assert reply.acted and reply.message.startswith("2.0.0 armed on slot b"), reply.message
    assert sim.op() is Operation.NEED_REBOOT and slot_b(sim) == ("trial", "2.0.0")
    await until(lambda: codes(server) == ["13/1", "14/1", "3/1"], "the 3/1")
    assert (await sim.agent.submit(Reboot())).acted
    await until(lambda: sim.rebooted_at, "the reboot")
    await sim.boot_new_slot()
    await until(lambda: codes(server) == ["13/1", "14/1", "3/1", "3/2"], "the 3/2")


async def test_a_power_cut_while_staged_boots_the_running_slot_and_the_update_stays_staged(
        tmp_path, server, clock, devices, caplog):
    caplog.set_level(logging.INFO, "omaha-agent")
    sim = devices(tmp_path, server.url, "{policy: manual}", clock, extra=ON_APPLY)
    await sim.start()
    await sim.install()
    assert await power_cut(sim) == "a"  # Wednesday's power cut does not switch the system early
    agent = await sim.start()
    assert sim.op() is Operation.STAGED and agent.snapshot()["new_version"] == "2.0.0"
    assert slot_b(sim)[0] == "bad" and codes(server) == ["13/1", "14/1"]
    reply = await agent.submit(Apply())  # the device booted since: hashed again, still the signed bytes
    assert reply.acted and slot_b(sim) == ("trial", "2.0.0"), reply.message
    assert "the device booted since 2.0.0 was staged: hashing slot b again" in caplog.text


async def test_a_staged_slot_written_to_while_the_device_was_down_is_refused_and_reported(
        tmp_path, server, clock, devices):
    sim = devices(tmp_path, server.url, "{policy: manual}", clock, extra=ON_APPLY)
    await sim.start()
    await sim.install()
    assert await power_cut(sim) == "a"
    with open(sim.dev.slots["b"], "r+b") as f:  # someone wrote to the inactive slot meanwhile
        f.seek(1 << 20)
        f.write(b"\0" * 4096)
    agent = await sim.start()
    reply = await agent.submit(Apply())
    assert not reply.acted and "no longer holds the verified image" in reply.message, reply.message
    assert sim.op() is Operation.IDLE and slot_b(sim)[0] == "bad"  # not armed
    assert "not armed" in agent.snapshot()["last_error"]
    await until(lambda: codes(server) == ["13/1", "14/1", "3/0:10"], "the 3/0 (hash)")
    assert json.loads((sim.dir / "state" / "state.json").read_text())["staged"] is None
    await sim.install()  # the next check downloads it again
    assert sim.op() is Operation.STAGED


async def test_in_window_stages_at_once_and_arms_only_when_the_window_opens(tmp_path, server, clock, devices):
    sim = devices(tmp_path, server.url, window("sat", 120), clock, extra=IN_WINDOW)
    agent = await sim.start()
    states_at_reboot = []
    recording = agent.ctx.boot.reboot

    async def looking_reboot():
        states_at_reboot.append(slot_b(sim))
        return await recording()
    agent.ctx.boot.reboot = looking_reboot
    await sim.install()
    assert sim.op() is Operation.REBOOT_PENDING and slot_b(sim)[0] == "bad"  # planned, not armed
    assert utc(agent.snapshot()["reboot_time"]) == dt.datetime(2026, 11, 28, 2, 0, tzinfo=timezone.utc)
    assert codes(server) == ["13/1", "14/1"]
    await until(lambda: sim.rebooted_at, "the reboot", 60)
    assert utc(sim.rebooted_at[0]).replace(second=0) == dt.datetime(2026, 11, 28, 2, 0, tzinfo=timezone.utc)
    assert states_at_reboot == [("trial", "2.0.0")]  # armed just before the reboot, in the window
    await until(lambda: codes(server) == ["13/1", "14/1", "3/1"], "the 3/1")


async def test_in_window_a_power_cut_before_the_window_boots_the_old_slot_and_the_reboot_is_planned_again(
        tmp_path, server, clock, devices):
    sim = devices(tmp_path, server.url, window("sat", 120), clock, extra=IN_WINDOW)
    await sim.start()
    await sim.install()
    assert await power_cut(sim) == "a"
    agent = await sim.start()
    assert sim.op() is Operation.REBOOT_PENDING and slot_b(sim)[0] == "bad"
    assert utc(agent.snapshot()["reboot_time"]) == dt.datetime(2026, 11, 28, 2, 0, tzinfo=timezone.utc)
    await until(lambda: sim.rebooted_at, "the reboot", 60)
    await until(lambda: slot_b(sim)[0] == "good" or sim.op() is Operation.NEED_REBOOT, "the reboot job to end")
    await sim.boot_new_slot()
    await until(lambda: codes(server) == ["13/1", "14/1", "3/1", "3/2"], "the 3/2")


async def test_in_window_a_staged_slot_that_changed_is_not_armed_at_the_window_and_no_reboot_comes(
        tmp_path, server, clock, devices):
    sim = devices(tmp_path, server.url, window("sat", 120), clock, extra=IN_WINDOW)
    await sim.start()
    await sim.install()
    assert await power_cut(sim) == "a"
    with open(sim.dev.slots["b"], "r+b") as f:
        f.write(b"X")
    agent = await sim.start()
    assert sim.op() is Operation.REBOOT_PENDING
    await until(lambda: sim.op() is Operation.IDLE, "the reboot job to refuse the changed slot", 60)
    assert not sim.rebooted_at and slot_b(sim)[0] == "bad"
    assert "no longer holds the verified image" in agent.snapshot()["last_error"]
    await until(lambda: codes(server) == ["13/1", "14/1", "3/0:10"], "the 3/0 (hash)")


# ---------------------------------------------------------------------------------------------- row 2: newest wins
async def test_a_newer_release_is_installed_over_the_waiting_one_and_one_reboot_reaches_it(
        tmp_path, server, clock, devices):
    sim = devices(tmp_path, server.url, "{policy: manual}", clock)
    await sim.start()
    await sim.install()
    assert sim.op() is Operation.NEED_REBOOT and slot_b(sim) == ("trial", "2.0.0")
    downloads = len(server.streams)
    assert "already installed and waits" in await check(sim)  # the same version again: no download
    assert len(server.streams) == downloads and slot_b(sim) == ("trial", "2.0.0")
    server.images.insert(0, image(tmp_path, "2.1.0"))  # released while the device waits to reboot
    assert (await check(sim)).startswith("installed 2.1.0 on slot b")
    assert sim.op() is Operation.NEED_REBOOT and sim.agent.snapshot()["new_version"] == "2.1.0"
    assert slot_b(sim) == ("trial", "2.1.0")
    assert (await sim.agent.submit(Reboot())).acted
    await until(lambda: sim.rebooted_at, "the reboot")
    agent = await sim.boot_new_slot()
    assert agent.ctx.version == "2.1.0" and len(sim.rebooted_at) == 1
    await until(lambda: "3/2" in codes(server, "2.1.0"), "the 3/2 of 2.1.0")
    assert codes(server, "2.0.0") == ["13/1", "14/1", "3/1"]  # superseded, not failed: no 3/0
    assert codes(server, "2.1.0") == ["13/1", "14/1", "3/1", "3/2"]


async def test_a_check_while_a_reboot_waits_for_its_window_keeps_its_time_and_takes_the_newer_version(
        tmp_path, server, clock, devices):
    sim = devices(tmp_path, server.url, window("sat", 120), clock)
    agent = await sim.start()
    await sim.install()
    planned = agent.snapshot()["reboot_time"]
    assert sim.op() is Operation.REBOOT_PENDING
    server.images.insert(0, image(tmp_path, "2.1.0"))
    assert (await check(sim)).startswith("installed 2.1.0 on slot b")
    assert sim.op() is Operation.REBOOT_PENDING
    snap = agent.snapshot()
    assert snap["reboot_time"] == planned and snap["reboot_version"] == "2.1.0"
    await until(lambda: sim.rebooted_at, "the reboot", 60)
    assert sim.rebooted_at[0] >= planned
    await sim.boot_new_slot()
    await until(lambda: "3/2" in codes(server, "2.1.0"), "the 3/2 of 2.1.0")
    assert "3/0" not in " ".join(codes(server, "2.0.0"))


async def test_a_newer_release_replaces_a_staged_one(tmp_path, server, clock, devices):
    sim = devices(tmp_path, server.url, "{policy: manual}", clock, extra=ON_APPLY)
    await sim.start()
    await sim.install()
    assert sim.op() is Operation.STAGED
    assert "already staged" in await check(sim)
    server.images.insert(0, image(tmp_path, "2.1.0"))
    assert (await check(sim)).startswith("staged 2.1.0 on slot b")
    assert sim.op() is Operation.STAGED and slot_b(sim)[0] == "bad"
    assert json.loads((sim.dir / "state" / "state.json").read_text())["staged"]["version"] == "2.1.0"
    assert (await sim.agent.submit(Apply())).acted and slot_b(sim) == ("trial", "2.1.0")
    assert codes(server, "2.0.0") == ["13/1", "14/1"]  # never armed, superseded: no 3/1, no 3/0


def test_status_names_a_waiting_version_without_a_size_it_no_longer_knows():
    """After a restart the daemon knows a staged or armed update's version, not its payload's size: `omaha-agent
    status` printed "2.0.0 (0 B)"."""
    from agent.console import render_status
    base = {"operation": "staged", "current_version": "1.0.0", "booted_slot": "a", "new_version": "2.0.0"}
    assert "new version:    2.0.0\n" in render_status(dict(base, new_size=0), 0) + "\n"
    assert "2.0.0 (1.0 MiB)" in render_status(dict(base, new_size=1 << 20), 0)
