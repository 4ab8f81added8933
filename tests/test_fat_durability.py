"""What a FAT ESP holds on disk the moment a write returns, as if the power failed right then.

A real vfat filesystem on a loop device (root, a loop driver and the kernel's vfat driver needed; skipped
with the reason otherwise: the development machines' kernel has no vfat, so there the QEMU test's fsck.vfat
after each plug pull is the check).
The loop device's backing file is exactly what the filesystem has sent to its disk, so a copy of it taken
while still mounted is the disk a power cut would leave: fsck.vfat must find it clean and mtools must read
the new content from it."""
import os
import shutil
import subprocess

import pytest

from agent.atomic import write_atomic
from agent.boot.grubenv import GrubEnvBoot, parse

from .conftest import need_tool

MTOOLS = dict(os.environ, MTOOLS_SKIP_CHECK="1")


@pytest.fixture
def esp(tmp_path):
    for tool in ("mkfs.vfat", "fsck.vfat", "mcopy", "losetup", "mount"):
        need_tool(tool)
    if os.geteuid() != 0:
        pytest.skip("a loop mount needs root")
    with open("/proc/filesystems") as f:
        if "vfat" not in f.read().split():
            pytest.skip("this kernel has no vfat driver (the QEMU test checks the ESP with fsck.vfat instead)")
    img, mnt = tmp_path / "esp.img", tmp_path / "esp"
    subprocess.run(["mkfs.vfat", "-n", "ESP", "-C", str(img), str(32 * 1024)], check=True, capture_output=True)
    mnt.mkdir()
    loop = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True)
    if loop.returncode != 0:
        pytest.skip(f"no loop device here: {loop.stderr.strip()}")
    dev = loop.stdout.strip()
    try:
        if subprocess.run(["mount", "-t", "vfat", dev, str(mnt)], capture_output=True).returncode != 0:
            pytest.skip("mounting vfat is not permitted here")
        try:
            yield img, mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", dev])


def disk_after_power_cut(img, tmp_path, name: str) -> bytes:
    """Copies the disk as it is now, checks its FAT read-only and returns ``name`` read from the copy."""
    copy = tmp_path / "cut.img"
    shutil.copyfile(img, copy)
    fsck = subprocess.run(["fsck.vfat", "-n", str(copy)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    out = tmp_path / "read-back"
    subprocess.run(["mcopy", "-o", "-i", str(copy), f"::/{name}", str(out)], check=True, env=MTOOLS)
    return out.read_bytes()


def test_write_atomic_replacement_is_on_the_disk_when_it_returns(esp, tmp_path):
    img, mnt = esp
    write_atomic(str(mnt / "state.json"), b"old " * 300)
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    write_atomic(str(mnt / "state.json"), b"new " * 300)
    assert disk_after_power_cut(img, tmp_path, "state.json") == b"new " * 300


def test_grubenv_update_is_on_the_disk_when_it_returns(esp, tmp_path):
    img, mnt = esp
    boot = GrubEnvBoot(str(mnt / "grubenv"))
    boot.initialize("a")
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    boot.set_trial("b", 2)
    on_disk = parse(disk_after_power_cut(img, tmp_path, "grubenv"))
    assert (on_disk["B_OK"], on_disk["B_TRY"], on_disk["ORDER"]) == ("0", "2", "B A")
    boot.mark_good("b")
    on_disk = parse(disk_after_power_cut(img, tmp_path, "grubenv"))
    assert (on_disk["B_OK"], on_disk["B_TRY"], on_disk["A_OK"]) == ("1", "0", "1")


def test_bls_entry_name_changes_are_on_the_disk_when_they_return(esp, tmp_path):
    from agent.boot.bls import BlsBoot
    img, mnt = esp
    entries = mnt / "loader" / "entries"
    entries.mkdir(parents=True)
    for slot in "ab":
        (entries / f"omaha-{slot}.conf").write_text(f"title {slot}\nlinux /vmlinuz\noptions omaha_agent.slot={slot}\n")
    boot = BlsBoot(str(mnt))
    boot.initialize("a")
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    boot.set_trial("b", 3)
    assert b"omaha_agent.slot=b" in disk_after_power_cut(img, tmp_path, "loader/entries/omaha-2-b+3.conf")
    listing = subprocess.run(["mdir", "-b", "-i", str(tmp_path / "cut.img"), "::/loader/entries"],
                             capture_output=True, text=True, env=MTOOLS).stdout
    assert "omaha-0-b+0.conf" not in listing and "omaha-1-a.conf" in listing
    boot.mark_good("b")
    assert b"omaha_agent.slot=b" in disk_after_power_cut(img, tmp_path, "loader/entries/omaha-2-b.conf")
