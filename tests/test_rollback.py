"""An operator's rollback (``Rollback``, ``omaha-agent rollback``): the older system on the other slot is armed for
a trial boot, the reboot follows the policy, and after the boot it is settled, confirmed and reported like an
update (3/2 of the older version with ``previousversion`` = the version left, which is then blocked). In-process
against the sim bootloader and against a real GRUB environment block (cross-checked with ``grub-editenv``),
with the development server on 127.0.0.1. (Over D-Bus and the CLI: tests/test_dbus.py.)

The GRUB backend cannot tell which slot the kernel booted from here (the kernel command line is the host's), so
the GRUB test's bootloader names the booted slot itself (``Booted``); every read and write of the block is the
real backend's, and each reboot is emulated as grub.cfg does it (count the trial's tries down, boot it)."""
import asyncio
import json
import subprocess

from agent.boot.grubenv import GrubEnvBoot
from agent.config import load
from agent.daemon import Agent
from agent.machine import Check, Operation, Refuse, Rollback

from .conftest import need_tool
from .simdevice import Device
from .test_reboots import until

QUIET = "schedule: {initial_delay: 3600}\ndbus: {enabled: false}\n"


async def started(config_path: str, boot=None) -> Agent:
    agent = Agent(load(config_path), boot=boot)
    settled = await agent.start()
    if settled.job is not None:
        await asyncio.wait_for(agent.owner.finished(settled.job), 60)
    return agent


def reports(server, kind: tuple[int, int]) -> list[dict]:
    return [e for e in server.events if (e["eventtype"], e["eventresult"]) == kind]


async def test_a_rollback_boots_the_older_slot_on_trial_and_reports_3_2_of_it_with_the_version_left(tmp_path, server):
    """issue 29 row 4: updated to 2.0.0 on slot b and confirmed, a rollback arms slot a (1.0.0) for a trial boot and
    the immediate policy reboots into it; nothing is sent on arming; after the boot its health step confirms it:
    3/2 with version 1.0.0 and previousversion 2.0.0, and 2.0.0 is then declined for its block (before: no
    Rollback command existed)."""
    dev = Device(tmp_path, server.url, policy="immediate", extra=QUIET)
    rc, out, err = await dev.once()
    assert rc == 0 and dev.boot.booted_slot() == "b", err  # installed 2.0.0 and rebooted into its trial
    agent = await started(dev.config, dev.boot)
    try:
        await agent._flush()
        assert [e["version"] for e in reports(server, (3, 2))] == ["2.0.0"]
        assert dev.state()["fallback"] == {"slot": "a", "version": "1.0.0"}  # what slot a keeps
        sent = len(server.events)
        reply = await agent.submit(Rollback())
        assert reply.acted and reply.message.startswith("rollback to 1.0.0 armed on slot a; reboot into 1.0.0 "
                                                        "planned for"), reply
        assert dev.state()["trial"] == {"slot": "a", "version": "1.0.0", "previous_version": "2.0.0", "armed": True,
                                        "untracked": False, "replaced": False, "rollback": True}
        await until(lambda: dev.boot.booted_slot() == "a", "the reboot into the rollback")
        assert dev.boot.status()["b"].state.value == "good"  # the slot left stays good (the trial's fallback)
        await agent._flush()
        assert len(server.events) == sent  # Omaha has no rollback event: nothing on arming
    finally:
        await agent.close()

    agent = await started(dev.config, dev.boot)  # the start after the reboot, on slot a
    try:
        assert agent.status.operation is Operation.IDLE and agent.ctx.version == "1.0.0"
        await agent._flush()
        last = reports(server, (3, 2))[-1]
        assert (last["version"], last["previousversion"], last["nextversion"]) == ("1.0.0", "2.0.0", "1.0.0")
        assert [s.state.value for s in dev.boot.status().values()] == ["good", "good"]
        state = dev.state()
        assert state["blocked"]["version"] == "2.0.0" and state["blocked"]["rolled_back"] is True
        assert state["fallback"] == {"slot": "b", "version": "2.0.0"} and state["trial"] is None
        check = await agent.submit(Check(True))
        outcome = await asyncio.wait_for(agent.owner.finished(check.job), 60)
        assert "offer of 2.0.0 not taken: version 2.0.0 was rolled back on this device" in outcome.message
        assert dev.boot.status()["b"].state.value == "good"  # declined: slot b is not written
    finally:
        await agent.close()


async def test_a_rollback_whose_trial_fails_goes_back_and_reports_3_0_45(tmp_path, server):
    """issue 29 row 4: the rollback target's trial goes through the same health step as an update's: when it
    fails, slot a is marked bad, 3/0 code 45 is sent (1.0.0, previousversion 2.0.0) and the device reboots back
    to 2.0.0 on slot b."""
    dev = Device(tmp_path, server.url, policy="immediate", extra=QUIET)
    assert (await dev.once())[0] == 0
    agent = await started(dev.config, dev.boot)
    try:
        assert (await agent.submit(Rollback())).acted
        await until(lambda: dev.boot.booted_slot() == "a", "the reboot into the rollback")
    finally:
        await agent.close()
    with open(dev.config) as f:
        text = f.read()
    with open(dev.config, "w") as f:
        f.write(text.replace('commands: ["true"]', 'commands: ["exit 3"]'))
    agent = await started(dev.config, dev.boot)
    try:
        await agent._flush()
        failed = reports(server, (3, 0))
        assert [(e["errorcode"], e["previousversion"], e["nextversion"]) for e in failed] == [(45, "2.0.0", "1.0.0")]
        assert dev.boot.booted_slot() == "b" and dev.boot.status()["a"].state.value == "bad"
        # slot a is bad now: a second rollback is refused with the reason
        refused = await agent.submit(Rollback())
        assert isinstance(refused.result, Refuse) and refused.result.kind == "NoRollback", refused
    finally:
        await agent.close()


async def test_a_rollback_is_refused_in_one_line_when_the_other_slot_is_empty_or_a_job_runs(tmp_path, server):
    """issue 29 row 4: a factory device (slot b bad) has nothing to roll back to; during a download the job runs;
    neither touches the bootloader or the state's trial."""
    dev = Device(tmp_path, server.url, extra=QUIET)
    agent = await started(dev.config, dev.boot)
    try:
        reply = await agent.submit(Rollback())
        assert isinstance(reply.result, Refuse) and reply.result.kind == "NoRollback"
        assert reply.message == "slot b is bad or empty (never installed, or its update failed): nothing to roll " \
                                "back to"
        server.faults.drip_delay = 0.01  # a download that lasts
        check = await agent.submit(Check(True))
        await until(lambda: agent.status.operation is Operation.DOWNLOADING, "the download")
        busy = await agent.submit(Rollback())
        assert busy.result.kind == "Busy" and "an update is running (downloading)" in busy.message
        await asyncio.wait_for(agent.owner.finished(check.job), 120)
        assert agent.status.operation is Operation.NEED_REBOOT
        waiting = await agent.submit(Rollback())
        assert waiting.result.kind == "NoRollback" and "2.0.0 is installed and waits for a reboot" in waiting.message
        assert dev.state()["trial"]["version"] == "2.0.0" and not dev.state()["trial"].get("rollback")
    finally:
        await agent.close()


class Booted(GrubEnvBoot):
    """The real GRUB env backend, told which slot booted (here the kernel command line is the host's)."""

    def __init__(self, path: str, booted: str):
        super().__init__(path)
        self.booted = booted

    def booted_slot(self) -> str:
        return self.booted


def grub_device(tmp_path, version: str):
    for slot in "ab":
        with open(tmp_path / f"slot-{slot}.img", "wb") as f:
            f.truncate(1 << 20)
    (tmp_path / "os-release").write_text(f'NAME=test\nVERSION_ID="{version}"\n')
    config = tmp_path / "agent.yaml"
    config.write_text(f"""server: {{url: "http://127.0.0.1:9", insecure_http: true, timeout: 5}}
app: {{id: "{{0a0b0c0d-1111-4222-8333-444455556666}}", version_file: {tmp_path}/os-release}}
slots:
  a: {{file: {tmp_path}/slot-a.img}}
  b: {{file: {tmp_path}/slot-b.img}}
boot: {{backend: grubenv, env: {tmp_path}/grubenv, tries: 3}}
state_dir: {tmp_path}/state
reboot: {{policy: manual}}
health: {{commands: ["true"], timeout: 10, after: start}}
trust: {{require_signature: false}}
{QUIET}""")
    return str(config)


def editenv(path) -> dict[str, str]:
    out = subprocess.run(["grub-editenv", str(path), "list"], capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def grub_boots(path) -> None:
    """One boot as config/grub/grub.cfg does it: the first trial slot in ORDER loses a try."""
    env = editenv(path)
    first = env["ORDER"].split()[0]
    if env[f"{first}_OK"] != "1":
        subprocess.run(["grub-editenv", str(path), "set", f"{first}_TRY={int(env[first + '_TRY']) - 1}"], check=True)


async def test_a_rollback_on_the_grub_backend_arms_the_recorded_older_slot_as_grub_editenv_shows(tmp_path,
                                                                                               monkeypatch):
    """issue 29 row 4: on GRUB (which records no versions) the agent recorded slot a's 1.0.0 when the update to
    2.0.0 on slot b was confirmed; a rollback then sets A_OK=0, A_TRY=3, ORDER="A B" and leaves B_OK=1, as
    grub-editenv lists it; after the boot into a, A_OK=1 and 3/2 of 1.0.0 from 2.0.0 is queued. Two good slots
    and no record: refused, the version is unknown."""
    need_tool("grub-editenv")
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")  # no logind: no delay lock
    env = tmp_path / "grubenv"
    subprocess.run(["grub-editenv", str(env), "create"], check=True)
    GrubEnvBoot(str(env)).initialize("a")
    config = grub_device(tmp_path, "1.0.0")

    agent = await started(config, Booted(str(env), "a"))
    try:  # both slots good but nothing recorded what slot b holds (provisioned by hand): not booted blind
        GrubEnvBoot(str(env)).mark_good("b")
        reply = await agent.submit(Rollback())
        assert reply.result.kind == "NoRollback" and "slot b is good but its version is unknown" in reply.message
        assert editenv(env)["B_OK"] == "1" and editenv(env)["ORDER"] == "B A"
    finally:
        await agent.close()

    # an update to 2.0.0 on slot b, armed by the agent's own path, then the boot into it
    GrubEnvBoot(str(env)).mark_bad("b")
    GrubEnvBoot(str(env)).set_trial("b", 3)
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "state.json").write_text(json.dumps(
        {"trial": {"slot": "b", "version": "2.0.0", "previous_version": "1.0.0", "armed": True}}))
    grub_boots(env)
    (tmp_path / "os-release").write_text('VERSION_ID="2.0.0"\n')
    agent = await started(config, Booted(str(env), "b"))
    try:
        assert editenv(env)["B_OK"] == "1" and agent.status.operation is Operation.IDLE
        await agent.status.refresh_slots()  # the Slots property shows what a rollback would boot
        assert agent.status.slots["a"] == {"state": "good", "tries_left": 0, "version": "1.0.0"}
        reply = await agent.submit(Rollback())
        assert reply.message == "rollback to 1.0.0 armed on slot a; it boots on the next reboot (omaha-agent reboot)"
        listed = editenv(env)
        assert (listed["A_OK"], listed["A_TRY"], listed["ORDER"], listed["B_OK"]) == ("0", "3", "A B", "1")
        assert agent.status.operation is Operation.NEED_REBOOT and agent.status.new_version == "1.0.0"
    finally:
        await agent.close()

    grub_boots(env)
    (tmp_path / "os-release").write_text('VERSION_ID="1.0.0"\n')
    agent = await started(config, Booted(str(env), "a"))
    try:
        listed = editenv(env)
        assert (listed["A_OK"], listed["B_OK"], listed["ORDER"]) == ("1", "1", "A B")
        with open(tmp_path / "state" / "state.json") as f:
            state = json.load(f)
        queued = [(e["version"], e["event"]["eventtype"], e["event"]["eventresult"], e["event"]["previousversion"])
                  for e in state["events"]]
        assert queued[-1] == ("1.0.0", 3, 2, "2.0.0") and (3, 1) not in [q[1:3] for q in queued]
        assert state["fallback"] == {"slot": "b", "version": "2.0.0"}
    finally:
        await agent.close()


async def test_rollback_over_dbus_and_the_cli_answers_in_one_line_and_refuses_with_the_project_error(
        tmp_path, server, system_bus):
    """issue 29 row 4: through a private dbus-daemon with the project's policy and a real daemon process: on a
    factory device ``Rollback()`` fails with ``org.omaha_agent.Agent1.Error.NoRollback`` and ``omaha-agent
    rollback`` prints its reason in one line (exit 1); after an update to 2.0.0 is confirmed, ``omaha-agent
    rollback`` prints one line and slot a waits, armed, for the reboot (the manual policy)."""
    from dbus_next import BusType, Message, MessageType
    from dbus_next.aio import MessageBus

    from agent.dbus.client import Client

    from .test_dbus import BUS_NAME, PATH, Daemon, cli, wait_status

    dev = Device(tmp_path, server.url, after="boot-complete", extra="schedule: {initial_delay: 3600}\n")
    daemon = Daemon(dev)
    await daemon.start()
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    client = await Client.connect()
    try:
        reply = await bus.call(Message(destination=BUS_NAME, path=PATH, interface=BUS_NAME, member="Rollback"))
        assert reply.message_type == MessageType.ERROR and reply.error_name == f"{BUS_NAME}.Error.NoRollback"
        assert reply.body == ["slot b is bad or empty (never installed, or its update failed): nothing to roll back to"]
        rc, out, err = await cli("rollback")
        assert rc == 1 and err.splitlines() == ["omaha-agent: slot b is bad or empty (never installed, or its update "
                                                "failed): nothing to roll back to"] and out == "", (out, err)
        await client.call("CheckForUpdate", "b", [True])
        await wait_status(client, lambda s: s["operation"] == "updated-need-reboot")
        rc, out, err = await cli("rollback")  # 2.0.0 waits on slot b: 1.0.0's slot is the running one
        assert rc == 1 and "2.0.0 is installed and waits for a reboot" in err and len(err.splitlines()) == 1
        await client.call("Reboot")
        await wait_status(client, lambda s: dev.boot.booted_slot() == "b")
    finally:
        await daemon.stop()

    second = Daemon(dev)  # on slot b, 2.0.0 on trial until boot-complete
    await second.start()
    try:
        await wait_status(client, lambda s: s["waiting_for_boot_complete"])
        rc, out, err = await cli("rollback")  # not before the trial is confirmed
        assert rc == 1 and "boots on trial" in err and "Traceback" not in err, err
        assert (await cli("confirm-boot"))[0] == 0
        await wait_status(client, lambda s: s["operation"] == "idle" and s["slots"]["b"]["state"] == "good")
        rc, out, err = await cli("rollback")
        assert rc == 0 and out.splitlines() == [
            "rollback to 1.0.0 armed on slot a; it boots on the next reboot (omaha-agent reboot)"], (out, err)
        status = await client.status()
        assert status["operation"] == "updated-need-reboot" and status["new_version"] == "1.0.0"
        assert status["slots"]["a"]["state"] == "trial" and status["slots"]["b"]["state"] == "good"
    finally:
        client.close()
        bus.disconnect()
        await second.stop()


async def test_a_power_cut_while_a_rollback_is_armed_leaves_it_whole_or_gone_and_never_reports_a_3_1(tmp_path,
                                                                                                   server):
    """issue 29 row 4: power can fail between the rollback's record and ``set_trial``, or between ``set_trial``
    and the armed record; the next start asks the bootloader: not armed, the record goes and slot a stays good;
    armed, it waits for its reboot. Neither queues a 3/1 (a rollback installs nothing)."""
    for cut_after_set_trial in (False, True):
        work = tmp_path / str(cut_after_set_trial)
        work.mkdir()
        dev = Device(work, server.url, extra=QUIET)
        dev.boot.set_trial("b", 2, "2.0.0")
        dev.boot.mark_good("b")
        assert dev.boot.reboot() == "b"  # running 2.0.0 on b, 1.0.0 still good on a
        if cut_after_set_trial:
            dev.boot.set_trial("a", 2, "1.0.0")
        (work / "state").mkdir()
        (work / "state" / "state.json").write_text(json.dumps({"trial": {
            "slot": "a", "version": "1.0.0", "previous_version": "2.0.0", "armed": False, "rollback": True}}))
        agent = await started(dev.config, dev.boot)
        try:
            state = dev.state()
            assert state["events"] == []
            if cut_after_set_trial:
                assert agent.status.operation is Operation.NEED_REBOOT and agent.status.new_version == "1.0.0"
                assert state["trial"]["armed"] is True and dev.boot.status()["a"].state.value == "trial"
            else:
                assert agent.status.operation is Operation.IDLE and state["trial"] is None
                assert dev.boot.status()["a"].state.value == "good"
        finally:
            await agent.close()


async def test_a_rollback_the_bootloader_cannot_arm_fails_in_one_line_and_leaves_the_running_slot_first(tmp_path,
                                                                                                      server):
    """issue 29 row 4: ``set_trial`` fails (``FaultyBoot``, tests/seams.py: a real bootloader cannot be made to
    fail at that call here): the command fails with the bootloader's reason in LastError, both slots stay good
    with the running slot b first in the boot order (so no reboot boots 1.0.0 untested), and no record is left."""
    from .seams import FaultyBoot
    dev = Device(tmp_path, server.url, policy="immediate", extra=QUIET)
    assert (await dev.once())[0] == 0
    boot = FaultyBoot(dev.boot)
    agent = await started(dev.config, boot)
    try:
        boot.fail("set_trial", "error")
        reply = await agent.submit(Rollback())
        assert type(reply.result).__name__ == "Failed" and reply.message == "injected failure in set_trial", reply
        assert agent.snapshot()["last_error"] == "injected failure in set_trial"
        assert agent.status.operation is Operation.IDLE and dev.state()["trial"] is None
        with open(dev.boot.path) as f:
            env = json.load(f)
        assert env["order"] == ["b", "a"] and [s.state.value for s in dev.boot.status().values()] == ["good", "good"]
        assert dev.boot.reboot() == "b"
    finally:
        await agent.close()
