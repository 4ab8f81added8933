"""``org.omaha_agent.Agent1``: status as properties and a signal, and the methods people and UIs call.

No ``from __future__ import annotations`` here: dbus-next reads the D-Bus signatures from the annotations."""

from dbus_next import PropertyAccess
from dbus_next.errors import DBusError
from dbus_next.service import ServiceInterface, dbus_property, method, signal

from . import convert

NAME = "org.omaha_agent.Agent1"
PATH = "/org/omaha_agent/Agent1"
ERROR = "org.omaha_agent.Agent1.Error"


class Agent1(ServiceInterface):
    def __init__(self, agent):
        super().__init__(NAME)
        self.agent = agent
        self._sent: dict = {}
        self._status: dict = {}

    # -------------------------------------------------------------- publishing (called by the throttle)
    def publish(self, snapshot: dict) -> None:
        values = {name: convert.property_value(name, snapshot) for name in convert.PROPERTIES}
        changed = {k: v for k, v in values.items() if self._sent.get(k) != v}
        if changed:
            self._sent.update(changed)
            self.emit_properties_changed(changed, [])
        if changed or snapshot != self._status:
            self._status = snapshot
            self.StatusChanged()

    @signal()
    def StatusChanged(self) -> "a{sv}":
        return convert.status_dict(self._status or self.agent.snapshot())

    # -------------------------------------------------------------- properties
    def _get(self, name: str):
        return convert.property_value(name, self.agent.snapshot())

    @dbus_property(access=PropertyAccess.READ)
    def Operation(self) -> "s":
        return self._get("Operation")

    @dbus_property(access=PropertyAccess.READ)
    def Progress(self) -> "d":
        return self._get("Progress")

    @dbus_property(access=PropertyAccess.READ)
    def CurrentVersion(self) -> "s":
        return self._get("CurrentVersion")

    @dbus_property(access=PropertyAccess.READ)
    def NewVersion(self) -> "s":
        return self._get("NewVersion")

    @dbus_property(access=PropertyAccess.READ)
    def NewSize(self) -> "t":
        return self._get("NewSize")

    @dbus_property(access=PropertyAccess.READ)
    def BytesDownloaded(self) -> "t":
        return self._get("BytesDownloaded")

    @dbus_property(access=PropertyAccess.READ)
    def LastCheckTime(self) -> "x":
        return self._get("LastCheckTime")

    @dbus_property(access=PropertyAccess.READ)
    def NextCheckTime(self) -> "x":
        return self._get("NextCheckTime")

    @dbus_property(access=PropertyAccess.READ)
    def BootedSlot(self) -> "s":
        return self._get("BootedSlot")

    @dbus_property(access=PropertyAccess.READ)
    def LastError(self) -> "s":
        return self._get("LastError")

    @dbus_property(access=PropertyAccess.READ)
    def Slots(self) -> "a{sa{sv}}":
        return self._get("Slots")

    # -------------------------------------------------------------- methods
    @method()
    def GetStatus(self) -> "a{sv}":
        return convert.status_dict(self.agent.snapshot())

    @method()
    def CheckForUpdate(self, interactive: "b") -> "b":
        """Starts a check and returns at once: true if it started, false if one is already running."""
        return self.agent.request_check(bool(interactive))

    @method()
    def Cancel(self) -> "s":
        if not self.agent.cancel():
            raise DBusError(f"{ERROR}.NothingToCancel",
                            f"no download is running (the agent is {self.agent.flow.operation.value})")
        return "download cancelled; it resumes from its checkpoint on the next check"

    @method()
    async def MarkGood(self) -> "s":
        return await _call(self.agent.mark_good())

    @method()
    async def Reboot(self) -> "s":
        return await _call(self.agent.reboot_now())

    @method()
    def ConfirmBoot(self) -> "s":
        """Sent by omaha-agent-confirm.service once boot-complete.target is reached."""
        return self.agent.confirm_boot()


async def _call(coro):
    from ..boot import BootError
    from ..daemon import AgentError
    try:
        return await coro
    except (AgentError, BootError, OSError) as exc:
        raise DBusError(f"{ERROR}.Failed", str(exc)) from None
