"""The agent on the system bus: ``org.omaha_agent.Agent1`` and, optionally, Flatcar's ``com.coreos.update1``.

The only package that imports dbus-next (besides logind.py). It observes the runner through ``Agent.listeners``
and forwards method calls to it; the engine knows nothing of D-Bus. The bus is the system bus, or the one in
``DBUS_SYSTEM_BUS_ADDRESS`` when set (tests run a private one). The connection is guarded against its callers
(``guard.py``); if it ends all the same, ``on_lost`` is told why (the service exits for systemd to restart it).
"""
from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("omaha-agent")

MIN_INTERVAL = 0.25  # at most 4 status signals a second while a download runs


class DbusUnavailable(Exception):
    pass


class Service:
    def __init__(self, agent, bus, interfaces, on_lost=None):
        self.agent = agent
        self.bus = bus
        self.interfaces = interfaces
        self._loop = asyncio.get_running_loop()
        self._watch = asyncio.ensure_future(self._watch_connection(on_lost))
        self._latest: dict | None = None
        self._operation = None
        self._reboot = None  # the planned reboot's time: a change goes out at once (RebootScheduled), never merged
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        agent.listeners.append(self.on_status)

    async def _watch_connection(self, on_lost) -> None:
        """The connection ended without ``close()``: log it and say so (never stay on the bus deaf)."""
        try:
            await self.bus.wait_for_disconnect()
            reason = "the bus daemon closed the connection"
        except Exception as exc:  # noqa: BLE001 - whatever ended it, the reason is logged
            reason = str(exc) or type(exc).__name__
        if self.bus._user_disconnect:
            return
        log.error("D-Bus: lost the connection to the system bus: %s", reason)
        if on_lost is not None:
            on_lost(f"lost the connection to the system bus: {reason}")

    def on_status(self, snapshot: dict) -> None:
        """Operation and reboot-plan changes go out at once; progress at most every MIN_INTERVAL, and the last one
        always."""
        self._latest = snapshot
        now = self._loop.time()
        if (snapshot["operation"] != self._operation or snapshot.get("reboot_time") != self._reboot
                or now - self._last >= MIN_INTERVAL):
            self._flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(MIN_INTERVAL - (now - self._last), self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        snapshot, self._last = self._latest, self._loop.time()
        if snapshot is None or not self.bus.connected:
            return
        self._operation, self._reboot = snapshot["operation"], snapshot.get("reboot_time")
        for interface in self.interfaces:
            try:
                interface.publish(snapshot)
            except Exception:  # a signal that cannot be sent never stops an update
                log.exception("D-Bus: could not publish the status")

    def close(self) -> None:
        if self.on_status in self.agent.listeners:
            self.agent.listeners.remove(self.on_status)
        if self._timer is not None:
            self._timer.cancel()
        self._watch.cancel()
        self.bus.disconnect()


def _bus_class():
    """The guarded bus (``guard.py``), answering an error raised by an ``async`` method without also logging it
    as an unhandled exception: dbus-next's reply context manager sends the error but does not swallow it."""
    from dbus_next import Message
    from dbus_next.service import ServiceInterface

    from .guard import GuardedBus

    class Bus(GuardedBus):
        def _make_method_handler(self, interface, method):
            if not asyncio.iscoroutinefunction(method.fn):
                return super()._make_method_handler(interface, method)

            def handler(msg, send_reply):
                def done(fut):
                    try:
                        result = fut.result()
                    except Exception as exc:  # a DBusError becomes its error reply, anything else a service error
                        send_reply.send_error(exc)
                        return
                    body, fds = ServiceInterface._fn_result_to_body(result, method.out_signature_tree)
                    send_reply(Message.new_method_return(msg, method.out_signature, body, fds))

                fut = asyncio.ensure_future(method.fn(interface, *ServiceInterface._msg_body_to_args(msg)))
                fut.add_done_callback(done)

            return handler

    return Bus


async def publish(agent, flatcar_compat: bool = False, on_lost=None) -> Service:
    """Connects, exports the objects, then owns the names (so a caller never sees a name without objects);
    ``on_lost(reason)`` is called if the connection ends before ``Service.close()``."""
    from dbus_next import BusType, NameFlag, RequestNameReply
    from dbus_next.errors import DBusError

    from . import agent1, flatcar

    try:
        bus = await _bus_class()(bus_type=BusType.SYSTEM).connect()
    except (OSError, DBusError, EOFError) as exc:
        raise DbusUnavailable(f"cannot connect to the system bus: {exc} (is dbus running? set dbus.enabled: "
                              f"false to run without it)") from None
    interfaces = [agent1.Agent1(agent)]
    bus.export(agent1.PATH, interfaces[0])
    names = [agent1.NAME]
    if flatcar_compat:
        interfaces.append(flatcar.Manager(agent))
        bus.export(flatcar.PATH, interfaces[1])
        names.append(flatcar.NAME)
    for name in names:
        try:
            reply = await bus.request_name(name, NameFlag.DO_NOT_QUEUE)
        except DBusError as exc:
            bus.disconnect()
            raise DbusUnavailable(f"the bus refused us the name {name}: {exc.text} (install "
                                  f"config/dbus/{agent1.NAME}.conf into /usr/share/dbus-1/system.d/)") from None
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            bus.disconnect()
            raise DbusUnavailable(f"{name} is already owned on the bus: another agent is running")
    service = Service(agent, bus, interfaces, on_lost)
    service.on_status(agent.snapshot())  # Flatcar's daemon also announces its status once at start-up
    return service
