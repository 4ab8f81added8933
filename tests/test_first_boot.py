"""The first boot with a missing or empty bootloader env: the agent adopts the running slot and never marks it bad
(a missing grubenv once got a good slot marked bad in another updater)."""
import subprocess

import pytest

from agent import settle
from agent.boot import SlotState, SlotStatus
from agent.boot.grubenv import GrubEnvBoot
from agent.config import load
from agent.daemon import Agent

from .conftest import need_tool
from .test_boot_backends import editenv_list, make_gpt, printenv, sfdisk_attrs


class RecordedGrubEnv(GrubEnvBoot):
    """The real grubenv backend, with a list of the slots it was asked to mark bad."""

    def __init__(self, path):
        super().__init__(path)
        self.marked_bad = []

    def mark_bad(self, slot):
        self.marked_bad.append(slot)
        super().mark_bad(slot)


async def start_agent(tmp_path, monkeypatch, boot: str, booted: str = "a", control=None) -> Agent:
    """Starts the agent once (settle only: no server is reachable) with ``boot``; ``booted`` runs."""
    for s in "ab":
        (tmp_path / f"slot-{s}.img").write_bytes(bytes(4096))
    (tmp_path / "agent.yaml").write_text(f"""server: {{url: "http://127.0.0.1:9/", insecure_http: true}}
app: {{id: "{{0a0b0c0d-1111-4222-8333-444455556666}}", version: "1.0.0"}}
slots:
  a: {{file: {tmp_path}/slot-a.img}}
  b: {{file: {tmp_path}/slot-b.img}}
boot: {boot}
state_dir: {tmp_path}/state
trust: {{require_signature: false}}
""")
    # which slot runs is read from /proc/cmdline on a device; this host's names neither slot file
    monkeypatch.setattr(settle, "detect_booted", lambda specs: booted)
    agent = Agent(load(str(tmp_path / "agent.yaml")), boot=control)
    try:
        await agent.start(once=True)
        return agent
    finally:
        await agent.close()


@pytest.mark.parametrize("env", ["missing", "empty file", "empty block"])
async def test_first_boot_with_a_missing_or_empty_grubenv_adopts_the_running_slot(tmp_path, monkeypatch, env):
    need_tool("grub-editenv")
    path = tmp_path / "grubenv"
    if env == "empty file":
        path.write_bytes(b"")
    elif env == "empty block":
        subprocess.run(["grub-editenv", str(path), "create"], check=True)
    control = RecordedGrubEnv(str(path))
    agent = await start_agent(tmp_path, monkeypatch, f"{{backend: grubenv, env: {path}}}", control=control)
    assert control.marked_bad == []
    values = editenv_list(str(path))  # a good (never bad); b bad: 0 or absent (an empty block gains a's only)
    assert (values["ORDER"], values["A_OK"], values["A_TRY"]) == ("A B", "1", "0")
    assert values.get("B_OK", "0") == "0" and values.get("B_TRY", "0") == "0"
    assert GrubEnvBoot(str(path)).status() == {"a": SlotStatus(SlotState.GOOD), "b": SlotStatus(SlotState.BAD)}
    # idle with nothing to settle: no trial record, no error, no event for the server
    assert agent.ctx.state.trial is None and agent.ctx.state.last_error == ""
    assert agent.snapshot()["operation"] == "idle" and agent.snapshot()["pending_events"] == 0


async def test_first_boot_on_slot_b_with_a_missing_grubenv_adopts_b(tmp_path, monkeypatch):
    need_tool("grub-editenv")
    path = tmp_path / "grubenv"
    await start_agent(tmp_path, monkeypatch, f"{{backend: grubenv, env: {path}}}", booted="b")
    env = editenv_list(str(path))
    assert (env["ORDER"], env["B_OK"], env["A_OK"], env["A_TRY"]) == ("B A", "1", "0", "0")


async def test_first_boot_with_blank_gpt_attributes_adopts_the_running_slot(tmp_path, monkeypatch):
    disk = str(tmp_path / "disk.img")
    make_gpt(disk)  # sfdisk leaves every attribute bit clear: no slot good or armed
    await start_agent(tmp_path, monkeypatch, f"{{backend: gpt, disk: {disk}}}")
    attrs = sfdisk_attrs(disk)
    assert attrs["ROOT-A"] == "GUID:49,56" and attrs["ROOT-B"] == ""


async def test_first_boot_with_a_uboot_env_without_slot_variables_adopts_the_running_slot(tmp_path, monkeypatch):
    need_tool("fw_setenv")
    env = tmp_path / "uboot.env"
    env.write_bytes(bytes(0x4000))
    config = tmp_path / "fw_env.config"
    config.write_text(f"{env}\t0x0\t0x4000\n")
    defaults = tmp_path / "defaults.txt"
    defaults.write_text("bootdelay=0\n")
    subprocess.run(["fw_setenv", "-c", str(config), "-f", str(defaults), "bootcmd", "run distro_bootcmd"],
                   check=True)  # a board's env as U-Boot ships it: nothing about slots
    await start_agent(tmp_path, monkeypatch, f"{{backend: uboot, fw_config: {config}}}")
    values = printenv(str(config))
    assert (values["BOOT_A_OK"], values["BOOT_ORDER"]) == ("1", "A B") and values.get("BOOT_B_OK", "0") == "0"
