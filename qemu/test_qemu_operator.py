"""An operator's rollback in the real image (on demand: `make qemu-test QEMU_TESTS=qemu/test_qemu_operator.py`;
not part of the default set nor of .ci/run): update to 2.0.0 and confirm it on slot B, then `omaha-agent rollback`
on the running device arms slot A's 1.0.0 for a trial boot, the immediate policy reboots, GRUB boots A, and the
agent confirms it and reports 3/2 of 1.0.0 (previousversion 2.0.0); a check then finds the server's 2.0.0 and
does not take it again.

The command runs inside the guest from a scenario file on the ESP (see test_qemu_reboots.py), as an operator
would type it; what it printed goes to the kernel log, so to the serial console."""
import subprocess

import pytest

from .test_qemu import (BOOT_TIMEOUT, INSTALL_TIMEOUT, assert_slot_read_from_the_cmdline, boot_and_report,  # noqa: F401
                        check_grubenv, image, start_server)
from .test_qemu_reboots import OPERATION, esp, esp_clear
from .vm import Machine

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(3600)]

# once the agent is idle on the confirmed slot B, the operator's command; retried while it is refused (the
# confirmation or the start-up check may still run), bounded in count
ROLLBACK = f"""#!/bin/sh
exec >/dev/kmsg 2>&1
i=0
until {OPERATION} 2>/dev/null | grep -q '"idle"'; do
  i=$((i + 1)); [ $i -gt 900 ] && exit 1; sleep 1
done
i=0
while [ $i -lt 60 ]; do
  if out=$(omaha-agent rollback 2>&1); then
    echo "omaha-test-setup: rollback: $out"
    exit 0
  fi
  echo "omaha-test-setup: rollback refused: $out"
  i=$((i + 1)); sleep 5
done
exit 1
"""
# on the older system, confirmed: a check now (the schedule kept from the boot before would wait an hour), which
# the server answers with 2.0.0 again
CHECK = f"""#!/bin/sh
exec >/dev/kmsg 2>&1
i=0
until {OPERATION} 2>/dev/null | grep -q '"idle"'; do
  i=$((i + 1)); [ $i -gt 900 ] && exit 1; sleep 1
done
echo "omaha-test-setup: check: $(omaha-agent check --wait --timeout 300 2>&1 | tail -n 3 | tr '\\n' ' ')"
"""


def serial_lines(boot, prefix: str) -> list[str]:
    try:
        with open(boot.serial, errors="replace") as f:
            return [line[line.index(prefix):].strip() for line in f if prefix in line]
    except FileNotFoundError:
        return []


async def test_operator_rollback_after_a_confirmed_update_boots_the_older_slot_and_reports_3_2_of_it(image,
                                                                                                   tmp_path):
    srv = await start_server(image, "operator-rollback", "2.0.0", "payload-2.0.0.ext4.zst")
    machine = Machine("operator-rollback", image["disk"])
    try:
        first = await boot_and_report(machine, "1.0.0", "A")
        await first.wait_exit(INSTALL_TIMEOUT, "the agent to install 2.0.0 and reboot")
        assert srv.event_codes() == ["13/1", "14/1", "3/1"]

        esp(machine, {"setup.sh": ROLLBACK}, tmp_path)   # for the boot on B only
        second = await boot_and_report(machine, "2.0.0", "B")
        await second.wait_for(lambda: "3/2" in srv.event_codes(), BOOT_TIMEOUT, "the 3/2 report of 2.0.0")
        took = await second.wait_exit(INSTALL_TIMEOUT, "omaha-agent rollback and the reboot it plans")
        said = serial_lines(second, "omaha-test-setup: rollback")
        print(f"boot 2: confirmed 2.0.0, then the operator's command, rebooted after {took:.0f} s: {said}")
        assert said and said[-1].startswith("omaha-test-setup: rollback: rollback to 1.0.0 armed on slot a; "), said
        assert srv.event_codes() == ["13/1", "14/1", "3/1", "3/2"]   # nothing is sent on arming

        esp_clear(machine)
        esp(machine, {"setup.sh": CHECK}, tmp_path)
        third = await boot_and_report(machine, "1.0.0", "A")
        await assert_slot_read_from_the_cmdline(third, "a")
        await third.wait_for(lambda: srv.event_codes() == ["13/1", "14/1", "3/1", "3/2", "3/2"], BOOT_TIMEOUT,
                             "the 3/2 report of 1.0.0")
        declined = await third.wait_for(
            lambda: next((line for line in third.lines() if "offer of 2.0.0 not taken" in line), None), BOOT_TIMEOUT,
            "the agent to decline the server's 2.0.0")
        print(f"boot 3: {declined.split(']: ', 1)[-1].strip()}")
        assert "was rolled back on this device" in declined, declined
        status = await third.wait_for(
            lambda: (s := third.status()) and s["slots"]["a"]["state"]["data"] == "good" and s, 120,
            "busctl to show slot a good")
        assert status["current_version"] == "1.0.0" and status["booted_slot"] == "a", status
        await third.power_off()
        print(f"boot 3: {serial_lines(third, 'omaha-test-setup: check')}")
    finally:
        await machine.close()
        await srv.stop()
    confirmed = srv.events[-1]
    assert (confirmed["version"], confirmed["previousversion"]) == ("1.0.0", "2.0.0"), confirmed
    assert srv.event_codes() == ["13/1", "14/1", "3/1", "3/2", "3/2"]   # 2.0.0 was not downloaded again
    check_grubenv(machine, tmp_path, {"a": "good", "b": "good"})   # the slot left stays good
    listed = subprocess.run(["grub-editenv", machine.read_grubenv(str(tmp_path / "grubenv-order")), "list"],
                            capture_output=True, text=True, check=True).stdout
    assert "ORDER=A B" in listed.split("\n"), listed
