"""NetworkManager on the system bus: is the default connection metered, and a wait until it is not.

NetworkManager's ``Metered`` property (org.freedesktop.NetworkManager) says it: ``NM_METERED_YES`` (1) and
``NM_METERED_GUESS_YES`` (3) are metered; anything else, no NetworkManager on the bus, or no bus at all is
unmetered (a device without NetworkManager is not held back). A change of the property (``PropertiesChanged``,
the standard signal or NetworkManager's own older one) wakes the wait; it also reads the property again every
``POLL`` seconds, in case a signal was missed. dbus-next is imported when a background download first asks.
"""
from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("omaha-agent")

NM, PATH = "org.freedesktop.NetworkManager", "/org/freedesktop/NetworkManager"
METERED = (1, 3)  # NM_METERED_YES, NM_METERED_GUESS_YES
TIMEOUT = 25.0  # seconds for one call
POLL = 300.0  # seconds between two reads while waiting, whatever the signals say


async def _metered(bus) -> bool:
    from dbus_next import Message, MessageType
    get = Message(destination=NM, path=PATH, interface="org.freedesktop.DBus.Properties", member="Get",
                  signature="ss", body=[NM, "Metered"])
    reply = await asyncio.wait_for(bus.call(get), TIMEOUT)
    if reply.message_type == MessageType.ERROR:
        return False  # (ServiceUnknown: no NetworkManager)
    value = reply.body[0].value if reply.body and hasattr(reply.body[0], "value") else None
    return isinstance(value, int) and value in METERED


async def _connect():
    from dbus_next import BusType
    from dbus_next.aio import MessageBus
    return await asyncio.wait_for(MessageBus(bus_type=BusType.SYSTEM).connect(), TIMEOUT)


async def metered() -> bool:
    """Whether NetworkManager says the default connection is metered (False without it)."""
    try:
        bus = await _connect()
    except Exception as exc:  # noqa: BLE001 - no system bus: nothing says the link is metered
        log.debug("no system bus for NetworkManager's Metered: %s", exc)
        return False
    try:
        return await _metered(bus)
    except (asyncio.TimeoutError, OSError, EOFError) as exc:
        log.debug("NetworkManager's Metered not read: %s", exc)
        return False
    finally:
        bus.disconnect()


async def wait_unmetered(on_wait, limit: float, clock, hurried: asyncio.Event | None = None) -> bool | None:
    """Returns at once (``False``) when the connection is not metered; else calls ``on_wait()`` (a coroutine
    function) and waits until NetworkManager says it is not (``True``), or ``hurried`` is set (``False``: an
    interactive check asked for the download), at most ``limit`` seconds of ``clock`` (the daemon's time seam)
    (``None``). Cancellable; the bus connection is closed on every way out."""
    try:
        bus = await _connect()
    except Exception as exc:  # noqa: BLE001
        log.debug("no system bus for NetworkManager's Metered: %s", exc)
        return False
    changed = asyncio.Event()
    hurried = hurried or asyncio.Event()
    relay = asyncio.ensure_future(_relay(hurried, changed))

    def handler(message) -> None:
        if message.path == PATH and message.member == "PropertiesChanged":
            changed.set()

    try:
        from dbus_next import Message
        bus.add_message_handler(handler)
        await asyncio.wait_for(bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
            member="AddMatch", signature="s", body=[f"type='signal',path='{PATH}',member='PropertiesChanged'"])),
            TIMEOUT)
        if not await _metered(bus):
            return False
        await on_wait()
        deadline = clock.now() + limit
        while (left := deadline - clock.now()) > 0:  # (bounded: each round sleeps, at most limit / POLL rounds)
            await clock.sleep(min(POLL, left), changed)
            changed.clear()  # (a change during the read below cuts the next sleep short)
            if hurried.is_set():
                return False
            if not await _metered(bus):
                return True
        return None
    except Exception as exc:  # noqa: BLE001 - a bus that went away, a malformed answer: never held back by it
        log.warning("NetworkManager's Metered could not be read (%s); the download goes ahead", exc)
        return False
    finally:
        relay.cancel()
        bus.disconnect()


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


WAITING = "waiting for an unmetered connection"


async def wait_for_unmetered(ctx, version: str, hurried: asyncio.Event | None = None) -> None:
    """The update job's gate before a background download (``install.on_metered: wait``): while NetworkManager
    says the connection is metered, ``LastError`` says the job waits, and the job waits (cancellable: Cancel
    ends it); at most ``schedule.interval``, then the job ends and the next check tries again."""
    from .errors import AttemptFailed
    state = ctx.state
    before = state.last_error

    async def waiting() -> None:
        state.last_error = (f"{WAITING}: the download of {version} starts when NetworkManager reports one "
                            "(install.on_metered: wait; CheckForUpdate downloads now)")
        log.info("%s", state.last_error)
        await ctx.save()
        ctx.status.notify()

    try:
        waited = await wait_unmetered(waiting, ctx.config.schedule.interval, ctx.clock, hurried)
    except BaseException:  # cancelled (Cancel, a stop): nothing waits any more
        if state.last_error.startswith(WAITING):
            state.last_error = before
            ctx.status.notify()
        raise
    if waited is None:
        state.last_error = (f"{WAITING}: still metered after {ctx.config.schedule.interval} s; the next check "
                            "tries again")
        await ctx.save()
        raise AttemptFailed(state.last_error)
    if waited or state.last_error.startswith(WAITING):
        log.info("the download of %s starts: %s", version, "the connection is not metered any more" if waited
                 else "an interactive check asked for it")
        state.last_error = before
        await ctx.save()
        ctx.status.notify()
