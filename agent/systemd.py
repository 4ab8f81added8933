"""sd_notify without libsystemd: READY=1, STATUS=, and the watchdog keep-alive sent from the event loop.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op, so the daemon runs the same way by hand.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger("omaha-agent")


class Notifier:
    def __init__(self, environ=os.environ):
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self.address = address if address.startswith(("/", "\0")) else ""
        self.watchdog_usec = 0
        if environ.get("WATCHDOG_USEC", "").isdigit() and environ.get("WATCHDOG_PID", str(os.getpid())) == str(
                os.getpid()):
            self.watchdog_usec = int(environ["WATCHDOG_USEC"])
        self._sock: socket.socket | None = None
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        if not self.address:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except BlockingIOError:  # the receiver is behind: drop this one rather than stall the event loop
            log.debug("sd_notify: the notify socket is full; dropped %s", fields[0])
            return False
        except OSError as exc:  # systemd went away or the socket is not ours: never fatal
            log.debug("sd_notify failed: %s", exc)
            return False

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    async def watchdog(self) -> None:
        """Pings at half the watchdog period. It runs on the event loop, so a blocked loop misses its ping and
        systemd restarts the daemon: exactly the failure the watchdog is meant to catch."""
        if not self.watchdog_usec:
            return
        period = self.watchdog_usec / 1e6 / 2
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(period)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_line(snapshot: dict) -> str:
    """The one-line STATUS= text ``systemctl status`` shows."""
    op = snapshot["operation"]
    if op == "downloading":
        return f"downloading {snapshot['new_version']}: {snapshot['progress'] * 100:.0f}%"
    if op == "updated-need-reboot":
        return f"{snapshot['new_version']} installed, waiting for a reboot"
    if op == "reboot-pending":
        return f"{snapshot['new_version']} installed, reboot waits for {snapshot.get('reboot_waiting_for') or 'logind'}"
    if snapshot.get("waiting_for_boot_complete"):
        return f"running {snapshot['current_version']} on trial, waiting for boot-complete.target"
    if op in ("idle",):
        return f"idle, running {snapshot['current_version']}" + (
            f" (last error: {snapshot['last_error']})" if snapshot.get("last_error") else "")
    return f"{op} ({snapshot['current_version']} -> {snapshot['new_version']})" if snapshot["new_version"] else op
