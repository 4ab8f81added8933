"""Boots the test image in QEMU, one process per boot (-no-reboot: a guest reboot ends the process, and the
test decides what happens next, like a power cycle). KVM when it works, TCG otherwise."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(REPO, "build", "qemu")
LOGS = os.path.join(BUILD, "logs")
QEMU = "qemu-system-x86_64"
ESP_MIB = 64  # build-image.sh: the ESP is the first partition, at 1 MiB
OPERATION = "busctl get-property org.omaha_agent.Agent1 /org/omaha_agent/Agent1 org.omaha_agent.Agent1 Operation"
MTOOLS = dict(os.environ, MTOOLS_SKIP_CHECK="1")
FSCK_EXPECTED = ("Dirty bit is set", "Automatically removing dirty bit", "Leaving filesystem unchanged")


def _first(*paths: str) -> str:
    for p in paths:
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"none of {paths} exists (apt-get install ovmf)")


def ovmf() -> tuple[str, str]:
    return (_first("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd"),
            _first("/usr/share/OVMF/OVMF_VARS_4M.fd", "/usr/share/OVMF/OVMF_VARS.fd"))


_ACCEL: str | None = None


def accel() -> str:
    """``kvm`` if a guest really runs under it (on some hosts /dev/kvm exists and QEMU then stops with a KVM
    internal error), else ``tcg``."""
    global _ACCEL
    if _ACCEL is None:
        _ACCEL = "tcg"
        if os.access("/dev/kvm", os.R_OK | os.W_OK):
            code, vars_template = ovmf()
            os.makedirs(BUILD, exist_ok=True)
            vars_copy = os.path.join(BUILD, "probe-vars.fd")
            shutil.copy(vars_template, vars_copy)
            proc = subprocess.Popen([QEMU, "-accel", "kvm", "-M", "q35", "-m", "256", "-nodefaults", "-display",
                                     "none", "-monitor", "none", "-serial", "none",
                                     "-drive", f"if=pflash,format=raw,readonly=on,file={code}",
                                     "-drive", f"if=pflash,format=raw,file={vars_copy}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                _, err = proc.communicate(timeout=6)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
                if "internal error" not in err and "emulation failure" not in err:
                    _ACCEL = "kvm"
    return _ACCEL


def fsck_fat(disk: str, scratch: str, start_mib: int, mib: int, what: str) -> str:
    """fsck.vfat -n on a copy of the FAT partition at ``start_mib`` of ``disk``; returns its report, or raises
    AssertionError with it when the filesystem is damaged."""
    subprocess.run(["dd", f"if={disk}", f"of={scratch}", "bs=1M", f"skip={start_mib}", f"count={mib}",
                    "status=none"], check=True)
    done = subprocess.run(["fsck.vfat", "-n", scratch], capture_output=True, text=True,
                          env=dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"))
    report = (done.stdout + done.stderr).strip()
    # a FAT mounted when the plug is pulled keeps its dirty bit: that alone is expected (exit 1 with -n)
    damage = [line for line in report.splitlines() if line.strip() and not line.startswith("fsck.fat")
              and not any(ok in line for ok in FSCK_EXPECTED) and not line.startswith(scratch)]
    if done.returncode not in (0, 1) or damage:
        raise AssertionError(f"{what}'s FAT is damaged after the power cut:\n{report}")
    return report


class Boot:
    def __init__(self, proc, serial: str, marker: str, started: float):
        self.proc, self.serial, self.marker, self.started = proc, serial, marker, started

    def lines(self) -> list[str]:
        try:
            with open(self.marker, errors="replace") as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def booted_version(self) -> str | None:
        for line in self.lines():
            if line.startswith("BOOTED "):
                return dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv).get("version")
        return None

    def package(self) -> str | None:
        """What dpkg inside the guest says of the agent's package and of the launcher the unit runs."""
        for line in self.lines():
            if line.startswith("PACKAGE "):
                return line[len("PACKAGE "):]
        return None

    def slot_source(self) -> str | None:
        """The agent's log line naming where it read the booted slot from (the guest reports it once)."""
        for line in self.lines():
            if line.startswith("AGENTSLOT "):
                return line[len("AGENTSLOT "):]
        return None

    def status(self) -> dict | None:
        """The agent's GetStatus as busctl printed it inside the guest, latest first."""
        for line in reversed(self.lines()):
            if line.startswith("BUSCTL {"):
                try:
                    data = json.loads(line[len("BUSCTL "):])["data"][0]
                except (ValueError, KeyError, IndexError):
                    continue
                return {k: v.get("data") for k, v in data.items()}
        return None

    def tail(self, n: int = 40) -> str:
        try:
            with open(self.serial, errors="replace") as f:
                serial = f.read().splitlines()[-n:]
        except FileNotFoundError:
            serial = []
        return ("--- serial console (last lines) ---\n" + "\n".join(serial) +
                "\n--- marker port (last lines) ---\n" + "\n".join(self.lines()[-8:]))

    async def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc.returncode is not None:
                raise AssertionError(f"the guest stopped before {what}\n{self.tail()}")
            await asyncio.sleep(1)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.tail()}")

    async def wait_exit(self, timeout: float, what: str) -> float:
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.tail()}") from None
        return time.monotonic() - self.started

    async def power_off(self) -> None:
        """Pulls the plug: no shutdown, whatever the guest was writing."""
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


class Machine:
    def __init__(self, name: str, disk_template: str):
        os.makedirs(LOGS, exist_ok=True)
        self.name = name
        self.disk = os.path.join(BUILD, f"{name}.img")
        subprocess.run(["cp", "--sparse=always", disk_template, self.disk], check=True)
        self.vars = os.path.join(BUILD, f"{name}-vars.fd")
        shutil.copy(ovmf()[1], self.vars)
        self.boots = 0

    async def boot(self) -> Boot:
        self.boots += 1
        stem = os.path.join(LOGS, f"{self.name}-boot{self.boots}")
        serial, marker = f"{stem}.serial.log", f"{stem}.marker.log"
        for p in (serial, marker):
            if os.path.exists(p):
                os.unlink(p)
        code, _ = ovmf()
        argv = [QEMU, "-accel", accel(), "-M", "q35", "-cpu", "max", "-smp", "2", "-m", "1024", "-nodefaults",
                "-display", "none", "-no-reboot", "-monitor", "none",
                "-drive", f"if=pflash,format=raw,readonly=on,file={code}",
                "-drive", f"if=pflash,format=raw,file={self.vars}",
                "-drive", f"file={self.disk},format=raw,if=virtio",
                "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
                "-device", "virtio-serial-pci", "-chardev", f"file,id=m,path={marker}",
                "-device", "virtserialport,chardev=m,name=marker",
                "-serial", f"file:{serial}"]
        stderr = open(f"{stem}.qemu.log", "wb")
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL, stderr=stderr)
        stderr.close()
        self.current = Boot(proc, serial, marker, time.monotonic())
        return self.current

    async def close(self) -> None:
        """Pulls the plug of a boot still running (a test that failed while waiting on it)."""
        if getattr(self, "current", None) is not None:
            await self.current.power_off()

    def fsck_esp(self, scratch: str) -> str:
        """Checks the ESP's FAT read-only (fsck.vfat -n) on a copy taken out of the disk image; returns its
        report, or raises AssertionError with it when the filesystem is damaged."""
        return fsck_fat(self.disk, scratch, 1, ESP_MIB, "the ESP")

    def read_grubenv(self, dest: str) -> str:
        """Copies the ESP's grubenv out of the disk image (no mount): the ESP starts at 1 MiB."""
        subprocess.run(["mcopy", "-o", "-i", f"{self.disk}@@1048576", "::/grubenv", dest], check=True,
                       env=dict(os.environ, MTOOLS_SKIP_CHECK="1"))
        return dest

    def partition(self, name: str) -> tuple[int, int]:
        """Offset and size in bytes of the partition named ``name`` (the GPT read by sfdisk)."""
        table = json.loads(subprocess.run(["sfdisk", "-J", self.disk], capture_output=True, text=True, check=True,
                                          env=dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"))
                           .stdout)["partitiontable"]
        part = next(p for p in table["partitions"] if p.get("name") == name)
        return part["start"] * 512, part["size"] * 512

    def read_state(self, scratch: str) -> dict | None:
        """The agent's state.json from the STATE partition, as the next boot will see it: the partition is copied
        out, e2fsck -fy replays its journal on the copy, debugfs reads the file. None when there is none;
        AssertionError when e2fsck cannot repair the copy."""
        start, size = self.partition("STATE")
        subprocess.run(["dd", f"if={self.disk}", f"of={scratch}", "bs=1M", f"skip={start >> 20}",
                        f"count={size >> 20}", "status=none"], check=True)
        env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        done = subprocess.run(["e2fsck", "-fy", scratch], capture_output=True, text=True, env=env)
        if done.returncode >= 4:
            raise AssertionError(f"the STATE file system is damaged beyond repair:\n{done.stdout}{done.stderr}")
        out = subprocess.run(["debugfs", "-R", "cat /state.json", scratch], capture_output=True, env=env)
        return json.loads(out.stdout) if out.stdout.strip() else None

    def partition_sha256(self, name: str, length: int) -> str:
        """SHA-256 of the first ``length`` bytes of the partition named ``name`` in the disk image (the bytes
        straight from the image file)."""
        start, size = self.partition(name)
        assert length <= size, f"{length} bytes do not fit partition {name}"
        digest = hashlib.sha256()
        with open(self.disk, "rb") as f:
            f.seek(start)
            left = length
            while left:
                piece = f.read(min(left, 8 << 20))
                assert piece, f"the disk image ends inside partition {name}"
                digest.update(piece)
                left -= len(piece)
        return digest.hexdigest()


def esp(machine: "Machine", files: dict[str, str], tmp_path) -> None:
    """Writes ``files`` into ::/omaha-test on the machine's ESP (no mount: the ESP starts at 1 MiB)."""
    target = f"{machine.disk}@@1048576"
    subprocess.run(["mmd", "-i", target, "::/omaha-test"], check=True, env=MTOOLS)
    for name, text in files.items():
        local = tmp_path / name
        local.write_text(text)
        subprocess.run(["mcopy", "-o", "-i", target, str(local), f"::/omaha-test/{name}"], check=True, env=MTOOLS)


def esp_clear(machine: "Machine") -> None:
    subprocess.run(["mdeltree", "-i", f"{machine.disk}@@1048576", "::/omaha-test"], check=True, env=MTOOLS)


def deb_version() -> str:
    """The package version the image was built from (debian/changelog's first line)."""
    with open(os.path.join(REPO, "debian", "changelog")) as f:
        return f.readline().split("(", 1)[1].split(")", 1)[0]


async def assert_agent_from_the_deb(boot: Boot) -> None:
    """The running agent is the one the image's apt installed: dpkg has omaha-agent at the version of
    debian/changelog installed ("ii"), owning /usr/bin/omaha-agent."""
    line = await boot.wait_for(boot.package, 120, "the guest's package report")
    print(f"dpkg inside the guest: {line}")
    assert line.split()[:3] == ["omaha-agent", deb_version(), "ii"], line
    assert line.endswith("omaha-agent: /usr/bin/omaha-agent"), line
