"""The real A/B cycle on aarch64: QEMU's virt machine, Debian's U-Boot running the project's config/uboot/boot.cmd,
the env as a redundant pair of files on the FAT boot partition, a GPT disk, systemd, the agent as a service
with the uboot backend (fw_setenv), and the development server on the host's loopback (the guest reaches it at
10.0.2.2).

Run through ``make qemu-test-arm64``: it builds the image and runs this inside a new network namespace that
has only ``lo``, so no traffic can leave the machine."""
import json
import os
import socket
import subprocess
import time

import pytest

from agent.boot.uboot import UBootBoot
from agent.tools.devserver import DevServer, Faults, Image

from ..vm import assert_agent_from_the_deb
from .vm import BUILD, ENV_FILES, LOGS, ArmMachine, env_copy

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(5400)]
BOOT_TIMEOUT = 900  # seconds from QEMU start to the guest's first report (TCG aarch64 on a busy 2-core host)
INSTALL_TIMEOUT = 2400
BOOT_MIB = 64  # build-image-arm64.sh


def _read(name: str) -> str:
    with open(os.path.join(BUILD, name)) as f:
        return f.read().strip()


@pytest.fixture(scope="module")
def image():
    if [name for _, name in socket.if_nameindex()] != ["lo"]:
        pytest.skip("run through make qemu-test-arm64: it runs in a network namespace that has only lo")
    if not os.path.exists(os.path.join(BUILD, "disk.img")):
        pytest.fail("build/qemu-arm64/disk.img is missing: make qemu-image-arm64 builds it")
    return {"disk": os.path.join(BUILD, "disk.img"), "appid": _read("appid"), "port": int(_read("port"))}


async def start_server(image, scenario: str, version: str, payload: str, faults: Faults | None = None):
    os.makedirs(LOGS, exist_ok=True)
    log = os.path.join(LOGS, f"{scenario}-server.jsonl")
    if os.path.exists(log):
        os.unlink(log)
    srv = DevServer([Image(os.path.join(BUILD, payload), version, image["appid"])], host="127.0.0.1",
                    port=image["port"], log_path=log, faults=faults or Faults(),
                    sign_key=os.path.join(BUILD, "release-key.pem"))
    await srv.start()
    return srv


def downloads(srv) -> list[dict]:
    with open(srv.log_path) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == "download"]


async def boot_and_report(machine: ArmMachine, expect_version: str, expect_slot: str):
    boot = await machine.boot()
    await boot.wait_for(boot.booted_version, BOOT_TIMEOUT, f"the guest to boot {expect_version}")
    up = time.monotonic() - boot.started
    print(f"{machine.name} boot {machine.boots}: {boot.booted_version()} on slot {expect_slot} reported after "
          f"{up:.0f} s; U-Boot: {' | '.join(boot.uboot_lines())}")
    line = next(line for line in boot.lines() if line.startswith("BOOTED "))
    assert boot.booted_version() == expect_version and f"omaha_agent.slot={expect_slot}" in line, line
    assert boot.uboot_slot() == expect_slot, boot.uboot_lines()
    return boot


def check_env(machine: ArmMachine, tmp_path, expect: dict[str, str]) -> dict[str, str]:
    """After the last plug pull: the boot partition's FAT is clean, and the project's reader, fw_printenv and
    an independent parse of the current copy all see ``expect``."""
    print("fsck.vfat -n on the boot partition:",
          machine.fsck_boot(str(tmp_path / "boot.img"), BOOT_MIB).splitlines()[-1])
    config = machine.read_env_files(str(tmp_path))
    states = {slot: st.state.value for slot, st in UBootBoot(config).status().items()}
    assert states == expect, states
    printed = subprocess.run(["fw_printenv", "-c", config], capture_output=True, text=True, check=True).stdout
    env = dict(line.split("=", 1) for line in printed.splitlines() if "=" in line)
    for slot, state in expect.items():
        assert env.get(f"BOOT_{slot.upper()}_OK") == ("1" if state == "good" else "0"), printed
    copies = {name: env_copy(str(tmp_path / name)) for name in ENV_FILES}
    print("env copies (CRC good, flags):", {n: c[:2] for n, c in copies.items()}, "fw_printenv:", env)
    return env


async def test_arm64_success_uboot_counts_the_trial_agent_confirms_b_and_reports(image, tmp_path):
    srv = await start_server(image, "success", "2.0.0", "payload-2.0.0.ext4.zst")
    machine = ArmMachine("success", image["disk"])
    try:
        first = await boot_and_report(machine, "1.0.0", "A")
        await assert_agent_from_the_deb(first)
        took = await first.wait_exit(INSTALL_TIMEOUT, "the agent to install 2.0.0 and reboot")
        print(f"boot 1: checked, streamed {srv.images[0].size >> 20} MiB onto ROOT-B and rebooted after {took:.0f} s")
        assert srv.event_codes() == ["13/1", "14/1", "3/1"]

        second = await boot_and_report(machine, "2.0.0", "B")
        assert "omaha-agent: slot B trial, 1 attempt(s) left after this one" in " ".join(second.uboot_lines())
        await second.wait_for(lambda: "3/2" in srv.event_codes(), BOOT_TIMEOUT, "the 3/2 report")
        status = await second.wait_for(
            lambda: (s := second.status()) and s["slots"]["b"]["state"]["data"] == "good" and s, 300,
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
    env = check_env(machine, tmp_path, {"a": "good", "b": "good"})
    assert env["BOOT_ORDER"] == "B A"


async def test_arm64_rollback_uboot_falls_back_to_a_when_the_new_init_fails(image, tmp_path):
    srv = await start_server(image, "rollback", "3.0.0", "payload-3.0.0.ext4.zst")
    machine = ArmMachine("rollback", image["disk"])
    try:
        first = await boot_and_report(machine, "1.0.0", "A")
        await first.wait_exit(INSTALL_TIMEOUT, "the agent to install 3.0.0 and reboot")
        assert srv.event_codes() == ["13/1", "14/1", "3/1"]
        failed = []
        while True:  # U-Boot tries B (tries: 2) until they run out; each try's init fails, panic=5 resets
            boot = await machine.boot()
            try:
                await boot.wait_for(boot.booted_version, BOOT_TIMEOUT, "a boot to report")
                break
            except AssertionError:
                if boot.proc.returncode is None:
                    raise
                failed.append(" | ".join(boot.uboot_lines()))
                assert len(failed) <= 3, "U-Boot kept trying the broken slot"
        print(f"rollback: {len(failed)} failed boot(s) of 3.0.0 ({failed}), then slot A again")
        assert len(failed) == 2 and boot.booted_version() == "1.0.0" and boot.uboot_slot() == "A"
        assert "1 attempt(s) left" in failed[0] and "0 attempt(s) left" in failed[1], failed
        await boot.wait_for(lambda: "3/0" in srv.event_codes(), BOOT_TIMEOUT, "the 3/0 report")
        report = srv.events[-1]
        assert report["errorcode"] == 44 and report["nextversion"] in ("3.0.0", None, "")
        await boot.wait_for(lambda: (s := boot.status()) and s["last_error"] and s["operation"] == "idle" and s,
                            300, "the agent to settle")
        status = boot.status()
        assert "3.0.0" in status["last_error"], status
        assert srv.event_codes() == ["13/1", "14/1", "3/1", "3/0"]  # 3.0.0 is not installed again
        await boot.power_off()
    finally:
        await srv.stop()
    check_env(machine, tmp_path, {"a": "good", "b": "bad"})


async def test_arm64_power_cut_during_download_then_resume_and_finish(image, tmp_path):
    srv = await start_server(image, "powercut", "2.0.0", "payload-2.0.0.ext4.zst", Faults(drip_delay=0.05))
    machine = ArmMachine("powercut", image["disk"])
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
    check_env(machine, tmp_path, {"a": "good", "b": "good"})


async def test_arm64_torn_env_write_still_boots_the_trial_slot_and_the_update_completes(image, tmp_path):
    """The plug is pulled in the boot where U-Boot writes B's countdown, and that write is left torn: the copy
    U-Boot wrote gets its first 512-byte sector new and the rest as it was, as a power cut after the first
    sector would leave it. A single env file would now fail its CRC and the script would find no A/B variables
    at all; with the pair it reads the intact copy, boots B again and counts that try instead."""
    srv = await start_server(image, "tornenv", "2.0.0", "payload-2.0.0.ext4.zst")
    machine = ArmMachine("tornenv", image["disk"])
    try:
        first = await boot_and_report(machine, "1.0.0", "A")
        await first.wait_exit(INSTALL_TIMEOUT, "the agent to install 2.0.0 and reboot")
        assert srv.event_codes() == ["13/1", "14/1", "3/1"]
        snap = tmp_path / "before"
        snap.mkdir()
        machine.read_env_files(str(snap))
        before = {n: (snap / n).read_bytes() for n in ENV_FILES}

        cut = await machine.boot()
        await cut.wait_for(cut.uboot_slot, BOOT_TIMEOUT, "U-Boot to save B's countdown and boot it")
        await cut.power_off()
        print("torn boot: U-Boot:", " | ".join(cut.uboot_lines()))
        assert cut.uboot_slot() == "B" and "1 attempt(s) left" in " ".join(cut.uboot_lines())
        after = tmp_path / "after"
        after.mkdir()
        machine.read_env_files(str(after))
        written = [n for n in ENV_FILES if (after / n).read_bytes() != before[n]]
        assert len(written) == 1, written  # U-Boot wrote one copy, the one that was not current
        name = written[0]
        torn = (after / name).read_bytes()[:512] + before[name][512:]
        machine.write_env_file(name, torn, str(tmp_path / "torn.env"))

        second = await boot_and_report(machine, "2.0.0", "B")
        lines = " ".join(second.uboot_lines())
        assert "bad CRC" in lines and "slot B trial, 1 attempt(s) left" in lines, lines
        await second.wait_for(lambda: "3/2" in srv.event_codes(), BOOT_TIMEOUT, "the 3/2 report")
        await second.wait_for(lambda: (s := second.status()) and s["slots"]["b"]["state"]["data"] == "good", 300,
                              "busctl to show slot b good")
        await second.power_off()
    finally:
        await srv.stop()
    assert srv.event_codes() == ["13/1", "14/1", "3/1", "3/2"]
    check_env(machine, tmp_path, {"a": "good", "b": "good"})
