"""The client commands (status, check, watch, mark-good, reboot, confirm-boot): the daemon's status over D-Bus,
rendered for a terminal or a log, every string in them with its control characters escaped. Only the daemon acts;
these commands ask it."""
from __future__ import annotations

import asyncio
import json
import sys
import time

from .text import clean, shown

SETTLED = ("idle", "updated-need-reboot", "reboot-pending", "staged")


def _when(ts: int, now: float) -> str:
    if not ts:
        return "never"
    delta = int(ts - now)
    rel = f"in {_span(delta)}" if delta >= 0 else f"{_span(-delta)} ago"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))} ({rel})"


def _span(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def render_status(s: dict, now: float) -> str:
    lines = [f"operation:      {s['operation']}" + (" (trial boot: waiting for boot-complete.target)"
                                                     if s.get("waiting_for_boot_complete") else ""),
             f"running:        {s['current_version']} on slot {s['booted_slot'] or '?'}"]
    if s.get("new_version"):
        size = s.get("new_size", 0)  # unknown (0) once the daemon restarted while an update waits
        lines.append(f"new version:    {s['new_version']}" + (f" ({_size(size)})" if size else ""))
        if s.get("saved_bytes"):
            lines.append(f"adaptive:       downloads {_size(s.get('planned_bytes', 0))}, saves "
                         f"{_size(s['saved_bytes'])}")
    if s["operation"] == "downloading":
        lines.append(f"downloaded:     {_size(s['bytes_downloaded'])} ({s['progress'] * 100:.0f}%, "
                     f"{_size(s.get('rate', 0))}/s)")
    if s.get("reboot_time"):
        waiting = s.get("reboot_waiting_for") or "nothing: asked of logind"
        lines.append(f"reboot:         into {s.get('reboot_version') or '?'} at {_when(s['reboot_time'], now)}; "
                     f"waiting for {waiting}")
    lines += [f"last check:     {_when(s.get('last_check', 0), now)}",
              f"next check:     {_when(s.get('next_check', 0), now)}",
              f"last error:     {s.get('last_error') or '-'}",
              f"pending events: {s.get('pending_events', 0)}",
              "slots:"]
    for name, slot in sorted((s.get("slots") or {}).items()):
        tries = f", {slot.get('tries_left', 0)} tries left" if slot.get("state") == "trial" else ""
        booted = "  (booted)" if name == s.get("booted_slot") else ""
        lines.append(f"  {name}  {slot.get('state', '?'):<6} {slot.get('version') or '-':<16}{tries}{booted}")
    return "\n".join(lines)


def progress_line(s: dict, width: int = 30) -> str:
    frac = min(1.0, max(0.0, s.get("progress", 0.0)))
    filled = int(frac * width)
    rate = s.get("rate", 0.0)
    left = (s.get("new_size", 0) - s.get("bytes_downloaded", 0)) / rate if rate > 0 else None
    eta = f"ETA {int(left) // 60}:{int(left) % 60:02d}" if left is not None else "ETA --:--"
    return (f"[{'#' * filled}{'-' * (width - filled)}] {frac * 100:5.1f}%  {_size(rate)}/s  {eta}  "
            f"{s.get('new_version', '')}")


class Printer:
    """A live progress bar on a terminal; otherwise one plain line per operation change or 10% of download."""

    def __init__(self, out=sys.stdout):
        self.out = out
        self.tty = out.isatty()
        self.last = (None, -1)
        self.bar = False

    def show(self, s: dict) -> None:
        op = s["operation"]
        tenth = int(s.get("progress", 0.0) * 10) if op == "downloading" else -1
        if self.tty and op == "downloading":
            self.out.write("\r" + progress_line(s))
            self.bar = True
        elif (op, tenth) != self.last:
            if self.bar:
                self.out.write("\n")
                self.bar = False
            text = op if op != "downloading" else f"downloading {s.get('new_version', '')}: {tenth * 10}%"
            if s.get("new_version") and op not in ("idle", "downloading"):
                text += f" ({s['new_version']})"
            self.out.write(text + "\n")
        self.out.flush()
        self.last = (op, tenth)

    def end(self) -> None:
        if self.bar:
            self.out.write("\n")
            self.bar = False


class _Shown:
    """A client whose answers have every string cleaned for a terminal (``text.shown``: control characters
    escaped): the daemon's status quotes servers, file names and logind's inhibitors."""

    def __init__(self, client):
        self.client = client

    async def status(self) -> dict:
        return shown(await self.client.status())

    async def next_status(self, timeout: float) -> dict | None:
        return shown(await self.client.next_status(timeout))

    async def call(self, *args, **kwargs):
        return shown(await self.client.call(*args, **kwargs))

    async def subscribe(self) -> None:
        await self.client.subscribe()

    def close(self) -> None:
        self.client.close()


async def _with_client(fn):
    from .dbus.client import Client
    client = _Shown(await Client.connect())
    try:
        return await fn(client)
    finally:
        client.close()


async def status(as_json: bool) -> int:
    s = await _with_client(lambda c: c.status())
    print(json.dumps(s, sort_keys=True) if as_json else render_status(s, time.time()))
    return 0


async def check(wait: bool, timeout: float) -> int:
    async def run(client) -> int:
        if not wait:
            started = await client.call("CheckForUpdate", "b", [True])
            print("check started" if started else "a check is already running")
            return 0
        await client.subscribe()
        await client.call("CheckForUpdate", "b", [True])  # (also while an update waits: a newer one replaces it)
        return await _follow(client, timeout, "check")
    return await _with_client(run)


async def install(path: str, signature: str, version: str, wait: bool, timeout: float) -> int:
    """An offline install: the daemon reads the file (it must be where the service can see it)."""
    import os

    async def run(client) -> int:
        if wait:
            await client.subscribe()
        print(await client.call("Install", "sss", [os.path.abspath(path), os.path.abspath(signature) if signature
                                                   else "", version]))
        return await _follow(client, timeout, "install") if wait else 0
    return await _with_client(run)


async def _follow(client, timeout: float, what: str) -> int:
    """Prints the status until the job settles; 0 when an update waits for its reboot or none was needed."""
    from .dbus.client import ClientError
    printer = Printer()
    s = await client.status()
    printer.show(s)
    left_idle = s["operation"] not in SETTLED
    deadline = time.monotonic() + timeout
    while not (left_idle and s["operation"] in SETTLED):
        remaining = deadline - time.monotonic()
        try:
            nxt = await client.next_status(min(remaining, 30)) if remaining > 0 else None
        except ClientError:  # the agent stopped: its error line starts on a line of its own
            printer.end()
            raise
        if nxt is None:
            if remaining <= 0:
                printer.end()
                print(f"gave up waiting after {timeout:.0f} s; the agent carries on (see: omaha-agent status)")
                return 1
            nxt = await client.status()  # a quiet check: poll so a lost signal cannot hang us
        s = nxt
        left_idle = left_idle or s["operation"] not in SETTLED
        printer.show(s)
    printer.end()
    if s["operation"] == "updated-need-reboot":
        print(f"{s['new_version']} is installed; it boots on trial after a reboot (omaha-agent reboot)")
        return 0
    if s["operation"] == "staged":
        print(f"{s['new_version']} is staged; omaha-agent apply arms it")
        return 0
    if s.get("last_error"):
        print(f"{what} failed: {s['last_error']}")
        return 1
    print(f"no update installed; running {s['current_version']}")
    return 0


async def watch(limit: float | None = None) -> int:
    async def run(client) -> int:
        await client.subscribe()
        printer = Printer()
        printer.show(await client.status())
        deadline = time.monotonic() + limit if limit else None
        try:
            while deadline is None or time.monotonic() < deadline:
                s = await client.next_status(5 if deadline is None else max(0.1, deadline - time.monotonic()))
                if s is not None:
                    printer.show(s)
        finally:  # (the agent stopped: its error line starts on a line of its own)
            printer.end()
        return 0
    return await _with_client(run)


async def simple(member: str, *args, timeout: float = 10) -> int:
    print(await _with_client(lambda c: c.call(member, *args, timeout=timeout)))
    return 0


def run(coro) -> int:
    from .dbus.client import ClientError
    try:
        return asyncio.run(coro)
    except ClientError as exc:
        print(f"omaha-agent: {clean(str(exc), 2000)}", file=sys.stderr)
        return 1
