"""Flatcar's update_engine interface (``com.coreos.update1.Manager``), so locksmith, the Flatcar Linux Update
Operator and update_engine_client-style scripts work unchanged. Same signatures, same status strings.

Each method is a command of the state machine (``COMMANDS``); a refusal or a failure is a D-Bus error named as
the project's own (``org.omaha_agent.Agent1.Error.<kind>``), an act or a no-op (a check already runs, like
update_engine) returns without one."""

from dbus_next.errors import DBusError
from dbus_next.service import ServiceInterface, method, signal

from ..machine import Check, NoOp, Refuse, Reset
from .agent1 import ERROR

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
    "staged": "UPDATE_STATUS_IDLE",  # Flatcar has no staged state: nothing waits for a reboot yet
}


COMMANDS = {"AttemptUpdate": Check(True), "ResetStatus": Reset()}


def error_for(reply) -> tuple[str, str] | None:
    """The D-Bus error (name, message) a Flatcar method answers with, or None (it acted, or had nothing to do)."""
    if isinstance(reply.result, Refuse):
        return f"{ERROR}.{reply.result.kind}", reply.message
    if isinstance(reply.result, NoOp) or reply.acted:
        return None
    return f"{ERROR}.Failed", reply.message


async def _call(agent, member: str) -> None:
    error = error_for(await agent.submit(COMMANDS[member]))
    if error is not None:
        raise DBusError(*error)


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
        await _call(self.agent, "AttemptUpdate")

    @method()
    async def ResetStatus(self):
        await _call(self.agent, "ResetStatus")

    @method()
    def GetStatus(self) -> "xdssx":
        return status_tuple(self.agent.snapshot())
