"""Rebooting through systemd-logind's D-Bus API (org.freedesktop.login1.Manager.Reboot)."""
from __future__ import annotations


async def reboot() -> None:
    from dbus_next import BusType
    from dbus_next.aio import MessageBus

    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        introspection = await bus.introspect("org.freedesktop.login1", "/org/freedesktop/login1")
        proxy = bus.get_proxy_object("org.freedesktop.login1", "/org/freedesktop/login1", introspection)
        manager = proxy.get_interface("org.freedesktop.login1.Manager")
        await manager.call_reboot(False)
    finally:
        bus.disconnect()
