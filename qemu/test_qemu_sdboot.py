"""The A/B cycle under systemd-boot: OVMF, Debian's systemd-boot, one Boot Loader Specification entry per slot on
the FAT ESP (boot counting in the file names), the agent's bls backend; the image is build-image.sh's
BOOTLOADER=systemd-boot twin (disk-sdboot.img), the harness the GRUB image's.

``make qemu-test`` runs the success scenario; the rollback and the power cut during the entry's name change run
on demand with QEMU_SDBOOT_ALL=1 (``make qemu-test-sdboot``)."""
import asyncio
import os
import subprocess
import time

import pytest

from agent.boot.bls import parse_name

from .test_qemu import BOOT_TIMEOUT, INSTALL_TIMEOUT, boot_and_report, built_image, start_server
from .vm import Machine

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(3600)]
ON_DEMAND = pytest.mark.skipif(not os.environ.get("QEMU_SDBOOT_ALL"),
                               reason="on demand: QEMU_SDBOOT_ALL=1 (make qemu-test-sdboot)")


@pytest.fixture(scope="module")
def image():
    return built_image("disk-sdboot.img", "qemu-image-sdboot")


def entries(machine: Machine) -> list[str]:
    """The entry files on the ESP of the disk image (no mount: mtools, the ESP starts at 1 MiB)."""
    out = subprocess.run(["mdir", "-b", "-i", f"{machine.disk}@@1048576", "::/loader/entries"], check=True,
                         capture_output=True, text=True, env=dict(os.environ, MTOOLS_SKIP_CHECK="1")).stdout
    return sorted(line.rsplit("/", 1)[-1] for line in out.splitlines() if line.strip().endswith(".conf"))


async def agent_slot_line(boot) -> str:
    line = await boot.wait_for(boot.slot_source, BOOT_TIMEOUT, "the agent's booted-slot log line")
    print(f"agent: {line}")
    return line


async def test_sdboot_success_trial_b_counted_by_systemd_boot_blessed_by_the_agent(image, tmp_path):
    started = time.monotonic()
    srv = await start_server(image, "sdboot-success", "2.0.0", "payload-sdboot-2.0.0.ext4.zst")
    machine = Machine("sdboot-success", image["disk"])
    try:
        assert entries(machine) == ["omaha-0-b+0.conf", "omaha-1-a.conf"]
        first = await boot_and_report(machine, "1.0.0", "A")
        line = await agent_slot_line(first)
        assert line.startswith("booted slot a, read from the entry systemd-boot selected (LoaderEntrySelected="), line
        assert line.endswith(", file omaha-1-a.conf)"), line
        took = await first.wait_exit(INSTALL_TIMEOUT, "the agent to install 2.0.0 and reboot")
        print(f"boot 1: streamed {srv.images[0].size >> 20} MiB onto ROOT-B and rebooted after {took:.0f} s")
        assert srv.event_codes() == ["13/1", "14/1", "3/1"]
        assert entries(machine) == ["omaha-1-a.conf", "omaha-2-b+3.conf"]

        second = await boot_and_report(machine, "2.0.0", "B")
        line = await agent_slot_line(second)
        assert line.startswith("booted slot b, read from the entry systemd-boot selected (LoaderEntrySelected="), line
        assert line.endswith(", file omaha-2-b+2-1.conf)"), line  # renamed by systemd-boot before it booted
        await second.wait_for(lambda: "3/2" in srv.event_codes(), BOOT_TIMEOUT, "the 3/2 report")
        await second.power_off()
    finally:
        await srv.stop()
    assert srv.event_codes() == ["13/1", "14/1", "3/1", "3/2"]
    print("fsck.vfat -n on the ESP:", machine.fsck_esp(str(tmp_path / "esp.img")).splitlines()[-1])
    assert entries(machine) == ["omaha-1-a.conf", "omaha-2-b.conf"]  # blessed: the counter is gone
    print(f"sdboot success scenario: {time.monotonic() - started:.0f} s")


@ON_DEMAND
async def test_sdboot_rollback_b_never_comes_up_systemd_boot_counts_it_out_and_a_reports_44(image, tmp_path):
    started = time.monotonic()
    srv = await start_server(image, "sdboot-rollback", "3.0.0", "payload-sdboot-3.0.0.ext4.zst")
    machine = Machine("sdboot-rollback", image["disk"])
    try:
        first = await boot_and_report(machine, "1.0.0", "A")
        await first.wait_exit(INSTALL_TIMEOUT, "the agent to install 3.0.0 and reboot")
        assert entries(machine) == ["omaha-1-a.conf", "omaha-2-b+3.conf"]
        failed, seen = 0, []
        while True:  # systemd-boot tries B (tries: 3), renaming its entry before each try; each try panics
            boot = await machine.boot()
            try:
                await boot.wait_for(boot.booted_version, BOOT_TIMEOUT, "a boot to report")
                break
            except AssertionError:
                if boot.proc.returncode is None:
                    raise
                failed += 1
                seen.append(entries(machine)[-1])
                assert failed <= 4, "systemd-boot kept trying the broken slot"
        print(f"sdboot rollback: {failed} failed boot(s) of 3.0.0 ({', '.join(seen)}), then slot A again")
        assert failed == 3 and seen == ["omaha-2-b+2-1.conf", "omaha-2-b+1-2.conf", "omaha-2-b+0-3.conf"]
        assert boot.booted_version() == "1.0.0"
        await boot.wait_for(lambda: "3/0" in srv.event_codes(), BOOT_TIMEOUT, "the 3/0 report")
        assert srv.events[-1]["errorcode"] == 44
        await boot.power_off()
    finally:
        await srv.stop()
    assert srv.event_codes() == ["13/1", "14/1", "3/1", "3/0"]
    machine.fsck_esp(str(tmp_path / "esp.img"))
    assert entries(machine) == ["omaha-1-a.conf", "omaha-2-b+0-3.conf"]  # kept: bad, recoverable
    print(f"sdboot rollback scenario: {time.monotonic() - started:.0f} s")


@ON_DEMAND
async def test_sdboot_power_cut_while_the_agent_blesses_b_leaves_a_name_and_the_next_boot_finishes(image, tmp_path):
    started = time.monotonic()
    srv = await start_server(image, "sdboot-powercut", "2.0.0", "payload-sdboot-2.0.0.ext4.zst")
    machine = Machine("sdboot-powercut", image["disk"])
    try:
        first = await boot_and_report(machine, "1.0.0", "A")
        await first.wait_exit(INSTALL_TIMEOUT, "the agent to install 2.0.0 and reboot")
        second = await boot_and_report(machine, "2.0.0", "B")
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not any(line.startswith("ENTRY ") and line.endswith(" omaha-2-b.conf") for line in second.lines()):
            assert time.monotonic() < deadline and second.proc.returncode is None, second.tail()
            await asyncio.sleep(0.005)
        await second.power_off()  # the blessed name is written; its old name is being removed, or just was
        left = [n for n in entries(machine) if parse_name(n).slot == "b"]
        print(f"sdboot power cut: slot b's entries right after the pull: {left}")
        machine.fsck_esp(str(tmp_path / "esp.img"))
        assert left and set(left) <= {"omaha-2-b+2-1.conf", "omaha-2-b.conf"}, left  # either name, never none
        third = await boot_and_report(machine, "2.0.0", "B")
        await third.wait_for(lambda: "3/2" in srv.event_codes(), BOOT_TIMEOUT, "the 3/2 report")
        await asyncio.sleep(5)
        await third.power_off()
    finally:
        await srv.stop()
    assert entries(machine) == ["omaha-1-a.conf", "omaha-2-b.conf"]
    print(f"sdboot power-cut scenario: {time.monotonic() - started:.0f} s")
