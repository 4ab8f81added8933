"""The real A/B cycle: OVMF, GRUB with the project's grub.cfg, a GPT disk, systemd, the agent as a service,
and the development server on the host's loopback (the guest reaches it at 10.0.2.2).

Run through ``make qemu-test``: it builds the image and runs this inside a new network namespace that has
only ``lo``, so no traffic can leave the machine."""
import asyncio
import json
import os
import socket
import subprocess
import time

import pytest

from agent.boot.grubenv import GrubEnvBoot
from agent.tools.devserver import DevServer, Faults, Image

from .vm import BUILD, LOGS, Machine, accel

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(3600)]
BOOT_TIMEOUT = 600  # seconds from QEMU start to the guest's first report (TCG on a busy 2-core host)
INSTALL_TIMEOUT = 1800


def _read(name: str) -> str:
    with open(os.path.join(BUILD, name)) as f:
        return f.read().strip()


@pytest.fixture(scope="module")
def image():
    if [name for _, name in socket.if_nameindex()] != ["lo"]:
        pytest.skip("run through make qemu-test: it runs in a network namespace that has only lo")
    if not os.path.exists(os.path.join(BUILD, "disk.img")):
        pytest.fail("build/qemu/disk.img is missing: make qemu-image builds it (make qemu-test does too)")
    print(f"\naccelerator: {accel()}")
    return {"disk": os.path.join(BUILD, "disk.img"), "appid": _read("appid"), "port": int(_read("port"))}


async def start_server(image, scenario: str, version: str, payload: str, faults: Faults | None = None):
    os.makedirs(LOGS, exist_ok=True)
    log = os.path.join(LOGS, f"{scenario}-server.jsonl")
    if os.path.exists(log):
        os.unlink(log)
    srv = DevServer([Image(os.path.join(BUILD, payload), version, image["appid"])], host="127.0.0.1",
                    port=image["port"], log_path=log, faults=faults or Faults(),
                    sign_key=os.path.join(BUILD, "release-key.pem"))  # the image trusts only this key
    await srv.start()
    return srv


def downloads(srv) -> list[dict]:
    with open(srv.log_path) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == "download"]


async def boot_and_report(machine: Machine, expect_version: str, expect_slot: str):
    boot = await machine.boot()
    await boot.wait_for(boot.booted_version, BOOT_TIMEOUT, f"the guest to boot {expect_version}")
    up = time.monotonic() - boot.started
    print(f"{machine.name} boot {machine.boots}: {boot.booted_version()} on slot {expect_slot} reported after "
          f"{up:.0f} s ({accel()})")
    line = next(line for line in boot.lines() if line.startswith("BOOTED "))
    assert boot.booted_version() == expect_version and f"omaha_agent.slot={expect_slot}" in line, line
    return boot


def check_grubenv(machine: Machine, tmp_path, expect: dict[str, str]) -> None:
    """After the last plug pull: the ESP's FAT is clean, and our reader and grub-editenv see ``expect``."""
    print("fsck.vfat -n on the ESP:", machine.fsck_esp(str(tmp_path / "esp.img")).splitlines()[-1])
    path = machine.read_grubenv(str(tmp_path / "grubenv"))
    states = {slot: st.state.value for slot, st in GrubEnvBoot(path).status().items()}
    assert states == expect, states
    listed = subprocess.run(["grub-editenv", path, "list"], capture_output=True, text=True, check=True).stdout
    for slot, state in expect.items():
        assert f"{slot.upper()}_OK={'1' if state == 'good' else '0'}" in listed, listed


async def test_success_update_reboot_confirm_and_report(image, tmp_path):
    srv = await start_server(image, "success", "2.0.0", "payload-2.0.0.ext4.zst")
    machine = Machine("success", image["disk"])
    try:
        first = await boot_and_report(machine, "1.0.0", "A")
        took = await first.wait_exit(INSTALL_TIMEOUT, "the agent to install 2.0.0 and reboot")
        print(f"boot 1: checked, streamed {srv.images[0].size >> 20} MiB onto ROOT-B and rebooted after {took:.0f} s")
        assert srv.event_codes() == ["13/1", "14/1", "3/1"]

        second = await boot_and_report(machine, "2.0.0", "B")
        await second.wait_for(lambda: "3/2" in srv.event_codes(), BOOT_TIMEOUT, "the 3/2 report")
        status = await second.wait_for(
            lambda: (s := second.status()) and s["slots"]["b"]["state"]["data"] == "good" and s, 120,
            "busctl to show slot b good")
        print("busctl GetStatus inside the guest:", json.dumps({k: status[k] for k in (
            "operation", "current_version", "booted_slot", "last_error", "pending_events")}))
        assert status["current_version"] == "2.0.0" and status["booted_slot"] == "b"
        await second.power_off()
    finally:
        await srv.stop()
    assert srv.event_codes() == ["13/1", "14/1", "3/1", "3/2"]
    done = srv.events[-1]
    assert done["version"] == "2.0.0" and done["previousversion"] == "1.0.0"
    # the plug was pulled within seconds of the agent marking B good in the grubenv on the FAT ESP
    check_grubenv(machine, tmp_path, {"a": "good", "b": "good"})


async def test_rollback_when_the_new_version_never_boots(image, tmp_path):
    srv = await start_server(image, "rollback", "3.0.0", "payload-3.0.0.ext4.zst")
    machine = Machine("rollback", image["disk"])
    try:
        first = await boot_and_report(machine, "1.0.0", "A")
        await first.wait_exit(INSTALL_TIMEOUT, "the agent to install 3.0.0 and reboot")
        assert srv.event_codes() == ["13/1", "14/1", "3/1"]
        failed = 0
        while True:  # GRUB tries B (tries: 2) until its tries run out; each try panics (panic=5) and reboots
            boot = await machine.boot()
            try:
                await boot.wait_for(boot.booted_version, BOOT_TIMEOUT, "a boot to report")
                break
            except AssertionError:
                if boot.proc.returncode is None:
                    raise
                failed += 1
                assert failed <= 3, "GRUB kept trying the broken slot"
        print(f"rollback: {failed} failed boot(s) of 3.0.0, then slot A again")
        assert failed == 2 and boot.booted_version() == "1.0.0"
        await boot.wait_for(lambda: "3/0" in srv.event_codes(), BOOT_TIMEOUT, "the 3/0 report")
        report = srv.events[-1]
        assert report["errorcode"] == 44 and report["nextversion"] in ("3.0.0", None, "")
        checks = len(srv.requests)
        await boot.wait_for(lambda: len(srv.requests) > checks or boot.status() and boot.status()["last_error"], 300,
                            "the agent to settle")
        await asyncio.sleep(10)
        status = boot.status()
        assert status and "3.0.0" in status["last_error"] and status["operation"] == "idle", status
        assert srv.event_codes() == ["13/1", "14/1", "3/1", "3/0"]  # 3.0.0 is not installed again
        await boot.power_off()
    finally:
        await srv.stop()
    check_grubenv(machine, tmp_path, {"a": "good", "b": "bad"})


async def test_power_cut_during_download_then_resume_and_finish(image, tmp_path):
    # a slow link, so the plug can be pulled in the middle of the download
    srv = await start_server(image, "powercut", "2.0.0", "payload-2.0.0.ext4.zst", Faults(drip_delay=0.05))
    machine = Machine("powercut", image["disk"])
    try:
        first = await boot_and_report(machine, "1.0.0", "A")
        await first.wait_for(lambda: (s := first.status()) and s["bytes_downloaded"] > 4 << 20, INSTALL_TIMEOUT,
                             "4 MiB of the download")
        await first.power_off()
        print(f"power cut at {first.status()['bytes_downloaded'] >> 20} MiB")
        assert srv.event_codes() == ["13/1"]
        srv.faults.drip_delay = 0.0
        second = await boot_and_report(machine, "1.0.0", "A")  # slot B is bad: A still boots
        took = await second.wait_exit(INSTALL_TIMEOUT, "the agent to finish the download and reboot")
        print(f"after the power cut: downloaded and rebooted after {took:.0f} s; GETs: "
              f"{[d['start'] for d in downloads(srv)]}")
        third = await boot_and_report(machine, "2.0.0", "B")
        await third.wait_for(lambda: "3/2" in srv.event_codes(), BOOT_TIMEOUT, "the 3/2 report")
        await third.power_off()
    finally:
        await srv.stop()
    assert srv.event_codes()[-3:] == ["14/1", "3/1", "3/2"] and srv.event_codes().count("3/2") == 1
    check_grubenv(machine, tmp_path, {"a": "good", "b": "good"})
