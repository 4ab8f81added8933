"""The command-line client's side of the bus: calls on org.omaha_agent.Agent1 and its StatusChanged signal."""
from __future__ import annotations

import asyncio

from dbus_next import BusType, Message, MessageType
from dbus_next.aio import MessageBus

from . import convert
from .agent1 import NAME, PATH

_DENIED = ("org.freedesktop.DBus.Error.AccessDenied",)
_ABSENT = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner",
           "org.freedesktop.DBus.Error.Spawn.ServiceNotFound", "org.freedesktop.DBus.Error.NoReply")


class ClientError(Exception):
    """One line for the user; the CLI prints it and exits non-zero."""


STOPPED = "omaha-agent stopped (it left the system bus); see: journalctl -u omaha-agent"


class Client:
    def __init__(self, bus: MessageBus):
        self.bus = bus
        self.signals: asyncio.Queue = asyncio.Queue(maxsize=1000)
        self.gone = asyncio.Event()  # the agent left the bus (its signals end)

    @classmethod
    async def connect(cls) -> "Client":
        try:
            bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        except (OSError, EOFError) as exc:
            raise ClientError(f"cannot reach the system bus ({exc}); is dbus running?") from None
        return cls(bus)

    async def call(self, member: str, signature: str = "", body=(), timeout: float = 10):
        msg = Message(destination=NAME, path=PATH, interface=NAME, member=member, signature=signature,
                      body=list(body))
        try:
            reply = await asyncio.wait_for(self.bus.call(msg), timeout)
        except asyncio.TimeoutError:
            raise ClientError(f"omaha-agent did not answer {member} within {timeout:.0f} s") from None
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else reply.error_name
            if reply.error_name in _ABSENT:
                raise ClientError("omaha-agent is not running (nobody owns org.omaha_agent.Agent1 on the system "
                                  "bus); start it with: systemctl start omaha-agent")
            if reply.error_name in _DENIED:
                raise ClientError(f"not allowed to call {member}: run it as root or as a member of group "
                                  f"omaha-agent")
            raise ClientError(text)
        return convert.unwrap(reply.body[0]) if reply.body else None

    async def status(self) -> dict:
        return await self.call("GetStatus")

    async def subscribe(self) -> None:
        """StatusChanged signals go to ``self.signals`` from now on, and the agent leaving the bus (stopped,
        crashed, restarted) ends them."""
        def handler(msg: Message):
            if msg.message_type != MessageType.SIGNAL:
                return
            if msg.member == "StatusChanged" and msg.path == PATH:
                if not self.signals.full():
                    self.signals.put_nowait(convert.unwrap(msg.body[0]))
            elif (msg.member == "NameOwnerChanged" and msg.sender == "org.freedesktop.DBus"
                  and msg.body[:1] == [NAME] and not msg.body[2]):
                self.gone.set()

        self.bus.add_message_handler(handler)  # before the matches: nothing they let through is missed
        for rule in (f"type='signal',sender='{NAME}',path='{PATH}',interface='{NAME}',member='StatusChanged'",
                     "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
                     f"member='NameOwnerChanged',arg0='{NAME}'"):
            reply = await self.bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                                interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                                                body=[rule]))
            if reply.message_type == MessageType.ERROR:
                raise ClientError(f"cannot subscribe to status signals: {reply.body[0] if reply.body else ''}")

    async def next_status(self, timeout: float) -> dict | None:
        """The next status signal; None when ``timeout`` passed without one; ClientError once the agent left
        (after the signals it sent before)."""
        if self.signals.empty() and self.gone.is_set():
            raise ClientError(STOPPED)
        get, gone = asyncio.ensure_future(self.signals.get()), asyncio.ensure_future(self.gone.wait())
        try:
            await asyncio.wait((get, gone), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (get, gone):
                task.cancel()
        if get.done() and not get.cancelled():
            return get.result()
        if gone.done() and not gone.cancelled():
            raise ClientError(STOPPED)
        return None

    def close(self) -> None:
        self.bus.disconnect()
