"""A FleetLock client (the reboot-slot protocol of Zincati, Fedora CoreOS's update agent): ``POST
<base>/v1/pre-reboot`` takes a reboot slot of the device's group, ``POST <base>/v1/steady-state`` gives it back.

Both send the header ``fleet-lock-protocol: true`` and ``{"client_params": {"id": ID, "group": GROUP}}``; only a
200 is success. A refusal carries ``{"kind": ..., "value": ...}``, shown to people cleaned and bounded
(``text.clean``); any other answer, however malformed, is a refusal too. Redirects are not followed (the header
exists so that a request is never acted on by a server it was not meant for). The ID is derived from
/etc/machine-id with an application-specific HMAC, as systemd's ``sd_id128_get_machine_app_specific``: stable
for the device, and never the machine ID itself."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass

from .text import clean

APP_ID = bytes.fromhex("6f6d61686161676e7446c0a7b1e20c5d")  # this agent's own application ID for the HMAC
MAX_ANSWER = 64 << 10
MACHINE_ID = "/etc/machine-id"


@dataclass(frozen=True)
class Granted:
    pass


@dataclass(frozen=True)
class Denied:
    """The server answered, and not 200."""

    status: int
    kind: str
    value: str

    def __str__(self) -> str:
        what = f"{self.kind}: {self.value}" if self.kind or self.value else "no reason given"
        return f"HTTP {self.status} ({what})"


@dataclass(frozen=True)
class Unreachable:
    reason: str

    def __str__(self) -> str:
        return self.reason


Answer = Granted | Denied | Unreachable


def client_id(machine_id_path: str = MACHINE_ID) -> str:
    """The device's FleetLock ID: HMAC-SHA256 keyed by the machine ID over this agent's application ID, cut to
    a 128-bit UUID (version 4 bits set), as hex. OSError/ValueError when the machine ID is missing or malformed."""
    with open(machine_id_path, encoding="ascii") as f:
        raw = bytes.fromhex(f.read(64).strip())
    if len(raw) != 16:
        raise ValueError(f"{machine_id_path} does not hold a 128-bit machine ID")
    digest = hmac.new(raw, APP_ID, hashlib.sha256).digest()[:16]
    return uuid.UUID(bytes=digest, version=4).hex


def body(client: str, group: str) -> bytes:
    return json.dumps({"client_params": {"id": client, "group": group}}).encode()


def _short(value, limit: int = 120) -> str:
    return clean(value if isinstance(value, (str, bytes)) else json.dumps(value)[:limit * 8], limit)


async def call(session, base: str, endpoint: str, client: str, group: str, timeout: float = 30.0) -> Answer:
    """One FleetLock request: ``endpoint`` is ``pre-reboot`` or ``steady-state``."""
    import aiohttp

    from .http import describe_error

    url = f"{base}/v1/{endpoint}"
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url, data=body(client, group), allow_redirects=False,
                                    headers={"fleet-lock-protocol": "true", "Content-Type": "application/json"}) as resp:
                if resp.status == 200:
                    return Granted()
                raw = await resp.content.read(MAX_ANSWER)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return Unreachable(f"FleetLock server {base}: {describe_error(exc)}")
    return Denied(resp.status, *_reason(raw))


def _reason(raw: bytes) -> tuple[str, str]:
    """A refusal's ``kind`` and ``value``, cleaned (``text.clean``); whatever the body is (not JSON, nested past
    any depth, not UTF-8), the answer stays a refusal, retried like any other."""
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        return "", _short(raw[:200]) if raw else ""
    if not isinstance(answer, dict):
        return "", "the answer is not a JSON object"
    try:
        return _short(answer.get("kind", ""), 60), _short(answer.get("value", ""))
    except RecursionError:
        return "", "the answer nests too deep"
