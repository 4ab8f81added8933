"""A staged update in the real image (on demand: `make qemu-test QEMU_TESTS=qemu/test_qemu_staged.py`; not part
of the default set nor of .ci/run): with `install.arm: on-apply` the agent on A downloads 2.0.0, writes and verifies
it on ROOT-B and leaves it staged, not armed; the guest reboots (`systemctl reboot`) and GRUB boots A's 1.0.0 again
(the grubenv still says B bad, nothing armed); then `omaha-agent apply` inside the guest hashes slot B again (the
device booted since staging), arms it, and the immediate policy reboots; GRUB boots B's 2.0.0 and the agent
confirms it and reports 3/2.

The configuration is switched inside the guest before the agent's first start (a `config.sed` scenario file on the
ESP); the commands run inside the guest from scenario files too (see test_qemu_reboots.py), and what they printed
goes to the kernel log, so to the serial console."""
import subprocess
import time

import pytest

from .test_qemu import (BOOT_TIMEOUT, INSTALL_TIMEOUT, boot_and_report, check_grubenv, image,  # noqa: F401
                        start_server)
from .test_qemu_operator import serial_lines
from .test_qemu_reboots import OPERATION, esp, esp_clear
from .vm import Machine

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(3600)]

# the image's agent.yaml says `install: {read_timeout: 30}`; this adds the arm (it matches only once: the edited
# line no longer ends that way, so a later boot's sed leaves it alone)
ON_APPLY = "s/^install: {read_timeout: 30}$/install: {read_timeout: 30, arm: on-apply}/\n"
WAIT_STAGED = f"""i=0
until {OPERATION} 2>/dev/null | grep -q '"staged"'; do
  i=$((i + 1)); [ $i -gt 1800 ] && exit 1; sleep 1
done"""
# boot 1: once the update is staged, a user's plain reboot (the agent plans none: nothing is armed)
REBOOT = f"""#!/bin/sh
exec >/dev/kmsg 2>&1
echo "omaha-test-setup: install.arm: $(grep -c 'arm: on-apply' /etc/omaha-agent/agent.yaml) line(s) on-apply"
{WAIT_STAGED}
echo "omaha-test-setup: staged: $(omaha-agent status 2>&1 | tr '\\n' ' ')"
sleep 2
echo "omaha-test-setup: rebooting"
systemctl reboot
"""
# boot 2: the operator's apply once the agent is up again with the update staged; retried while it is refused (the
# start-up check may still run), bounded in count
APPLY = f"""#!/bin/sh
exec >/dev/kmsg 2>&1
{WAIT_STAGED}
i=0
while [ $i -lt 60 ]; do
  t0=$(date +%s)
  if out=$(omaha-agent apply 2>&1); then
    echo "omaha-test-setup: apply: $out (answered in $(( $(date +%s) - t0 )) s)"
    exit 0
  fi
  echo "omaha-test-setup: apply refused: $out"
  i=$((i + 1)); sleep 5
done
exit 1
"""


def agent_log(boot, text: str) -> str | None:
    """The agent's journal line (forwarded by the guest's report unit) that contains ``text``."""
    return next((line for line in boot.lines() if line.startswith("AGENTLOG ") and text in line), None)


def grubenv_list(machine: Machine, tmp_path, name: str) -> list[str]:
    return subprocess.run(["grub-editenv", machine.read_grubenv(str(tmp_path / name)), "list"],
                          capture_output=True, text=True, check=True).stdout.split("\n")


async def test_staged_update_survives_a_reboot_unarmed_then_apply_boots_it_and_reports_3_2(image, tmp_path):
    srv = await start_server(image, "staged", "2.0.0", "payload-2.0.0.ext4.zst")
    machine = Machine("staged", image["disk"])
    began = time.monotonic()
    try:
        esp(machine, {"config.sed": ON_APPLY, "setup.sh": REBOOT}, tmp_path)
        first = await boot_and_report(machine, "1.0.0", "A")
        staged = await first.wait_for(lambda: agent_log(first, "2.0.0 staged on slot b"), INSTALL_TIMEOUT,
                                      "the agent to stage 2.0.0")
        print(f"boot 1: {staged.split(']: ', 1)[-1].strip()}")
        assert "install.arm: on-apply" in staged, staged
        took = await first.wait_exit(INSTALL_TIMEOUT, "the guest's reboot once 2.0.0 is staged")
        print(f"boot 1: staged, then `systemctl reboot` after {took:.0f} s: "
              f"{serial_lines(first, 'omaha-test-setup: staged')}")
        assert serial_lines(first, "omaha-test-setup: install.arm: 1 line(s) on-apply"), first.tail()
        assert srv.event_codes() == ["13/1", "14/1"]   # nothing armed, so no 3/1
        # the disk between the boots: B still bad and nothing armed, the staged record kept
        check_grubenv(machine, tmp_path, {"a": "good", "b": "bad"})
        listed = grubenv_list(machine, tmp_path, "grubenv-staged")
        assert {"ORDER=A B", "B_OK=0", "B_TRY=0"} <= set(listed), listed
        state = machine.read_state(str(tmp_path / "state-staged.img"))
        assert state and state["staged"] and state["trial"] is None, state
        assert (state["staged"]["slot"], state["staged"]["version"]) == ("b", "2.0.0"), state["staged"]

        esp_clear(machine)
        esp(machine, {"setup.sh": APPLY}, tmp_path)
        second = await boot_and_report(machine, "1.0.0", "A")   # GRUB did not boot the unarmed slot
        status = await second.wait_for(lambda: (s := second.status()) and s["operation"] == "staged" and s,
                                       BOOT_TIMEOUT, "busctl to show the update still staged")
        assert status["current_version"] == "1.0.0" and status["booted_slot"] == "a", status
        took = await second.wait_exit(INSTALL_TIMEOUT, "omaha-agent apply and the reboot it plans")
        said = serial_lines(second, "omaha-test-setup: apply")
        print(f"boot 2: still staged on A, then the operator's apply, rebooted after {took:.0f} s: {said}")
        # one call: the answer waits for the slot's hash (20-32 s here under TCG), past the 10 s other commands wait
        assert len(said) == 1 and said[0].startswith("omaha-test-setup: apply: 2.0.0 armed on slot b; "), said
        hashed = agent_log(second, "the device booted since 2.0.0 was staged: hashing slot b again")
        armed = agent_log(second, "staged 2.0.0 armed on slot b")
        print(f"boot 2: {hashed and hashed.split(']: ', 1)[-1].strip()}; {armed and armed.split(']: ', 1)[-1].strip()}")
        assert hashed and armed, second.tail()
        assert srv.event_codes() == ["13/1", "14/1", "3/1"]

        esp_clear(machine)
        third = await boot_and_report(machine, "2.0.0", "B")
        await third.wait_for(lambda: "3/2" in srv.event_codes(), BOOT_TIMEOUT, "the 3/2 report")
        status = await third.wait_for(
            lambda: (s := third.status()) and s["slots"]["b"]["state"]["data"] == "good" and s, 120,
            "busctl to show slot b good")
        assert status["current_version"] == "2.0.0" and status["booted_slot"] == "b", status
        await third.power_off()
    finally:
        await machine.close()
        await srv.stop()
    print(f"staged scenario: {machine.boots} boots, {time.monotonic() - began:.0f} s")
    assert srv.event_codes() == ["13/1", "14/1", "3/1", "3/2"]   # no 3/0
    done = srv.events[-1]
    assert (done["version"], done["previousversion"]) == ("2.0.0", "1.0.0"), done
    check_grubenv(machine, tmp_path, {"a": "good", "b": "good"})
