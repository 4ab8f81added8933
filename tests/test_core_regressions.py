"""The four defects of a core without one owner, each driven the way a user hits it: over D-Bus against a real
daemon process on a private bus, a simulated device, and the development server."""
import asyncio

import pytest

from agent.dbus.client import Client, ClientError

from .simdevice import Device, image
from .test_dbus import Daemon, wait_status

QUIET = "schedule: {initial_delay: 3600}\n"


async def installed_and_rebooted(dev: Device) -> None:
    rc, out, err = await dev.once()
    assert rc == 0 and "installed 2.0.0" in out, err
    rc, out, _ = await dev.cli("sim-reboot")
    assert out.strip() == "b"


def trial_reports(server) -> list[str]:
    """The final reports of the 2.0.0 trial: 3/2, or 3/0 with a trial's error code (44 fell back, 45 unhealthy)."""
    return [f"{e['eventtype']}/{e['eventresult']}" for e in server.events if e["nextversion"] == "2.0.0"
            and ((e["eventtype"], e["eventresult"]) == (3, 2)
                 or ((e["eventtype"], e["eventresult"]) == (3, 0) and e["errorcode"] in (44, 45)))]


async def test_mark_good_during_the_start_up_health_step_is_refused_and_3_2_is_sent_once(tmp_path, server,
                                                                                         system_bus):
    dev = Device(tmp_path, server.url, health="sleep 2", after="start", extra=QUIET)
    await installed_and_rebooted(dev)
    daemon = Daemon(dev)
    await daemon.start()  # READY comes after the settle: the health step runs now, as the owner's job
    client = await Client.connect()
    try:
        assert (await client.status())["operation"] == "health-check"
        with pytest.raises(ClientError, match="health check of the running trial is in progress"):
            await client.call("MarkGood")
        with pytest.raises(ClientError, match="no update check before it is confirmed"):
            await client.call("CheckForUpdate", "b", [True])
        await wait_status(client, lambda s: s["operation"] == "idle" and not s["pending_events"])
        assert trial_reports(server) == ["3/2"]
        assert "already good" in await client.call("MarkGood")  # afterwards: nothing to do
        assert trial_reports(server) == ["3/2"] and dev.boot.status()["b"].state.value == "good"
    finally:
        client.close()
        await daemon.stop()


async def test_mark_good_during_a_failing_health_step_cannot_turn_its_3_0_into_3_2(tmp_path, server, system_bus):
    dev = Device(tmp_path, server.url, health="sleep 2; exit 3", after="start", extra=QUIET)
    await installed_and_rebooted(dev)
    daemon = Daemon(dev)
    await daemon.start()
    client = await Client.connect()
    try:
        with pytest.raises(ClientError, match="in progress"):
            await client.call("MarkGood")
        status = await wait_status(client, lambda s: s["operation"] == "idle" and not s["pending_events"])
        assert "health check failed on 2.0.0" in status["last_error"]
        assert trial_reports(server) == ["3/0"] and server.events[-1]["errorcode"] == 45
        assert dev.boot.status()["b"].state.value == "bad"
        with pytest.raises(ClientError, match="the running slot is not good"):  # nor afterwards, on the bad slot
            await client.call("MarkGood")
        assert dev.boot.status()["b"].state.value == "bad" and trial_reports(server) == ["3/0"]
    finally:
        client.close()
        await daemon.stop()


async def test_mark_good_while_an_update_waits_for_its_reboot_leaves_the_boot_order_alone(tmp_path, server,
                                                                                         system_bus):
    dev = Device(tmp_path, server.url, extra=QUIET)
    daemon = Daemon(dev)
    await daemon.start()
    client = await Client.connect()
    try:
        assert await client.call("CheckForUpdate", "b", [True]) is True
        await wait_status(client, lambda s: s["operation"] == "updated-need-reboot")
        before = dev.boot.status()
        answer = await client.call("MarkGood")
        assert "already good" in answer and "2.0.0 is installed and waits for a reboot" in answer
        assert dev.boot.status() == before and before["b"].state.value == "trial"
    finally:
        client.close()
        await daemon.stop()
    again = Daemon(dev)  # a restart still waits for the reboot
    await again.start()
    client = await Client.connect()
    try:
        assert (await client.status())["operation"] == "updated-need-reboot"
    finally:
        client.close()
        await again.stop()
    rc, out, _ = await dev.cli("sim-reboot")
    assert out.strip() == "b"  # the trial boots


async def test_reset_status_then_a_bad_offer_is_not_reported_as_the_armed_version_failing_to_boot(tmp_path, server,
                                                                                                  system_bus):
    dev = Device(tmp_path, server.url, extra=QUIET + "dbus: {flatcar_compat: true}\n")
    daemon = Daemon(dev)
    await daemon.start()
    client = await Client.connect()
    from dbus_next import BusType, Message, MessageType
    from dbus_next.aio import MessageBus
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()

    async def flatcar(member):
        reply = await bus.call(Message(destination="com.coreos.update1", path="/com/coreos/update1",
                                       interface="com.coreos.update1.Manager", member=member))
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body

    try:
        await flatcar("AttemptUpdate")
        await wait_status(client, lambda s: s["operation"] == "updated-need-reboot" and not s["pending_events"])
        await flatcar("ResetStatus")
        assert (await client.status())["operation"] == "idle"
        server.images = [image(tmp_path, "3.0.0")]
        server.faults.wrong_hash = True
        assert await client.call("CheckForUpdate", "b", [True]) is True
        status = await wait_status(client, lambda s: s["operation"] == "idle" and s["last_error"]
                                   and not s["pending_events"])
        assert "update to 3.0.0 failed" in status["last_error"]
    finally:
        bus.disconnect()
        client.close()
        await daemon.stop()
    assert dev.state()["trial"] is None and dev.state()["blocked"]["version"] == "3.0.0"
    again = Daemon(dev)  # a plain restart, no reboot
    await again.start()
    try:
        await asyncio.sleep(0.5)
    finally:
        await again.stop()
    assert trial_reports(server) == []  # before: 3/0 code 44 for 2.0.0, which never had a chance to boot
    failures = [e for e in server.events if (e["eventtype"], e["eventresult"]) == (3, 0)]
    assert [(e["nextversion"], e["errorcode"]) for e in failures] == [("3.0.0", 10)]
    assert dev.state()["blocked"]["version"] == "3.0.0"


async def test_a_bootloader_error_in_a_check_and_in_the_confirm_path_leaves_the_daemon_running(tmp_path, server,
                                                                                              system_bus):
    dev = Device(tmp_path, server.url, after="boot-complete", extra=QUIET)
    env = dev.dir / "bootenv.json"
    daemon = Daemon(dev)
    await daemon.start()
    client = await Client.connect()
    try:
        good = env.read_bytes()
        env.write_bytes(b"{corrupt")
        assert await client.call("CheckForUpdate", "b", [True]) is True
        status = await wait_status(client, lambda s: s["operation"] == "idle" and s["last_error"])
        assert "unreadable simulated bootloader env" in status["last_error"]
        env.write_bytes(good)
        assert await client.call("CheckForUpdate", "b", [True]) is True
        await wait_status(client, lambda s: s["operation"] == "updated-need-reboot" and not s["pending_events"])
        assert "rebooting into 2.0.0" in await client.call("Reboot")
        await wait_status(client, lambda s: s["operation"] == "updated-need-reboot" and dev.boot.booted_slot() == "b")
    finally:
        client.close()
        await daemon.stop()
    second = Daemon(dev)  # on b, waiting for boot-complete; the env breaks before ConfirmBoot
    await second.start()
    client = await Client.connect()
    try:
        await wait_status(client, lambda s: s["operation"] == "awaiting-boot-complete")
        good = env.read_bytes()
        env.write_bytes(b"{corrupt")
        assert "checking the health of slot b" in await client.call("ConfirmBoot")
        status = await wait_status(client, lambda s: s["operation"] == "awaiting-boot-complete" and s["last_error"])
        assert "unreadable simulated bootloader env" in status["last_error"]  # the verdict could not be written
        assert second.proc.returncode is None  # alive
        assert trial_reports(server) == []  # nothing reported while the verdict could not be written
        env.write_bytes(good)
        assert "checking the health of slot b" in await client.call("ConfirmBoot")  # the trial is decided again
        await wait_status(client, lambda s: s["operation"] == "idle" and not s["pending_events"])
        assert trial_reports(server) == ["3/2"] and dev.boot.status()["b"].state.value == "good"
    finally:
        client.close()
        await second.stop()


# ---------------------------------------------------------------------------------------------- found in review
async def test_a_cancel_while_a_failed_check_saves_its_error_does_not_leave_the_owner_stuck(tmp_path, server):
    import time as _time

    from agent.machine import Cancel, Check, Operation

    from .seams import FaultyBoot
    from .test_boot_faults import running
    dev = Device(tmp_path, server.url, extra=QUIET + "dbus: {enabled: false}\n")
    boot = FaultyBoot(dev.boot)
    agent, stop, task = await running(dev, boot)
    try:
        assert agent.status.operation is Operation.IDLE
        real_write = agent.ctx.store._write
        saving = asyncio.Event()
        loop = asyncio.get_running_loop()

        def slow_write(data):  # a slow disk: the seam where the cancel lands (the real write still happens)
            loop.call_soon_threadsafe(saving.set)
            _time.sleep(0.3)
            real_write(data)

        boot.fail("status", "error")
        reply = await agent.submit(Check(True))
        agent.ctx.store._write = slow_write
        await asyncio.wait_for(saving.wait(), 10)  # the job failed and is saving its LastError
        await agent.submit(Cancel())
        await asyncio.wait_for(reply.job, 10)
        agent.ctx.store._write = real_write
        for _ in range(300):
            if agent.status.operation is Operation.IDLE and agent.owner.job is None:
                break
            await asyncio.sleep(0.01)
        assert agent.status.operation is Operation.IDLE  # before: stuck in checking until a restart
        boot.heal()
        again = await agent.submit(Check(True))
        assert again.job is not None and (await asyncio.wait_for(again.job, 30)).ok
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_an_unreadable_bootloader_at_start_up_is_not_taken_for_a_fallback(tmp_path, server):
    dev = Device(tmp_path, server.url)
    assert (await dev.once())[0] == 0  # 2.0.0 armed on b, waiting for a reboot
    env = dev.dir / "bootenv.json"
    good = env.read_bytes()
    env.write_bytes(b"{corrupt")
    rc, out, err = await dev.once()  # a restart while the bootloader cannot be read
    assert rc == 1 and "Traceback" not in err
    env.write_bytes(good)
    assert trial_reports(server) == [] and dev.state()["trial"]["armed"] is True and dev.state()["blocked"] is None
    rc, out, err = await dev.once()
    assert rc == 0 and "waits for a reboot" in out, err
    assert dev.boot.status()["b"].state.value == "trial"


async def test_a_replaced_install_found_unbootable_at_start_up_is_dropped_without_a_report(tmp_path, server):
    import json
    dev = Device(tmp_path, server.url)
    assert (await dev.once())[0] == 0
    state = dev.state()
    state["trial"]["replaced"] = True  # a new install began replacing it, marked its slot bad, then power failed
    (dev.dir / "state" / "state.json").write_text(json.dumps(state))
    dev.boot.mark_bad("b")
    rc, out, err = await dev.once()
    assert rc == 0 and trial_reports(server) == [], err  # before the flag: 3/0 code 44, "2.0.0 did not boot"
    assert "installed 2.0.0 on slot b" in out  # the record was dropped quietly; the offer installs afresh
    assert server.event_codes().count("3/1") == 2 and dev.state()["trial"]["replaced"] is False


async def test_a_cancel_that_lands_before_the_check_job_ran_still_ends_the_job(tmp_path, server):
    # found by the randomized interleavings (seed 105): the cancel came before the job's first step, its body
    # never ran, no JobDone came, and the owner stayed in 'checking' for good
    from agent.machine import Cancel, Check, Operation

    from .seams import FaultyBoot
    from .test_boot_faults import running
    dev = Device(tmp_path, server.url, extra=QUIET + "dbus: {enabled: false}\n")
    agent, stop, task = await running(dev, FaultyBoot(dev.boot))  # no fault set: the sim bootloader as it is
    try:
        assert agent.status.operation is Operation.IDLE
        check, cancel = await asyncio.gather(agent.submit(Check(True)), agent.submit(Cancel()))
        assert check.acted and cancel.acted and check.job.cancelled()
        for _ in range(300):
            if agent.status.operation is Operation.IDLE and agent.owner.job is None:
                break
            await asyncio.sleep(0.01)
        assert agent.status.operation is Operation.IDLE
        again = await agent.submit(Check(True))
        assert (await asyncio.wait_for(again.job, 30)).ok
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
