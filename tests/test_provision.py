"""``omaha-agent provision``: the factory boot state per backend, checked with the bootloaders' own tools."""
import json
import subprocess

import pytest

from agent import provision as provision_module
from agent.boot import BootEnvMissing
from agent.boot.grubenv import GrubEnvBoot
from agent.cli import main

from .conftest import need_tool
from .test_boot_backends import editenv_list, make_gpt, printenv, sfdisk_attrs, sfdisk_clean

FACTORY_GRUB = {"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0", "B_TRY": "0"}
FACTORY_UBOOT = {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "BOOT_A_OK": "1", "BOOT_B_LEFT": "0", "BOOT_B_OK": "0"}


def write_config(path, boot: str) -> str:
    """An agent.yaml as an image would carry it (absolute device paths), with ``boot`` as its boot: mapping."""
    path.write_text(f"""server: {{url: "http://127.0.0.1:9/", insecure_http: true}}
app: {{id: "{{0a0b0c0d-1111-4222-8333-444455556666}}", version: "1.0.0"}}
slots:
  a: {{partlabel: ROOT-A}}
  b: {{partlabel: ROOT-B}}
boot: {boot}
state_dir: /var/lib/omaha-agent
trust: {{require_signature: false}}
""")
    return str(path)


def provision(config, *extra, slot="a", version="1.0.0"):
    return main(["provision", "--config", config, "--slot", slot, "--version", version, *extra])


def test_provision_grubenv_in_an_image_tree_is_read_by_grub_editenv_and_is_idempotent(tmp_path, capsys):
    need_tool("grub-editenv")
    tree = tmp_path / "tree"
    (tree / "boot" / "efi").mkdir(parents=True)
    config = write_config(tmp_path / "agent.yaml", "{backend: grubenv, env: /boot/efi/grubenv}")
    assert provision(config, "--image-root", str(tree)) == 0
    env = tree / "boot" / "efi" / "grubenv"
    assert editenv_list(str(env)) == FACTORY_GRUB
    assert len(env.read_bytes()) == 1024
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "slot a good" in out and "slot b bad" in out
    first = env.read_bytes()
    assert provision(config, "--image-root", str(tree)) == 0
    assert env.read_bytes() == first


def test_provision_grubenv_keeps_other_variables_and_disarms_a_trial(tmp_path):
    need_tool("grub-editenv")
    env = tmp_path / "boot" / "efi" / "grubenv"
    env.parent.mkdir(parents=True)
    subprocess.run(["grub-editenv", str(env), "create"], check=True)
    subprocess.run(["grub-editenv", str(env), "set", "saved_entry=0", "ORDER=B A", "B_OK=0", "B_TRY=3"], check=True)
    config = write_config(tmp_path / "agent.yaml", "{backend: grubenv, env: /boot/efi/grubenv}")
    assert provision(config, "--image-root", str(tmp_path)) == 0
    assert editenv_list(str(env)) == {"saved_entry": "0", **FACTORY_GRUB}


def test_provision_grubenv_replaces_an_empty_file_with_a_full_block(tmp_path):
    need_tool("grub-editenv")
    (tmp_path / "grubenv").write_bytes(b"")
    config = write_config(tmp_path / "agent.yaml", "{backend: grubenv, env: /grubenv}")
    assert provision(config, "--image-root", str(tmp_path)) == 0
    assert editenv_list(str(tmp_path / "grubenv")) == FACTORY_GRUB
    assert len((tmp_path / "grubenv").read_bytes()) == 1024


def test_provision_slot_b_marks_b_good_and_a_bad(tmp_path):
    need_tool("grub-editenv")
    config = write_config(tmp_path / "agent.yaml", "{backend: grubenv, env: /grubenv}")
    assert provision(config, "--image-root", str(tmp_path), slot="b") == 0
    assert editenv_list(str(tmp_path / "grubenv")) == {"ORDER": "B A", "B_OK": "1", "B_TRY": "0", "A_OK": "0",
                                                       "A_TRY": "0"}


def sfdisk_dump(disk):
    return subprocess.run(["sfdisk", "-d", disk], check=True, capture_output=True, text=True).stdout


def test_provision_gpt_on_a_disk_image_sets_the_attribute_bits_sfdisk_reads_and_is_idempotent(tmp_path):
    disk = str(tmp_path / "disk.img")
    make_gpt(disk)
    subprocess.run(["sfdisk", "-q", "--part-attrs", disk, "3", "GUID:49,52,53"], check=True)  # b armed, 3 tries
    config = write_config(tmp_path / "agent.yaml", "{backend: gpt, disk: /dev/sda}")
    assert provision(config, "--image-root", disk) == 0
    attrs = sfdisk_attrs(disk)
    assert attrs["ROOT-A"] == "GUID:49,56" and attrs["ROOT-B"] == ""  # a: priority 2, successful; b: nothing
    one = subprocess.run(["sfdisk", "--part-attrs", disk, "2"], check=True, capture_output=True, text=True).stdout
    assert one.strip() == "GUID:49,56"
    dump, first = sfdisk_dump(disk), open(disk, "rb").read()
    assert provision(config, "--image-root", disk) == 0
    assert sfdisk_dump(disk) == dump and open(disk, "rb").read() == first
    clean, text = sfdisk_clean(disk)  # both tables and their CRCs as sfdisk expects them
    assert clean, text


def uboot_tree(tmp_path):
    need_tool("fw_setenv")
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "boot" / "firmware").mkdir(parents=True)
    (tree / "etc" / "fw_env.config").write_text("# the redundant pair\n/boot/firmware/uboot.env 0x0000 0x4000\n"
                                                "/boot/firmware/uboot-redund.env 0x0000 0x4000\n")
    host = tmp_path / "host-fw_env.config"  # fw_printenv on the build host, pointing into the tree
    host.write_text(f"{tree}/boot/firmware/uboot.env 0x0 0x4000\n{tree}/boot/firmware/uboot-redund.env 0x0 0x4000\n")
    return tree, str(host)


def test_provision_uboot_creates_the_env_pair_in_the_tree_read_by_fw_printenv_and_is_idempotent(tmp_path):
    tree, host = uboot_tree(tmp_path)
    config = write_config(tmp_path / "agent.yaml", "{backend: uboot, fw_config: /etc/fw_env.config}")
    assert provision(config, "--image-root", str(tree)) == 0
    files = [tree / "boot" / "firmware" / name for name in ("uboot.env", "uboot-redund.env")]
    assert [f.stat().st_size for f in files] == [0x4000, 0x4000]
    assert printenv(host) == FACTORY_UBOOT
    first = [f.read_bytes() for f in files]
    assert provision(config, "--image-root", str(tree)) == 0
    assert [f.read_bytes() for f in files] == first  # no second write: the pair does not switch copies


def test_provision_uboot_disarms_a_trial_in_an_existing_env(tmp_path):
    tree, host = uboot_tree(tmp_path)
    config = write_config(tmp_path / "agent.yaml", "{backend: uboot, fw_config: /etc/fw_env.config}")
    assert provision(config, "--image-root", str(tree)) == 0
    subprocess.run(["fw_setenv", "-c", host, "BOOT_ORDER", "B A"], check=True)
    subprocess.run(["fw_setenv", "-c", host, "BOOT_B_LEFT", "3"], check=True)
    assert provision(config, "--image-root", str(tree)) == 0
    assert printenv(host) == FACTORY_UBOOT


def test_provision_sim_records_the_version_and_is_idempotent(tmp_path):
    config = write_config(tmp_path / "agent.yaml", "{backend: sim, env: /var/sim/bootenv.json}")
    (tmp_path / "var" / "sim").mkdir(parents=True)
    assert provision(config, "--image-root", str(tmp_path), version="4.2.0") == 0
    env_path = tmp_path / "var" / "sim" / "bootenv.json"
    env = json.loads(env_path.read_text())
    assert env["booted"] == "a" and env["order"] == ["a", "b"]
    assert env["slots"] == {"a": {"state": "good", "tries": 0, "version": "4.2.0"},
                            "b": {"state": "bad", "tries": 0, "version": None}}
    first = env_path.read_bytes()
    assert provision(config, "--image-root", str(tmp_path), version="4.2.0") == 0
    assert env_path.read_bytes() == first


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_provision_gpt_refuses_a_directory_as_image_root_in_one_line(tmp_path, capsys):
    config = write_config(tmp_path / "agent.yaml", "{backend: gpt, disk: /dev/sda}")
    assert provision(config, "--image-root", str(tmp_path)) == 1
    assert "pass the disk image as --image-root" in one_line_error(capsys)


def test_provision_names_the_missing_directory_in_one_line(tmp_path, capsys):
    config = write_config(tmp_path / "agent.yaml", "{backend: grubenv, env: /boot/efi/grubenv}")
    assert provision(config, "--image-root", str(tmp_path)) == 1
    err = one_line_error(capsys)
    assert f"{tmp_path}/boot/efi does not exist: create it" in err


def test_provision_leaves_a_file_that_is_no_grub_env_block_alone_and_says_what_to_do(tmp_path, capsys):
    (tmp_path / "grubenv").write_bytes(b"not an env block\n")
    config = write_config(tmp_path / "agent.yaml", "{backend: grubenv, env: /grubenv}")
    assert provision(config, "--image-root", str(tmp_path)) == 1
    assert "move the file away and write a fresh block with 'omaha-agent provision'" in one_line_error(capsys)
    assert (tmp_path / "grubenv").read_bytes() == b"not an env block\n"


def test_provision_refuses_a_bad_version_in_one_line(tmp_path, capsys):
    config = write_config(tmp_path / "agent.yaml", "{backend: grubenv, env: /grubenv}")
    assert provision(config, "--image-root", str(tmp_path), version="1.0\x07") == 1
    assert "--version" in one_line_error(capsys)
    assert not (tmp_path / "grubenv").exists()


def test_provision_on_the_running_system_refuses_to_mark_the_running_slot_bad(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path / "agent.yaml", f"{{backend: grubenv, env: {tmp_path}/grubenv}}")
    # which slot runs comes from /proc/cmdline on a device; this host's names neither slot
    monkeypatch.setattr(provision_module, "detect_booted", lambda specs: "a")
    assert provision(config, slot="b") == 1
    assert "use --slot a, or --image-root" in one_line_error(capsys)
    assert not (tmp_path / "grubenv").exists()
    assert provision(config, slot="a") == 0


def test_grubenv_status_of_a_missing_or_empty_block_says_to_provision(tmp_path):
    path = tmp_path / "grubenv"
    with pytest.raises(BootEnvMissing, match="not found .*'omaha-agent provision --slot a"):
        GrubEnvBoot(str(path)).status()
    path.write_bytes(b"")
    with pytest.raises(BootEnvMissing, match="empty .*'omaha-agent provision --slot a"):
        GrubEnvBoot(str(path)).status()
