"""config/uboot/boot.cmd under the real U-Boot (Debian's qemu_arm64 build in qemu-system-aarch64) against the env
pair the real fw_setenv writes through the uboot backend: which slot it picks, what it writes back, and that
fw_printenv and the backend read back the same. The slots are empty partitions, so each run ends when the
script finds no kernel and resets (-no-reboot: QEMU exits); seconds per boot, no Linux."""
import os
import shutil
import subprocess
import zlib

import pytest

from agent.boot.uboot import UBootBoot

from .vm import ENV_FILES, ENV_SIZE, QEMU, UBOOT, ArmMachine, env_copy

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(900)]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOOT_MIB = 64  # as in the image: a FAT16 boot partition
RUN_TIMEOUT = 300  # one U-Boot run under TCG on a busy 2-core host (about 10 s when quiet)


@pytest.fixture(scope="module")
def tools():
    for tool in (QEMU, "mkimage", "fw_setenv", "mcopy", "mkfs.vfat", "sfdisk"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing: make qemu-test-arm64 installs it")
    if not os.path.exists(UBOOT):
        pytest.skip(f"{UBOOT} is missing: apt-get install u-boot-qemu")


class Rig:
    """A small disk (GPT: the FAT boot partition with boot.scr, and two empty slot partitions) whose env pair is
    prepared on the host with the backend and fw_setenv, then booted under U-Boot."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.host = tmp_path / "host"
        self.host.mkdir()
        self.config = self.host / "fw_env.config"
        self.config.write_text("".join(f"{self.host / n} 0x0000 {ENV_SIZE:#06x}\n" for n in ENV_FILES))
        for n in ENV_FILES:
            (self.host / n).write_bytes(bytes(ENV_SIZE))
        (self.host / "defaults").write_text("bootdelay=0\n")
        self.backend = UBootBoot(str(self.config))
        # the factory state: one good copy (flags 1), the other blank until the first write goes there
        self.backend.initialize("a", defaults=str(self.host / "defaults"))
        self.machine = None

    def files(self) -> dict[str, bytes]:
        return {n: (self.host / n).read_bytes() for n in ENV_FILES}

    def put(self, files: dict[str, bytes]) -> None:
        for n, data in files.items():
            (self.host / n).write_bytes(data)

    def disk(self) -> str:
        boot = self.dir / "boot.img"
        subprocess.run(["mkimage", "-A", "arm64", "-T", "script", "-C", "none", "-d",
                        os.path.join(REPO, "config", "uboot", "boot.cmd"), str(self.dir / "boot.scr")],
                       check=True, capture_output=True)
        subprocess.run(["mkfs.vfat", "-n", "BOOT", "-C", str(boot), str(BOOT_MIB * 1024)], check=True,
                       capture_output=True)
        subprocess.run(["mcopy", "-i", str(boot), str(self.dir / "boot.scr")] + [str(self.host / n) for n in ENV_FILES]
                       + ["::/"], check=True)
        disk = self.dir / "disk.img"
        with open(disk, "wb") as f:
            f.truncate((1 + BOOT_MIB + 2 + 1) << 20)
        subprocess.run(["sfdisk", "-q", str(disk)], input=f"label: gpt\nstart=1MiB, size={BOOT_MIB}MiB, type=uefi, "
                       "name=BOOT\nsize=1MiB, name=ROOT-A\nsize=1MiB, name=ROOT-B\n", text=True, check=True)
        subprocess.run(["dd", f"if={boot}", f"of={disk}", "bs=1M", "seek=1", "conv=notrunc,sparse", "status=none"],
                       check=True)
        return str(disk)

    async def run(self, name: str):
        """Boots U-Boot once on the disk (made on the first run); returns the boot and the env files after it."""
        if self.machine is None:
            self.machine = ArmMachine(name, self.disk(), logs=str(self.dir / "logs"), workdir=str(self.dir))
        boot = await self.machine.boot(net=False, memory=512)
        await boot.wait_exit(RUN_TIMEOUT, "U-Boot to run boot.scr and reset")
        out = self.dir / f"after{self.machine.boots}"
        out.mkdir()
        self.read_config = self.machine.read_env_files(str(out))
        print(f"{name} run {self.machine.boots}: " + " | ".join(boot.uboot_lines()))
        return boot, {n: (out / n).read_bytes() for n in ENV_FILES}

    def printenv(self) -> dict[str, str]:
        out = subprocess.run(["fw_printenv", "-c", self.read_config], capture_output=True, text=True, check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def states(self) -> dict[str, str]:
        return {slot: (st.state.value, st.tries_left) if st.state.value == "trial" else st.state.value
                for slot, st in UBootBoot(self.read_config).status().items()}


def newer(files: dict[str, bytes]) -> str:
    """The file fw_setenv wrote last (flags one above the other's)."""
    a, b = (files[n][4] for n in ENV_FILES)
    return ENV_FILES[1] if (b - a) % 256 in range(1, 128) else ENV_FILES[0]


def with_flags(data: bytes, flags: int) -> bytes:
    body = data[5:]
    return zlib.crc32(body).to_bytes(4, "little") + bytes([flags]) + body


async def test_uboot_counts_a_trial_down_into_the_other_copy_and_boots_it(tools, tmp_path):
    rig = Rig(tmp_path)
    rig.backend.set_trial("b", 2)
    before = rig.files()
    current = newer(before)
    boot, after = await rig.run("trial")
    assert boot.uboot_slot() == "B", boot.tail()
    other = next(n for n in ENV_FILES if n != current)
    assert after[current] == before[current]  # the current copy is not touched
    ok, flags, env = env_copy(str(rig.dir / "after1" / other))
    assert ok and flags == (before[current][4] + 1) % 256, (ok, flags)
    assert env == {"BOOT_ORDER": "B A", "BOOT_A_OK": "1", "BOOT_A_LEFT": "3", "BOOT_B_OK": "0", "BOOT_B_LEFT": "1"}
    assert rig.printenv()["BOOT_B_LEFT"] == "1"
    assert rig.states() == {"a": "good", "b": ("trial", 1)}


async def test_uboot_boots_a_confirmed_slot_without_writing_the_env(tools, tmp_path):
    rig = Rig(tmp_path)
    rig.backend.set_trial("b", 2)
    rig.backend.mark_good("b")
    before = rig.files()
    boot, after = await rig.run("good")
    assert boot.uboot_slot() == "B", boot.tail()
    assert after == before
    assert rig.states() == {"a": "good", "b": "good"}


async def test_uboot_falls_back_to_the_next_slot_when_the_trial_has_no_attempts_left(tools, tmp_path):
    rig = Rig(tmp_path)
    rig.backend.set_trial("b", 1)
    boot, first = await rig.run("fallback")
    assert boot.uboot_slot() == "B", boot.tail()
    assert rig.states() == {"a": "good", "b": "bad"}  # 0 left: the agent on A would see the rollback
    boot, second = await rig.run("fallback")
    assert boot.uboot_slot() == "A", boot.tail()
    assert second == first  # nothing counted, nothing written


async def test_uboot_reads_the_older_copy_when_the_newer_write_was_torn(tools, tmp_path):
    rig = Rig(tmp_path)
    before = rig.files()
    rig.backend.set_trial("b", 2)
    written = rig.files()
    target = newer(written)
    # the power went after the first 512-byte sector of fw_setenv's write reached the disk
    rig.put({target: written[target][:512] + before[target][512:]})
    boot, after = await rig.run("torn")
    assert any("bad CRC" in line for line in boot.uboot_lines()), boot.tail()
    assert boot.uboot_slot() == "A", boot.tail()  # the state before the torn write: B not yet a trial
    assert rig.printenv()["BOOT_ORDER"] == "A B"  # libubootenv reads the same copy
    assert rig.states() == {"a": "good", "b": "bad"}


async def test_uboot_and_libubootenv_agree_that_flags_0_is_newer_than_255(tools, tmp_path):
    rig = Rig(tmp_path)
    files = rig.files()
    cur = next(n for n in ENV_FILES if env_copy(str(rig.host / n))[0])
    other = next(n for n in ENV_FILES if n != cur)
    rig.put({cur: with_flags(files[cur], 255)})
    rig.backend.set_trial("b", 3)  # libubootenv writes the copy that is not current: flags 0 after 255
    files = rig.files()
    assert files[other][4] == 0 and files[cur][4] == 255, (files[other][4], files[cur][4])
    boot, after = await rig.run("wrap")
    assert boot.uboot_slot() == "B", boot.tail()
    ok, flags, env = env_copy(str(rig.dir / "after1" / cur))
    assert ok and flags == 1 and env["BOOT_B_LEFT"] == "2", (ok, flags, env)
    assert rig.printenv()["BOOT_B_LEFT"] == "2"
    assert rig.states() == {"a": "good", "b": ("trial", 2)}


async def test_uboot_boots_a_and_writes_nothing_when_neither_copy_is_readable(tools, tmp_path):
    rig = Rig(tmp_path)
    blank = {n: bytes(ENV_SIZE) for n in ENV_FILES}
    rig.put(blank)
    boot, after = await rig.run("blank")
    assert boot.uboot_slot() == "A", boot.tail()
    assert after == blank  # no countdown without a trial, so no write either


async def test_uboot_wraps_its_flags_from_255_to_0_and_libubootenv_reads_that_copy_as_newer(tools, tmp_path):
    rig = Rig(tmp_path)
    rig.backend.set_trial("b", 2)
    files = rig.files()
    cur = newer(files)
    other = next(n for n in ENV_FILES if n != cur)
    rig.put({cur: with_flags(files[cur], 255), other: with_flags(files[other], 254)})
    boot, after = await rig.run("uwrap")
    assert boot.uboot_slot() == "B", boot.tail()
    ok, flags, env = env_copy(str(rig.dir / "after1" / other))
    assert ok and flags == 0 and env["BOOT_B_LEFT"] == "1", (ok, flags, env)
    assert rig.printenv()["BOOT_B_LEFT"] == "1"
    assert rig.states() == {"a": "good", "b": ("trial", 1)}
