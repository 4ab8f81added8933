#!/usr/bin/env python3
"""A minimal device UI for omaha-agent, to copy into your own: follows StatusChanged, offers "Update now",
shows the download's progress, offers "Restart" once an update waits for a reboot, and counts down to a planned
reboot with a "later" key (PostponeReboot).

It talks to org.omaha_agent.Agent1 on the system bus with dbus-next (python3-dbus-next on Debian). A real UI
draws buttons where this one reads a line from the terminal. Run it as root or as a member of group
omaha-agent (everyone may watch; only they may act).
"""
import asyncio
import sys
import time

from dbus_next import BusType
from dbus_next.aio import MessageBus

NAME, PATH = "org.omaha_agent.Agent1", "/org/omaha_agent/Agent1"


def describe(status: dict) -> str:
    """One line for the screen, from the a{sv} status (values are Variants)."""
    op = status["operation"].value
    new = status["new_version"].value
    if op == "downloading":
        done, total = status["bytes_downloaded"].value, status["new_size"].value
        bar = "#" * int(status["progress"].value * 20)
        return f"Downloading {new}: [{bar:<20}] {done >> 20}/{total >> 20} MiB"
    if op == "reboot-pending":
        left = max(0, status["reboot_time"].value - int(time.time()))
        when = f"in {left // 60}:{left % 60:02d}" if left < 3600 else time.strftime(
            "at %a %H:%M", time.localtime(status["reboot_time"].value))
        return (f"Restarting into {status['reboot_version'].value} {when} (waiting for "
                f"{status['reboot_waiting_for'].value or 'the restart'}). 'l': later (1 h), 'r': now.")
    if op == "updated-need-reboot":
        return f"Version {new} is ready. Type 'r' to restart now."
    if op == "idle":
        error = status["last_error"].value
        return f"Up to date: {status['current_version'].value}" + (f" (last try failed: {error})" if error else "") \
            + ". Type 'u' to check for an update now."
    return f"{op.replace('-', ' ').capitalize()} {new}".strip()


async def main() -> int:
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    introspection = await bus.introspect(NAME, PATH)
    agent = bus.get_proxy_object(NAME, PATH, introspection).get_interface(NAME)

    def show(status: dict) -> None:
        print("\r\033[K" + describe(status), end="", flush=True)

    latest = {"status": await agent.call_get_status()}

    def changed(status: dict) -> None:
        latest["status"] = status
        show(status)

    agent.on_status_changed(changed)  # the signal StatusChanged(a{sv}), sent at most a few times a second
    show(latest["status"])

    async def tick() -> None:  # the countdown moves every second without a signal
        while True:
            await asyncio.sleep(1)
            if latest["status"]["operation"].value == "reboot-pending":
                show(latest["status"])

    ticker = asyncio.create_task(tick())

    loop = asyncio.get_running_loop()
    keys: asyncio.Queue = asyncio.Queue()
    loop.add_reader(sys.stdin, lambda: keys.put_nowait(sys.stdin.readline()))
    while True:
        line = await keys.get()
        if not line:  # end of input
            break
        key = line.strip()
        try:
            if key == "u":
                await agent.call_check_for_update(True)  # interactive: the server sees a user asking
            elif key == "r":
                print("\n" + await agent.call_reboot())
            elif key == "l":
                print("\n" + await agent.call_postpone_reboot(3600))
            elif key == "q":
                break
        except Exception as exc:  # e.g. AccessDenied, or Reboot when no update waits
            print(f"\n{exc}")
    ticker.cancel()
    bus.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
