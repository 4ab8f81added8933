"""Flatcar's update_engine interface (``com.coreos.update1.Manager``), so locksmith, the Flatcar Linux Update
Operator and update_engine_client-style scripts work unchanged. Same signatures, same status strings."""

from dbus_next.errors import DBusError
from dbus_next.service import ServiceInterface, method, signal

from ..machine import Act, Check, NoOp, Reset

NAME = "com.coreos.update1"
PATH = "/com/coreos/update1"
INTERFACE = "com.coreos.update1.Manager"

STATUS = {
    "idle": "UPDATE_STATUS_IDLE",
    "checking": "UPDATE_STATUS_CHECKING_FOR_UPDATE",
    "update-available": "UPDATE_STATUS_UPDATE_AVAILABLE",
    "downloading": "UPDATE_STATUS_DOWNLOADING",
    "verifying": "UPDATE_STATUS_VERIFYING",
    "finalizing": "UPDATE_STATUS_FINALIZING",
    "updated-need-reboot": "UPDATE_STATUS_UPDATED_NEED_REBOOT",
    "reboot-pending": "UPDATE_STATUS_UPDATED_NEED_REBOOT",
    "reporting-error": "UPDATE_STATUS_REPORTING_ERROR_EVENT",
}


def status_tuple(snapshot: dict) -> list:
    """(x last_checked_time, d progress, s current_operation, s new_version, x new_size)"""
    return [int(snapshot.get("last_check") or 0), float(snapshot.get("progress") or 0.0),
            STATUS.get(snapshot.get("operation", "idle"), "UPDATE_STATUS_IDLE"), str(snapshot.get("new_version") or ""),
            int(snapshot.get("new_size") or 0)]


class Manager(ServiceInterface):
    def __init__(self, agent):
        super().__init__(INTERFACE)
        self.agent = agent
        self._sent: list | None = None

    def publish(self, snapshot: dict) -> None:
        status = status_tuple(snapshot)
        if status != self._sent:
            self._sent = status
            self.StatusUpdate()

    @signal()
    def StatusUpdate(self) -> "xdssx":
        return self._sent or status_tuple(self.agent.snapshot())

    @method()
    async def AttemptUpdate(self):
        await self.agent.submit(Check(True))  # like update_engine: no error when a check already runs

    @method()
    async def ResetStatus(self):
        reply = await self.agent.submit(Reset())
        if not isinstance(reply.result, (Act, NoOp)):
            raise DBusError("com.coreos.update1.Error.Failed", reply.message)

    @method()
    def GetStatus(self) -> "xdssx":
        return status_tuple(self.agent.snapshot())
