"""``org.omaha_agent.Agent1``: status as properties and a signal, and the methods people and UIs call.

No ``from __future__ import annotations`` here: dbus-next reads the D-Bus signatures from the annotations."""

from dbus_next import PropertyAccess
from dbus_next.errors import DBusError
from dbus_next.service import ServiceInterface, dbus_property, method, signal

from ..machine import (
    Apply, Cancel, Check, ConfirmBoot, InstallFile, MarkGood, PostponeReboot, Reboot, Refuse, Rollback,
)
from ..owner import Failed
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
        if values["RebootTime"] and {"RebootTime", "RebootVersion"} & changed.keys():
            self.RebootScheduled()  # a UI warns its user from this: which version, and when

    @signal()
    def RebootScheduled(self) -> "sx":
        """A reboot into an installed update is planned (or moved): the version, and when (Unix seconds)."""
        return [self._sent.get("RebootVersion", ""), self._sent.get("RebootTime", 0)]

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
    def PlannedBytes(self) -> "t":
        return self._get("PlannedBytes")

    @dbus_property(access=PropertyAccess.READ)
    def SavedBytes(self) -> "t":
        return self._get("SavedBytes")

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

    @dbus_property(access=PropertyAccess.READ)
    def RebootVersion(self) -> "s":
        return self._get("RebootVersion")

    @dbus_property(access=PropertyAccess.READ)
    def RebootTime(self) -> "x":
        """When the planned reboot is due (Unix seconds); 0 when none is planned."""
        return self._get("RebootTime")

    @dbus_property(access=PropertyAccess.READ)
    def RebootWaitingFor(self) -> "s":
        """What the planned reboot waits for: its time, the maintenance window, a shutdown inhibitor (who holds
        it and why), the fleet lock (the server's answer); "" once it is asked of logind."""
        return self._get("RebootWaitingFor")

    # -------------------------------------------------------------- methods
    @method()
    def GetStatus(self) -> "a{sv}":
        return convert.status_dict(self.agent.snapshot())

    @method()
    async def CheckForUpdate(self, interactive: "b") -> "b":
        """Starts a check and returns at once: true if it started, false if one is already running or an
        installed update waits for a reboot; an error when the agent cannot check now (a trial boot)."""
        reply = await answer(self.agent, Check(bool(interactive)))
        return reply.acted

    @method()
    async def Install(self, path: "s", signature: "s", version: "s") -> "s":
        """An offline install of a payload file the service can read; ``signature`` "" means ``path`` + ".sig";
        ``version`` only when signatures are not required. Returns at once; follow Operation for the rest."""
        return (await answer(self.agent, InstallFile(path, signature, version))).message

    @method()
    async def Cancel(self) -> "s":
        return (await answer(self.agent, Cancel())).message

    @method()
    async def MarkGood(self) -> "s":
        return (await answer(self.agent, MarkGood())).message

    @method()
    async def Reboot(self) -> "s":
        return (await answer(self.agent, Reboot())).message

    @method()
    async def PostponeReboot(self, seconds: "u") -> "s":
        """Moves the planned reboot ``seconds`` later (at most reboot.max_postpone past its first planned time)."""
        return (await answer(self.agent, PostponeReboot(int(seconds)))).message

    @method()
    async def Rollback(self) -> "s":
        """Arms the older system on the other slot for a trial boot and plans the reboot by reboot.policy; an
        error (``Error.NoRollback``, ``Error.Busy``) says why when there is nothing to roll back to now."""
        return (await answer(self.agent, Rollback())).message

    @method()
    async def Apply(self) -> "s":
        """Arms the staged update (install.arm: on-apply or in-window) and plans the reboot by reboot.policy; an
        error (``Error.NothingToApply``, ``Error.Busy``, ``Error.Failed`` for bytes that changed) says why not."""
        return (await answer(self.agent, Apply())).message

    @method()
    async def ConfirmBoot(self) -> "s":
        """Sent by omaha-agent-confirm.service once boot-complete.target is reached."""
        return (await answer(self.agent, ConfirmBoot())).message


async def answer(agent, command):
    """The owner's answer to ``command``; a refusal or a failure becomes a D-Bus error with its reason."""
    reply = await agent.submit(command)
    if isinstance(reply.result, Refuse):
        raise DBusError(f"{ERROR}.{reply.result.kind}", reply.message)
    if isinstance(reply.result, Failed):
        raise DBusError(f"{ERROR}.Failed", reply.message)
    return reply
