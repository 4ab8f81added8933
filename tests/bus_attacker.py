"""A hostile local client of the system bus, written with the standard library only so that user ``nobody`` can
run it from a world-readable copy (``python3 bus_attacker.py ADDRESS ATTACK [ARGS]``). It marshals messages by
hand, so it can send what no D-Bus library would: calls it never reads the replies of, bodies of the wrong
signature, 30 MiB unicast signals. Prints one JSON line: what it did and what it got back."""
import json
import os
import socket
import struct
import sys
import time

METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
NAME, PATH = "org.omaha_agent.Agent1", "/org/omaha_agent/Agent1"


def _pad(n: int, align: int) -> bytes:
    return b"\0" * ((-n) % align)


def message(mtype: int, serial: int, fields: list, body: bytes = b"", signature: str = "", flags: int = 0) -> bytes:
    """One little-endian message; ``fields`` are (code, value) with the value's type fixed by the code."""
    if signature:
        fields = [*fields, (8, signature)]
    buf = bytearray(struct.pack("<cBBBIII", b"l", mtype, flags, 1, len(body), serial, 0))
    for code, value in fields:
        buf += _pad(len(buf), 8)
        sig = {1: "o", 2: "s", 3: "s", 4: "s", 5: "u", 6: "s", 7: "s", 8: "g"}[code]
        buf += bytes([code, 1]) + sig.encode() + b"\0"
        if sig in "os":
            raw = value.encode()
            buf += _pad(len(buf), 4) + struct.pack("<I", len(raw)) + raw + b"\0"
        elif sig == "g":
            raw = value.encode()
            buf += bytes([len(raw)]) + raw + b"\0"
        else:
            buf += _pad(len(buf), 4) + struct.pack("<I", value)
    struct.pack_into("<I", buf, 12, len(buf) - 16)
    buf += _pad(len(buf), 8)
    return bytes(buf) + body


def big_array(element: str, size: int) -> bytes:
    """A body of signature ``a<element>`` about ``size`` bytes long: ``av`` of bytes (4 bytes each on the wire,
    a Python object each when decoded) or ``ai``."""
    item = b"\x01y\x00\x07" if element == "v" else struct.pack("<i", 7)
    count = size // len(item)
    return struct.pack("<I", count * len(item)) + item * count


class Raw:
    def __init__(self, address: str):
        path = address.split("unix:path=", 1)[1].split(",", 1)[0]
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
        line = b""
        while not line.endswith(b"\r\n"):
            line += self.sock.recv(1)
        if not line.startswith(b"OK"):
            raise SystemExit(f"authentication refused: {line!r}")
        self.sock.sendall(b"BEGIN\r\n")
        self.serial = 0
        self.unique = self.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello")[1]

    def next_serial(self) -> int:
        self.serial += 1
        return self.serial

    def call_bytes(self, dest, path, interface, member, body=b"", signature="") -> bytes:
        return message(METHOD_CALL, self.next_serial(), [(1, path), (2, interface), (3, member), (6, dest)], body,
                       signature)

    def call(self, dest, path, interface, member, body=b"", signature=""):
        """Sends a call and reads until its reply: (error name or "", first string of the body or "")."""
        self.sock.sendall(self.call_bytes(dest, path, interface, member, body, signature))
        serial = self.serial
        while True:
            mtype, fields, body = self.read()
            if mtype in (METHOD_RETURN, ERROR) and fields.get(5) == serial:
                text = ""
                if body[:4] and fields.get(8, "").startswith("s"):
                    text = body[4:4 + struct.unpack_from("<I", body)[0]].decode(errors="replace")
                return (fields.get(4, "") if mtype == ERROR else ""), text

    def _exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(min(n - len(out), 1 << 20))
            if not chunk:
                raise EOFError("the bus closed the connection")
            out += chunk
        return bytes(out)

    def read(self):
        head = self._exactly(16)
        _, mtype, _, _, body_len, _, fields_len = struct.unpack("<cBBBIII", head)
        rest = self._exactly(fields_len + (-fields_len) % 8 + body_len)
        raw, fields, at = head + rest, {}, 16
        while at < 16 + fields_len:
            at += (-at) % 8
            code, sig_len = raw[at], raw[at + 1]
            sig = raw[at + 2:at + 2 + sig_len].decode()
            at += 3 + sig_len
            if sig in "os":
                at += (-at) % 4
                n = struct.unpack_from("<I", raw, at)[0]
                fields[code] = raw[at + 4:at + 4 + n].decode()
                at += 5 + n
            elif sig == "g":
                n = raw[at]
                fields[code] = raw[at + 1:at + 1 + n].decode()
                at += 2 + n
            else:
                at += (-at) % 4
                fields[code] = struct.unpack_from("<I", raw, at)[0]
                at += 4
        return mtype, fields, rest[fields_len + (-fields_len) % 8:]


def flood(address: str, connections: int, calls: int, hold: float) -> dict:
    """``calls`` GetStatus calls back to back on each of ``connections`` connections, never reading a reply;
    the connections stay open ``hold`` seconds (the replies pile up), then close."""
    conns = [Raw(address) for _ in range(connections)]
    sent = 0
    for conn in conns:
        conn.sock.setblocking(False)
    for conn in conns:
        data = b"".join(conn.call_bytes(NAME, PATH, NAME, "GetStatus") for _ in range(calls))
        view = memoryview(data)
        deadline = time.monotonic() + 30
        while view and time.monotonic() < deadline:
            try:
                view = view[conn.sock.send(view):]
            except BlockingIOError:
                time.sleep(0.001)
        sent += calls if not view else 0
    time.sleep(hold)
    for conn in conns:
        conn.sock.close()
    return {"attack": "flood", "connections": connections, "calls_sent": sent}


def big_call(address: str, element: str, size: int) -> dict:
    """One GetStatus call with a ``size``-byte body of signature ``a<element>``; returns the answer."""
    conn = Raw(address)
    started = time.monotonic()
    error, text = conn.call(NAME, PATH, NAME, "GetStatus", big_array(element, size), "a" + element)
    return {"attack": "big_call", "bytes": size, "error": error, "text": text[:200],
            "seconds": round(time.monotonic() - started, 3)}


def big_install(address: str, size: int) -> dict:
    """An Install call of the right signature ("sss") whose path is ``size`` bytes long."""
    conn = Raw(address)
    path = struct.pack("<I", size) + b"/" * size + b"\0"
    body = path + _pad(len(path), 4) + struct.pack("<I", 0) + b"\0\0\0\0" + struct.pack("<I", 0) + b"\0"
    error, text = conn.call(NAME, PATH, NAME, "Install", body, "sss")
    return {"attack": "big_install", "bytes": size, "error": error, "text": text[:200]}


def signals(address: str, count: int, size: int) -> dict:
    """``count`` unicast signals of ``size`` bytes (``ai``) to the agent's unique name, then a Ping to the agent
    that is answered only once the agent read past them."""
    conn = Raw(address)
    error, owner = conn.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                             "GetNameOwner", struct.pack("<I", len(NAME)) + NAME.encode() + b"\0", "s")
    if error:
        raise SystemExit(f"GetNameOwner: {error}")
    for _ in range(count):
        conn.sock.sendall(message(SIGNAL, conn.next_serial(), [(1, "/x"), (2, "x.y"), (3, "Z"), (6, owner)],
                                  big_array("i", size), "ai"))
    started = time.monotonic()
    error, _ = conn.call(NAME, PATH, "org.freedesktop.DBus.Peer", "Ping")
    return {"attack": "signals", "count": count, "bytes": size, "ping_error": error,
            "ping_seconds": round(time.monotonic() - started, 3)}


if __name__ == "__main__":
    address, attack, *args = sys.argv[1:]
    if attack == "flood":
        result = flood(address, int(args[0]), int(args[1]), float(args[2]))
    elif attack == "big_call":
        result = big_call(address, args[0], int(args[1]))
    elif attack == "big_install":
        result = big_install(address, int(args[0]))
    else:
        result = signals(address, int(args[0]), int(args[1]))
    print(json.dumps(result))
