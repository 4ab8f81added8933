import os
import subprocess

import pytest

from agent.boot import BootError, SlotState, SlotStatus
from agent.boot.gpt import GptBoot
from agent.boot.grubenv import GrubEnvBoot, parse
from agent.boot.sim import PANIC_MAGIC
from agent.boot.uboot import UBootBoot

from .conftest import need_tool


def editenv_list(path):
    out = subprocess.run(["grub-editenv", path, "list"], check=True, capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_grubenv_cross_checked_with_grub_editenv(tmp_path):
    need_tool("grub-editenv")
    path = str(tmp_path / "grubenv")
    subprocess.run(["grub-editenv", path, "create"], check=True)
    subprocess.run(["grub-editenv", path, "set", "saved_entry=0", "KEEP=me"], check=True)
    boot = GrubEnvBoot(path)
    boot.initialize("a")
    assert editenv_list(path) == {"saved_entry": "0", "KEEP": "me", "ORDER": "A B", "A_OK": "1", "A_TRY": "0",
                                  "B_OK": "0", "B_TRY": "0"}
    assert os.path.getsize(path) == 1024
    boot.mark_bad("b")
    boot.set_trial("b", 3)
    env = editenv_list(path)
    assert (env["ORDER"], env["B_OK"], env["B_TRY"], env["A_OK"]) == ("B A", "0", "3", "1")
    assert boot.status() == {"a": SlotStatus(SlotState.GOOD), "b": SlotStatus(SlotState.TRIAL, 3)}
    # GRUB counts a try down with save_env; grub-editenv stands in for it here
    subprocess.run(["grub-editenv", path, "set", "B_TRY=2"], check=True)
    assert boot.status()["b"] == SlotStatus(SlotState.TRIAL, 2)
    boot.mark_good("b")
    env = editenv_list(path)
    assert (env["ORDER"], env["B_OK"], env["B_TRY"]) == ("B A", "1", "0")
    assert env["KEEP"] == "me"
    subprocess.run(["grub-editenv", path, "set", "B_OK=0", "B_TRY=0"], check=True)
    assert boot.status()["b"].state is SlotState.BAD


def test_grubenv_rewrites_the_block_in_place_so_a_torn_write_is_old_or_new(tmp_path):
    need_tool("grub-editenv")
    path = str(tmp_path / "grubenv")
    subprocess.run(["grub-editenv", path, "create"], check=True)
    boot = GrubEnvBoot(path)
    boot.initialize("a")
    inode = os.stat(path).st_ino
    assert [p for p in os.listdir(tmp_path)] == ["grubenv"]
    before = open(path, "rb").read()
    boot.set_trial("b", 9)
    after = open(path, "rb").read()
    assert os.stat(path).st_ino == inode  # same file, same clusters: no FAT metadata changed
    # the variables live in the first 512-byte sector; a power cut between the two sectors' writes
    # leaves either sector set, and both mixes read as the old or the new state
    assert after[512:] == before[512:] == b"#" * 512
    torn = tmp_path / "torn"
    torn.write_bytes(after[:512] + before[512:])
    assert parse(torn.read_bytes()) == parse(after)
    torn.write_bytes(before[:512] + after[512:])
    assert parse(torn.read_bytes()) == parse(before)
    assert editenv_list(path)["B_TRY"] == "9"


def test_grubenv_short_file_is_replaced_by_a_full_block(tmp_path):
    path = tmp_path / "grubenv"
    path.write_bytes(b"# GRUB Environment Block\nA_OK=1\n")
    GrubEnvBoot(str(path)).mark_bad("b")
    assert len(path.read_bytes()) == 1024 and parse(path.read_bytes())["A_OK"] == "1"


def test_grubenv_rejects_garbage_and_missing(tmp_path):
    with pytest.raises(BootError, match="not found"):
        GrubEnvBoot(str(tmp_path / "nope")).status()
    bad = tmp_path / "bad"
    bad.write_bytes(b"hello")
    with pytest.raises(BootError, match="not a GRUB environment block"):
        GrubEnvBoot(str(bad)).status()
    assert parse(b"# GRUB Environment Block\nA=1\n####") == {"A": "1"}


def test_grub_cfg_counts_down_with_an_if_chain():
    cfg = open(os.path.join(os.path.dirname(__file__), "..", "config", "grub", "grub.cfg")).read()
    for n in range(2, 10):
        assert f'[ "${{try}}" = "{n}" ]; then set left={n - 1}' in cfg
    assert "save_env B_TRY" in cfg and "root=PARTLABEL=${partlabel}" in cfg


def test_grub_cfg_never_uses_the_menus_own_chosen_variable():
    # GRUB's menu sets ${chosen} to the entry's path ("A>Slot A") while the entry runs: the kernel command line
    # then said omaha_agent.slot=A>Slot A (seen in the QEMU guest)
    cfg = open(os.path.join(os.path.dirname(__file__), "..", "config", "grub", "grub.cfg")).read()
    code = "\n".join(line.split("#", 1)[0] for line in cfg.splitlines())
    assert "chosen" not in code and "omaha_agent.slot=${boot_slot}" in code


def make_gpt(path, size_mib=16):
    need_tool("sfdisk")
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    script = "label: gpt\nsize=2MiB, type=U, name=EFI\nsize=5MiB, name=ROOT-A\nsize=5MiB, name=ROOT-B\n"
    subprocess.run(["sfdisk", "-q", path], input=script, text=True, check=True, capture_output=True)


def sfdisk_attrs(path):
    dump = subprocess.run(["sfdisk", "--dump", path], check=True, capture_output=True, text=True).stdout
    attrs = {}
    for line in dump.splitlines():
        if "name=" in line:
            name = line.split('name="')[1].split('"')[0]
            attrs[name] = line.split('attrs="')[1].split('"')[0] if 'attrs="' in line else ""
    return attrs


def test_gpt_bits_on_a_real_sfdisk_image(tmp_path):
    disk = str(tmp_path / "disk.img")
    make_gpt(disk)
    boot = GptBoot(disk)
    boot.initialize("a")
    assert boot.status() == {"a": SlotStatus(SlotState.GOOD), "b": SlotStatus(SlotState.BAD)}
    attrs = sfdisk_attrs(disk)
    assert attrs["ROOT-A"] == "GUID:49,56" and attrs["ROOT-B"] == ""  # priority 2 = bit 49; successful = 56
    boot.mark_bad("b")
    boot.set_trial("b", 5)
    attrs = sfdisk_attrs(disk)
    # b: priority 2 (bit 49), tries 5 (bits 52, 54); a keeps priority 1 (bit 48) and successful
    assert attrs["ROOT-B"] == "GUID:49,52,54" and attrs["ROOT-A"] == "GUID:48,56"
    assert boot.status()["b"] == SlotStatus(SlotState.TRIAL, 5)
    boot.mark_good("b")
    assert sfdisk_attrs(disk)["ROOT-B"] == "GUID:49,56"
    # sfdisk accepts both tables (CRCs right): verify reports no problem with either
    clean, text = sfdisk_clean(disk)
    assert clean, text


def sfdisk_clean(path):
    """sfdisk --verify exits 0 even on a corrupt copy (it warns on stderr and uses the other): clean means
    exit 0, "No errors detected" and no warning about either table."""
    verify = subprocess.run(["sfdisk", "--verify", path], capture_output=True, text=True)
    text = verify.stdout + verify.stderr
    return verify.returncode == 0 and "No errors detected" in text and "corrupt" not in text, text


SECTOR = 512
PRIMARY = slice(1 * SECTOR, 34 * SECTOR)  # the primary header (LBA 1) and its 128-entry array (LBA 2-33)


def old_primary_new_backup(disk):
    """A power cut between the two halves of a write: the backup holds the new state (b trial, 3 tries),
    the primary still the old one (b bad). Both are whole, so the primary (old) is what firmware reads."""
    boot = GptBoot(disk)
    boot.initialize("a")
    old = open(disk, "rb").read()[PRIMARY]
    boot.set_trial("b", 3)
    with open(disk, "r+b") as f:
        f.seek(PRIMARY.start)
        f.write(old)
    assert boot.status() == {"a": SlotStatus(SlotState.GOOD), "b": SlotStatus(SlotState.BAD)}
    return boot


def assert_backup_state_read_then_repaired(disk, boot):
    """status() reads the backup (b trial), a write repairs the primary, and the primary alone says so."""
    assert boot.status() == {"a": SlotStatus(SlotState.GOOD), "b": SlotStatus(SlotState.TRIAL, 3)}
    clean, text = sfdisk_clean(disk)
    assert not clean and "primary GPT table is corrupt" in text  # sfdisk sees the torn primary too
    boot.mark_good("b")  # the agent confirms the trial: the write rewrites both copies
    clean, text = sfdisk_clean(disk)
    assert clean, text
    assert sfdisk_attrs(disk) == {"EFI": "", "ROOT-A": "GUID:48,56", "ROOT-B": "GUID:49,56"}
    image = open(disk, "rb").read()
    with open(disk, "r+b") as f:  # wipe the backup header: only the repaired primary is left to read
        f.seek(len(image) - SECTOR)
        f.write(bytes(SECTOR))
    assert GptBoot(disk).status() == {"a": SlotStatus(SlotState.GOOD), "b": SlotStatus(SlotState.GOOD)}


def test_gpt_torn_primary_header_is_read_from_the_backup_and_repaired_by_the_next_write(tmp_path):
    disk = str(tmp_path / "disk.img")
    make_gpt(disk)
    boot = old_primary_new_backup(disk)
    with open(disk, "r+b") as f:  # the primary header torn mid-write: its reserved bytes no longer match the CRC
        f.seek(SECTOR + 20)
        f.write(b"\xff\xff")
    assert_backup_state_read_then_repaired(disk, boot)


def test_gpt_primary_header_wiped_altogether_is_read_from_the_backup_and_repaired(tmp_path):
    disk = str(tmp_path / "disk.img")
    make_gpt(disk)
    old_primary_new_backup(disk)
    with open(disk, "r+b") as f:  # not even the signature is left: the sector size is found from the backup
        f.seek(SECTOR)
        f.write(bytes(SECTOR))
    assert_backup_state_read_then_repaired(disk, GptBoot(disk))


def test_gpt_torn_primary_entries_are_read_from_the_backup_and_repaired_by_the_next_write(tmp_path):
    disk = str(tmp_path / "disk.img")
    make_gpt(disk)
    boot = old_primary_new_backup(disk)
    with open(disk, "r+b") as f:  # a torn entry-array write: ROOT-A's entry (the 2nd) half garbage
        f.seek(2 * SECTOR + 128 + 40)
        f.write(b"\xa5" * 64)
    assert_backup_state_read_then_repaired(disk, boot)


def test_gpt_torn_backup_next_to_a_whole_primary_is_rebuilt_by_the_next_write(tmp_path):
    disk = str(tmp_path / "disk.img")
    make_gpt(disk)
    boot = GptBoot(disk)
    boot.initialize("a")
    size = os.path.getsize(disk)
    with open(disk, "r+b") as f:
        f.seek(size - SECTOR + 20)
        f.write(b"\xff\xff")
    assert boot.status() == {"a": SlotStatus(SlotState.GOOD), "b": SlotStatus(SlotState.BAD)}
    clean, text = sfdisk_clean(disk)
    assert not clean and "backup GPT table is corrupt" in text
    boot.set_trial("b", 2)
    clean, text = sfdisk_clean(disk)
    assert clean, text
    with open(disk, "r+b") as f:  # now only the rebuilt backup is left to read
        f.seek(SECTOR)
        f.write(bytes(SECTOR))
    assert GptBoot(disk).status() == {"a": SlotStatus(SlotState.GOOD), "b": SlotStatus(SlotState.TRIAL, 2)}


def test_gpt_with_both_copies_torn_is_a_one_line_error_naming_both(tmp_path):
    disk = str(tmp_path / "disk.img")
    make_gpt(disk)
    GptBoot(disk).initialize("a")
    size = os.path.getsize(disk)
    with open(disk, "r+b") as f:
        for where in (SECTOR + 20, size - SECTOR + 20):
            f.seek(where)
            f.write(b"\xff\xff")
    with pytest.raises(BootError, match=r"LBA 1 fails its CRC; the backup too: .* fails its CRC") as info:
        GptBoot(disk).status()
    assert "\n" not in str(info.value)


def test_gpt_refuses_a_disk_without_gpt(tmp_path):
    disk = tmp_path / "blank.img"
    disk.write_bytes(bytes(1 << 20))
    with pytest.raises(BootError, match="no GPT"):
        GptBoot(str(disk)).status()


def test_uboot_env_through_fw_env_config(tmp_path):
    _, config = uboot_env(tmp_path)
    boot = UBootBoot(config)
    assert boot.status() == {"a": SlotStatus(SlotState.GOOD), "b": SlotStatus(SlotState.BAD)}
    boot.mark_bad("b")
    boot.set_trial("b", 3)
    printed = subprocess.run(["fw_printenv", "-c", config], capture_output=True, text=True, check=True).stdout
    assert "BOOT_ORDER=B A" in printed and "BOOT_B_LEFT=3" in printed and "bootdelay=0" in printed
    assert boot.status()["b"] == SlotStatus(SlotState.TRIAL, 3)
    subprocess.run(["fw_setenv", "-c", config, "BOOT_B_LEFT", "2"], check=True)  # U-Boot's countdown
    assert boot.status()["b"] == SlotStatus(SlotState.TRIAL, 2)
    boot.mark_good("b")
    assert boot.status()["b"] == SlotStatus(SlotState.GOOD)


def uboot_env(tmp_path):
    need_tool("fw_setenv")
    env = tmp_path / "uboot.env"
    env.write_bytes(bytes(0x4000))
    config = tmp_path / "fw_env.config"
    config.write_text(f"{env}\t0x0\t0x4000\n")
    defaults = tmp_path / "defaults.txt"
    defaults.write_text("bootdelay=0\n")  # a blank env needs one (libubootenv's fw_setenv -f)
    UBootBoot(str(config)).initialize("a", defaults=str(defaults))
    return env, str(config)


def printenv(config):
    out = subprocess.run(["fw_printenv", "-c", config], capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_uboot_refill_tops_up_a_good_slot_counted_down_and_leaves_a_trial_countdown_alone(tmp_path):
    env, config = uboot_env(tmp_path)
    boot = UBootBoot(config)
    before = env.read_bytes()
    assert boot.refill("a") is False and env.read_bytes() == before  # full already: no flash write
    subprocess.run(["fw_setenv", "-c", config, "BOOT_A_LEFT", "0"], check=True)  # the script counted 3 boots
    assert boot.status()["a"] == SlotStatus(SlotState.GOOD)  # still "good", but the script would skip it
    assert boot.refill("a") is True and printenv(config)["BOOT_A_LEFT"] == "3"
    boot.set_trial("b", 2)
    subprocess.run(["fw_setenv", "-c", config, "BOOT_B_LEFT", "1"], check=True)
    assert boot.refill("b") is False and printenv(config)["BOOT_B_LEFT"] == "1"  # a trial keeps counting down
    boot.mark_good("b")  # confirming refills too
    assert printenv(config)["BOOT_B_LEFT"] == "3"


async def test_uboot_daemon_start_refills_the_booted_good_slot_through_fw_setenv(tmp_path, monkeypatch):
    from .test_first_boot import start_agent
    env, config = uboot_env(tmp_path)
    subprocess.run(["fw_setenv", "-c", config, "BOOT_A_LEFT", "1"], check=True)  # two boots counted down
    await start_agent(tmp_path, monkeypatch, f"{{backend: uboot, fw_config: {config}}}")
    values = printenv(config)
    assert (values["BOOT_A_LEFT"], values["BOOT_A_OK"], values["BOOT_ORDER"]) == ("3", "1", "A B")


def test_uboot_missing_tool_is_a_clear_error(tmp_path):
    with pytest.raises(BootError, match="not found: install libubootenv-tool"):
        UBootBoot(None, printenv="fw_printenv-does-not-exist").status()


def test_sim_reboot_follows_bootloader_rules(device):
    boot, slots = device
    assert boot.booted_slot() == "a"
    boot.mark_bad("b")
    boot.set_trial("b", 2, "2.0.0")
    assert boot.reboot() == "b"
    assert boot.status()["b"] == SlotStatus(SlotState.TRIAL, 1, "2.0.0")
    assert boot.reboot() == "b"  # not confirmed: the last try
    assert boot.reboot() == "a"  # tries gone: fallback to the good slot
    assert boot.status()["b"].state is SlotState.BAD


def test_sim_panicking_image_falls_back(device):
    boot, slots = device
    with open(slots["b"], "r+b") as f:
        f.write(PANIC_MAGIC)
    boot.set_trial("b", 3, "3.0.0")
    assert boot.reboot() == "a"
    assert boot.status()["b"].state is SlotState.BAD and boot.status()["a"].state is SlotState.GOOD


def test_sim_bricked_device_is_reported(device):
    boot, _ = device
    boot.mark_bad("a")
    with pytest.raises(BootError, match="bricked"):
        boot.reboot()


def test_uboot_redundant_pair_keeps_the_state_before_a_torn_write(tmp_path):
    """config/uboot/fw_env.config's pair: each fw_setenv writes the copy that is not current, one flags step
    ahead; a write torn after its first sector fails its CRC and both libubootenv and the backend read the
    intact copy, the state before that write (U-Boot's boot.cmd does the same; qemu/arm64 checks it there)."""
    need_tool("fw_setenv")
    files = [tmp_path / "uboot.env", tmp_path / "uboot-redund.env"]
    for f in files:
        f.write_bytes(bytes(0x4000))
    config = tmp_path / "fw_env.config"
    config.write_text("".join(f"{f} 0x0000 0x4000\n" for f in files))
    defaults = tmp_path / "defaults.txt"
    defaults.write_text("bootdelay=0\n")
    boot = UBootBoot(str(config))
    boot.initialize("a", defaults=str(defaults))
    boot.set_trial("b", 2)
    before = [f.read_bytes() for f in files]
    assert sorted(b[4] for b in before) == [1, 2]  # flags: the newer copy is one ahead
    boot.mark_good("b")
    after = [f.read_bytes() for f in files]
    written = next(i for i in (0, 1) if after[i] != before[i])
    assert after[written][4] == 3 and after[1 - written] == before[1 - written]  # the current copy untouched
    assert boot.status()["b"] == SlotStatus(SlotState.GOOD)
    files[written].write_bytes(after[written][:512] + before[written][512:])  # the power went after one sector
    assert boot.status() == {"a": SlotStatus(SlotState.GOOD), "b": SlotStatus(SlotState.TRIAL, 2)}
    assert printenv(str(config))["BOOT_B_LEFT"] == "2"
    boot.mark_good("b")  # the next write goes over the torn copy again, one step ahead of the intact one
    assert files[written].read_bytes()[4] == 3 and boot.status()["b"] == SlotStatus(SlotState.GOOD)
