"""systemd-logind on the system bus (org.freedesktop.login1.Manager): reboot, read the inhibitor locks, and hold a
``delay`` lock on shutdown while the agent writes a slot or the bootloader's state."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .text import clean

log = logging.getLogger("omaha-agent")

LOGIN1, PATH, MANAGER = "org.freedesktop.login1", "/org/freedesktop/login1", "org.freedesktop.login1.Manager"
TIMEOUT = 25.0  # seconds: D-Bus's own default for a method call


class LogindError(Exception):
    pass


@dataclass(frozen=True)
class Inhibitor:
    what: str  # colon-separated: shutdown, sleep, idle, ...
    who: str
    why: str
    mode: str  # block | delay
    uid: int
    pid: int

    def __str__(self) -> str:
        return f"{self.who} (pid {self.pid}: {self.why})"


async def _call(member: str, signature: str = "", body: tuple = (), fds: bool = False):
    import asyncio

    from dbus_next import BusType, Message, MessageType
    from dbus_next.aio import MessageBus

    try:
        bus = await asyncio.wait_for(MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=fds).connect(), TIMEOUT)
    except Exception as exc:  # no bus, or the bus refused us: the caller decides what that means
        raise LogindError(f"cannot reach the system bus: {exc or type(exc).__name__}") from None
    try:
        reply = await asyncio.wait_for(bus.call(Message(destination=LOGIN1, path=PATH, interface=MANAGER,
                                                        member=member, signature=signature, body=list(body))),
                                       TIMEOUT)
    except asyncio.TimeoutError:
        raise LogindError(f"logind did not answer {member} within {TIMEOUT:g} s") from None
    finally:
        bus.disconnect()
    if reply.message_type == MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        raise LogindError(f"logind {member}: {clean(reply.error_name, 100)}{': ' + clean(text, 200) if text else ''}")
    if not fds:
        return reply.body
    # an "h" in the body is an index into the descriptors that came with the message (dbus-next's low level)
    return [reply.unix_fds[value] if isinstance(value, int) and sig == "h" else value
            for value, sig in zip(reply.body, reply.signature)], reply.unix_fds


async def reboot() -> None:
    await _call("Reboot", "b", (False,))


async def inhibitors() -> list[Inhibitor]:
    """logind's inhibitor locks; their texts (set by whoever took them) cleaned (``text.clean``)."""
    return [inhibitor(row) for row in (await _call("ListInhibitors"))[0]]


def inhibitor(row) -> Inhibitor:
    """One row of ``ListInhibitors`` (``ssssuu``) as an ``Inhibitor``, its texts cleaned where they enter."""
    what, who, why, mode, uid, pid = row
    return Inhibitor(clean(what, 200), clean(who, 60), clean(why, 120), clean(mode, 20), uid, pid)


def blocking_shutdown(locks: list[Inhibitor], own_pid: int | None = None) -> list[Inhibitor]:
    """The ``block`` locks on shutdown that someone else holds: each holds a reboot back."""
    own = os.getpid() if own_pid is None else own_pid
    return [i for i in locks if i.mode == "block" and "shutdown" in i.what.split(":") and i.pid != own]


class DelayLock:
    """``async with DelayLock(why)``: a ``delay`` lock on shutdown for the block's duration, so a shutdown asked
    for meanwhile waits (up to logind's InhibitDelayMaxSec) for the current write and its checkpoint. Without
    logind the block runs unprotected (logged at debug level): a lock is a courtesy, never a precondition."""

    def __init__(self, why: str):
        self.why = why
        self.fd: int | None = None

    async def __aenter__(self):
        try:
            body, received = await _call("Inhibit", "ssss", ("shutdown", "omaha-agent", self.why, "delay"), fds=True)
        except LogindError as exc:
            log.debug("no shutdown delay lock: %s", exc)
            return self
        for fd in received:  # the lock's descriptor is ours to keep; anything else that came along is closed
            if fd != body[0]:
                os.close(fd)
        if isinstance(body[0], int) and body[0] in received:
            self.fd = body[0]
        return self

    async def __aexit__(self, *exc_info) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
