"""The agent's connection to the bus, guarded against its callers (anyone may call GetStatus).

dbus-next 0.2.3 (Debian's python3-dbus-next; its fork dbus-fast 1.84, what Debian bookworm ships, behaves the
same) gives its connection up silently when the socket is momentarily full (EAGAIN in its writer), and decodes a
message's whole body before anyone looks at its signature or size. ``GuardedBus`` replaces both ends:

- the writer waits for the socket on EAGAIN and never gives up on it; replies (and unicast signals) are queued
  at most ``PEER_QUEUE`` bytes per destination and ``REPLY_QUEUE`` bytes in all: past that a reply is dropped,
  so a caller that does not read its replies costs only its own replies;
- the reader reads the fixed header and the header fields first and decides from them alone: a method call
  whose signature is not the method's, or whose body is larger than ``MAX_CALL_BODY``, is answered with an
  error and its body read past in small chunks, never kept or decoded; signals not from the bus daemon and
  replies nobody waits for are read past unread; each readable event reads at most ``READ_BUDGET`` bytes, so
  even a 32 MiB message never holds the event loop.
"""
from __future__ import annotations

import collections
import io
import logging
import struct

from dbus_next import Message, MessageFlag, MessageType
from dbus_next._private.unmarshaller import Unmarshaller
from dbus_next.aio import MessageBus
from dbus_next.errors import DBusError
from dbus_next.service import ServiceInterface

log = logging.getLogger("omaha-agent")

MAX_HEADER = 16 << 10  # header fields (path, names, signature): a few hundred bytes in practice
MAX_CALL_BODY = 64 << 10  # the largest call the agent takes: Install's three strings
MAX_REPLY_BODY = 1 << 20  # the bus daemon's answers to the agent's own calls
PEER_QUEUE = 256 << 10  # reply bytes queued for one destination before its next replies are dropped
REPLY_QUEUE = 4 << 20  # reply bytes queued in all
READ_BUDGET = 256 << 10  # bytes read per readable event
MESSAGE_BUDGET = 8  # messages handled per readable event (a GetStatus answer costs about 1 ms)
CHUNK = 64 << 10

BUS_DAEMON = "org.freedesktop.DBus"
STANDARD = {  # the interfaces dbus-next answers on every exported object, and their methods' signatures
    ("org.freedesktop.DBus.Properties", "Get"): "ss",
    ("org.freedesktop.DBus.Properties", "GetAll"): "s",
    ("org.freedesktop.DBus.Properties", "Set"): "ssv",
    ("org.freedesktop.DBus.Introspectable", "Introspect"): "",
    ("org.freedesktop.DBus.Peer", "Ping"): "",
    ("org.freedesktop.DBus.Peer", "GetMachineId"): "",
    ("org.freedesktop.DBus.ObjectManager", "GetManagedObjects"): "",
}
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
LIMITS = "org.freedesktop.DBus.Error.LimitsExceeded"
UNKNOWN = "org.freedesktop.DBus.Error.UnknownMethod"


class _Writer:
    """dbus-next's writer interface (``schedule_write``, ``buffer_message``, ``write_callback``), bounded and
    patient: EAGAIN means "wait until writable", only a real socket error ends the connection."""

    def __init__(self, bus: "GuardedBus"):
        self.bus, self.sock, self.loop, self.fd = bus, bus._sock, bus._loop, bus._fd
        self.queue: collections.deque = collections.deque()  # [remaining bytes, future, destination, is reply]
        self.per_peer: collections.Counter = collections.Counter()
        self.replies = 0  # reply bytes queued
        self.dropped = 0
        self.watching = False

    def buffer_message(self, msg: Message, future=None) -> None:
        data = msg._marshall(negotiate_unix_fd=False)
        reply = msg.message_type in (MessageType.METHOD_RETURN, MessageType.ERROR) or (
            msg.message_type == MessageType.SIGNAL and msg.destination is not None)
        if reply and self.per_peer[msg.destination] and (
                self.per_peer[msg.destination] + len(data) > PEER_QUEUE or self.replies + len(data) > REPLY_QUEUE):
            if self.dropped % 1000 == 0:
                log.warning("D-Bus: %s does not read its replies; dropping them (%d so far)", msg.destination,
                            self.dropped + 1)
            self.dropped += 1
            if future is not None and not future.done():
                future.set_result(None)
            return
        self.queue.append([memoryview(data), future, msg.destination, reply])
        if reply:
            self.per_peer[msg.destination] += len(data)
            self.replies += len(data)

    def schedule_write(self, msg: Message | None = None, future=None) -> None:
        if msg is not None:
            self.buffer_message(msg, future)
        if self.bus._disconnected:
            self.fail(EOFError("not connected to the bus"))
            return
        if self.bus.unique_name and self.queue and not self.watching and not self.bus._disconnected:
            self.loop.add_writer(self.fd, self.write_callback)
            self.watching = True

    def _account(self, entry, sent: int) -> None:
        if entry[3]:
            self.per_peer[entry[2]] -= sent
            self.replies -= sent
            if self.per_peer[entry[2]] <= 0:
                del self.per_peer[entry[2]]

    def write_callback(self) -> None:
        try:
            while self.queue:
                entry = self.queue[0]
                sent = self.sock.send(entry[0])
                self._account(entry, sent)
                entry[0] = entry[0][sent:]
                if len(entry[0]):
                    return  # the socket took part of it: the rest when it is writable again
                self.queue.popleft()
                if entry[1] is not None and not entry[1].done():
                    entry[1].set_result(None)
        except (BlockingIOError, InterruptedError):
            return  # full for now: the loop calls again once the bus daemon has read some
        except OSError as exc:
            self.fail(exc)
            self.bus._finalize(exc)
            return
        self.loop.remove_writer(self.fd)
        self.watching = False

    def fail(self, exc: Exception) -> None:
        """The connection ended: every message still queued fails with ``exc`` (a sender that awaits it sees
        the error; most never await a send, so it is marked retrieved rather than logged as unhandled)."""
        while self.queue:
            future = self.queue.popleft()[1]
            if future is not None and not future.done():
                future.set_exception(exc)
                future.exception()
        self.per_peer.clear()
        self.replies = 0


class _Reader:
    """Reads one message at a time: fixed header, header fields, then the body only if ``decide`` takes it."""

    def __init__(self, bus: "GuardedBus"):
        self.bus = bus
        self.buf = bytearray()
        self.need = 16  # bytes of the current part (fixed header, header, body)
        self.part = "fixed"
        self.skip = 0  # body bytes still to read past
        self.body_len = 0
        self.scratch = bytearray(CHUNK)
        self.header: bytes = b""
        self.head: Message | None = None
        self.discarded = 0

    def on_readable(self) -> None:
        budget, messages = READ_BUDGET, MESSAGE_BUDGET
        try:
            while budget > 0 and messages > 0:
                if self.skip:
                    n = self.bus._sock.recv_into(self.scratch, min(self.skip, CHUNK, budget))
                    if n == 0:
                        raise EOFError("the bus daemon closed the connection")
                    self.skip -= n
                    budget -= n
                    continue
                data = self.bus._sock.recv(min(self.need - len(self.buf), budget))
                if not data:
                    raise EOFError("the bus daemon closed the connection")
                self.buf += data
                budget -= len(data)
                if len(self.buf) == self.need:
                    messages -= self._advance()
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, EOFError, ValueError) as exc:
            self.bus._finalize(exc)

    def _advance(self) -> int:
        """A part is complete: go on to the next one; 1 when a message was finished."""
        if self.part == "fixed":
            if self.buf[0:1] not in (b"l", b"B") or self.buf[3] != 1:
                raise ValueError("the bus sent bytes that are no D-Bus message")
            order = "<" if self.buf[0:1] == b"l" else ">"
            self.body_len, fields_len = struct.unpack_from(order + "I", self.buf, 4)[0], \
                struct.unpack_from(order + "I", self.buf, 12)[0]
            header_len = 16 + fields_len + (-fields_len) % 8
            if fields_len > MAX_HEADER:
                return self._finish(skip=header_len - 16 + self.body_len)
            self.part, self.need = "header", header_len
            return 0
        if self.part == "header":
            self.header = bytes(self.buf)
            try:
                self.head = _decode(self.header, with_body=False)
            except Exception as exc:  # noqa: BLE001 - a header dbus-next cannot read: read past the message
                log.debug("D-Bus: dropped a message whose header could not be read: %s", exc)  # (a flood of them
                # must not flood the journal: the bus daemon checked the header, only unknown fields get here)
                return self._finish(skip=self.body_len)
            try:
                verdict = self.bus._decide(self.head, self.body_len)
                if verdict is not True and verdict is not None:
                    self.bus._refuse(self.head, *verdict)
            except Exception:  # noqa: BLE001 - whatever went wrong, the next message still starts in place
                log.exception("D-Bus: dropped a message that could not be judged")
                verdict = None
            if verdict is not True:
                return self._finish(skip=self.body_len)
            if self.body_len == 0:
                return self._deliver(self.header)
            self.part, self.need, self.buf = "body", self.body_len, bytearray()
            return 0
        return self._deliver(self.header + bytes(self.buf))

    def _deliver(self, raw: bytes) -> int:
        head = self.head
        self._finish(skip=0)
        try:
            msg = _decode(raw, with_body=True)
        except Exception as exc:  # noqa: BLE001 - a body that does not match its own signature
            if head.message_type == MessageType.METHOD_CALL:
                self.bus._refuse(head, INVALID_ARGS, f"the message could not be read: {exc}")
            return 1
        self.bus._on_message(msg)
        return 1

    def _finish(self, skip: int) -> int:
        if skip:
            self.discarded += 1
        self.skip, self.part, self.need, self.buf, self.head = skip, "fixed", 16, bytearray(), None
        return 1


def _decode(raw: bytes, with_body: bool) -> Message:
    """A complete message (header, or header and body) through dbus-next's own unmarshaller; without the body,
    the header's body length is read as 0 so only the header fields are decoded."""
    if not with_body:
        order = "<" if raw[0:1] == b"l" else ">"
        raw = raw[:4] + struct.pack(order + "I", 0) + raw[8:]
    msg = Unmarshaller(io.BytesIO(raw)).unmarshall()
    if msg is None:
        raise ValueError("incomplete message")
    return msg


class GuardedBus(MessageBus):
    def __init__(self, *args, **kwargs):
        kwargs["negotiate_unix_fd"] = False
        super().__init__(*args, **kwargs)
        self._writer = _Writer(self)
        self._reader = _Reader(self)

    def _message_reader(self) -> None:  # dbus-next registers this as the socket's reader in connect()
        self._reader.on_readable()

    def _signatures(self) -> dict:
        known = dict(STANDARD)
        for interfaces in self._path_exports.values():
            for interface in interfaces:
                for m in ServiceInterface._get_methods(interface):
                    if not m.disabled:
                        known[(interface.name, m.name)] = m.in_signature
        return known

    def _decide(self, head: Message, body_len: int):
        """True: read and handle it; None: read past it; (error name, text): read past it and answer that."""
        kind = head.message_type
        if kind == MessageType.METHOD_CALL:
            known = self._signatures()
            if head.interface:
                expected = [known[(head.interface, head.member)]] if (head.interface, head.member) in known else []
            else:
                expected = [sig for (_, member), sig in known.items() if member == head.member]
            name = f"{head.interface + '.' if head.interface else ''}{head.member}"
            if not expected:
                return UNKNOWN, f"no method {name} here"
            if head.signature not in expected:
                return INVALID_ARGS, f'{name} takes signature "{expected[0]}", not "{head.signature[:64]}"'
            if body_len > MAX_CALL_BODY:
                return LIMITS, f"{name}: a {body_len}-byte call is larger than the {MAX_CALL_BODY} bytes taken"
            return True
        if body_len > MAX_REPLY_BODY:
            if kind in (MessageType.METHOD_RETURN, MessageType.ERROR):
                handler = self._method_return_handlers.pop(head.reply_serial, None)
                if handler is not None:
                    handler(None, DBusError(LIMITS, f"a {body_len}-byte reply is larger than we take"))
            return None
        if kind == MessageType.SIGNAL:
            return True if head.sender == BUS_DAEMON else None  # nobody else's signals are subscribed to
        return True if head.reply_serial in self._method_return_handlers else None

    def _refuse(self, head: Message, error: str, text: str) -> None:
        if (head.message_type == MessageType.METHOD_CALL and head.sender
                and not head.flags & MessageFlag.NO_REPLY_EXPECTED):
            self.send(Message.new_error(head, error, text))

    def _finalize(self, err=None) -> None:
        super()._finalize(err)
        self._writer.fail(err or EOFError("disconnected"))

    @property
    def refused(self) -> int:
        """Messages read past unread (refused calls, foreign signals, unexpected replies)."""
        return self._reader.discarded
