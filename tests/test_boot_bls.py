"""The systemd-boot backend (agent/boot/bls.py) against an ESP directory, its choice of entry cross-checked
with systemd's own ``bootctl list`` (same sort as systemd-boot: entries with no tries left last, then by name).

systemd-boot's own renames at boot (``+3`` → ``+2-1`` …) cannot run outside firmware: ``boot_attempt`` does
the rename it documents (the QEMU scenarios run the real one)."""
import logging
import os
import re
import struct
import subprocess

import pytest

from agent.boot import BootEnvMissing, BootError, SlotState
from agent.boot.bls import LOADER_GUID, BlsBoot, entry_id, parse_name
from agent.cli import main

from .conftest import need_tool
from .test_provision import write_config


def write_entry(esp, name, slot, title=None):
    path = esp / "loader" / "entries" / name
    path.write_text(f"title {title or 'Omaha ' + slot}\nlinux /omaha/vmlinuz\ninitrd /omaha/initrd.img\n"
                    f"options root=PARTLABEL=ROOT-{slot.upper()} ro quiet omaha_agent.slot={slot}\n")
    return path


@pytest.fixture
def esp(tmp_path):
    """An ESP as the image builder leaves it: one entry per slot, not provisioned yet."""
    root = tmp_path / "esp"
    (root / "loader" / "entries").mkdir(parents=True)
    (root / "loader" / "loader.conf").write_text("timeout 0\n")
    write_entry(root, "omaha-a.conf", "a")
    write_entry(root, "omaha-b.conf", "b")
    return root


def names(esp):
    return sorted(os.listdir(esp / "loader" / "entries"))


def boot_attempt(esp, name):
    """What systemd-boot does to a counted entry before booting it (its docs' ``+3`` → ``+2-1`` rule)."""
    m = re.fullmatch(r"(.*)\+(\d+)(?:-(\d+))?\.conf", name)
    left, done = int(m.group(2)), int(m.group(3) or 0)
    new = f"{m.group(1)}+{left - 1}-{done + 1}.conf"
    os.rename(esp / "loader" / "entries" / name, esp / "loader" / "entries" / new)
    return new


def bootctl_default(esp):
    """The entry file ``bootctl list`` marks ``(default)``: the one systemd-boot boots."""
    tool = need_tool("bootctl")
    if os.geteuid() != 0:
        pytest.skip("bootctl wants the ESP to be a mount point: a bind mount needs root")
    script = 'mount --bind "$1" "$1" && SYSTEMD_RELAX_ESP_CHECKS=1 "$2" --esp-path="$1" --no-pager list'
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(esp), tool], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, SYSTEMD_EFI_OPTIONS="", SYSTEMD_PAGER=""))
    if proc.returncode != 0 and "mount" in proc.stderr:
        pytest.skip(f"no private bind mount here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    default = None
    for block in proc.stdout.split("\n\n"):
        if "(default)" in block:
            default = re.search(r"source: (\S+)", block).group(1)
    assert default, proc.stdout
    return os.path.basename(default)


def states(boot):
    return {slot: (s.state.value, s.tries_left) for slot, s in boot.status().items()}


def test_factory_state_renames_the_image_entries_keeps_their_content_and_is_idempotent(esp):
    before = (esp / "loader" / "entries" / "omaha-b.conf").read_text()
    boot = BlsBoot(str(esp))
    with pytest.raises(BootEnvMissing):
        boot.status()
    boot.initialize("a")
    assert names(esp) == ["omaha-0-b+0.conf", "omaha-1-a.conf"]
    assert (esp / "loader" / "entries" / "omaha-0-b+0.conf").read_text() == before
    assert states(boot) == {"a": ("good", 0), "b": ("bad", 0)}
    boot.initialize("a")
    assert names(esp) == ["omaha-0-b+0.conf", "omaha-1-a.conf"]
    assert bootctl_default(esp) == "omaha-1-a.conf"


def test_success_a_to_trial_b_counted_down_by_the_bootloader_then_blessed(esp):
    boot = BlsBoot(str(esp))
    boot.initialize("a")
    boot.set_trial("b", 3)
    assert "omaha-2-b+3.conf" in names(esp)
    assert states(boot) == {"a": ("good", 0), "b": ("trial", 3)}
    assert bootctl_default(esp) == "omaha-2-b+3.conf"
    now = boot_attempt(esp, "omaha-2-b+3.conf")
    assert states(boot)["b"] == ("trial", 2)
    assert bootctl_default(esp) == now == "omaha-2-b+2-1.conf"
    boot.mark_good("b")  # what systemd-bless-boot good does: the counter leaves the name
    assert names(esp) == ["omaha-1-a.conf", "omaha-2-b.conf"]
    assert states(boot) == {"a": ("good", 0), "b": ("good", 0)}
    assert bootctl_default(esp) == "omaha-2-b.conf"


def test_rollback_a_trial_counted_to_zero_sorts_last_so_the_good_slot_boots_and_stays_recoverable(esp):
    boot = BlsBoot(str(esp))
    boot.initialize("a")
    boot.set_trial("b", 3)
    name = "omaha-2-b+3.conf"
    for _ in range(3):
        name = boot_attempt(esp, name)
    assert name == "omaha-2-b+0-3.conf"
    assert states(boot)["b"] == ("bad", 0)
    assert bootctl_default(esp) == "omaha-1-a.conf"
    boot.mark_bad("b")  # the agent's verdict on the fell-back trial: the entry is kept, its name unchanged
    assert names(esp) == ["omaha-1-a.conf", "omaha-2-b+0-3.conf"]
    boot.set_trial("b", 2)  # a later update revives it
    assert names(esp) == ["omaha-1-a.conf", "omaha-3-b+2.conf"]


def test_an_update_back_to_the_older_slot_outranks_the_good_one_and_a_failed_health_check_goes_back(esp):
    boot = BlsBoot(str(esp))
    boot.initialize("a")
    boot.set_trial("b", 3)
    boot.mark_good("b")
    boot.set_trial("a", 2)  # a's name sorts below b's, so its rank must lift it
    assert names(esp) == ["omaha-2-b.conf", "omaha-3-a+2.conf"]
    assert bootctl_default(esp) == "omaha-3-a+2.conf"
    boot_attempt(esp, "omaha-3-a+2.conf")
    boot.mark_bad("a")  # the health check failed on a
    assert names(esp) == ["omaha-2-b.conf", "omaha-3-a+0-1.conf"]
    assert states(boot) == {"a": ("bad", 0), "b": ("good", 0)}
    assert bootctl_default(esp) == "omaha-2-b.conf"


def test_mark_good_of_a_lower_ranked_slot_lifts_it_above_the_other_good_slot(esp):
    boot = BlsBoot(str(esp))
    boot.initialize("a")
    boot.set_trial("b", 3)
    boot.mark_good("b")
    boot.mark_good("a")
    assert names(esp) == ["omaha-2-b.conf", "omaha-3-a.conf"]
    assert bootctl_default(esp) == "omaha-3-a.conf"


class PowerCut(Exception):
    pass


@pytest.mark.parametrize("step", ["set_trial", "mark_good", "mark_bad"])
def test_power_cut_between_the_new_name_and_the_old_ones_removal_leaves_a_bootable_entry_and_is_finished_later(
        esp, monkeypatch, step):
    boot = BlsBoot(str(esp))
    boot.initialize("a")
    if step != "set_trial":
        boot.set_trial("b", 3)
        boot_attempt(esp, "omaha-2-b+3.conf")
    before = states(boot)
    real_unlink = os.unlink

    def cut(path, *args, **kwargs):
        raise PowerCut(path)
    monkeypatch.setattr(os, "unlink", cut)
    with pytest.raises(PowerCut):
        getattr(boot, step)("b", 3) if step == "set_trial" else getattr(boot, step)("b")
    monkeypatch.setattr(os, "unlink", real_unlink)
    on_disk = [n for n in names(esp) if parse_name(n).slot == "b"]
    assert len(on_disk) == 2  # both names, same content: never none
    texts = {(esp / "loader" / "entries" / n).read_text() for n in on_disk}
    assert len(texts) == 1
    after = BlsBoot(str(esp))
    expected = {"set_trial": ("trial", 3), "mark_good": before["b"], "mark_bad": ("bad", 0)}[step]
    assert states(after)["b"] == expected  # the higher rank, else the worse state: the agent does the step again
    bootctl_default(esp)  # systemd-boot still finds an entry to boot
    getattr(after, step)("b", 3) if step == "set_trial" else getattr(after, step)("b")
    assert len([n for n in names(esp) if parse_name(n).slot == "b"]) == 1


def test_an_entry_whose_options_do_not_name_its_slot_is_ignored_and_removed_by_the_next_write(esp, caplog):
    boot = BlsBoot(str(esp))
    boot.initialize("a")
    (esp / "loader" / "entries" / "omaha-5-b+3.conf").write_text("title torn\nlinux /omaha/vm")
    with caplog.at_level(logging.WARNING, logger="omaha-agent"):
        assert states(boot)["b"] == ("bad", 0)
    assert "omaha-5-b+3.conf: its options do not say omaha_agent.slot=b" in caplog.text
    boot.set_trial("b", 3)
    assert names(esp) == ["omaha-1-a.conf", "omaha-2-b+3.conf"]


def test_missing_entries_and_directory_are_one_line_errors(esp, tmp_path):
    boot = BlsBoot(str(esp))
    boot.initialize("a")
    os.unlink(esp / "loader" / "entries" / "omaha-0-b+0.conf")
    with pytest.raises(BootError, match=r"no boot entry for slot b .*omaha_agent.slot=b"):
        boot.status()
    with pytest.raises(BootError, match="mount the EFI system partition"):
        BlsBoot(str(tmp_path / "nowhere")).status()
    with pytest.raises(BootError, match="tries must be"):
        boot.set_trial("a", 16)


def efivar(efivars, name, text):
    efivars.mkdir(exist_ok=True)
    (efivars / f"{name}-{LOADER_GUID}").write_bytes(struct.pack("<I", 6) + (text + "\0").encode("utf-16-le"))


@pytest.mark.parametrize("selected", ["omaha-2-b+3.conf", "omaha-2-b.conf", "OMAHA-2-B+3"])
def test_booted_slot_is_read_from_the_options_of_the_entry_in_loader_entry_selected(esp, tmp_path, selected):
    boot = BlsBoot(str(esp), str(tmp_path / "efivars"))
    boot.initialize("a")
    boot.set_trial("b", 3)
    boot_attempt(esp, "omaha-2-b+3.conf")  # the file is renamed after systemd-boot exported its id
    assert boot.booted_slot() is None  # no variable: the kernel command line decides
    efivar(tmp_path / "efivars", "LoaderEntrySelected", selected)
    assert boot.booted_slot() == "b"
    efivar(tmp_path / "efivars", "LoaderEntrySelected", "debian-6.1.conf")
    assert boot.booted_slot() is None
    assert entry_id("omaha-2-b+2-1.conf") == entry_id("omaha-2-b.conf") == "omaha-2-b"


def test_a_default_entry_that_would_defeat_the_fallback_is_reported(esp, tmp_path, caplog):
    boot = BlsBoot(str(esp), str(tmp_path / "efivars"))
    boot.initialize("a")
    assert boot.ordering_problems() == []
    efivar(tmp_path / "efivars", "LoaderEntryDefault", "omaha-1-a.conf")
    (esp / "loader" / "loader.conf").write_text("timeout 0\ndefault omaha-*\n")
    problems = boot.ordering_problems()
    assert len(problems) == 2 and "bootctl set-default ''" in problems[0] and "remove the line" in problems[1]
    with caplog.at_level(logging.WARNING, logger="omaha-agent"):
        boot.booted_slot()
    assert "LoaderEntryDefault" in caplog.text


def test_provision_bls_in_an_image_tree_and_its_one_line_errors(tmp_path, capsys):
    tree = tmp_path / "tree"
    esp = tree / "boot" / "efi"
    (esp / "loader" / "entries").mkdir(parents=True)
    write_entry(esp, "omaha-a.conf", "a")
    config = write_config(tmp_path / "agent.yaml", "{backend: bls, esp: /boot/efi}")
    args = ["provision", "--config", config, "--slot", "b", "--version", "1.0.0", "--image-root", str(tree)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "no boot entry for slot b" in err and "\n" not in err
    write_entry(esp, "omaha-b.conf", "b")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"systemd-boot entries in {esp}/loader/entries: slot b good" in out
    assert names(esp) == ["omaha-0-a+0.conf", "omaha-1-b.conf"]
    assert main(args) == 0
    assert names(esp) == ["omaha-0-a+0.conf", "omaha-1-b.conf"]
    write_entry(esp, "other.conf", "a")
    os.unlink(esp / "loader" / "entries" / "omaha-0-a+0.conf")
    write_entry(esp, "another.conf", "a")
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "2 entries carry omaha_agent.slot=a" in err and "\n" not in err
