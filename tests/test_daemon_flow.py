"""The whole flow on the sim backend against the real development server, driven through the CLI."""
import asyncio
import os
import shutil
import signal
import sys

import pytest

from agent.boot.sim import PANIC_MAGIC

from .simdevice import APP, ROOT, Device, image


@pytest.mark.parametrize("protocol", ["3.0", "3.1"])
async def test_update_reboot_and_report_3_2(tmp_path, server, protocol):
    dev = Device(tmp_path, server.url, protocol=protocol)
    rc, out, err = await dev.once()
    assert rc == 0, err
    assert "installed 2.0.0 on slot b" in out
    slots = await dev.slots_json()
    assert slots["booted"] == "a" and slots["slots"]["b"]["state"] == "trial" and slots["slots"]["b"]["tries_left"] == 2
    assert server.event_codes() == ["13/1", "14/1", "3/1"]
    assert server.requests[0]["protocol"] == protocol and server.requests[0]["installsource"] == "ondemandupdate"
    rc, out, _ = await dev.cli("sim-reboot")
    assert rc == 0 and out.strip() == "b"
    rc, out, err = await dev.once()
    assert rc == 0, err
    assert "no update (running 2.0.0)" in out
    assert server.event_codes() == ["13/1", "14/1", "3/1", "3/2"]
    last = server.events[-1]
    assert last["version"] == "2.0.0" and last["previousversion"] == "1.0.0"
    slots = await dev.slots_json()
    assert slots["booted"] == "b" and slots["version"] == "2.0.0" and slots["slots"]["b"]["state"] == "good"
    assert server.requests[-1]["apps"][0]["version"] == "2.0.0"
    assert dev.state()["events"] == []


async def test_unhealthy_trial_is_marked_bad_reported_and_rebooted_back(tmp_path, server):
    dev = Device(tmp_path, server.url, policy="immediate", health="exit 3")
    rc, out, err = await dev.once()  # installs and (immediate policy) reboots into b
    assert rc == 0, err
    assert dev.boot.booted_slot() == "b"
    rc, out, err = await dev.once()  # on b: health fails -> mark bad -> 3/0 -> reboot back to a
    assert server.event_codes() == ["13/1", "14/1", "3/1", "3/0"]
    assert server.events[-1]["errorcode"] == 45 and server.events[-1]["nextversion"] == "2.0.0"
    assert dev.boot.booted_slot() == "a" and dev.boot.status()["b"].state.value == "bad"
    rc, out, err = await dev.once()  # back on a: the same version is not installed again at once
    assert rc == 0 and "not taken" in out and "failed on this device" in out
    assert server.event_codes() == ["13/1", "14/1", "3/1", "3/0"]


async def test_trial_that_never_boots_falls_back_and_reports_3_0(tmp_path, server):
    server.images = [image(tmp_path, "2.0.0", head=PANIC_MAGIC)]
    dev = Device(tmp_path, server.url)
    assert (await dev.once())[0] == 0
    rc, out, _ = await dev.cli("sim-reboot")
    assert out.strip() == "a"  # both tries panicked
    rc, out, err = await dev.once()
    assert rc == 0, err
    assert server.event_codes() == ["13/1", "14/1", "3/1", "3/0"] and server.events[-1]["errorcode"] == 44
    assert dev.boot.status()["b"].state.value == "bad"


async def test_trial_boot_whose_state_was_lost_is_still_confirmed_and_reported(tmp_path, server):
    dev = Device(tmp_path, server.url)
    assert (await dev.once())[0] == 0
    await dev.cli("sim-reboot")
    shutil.rmtree(tmp_path / "state")  # the trial record and the queued 13/1 14/1 3/1 are gone
    server.events.clear()
    assert dev.boot.status()["b"].state.value == "trial"
    rc, out, err = await dev.once()
    assert rc == 0, err
    assert "no trial record names it" in err and "no update (running 2.0.0)" in out
    assert dev.boot.status()["b"].state.value == "good" and server.event_codes() == ["3/2"]
    assert server.events[0]["version"] == "2.0.0" and server.events[0]["previousversion"] == "0.0.0.0"


async def test_unhealthy_untracked_trial_goes_back_to_the_good_slot(tmp_path, server):
    dev = Device(tmp_path, server.url, policy="immediate", health="exit 3")
    assert (await dev.once())[0] == 0
    assert dev.boot.booted_slot() == "b"
    shutil.rmtree(tmp_path / "state")
    server.events.clear()
    await dev.once()
    assert dev.boot.booted_slot() == "a" and dev.boot.status()["b"].state.value == "bad"
    assert server.event_codes() == ["3/0"] and server.events[0]["errorcode"] == 45


async def test_failed_trial_still_running_is_not_reported_again_on_restart(tmp_path, server):
    dev = Device(tmp_path, server.url, policy="manual", health="exit 3")
    assert (await dev.once())[0] == 0
    await dev.cli("sim-reboot")
    await dev.once()  # health fails: b bad, 3/0; the manual policy leaves the reboot to the operator
    assert dev.boot.booted_slot() == "b" and server.event_codes().count("3/0") == 1
    rc, out, err = await dev.once()  # a daemon restart while still on b
    assert server.event_codes().count("3/0") == 1 and "which failed here" in err, err
    assert dev.boot.status()["b"].state.value == "bad"


async def test_running_slot_is_adopted_when_no_slot_is_good(tmp_path, server):
    dev = Device(tmp_path, server.url)
    dev.boot.mark_bad("a")  # e.g. a fresh env block that marks nothing good
    rc, out, err = await dev.once()
    assert rc == 0, err
    assert dev.boot.status()["a"].state.value == "good"
    assert "installed 2.0.0 on slot b" in out  # updates are no longer held back by an unconfirmed slot


async def test_events_survive_a_server_outage_and_are_delivered_exactly_once(tmp_path, server):
    dev = Device(tmp_path, server.url)
    assert (await dev.once())[0] == 0
    await dev.cli("sim-reboot")
    server.faults.event_status, server.faults.event_failures = 503, 0  # every report refused while it is down
    rc, out, err = await dev.once()
    assert rc != 0 and "could not be delivered" in err
    assert dev.state()["events"][0]["event"]["eventtype"] == 3
    first_id = dev.state()["events"][0]["requestid"]
    assert [e["requestid"] for e in dev.state()["events"]] == [first_id]  # still queued, once
    server.faults.event_status = 0  # the server is back
    rc, out, err = await dev.once()
    assert rc == 0, err
    reports = [e for e in server.events if (e["eventtype"], e["eventresult"]) == (3, 2)]
    assert len(reports) == 1 and reports[0]["requestid"] == first_id and int(reports[0]["request_age"]) >= 0
    rc, out, err = await dev.once()
    assert len([e for e in server.events if (e["eventtype"], e["eventresult"]) == (3, 2)]) == 1


async def test_downgrade_and_same_version_are_refused_even_if_offered(tmp_path, server):
    server.faults.always_offer = True
    server.images = [image(tmp_path, "0.9.0")]
    dev = Device(tmp_path, server.url)
    rc, out, _ = await dev.once()
    assert rc == 0 and "downgrade, refused" in out
    server.images = [image(tmp_path, "1.0.0")]
    rc, out, _ = await dev.once()
    assert rc == 0 and "already running" in out
    assert server.events == []


async def test_unusable_answer_is_a_one_line_error(tmp_path, server):
    server.faults.malformed = (open(os.path.join(ROOT, "tests", "data", "omaha",
                                                 "chromeos_update_response_malformed.xml"), "rb").read()
                               .replace(b"{87efface-864d-49a5-9bb3-4b050a7c227a}", APP.encode()))
    dev = Device(tmp_path, server.url)
    rc, out, err = await dev.once()
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("omaha-agent: no usable update: the manifest has no version")
    assert dev.boot.status()["b"].state.value == "bad" and server.events == []


CRASHER = r"""
import asyncio, os, sys
from agent.config import load
from agent.daemon import Agent, AgentError
crash_at, config = sys.argv[1], sys.argv[2]
agent = Agent(load(config))
def listener(snap):
    if snap["operation"] == crash_at:
        os._exit(137)
agent.listeners.append(listener)
try:
    print(asyncio.run(agent.run_once()))
except AgentError as exc:
    print("error", exc)
"""


@pytest.mark.parametrize("crash_at", ["checking", "update-available", "downloading", "verifying", "finalizing",
                                      "updated-need-reboot"])
async def test_killed_at_every_transition_then_restarted_finishes(tmp_path, server, crash_at):
    dev = Device(tmp_path, server.url)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CRASHER, crash_at, dev.config,
                                                env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 137
    assert dev.boot.status()["b"].state.value in ("bad", "trial")
    if crash_at == "downloading":  # the state says a download was under way: a restart resumes it soon
        assert dev.state()["download"]["version"] == "2.0.0" and dev.state()["download"]["slot"] == "b"
    rc, out, err = await dev.once()  # restarted: finishes the update
    assert rc == 0, err
    assert dev.boot.status()["b"].state.value == "trial"
    await dev.cli("sim-reboot")
    rc, out, err = await dev.once()
    assert rc == 0, err
    codes = server.event_codes()
    assert codes[-1] == "3/2" and codes.count("3/2") == 1 and {"13/1", "14/1", "3/1"} <= set(codes)
    assert dev.boot.status()["b"].state.value == "good" and dev.state()["events"] == []


async def test_daemon_runs_forever_and_stops_cleanly_on_sigterm(tmp_path, server):
    dev = Device(tmp_path, server.url)
    with open(dev.config, "a") as f:
        f.write("schedule: {initial_delay: 0, interval: 3600}\ndbus: {enabled: false}\n")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "agent.cli", "daemon", "--config", dev.config,
                                                env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    for _ in range(300):
        await asyncio.sleep(0.2)
        if "3/1" in server.event_codes():
            break
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    assert server.event_codes() == ["13/1", "14/1", "3/1"]
    assert "next check in" in err.decode() and "Traceback" not in err.decode()
