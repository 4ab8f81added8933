"""Reboot policies in the real image: logind's shutdown inhibitors and a maintenance window, with systemd,
logind and the agent as a service (see test_qemu.py for the image and the rules).

Each scenario leaves its files on the ESP before the first boot (omaha-test-scenario.service applies them:
``config.sed`` edits the agent's configuration before the agent starts, ``setup.sh`` runs in the background)."""
import datetime as dt
import time

import pytest

from .test_qemu import BOOT_TIMEOUT, INSTALL_TIMEOUT, boot_and_report, check_grubenv, image, start_server  # noqa: F401
from .vm import OPERATION, Machine, esp, esp_clear  # noqa: F401 (test_qemu_operator imports them here)

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(3600)]
WAIT_PENDING = f"""i=0
until {OPERATION} 2>/dev/null | grep -q reboot-pending; do
  i=$((i + 1)); [ $i -gt 1800 ] && exit 1; sleep 1
done"""


async def confirm_on_b(machine: Machine, srv) -> None:
    """The reboot happened: without the scenario's files, slot B boots 2.0.0 and the agent reports 3/2."""
    esp_clear(machine)
    second = await boot_and_report(machine, "2.0.0", "B")
    await second.wait_for(lambda: "3/2" in srv.event_codes(), BOOT_TIMEOUT, "the 3/2 report")
    await second.power_off()


async def test_a_shutdown_inhibitor_holds_the_reboot_back_until_it_is_released(image, tmp_path):
    setup = f"""#!/bin/sh
# a block lock on shutdown from the agent's start (the bus and logind are up by then) until a minute after the
# agent wants to reboot; what it says goes to the kernel log, so to the serial console
exec >/dev/kmsg 2>&1
i=0
until {OPERATION} >/dev/null 2>&1; do
  i=$((i + 1)); [ $i -gt 600 ] && exit 1; sleep 1
done
echo "omaha-test-setup: the agent is up; taking a block lock on shutdown"
exec systemd-inhibit --what=shutdown --mode=block --who=omaha-test --why="the test holds shutdown" sh -c '
{WAIT_PENDING}
echo "omaha-test-setup: the agent waits to reboot; releasing the lock in 60 s"
sleep 60'
"""
    srv = await start_server(image, "inhibit", "2.0.0", "payload-2.0.0.ext4.zst")
    machine = Machine("inhibit", image["disk"])
    esp(machine, {"setup.sh": setup}, tmp_path)
    try:
        first = await boot_and_report(machine, "1.0.0", "A")
        held = await first.wait_for(
            lambda: (s := first.status()) and s["operation"] == "reboot-pending" and "omaha-test" in
            s["reboot_waiting_for"] and s, INSTALL_TIMEOUT, "the reboot to wait for the inhibitor")
        since = time.monotonic()
        print(f"inhibit: installed; the reboot waits for {held['reboot_waiting_for']!r}")
        assert "the test holds shutdown" in held["reboot_waiting_for"]
        await first.wait_exit(300, "the reboot once the inhibitor is released")
        waited = time.monotonic() - since
        print(f"inhibit: rebooted {waited:.0f} s after the agent first said it waits for the inhibitor (held 60 s)")
        assert waited >= 50, waited
        assert srv.event_codes() == ["13/1", "14/1", "3/1"]
        await confirm_on_b(machine, srv)
    finally:
        await machine.close()
        await srv.stop()
    assert srv.event_codes() == ["13/1", "14/1", "3/1", "3/2"]


async def test_the_windows_policy_reboots_when_a_window_opens_after_the_install(image, tmp_path):
    # first a window two days away: the install finishes and the reboot waits; then the guest moves the window to
    # open a minute or two from then and restarts the agent, which plans the waiting update's reboot again
    later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)).strftime("%a").lower()
    windows = ('s/^reboot: .*/reboot: {policy: windows, windows: [{days: [%s], start: "%s", length: 10, '
               'timezone: UTC}]}/')
    near = windows.replace('"', '\\"') % ("mon, tue, wed, thu, fri, sat, sun", "$start")  # in double quotes
    setup = f"""#!/bin/sh
{WAIT_PENDING}
sleep 30  # long enough for the host to see the far window in the report
start=$(date -u -d '+2 min' +%H:%M)
sed -i "{near}" /etc/omaha-agent/agent.yaml
systemctl restart omaha-agent.service
"""
    srv = await start_server(image, "window", "2.0.0", "payload-2.0.0.ext4.zst")
    machine = Machine("window", image["disk"])
    esp(machine, {"config.sed": windows % (later, "12:00") + "\n", "setup.sh": setup}, tmp_path)
    try:
        first = await boot_and_report(machine, "1.0.0", "A")
        far = await first.wait_for(
            lambda: (s := first.status()) and s["operation"] == "reboot-pending" and s, INSTALL_TIMEOUT,
            "the installed update to wait for its window")
        assert far["reboot_waiting_for"] == "the maintenance window" and far["reboot_time"] > time.time() + 86400
        near = await first.wait_for(
            lambda: (s := first.status()) and s["operation"] == "reboot-pending" and 0 < s["reboot_time"] <
            time.time() + 180 and s, 300, "the agent, restarted, to plan the reboot into the near window")
        opens = near["reboot_time"]
        print(f"window: installed; reboot planned for the window at {time.strftime('%H:%M:%S', time.gmtime(opens))}"
              f" UTC ({opens - time.time():.0f} s from now)")
        await first.wait_exit(400, "the reboot in the window")
        rebooted = time.time()
        print(f"window: the guest rebooted {rebooted - opens:.0f} s after the window opened")
        assert opens - 3 <= rebooted <= opens + 120  # not before the window (host and guest share the clock)
        await confirm_on_b(machine, srv)
    finally:
        await machine.close()
        await srv.stop()
    assert srv.event_codes() == ["13/1", "14/1", "3/1", "3/2"]
    check_grubenv(machine, tmp_path, {"a": "good", "b": "good"})
