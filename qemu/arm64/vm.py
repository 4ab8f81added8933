"""The aarch64 twin of qemu/vm.py: QEMU's ``virt`` machine with Debian's U-Boot (qemu_arm64) as firmware, one
process per boot (-no-reboot), serial and marker logs. Always TCG: the hosts are amd64. The U-Boot env is a
redundant pair of files on the disk's FAT boot partition (config/uboot/fw_env.config); the host reads and
writes them with mtools, without mounting."""
from __future__ import annotations

import asyncio
import os
import subprocess
import time

from ..vm import REPO, Boot

BUILD = os.path.join(REPO, "build", "qemu-arm64")
LOGS = os.path.join(BUILD, "logs")
QEMU = "qemu-system-aarch64"
UBOOT = "/usr/lib/u-boot/qemu_arm64/u-boot.bin"
BOOT_OFFSET = 1 << 20  # the FAT boot partition is the first one, at 1 MiB
ENV_FILES = ("uboot.env", "uboot-redund.env")
ENV_SIZE = 0x4000
MTOOLS_ENV = dict(os.environ, MTOOLS_SKIP_CHECK="1")


def _serial_lines(boot: Boot) -> list[str]:
    try:
        with open(boot.serial, errors="replace") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


class ArmBoot(Boot):
    def serial_lines(self) -> list[str]:
        return _serial_lines(self)

    def uboot_lines(self) -> list[str]:
        """What the project's boot script printed in this boot (its lines start with ``omaha-agent:``)."""
        return [line.strip() for line in self.serial_lines() if line.strip().startswith("omaha-agent:")]

    def uboot_slot(self) -> str | None:
        for line in self.uboot_lines():
            if line.startswith("omaha-agent: booting slot "):
                return line.split()[3]
        return None


class ArmMachine:
    def __init__(self, name: str, disk_template: str, logs: str = LOGS, workdir: str = BUILD):
        os.makedirs(logs, exist_ok=True)
        self.name, self.logs = name, logs
        self.disk = os.path.join(workdir, f"{name}.img")
        subprocess.run(["cp", "--sparse=always", disk_template, self.disk], check=True)
        self.boots = 0

    async def boot(self, net: bool = True, memory: int = 1024) -> ArmBoot:
        self.boots += 1
        stem = os.path.join(self.logs, f"{self.name}-boot{self.boots}")
        serial, marker = f"{stem}.serial.log", f"{stem}.marker.log"
        for p in (serial, marker):
            if os.path.exists(p):
                os.unlink(p)
        argv = [QEMU, "-M", "virt", "-accel", "tcg", "-cpu", "max,pauth-impdef=on", "-smp", "2", "-m", str(memory),
                "-nodefaults", "-display", "none", "-no-reboot", "-monitor", "none", "-bios", UBOOT]
        if net:
            argv += ["-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0"]
        else:
            argv += ["-nic", "none"]
        argv += ["-device", "virtio-serial-device", "-chardev", f"file,id=m,path={marker}",
                 "-device", "virtserialport,chardev=m,name=marker",
                 # the disk goes last: U-Boot numbers the last virtio disk on the command line virtio 0
                 "-drive", f"file={self.disk},format=raw,if=none,id=d0", "-device", "virtio-blk-device,drive=d0",
                 "-serial", f"file:{serial}"]
        stderr = open(f"{stem}.qemu.log", "wb")
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL, stderr=stderr)
        stderr.close()
        return ArmBoot(proc, serial, marker, time.monotonic())

    # ---- the env pair on the boot partition
    def read_env_files(self, dest_dir: str) -> str:
        """Copies both env files out of the disk image and writes a fw_env.config naming the copies; returns
        the config's path (for fw_printenv -c and the uboot backend)."""
        for name in ENV_FILES:
            subprocess.run(["mcopy", "-o", "-n", "-i", f"{self.disk}@@{BOOT_OFFSET}", f"::/{name}",
                            os.path.join(dest_dir, name)], check=True, env=MTOOLS_ENV)
        config = os.path.join(dest_dir, "fw_env.config")
        with open(config, "w") as f:
            for name in ENV_FILES:
                f.write(f"{os.path.join(dest_dir, name)} 0x0000 {ENV_SIZE:#06x}\n")
        return config

    def write_env_file(self, name: str, data: bytes, scratch: str) -> None:
        """Puts ``data`` as the env file ``name`` on the boot partition (same size: the file's clusters stay)."""
        assert len(data) == ENV_SIZE
        with open(scratch, "wb") as f:
            f.write(data)
        subprocess.run(["mcopy", "-o", "-i", f"{self.disk}@@{BOOT_OFFSET}", scratch, f"::/{name}"], check=True,
                       env=MTOOLS_ENV)

    def fsck_boot(self, scratch: str, mib: int) -> str:
        """fsck.vfat -n on a copy of the boot partition (it starts at 1 MiB, like the amd64 ESP)."""
        from ..vm import fsck_fat
        return fsck_fat(self.disk, scratch, 1, mib, "the boot partition")


def env_copy(path: str) -> tuple[bool, int, dict[str, str]]:
    """One copy of a redundant env file: (CRC good, flags byte, variables), read here independently of
    libubootenv and U-Boot."""
    import zlib
    with open(path, "rb") as f:
        data = f.read()
    crc_ok = int.from_bytes(data[:4], "little") == zlib.crc32(data[5:])
    env = {}
    for item in data[5:].split(b"\0"):
        if not item:
            break
        name, _, value = item.decode(errors="replace").partition("=")
        env[name] = value
    return crc_ok, data[4], env
