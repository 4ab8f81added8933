"""Slot groups on a real boot: the image is build-image.sh's LAYOUT=groups twin (disk-groups.img), where each slot
is a pair, a root filesystem (ROOT-X) and a kernel partition (KERN-X, an ext2 filesystem with vmlinuz, initrd.img
and kern.cfg naming its release). GRUB loads the kernel from the chosen slot's KERN partition and passes
``omaha_test.kern=V`` (kern.cfg's release) on the command line, so the boot itself shows which kernel partition
it came from. A release is two packages, ``rootfs-V.ext4.zst`` and ``kernel-V.img.zst``, in one signed envelope;
the agent writes each onto its group's inactive member, runs the image's post-install hook (a transient unit of
PID 1 without network, given each group's target) and arms the pair with one write of the grubenv."""
import os
import time

import pytest

from agent.tools.devserver import Image

from .test_qemu import BOOT_TIMEOUT, INSTALL_TIMEOUT, boot_and_report, built_image, downloads, start_server
from .vm import BUILD, Machine

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(3600)]
GROUPS = os.path.join(BUILD, "groups")


@pytest.fixture(scope="module")
def image():
    return built_image("disk-groups.img", "qemu-image-groups")


def kern_of(boot) -> str | None:
    """The release of the kernel partition GRUB loaded this boot's kernel from (omaha_test.kern=)."""
    line = next(line for line in boot.lines() if line.startswith("BOOTED "))
    return next((w.split("=", 1)[1] for w in line.split() if w.startswith("omaha_test.kern=")), None)


async def test_groups_a_kernel_and_a_root_filesystem_installed_together_armed_once_and_booted_together(image,
                                                                                                      tmp_path):
    started = time.monotonic()
    kernel = Image(os.path.join(GROUPS, "kernel-2.0.0.img.zst"), "2.0.0", image["appid"])
    release = Image(os.path.join(GROUPS, "rootfs-2.0.0.ext4.zst"), "2.0.0", image["appid"], parts=(kernel,))
    srv = await start_server(image, "groups", "2.0.0", release)
    machine = Machine("groups", image["disk"])
    try:
        first = await boot_and_report(machine, "1.0.0", "A")
        assert kern_of(first) == "1.0.0"  # GRUB took the kernel from KERN-A
        took = await first.wait_exit(INSTALL_TIMEOUT, "the agent to install the pair and reboot")
        print(f"boot 1: streamed rootfs ({release.size >> 20} MiB) onto ROOT-B and kernel ({kernel.size >> 20} MiB) "
              f"onto KERN-B, rebooted after {took:.0f} s")
        assert srv.event_codes() == ["13/1", "14/1", "3/1"]  # one release: its events once
        assert sorted(d["name"] for d in downloads(srv)) == ["kernel-2.0.0.img.zst", "rootfs-2.0.0.ext4.zst"]
        # the image's post-install hook ran once, after both images were verified, under PID 1 without network,
        # given each group's target member
        hook = [line.split("post-install: ", 1)[1] for line in first.lines() if "post-install: hook" in line]
        print(f"post-install hook: {hook}")
        assert hook == ["hook version=2.0.0 rootfs=/dev/vda3 kernel=/dev/vda6 net=lo"], hook

        second = await boot_and_report(machine, "2.0.0", "B")
        assert kern_of(second) == "2.0.0"  # the root filesystem and the kernel of 2.0.0 came up together
        await second.wait_for(lambda: "3/2" in srv.event_codes(), BOOT_TIMEOUT, "the 3/2 report")
        await second.power_off()
    finally:
        await srv.stop()
        await machine.close()
    assert srv.event_codes() == ["13/1", "14/1", "3/1", "3/2"]
    print(f"groups scenario: {time.monotonic() - started:.0f} s")
