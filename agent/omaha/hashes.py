"""Reading package hashes as servers really send them: hex in any case, or base64 (standard or URL-safe)."""
from __future__ import annotations

import base64
import binascii
import re

from .model import ProtocolError

_HEX = re.compile(r"[0-9a-fA-F]+")
_B64 = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")

SHA256_LEN = 32
SHA1_LEN = 20


def digest_from_text(text: str, length: int, what: str) -> bytes:
    """Decode a digest of ``length`` bytes written as hex or base64; the encoding is decided by the
    text's length and alphabet. Raises ``ProtocolError`` naming ``what`` when it is neither."""
    value = text.strip()
    if len(value) == 2 * length and _HEX.fullmatch(value):
        return bytes.fromhex(value)
    if _B64.fullmatch(value):
        padded = value.replace("-", "+").replace("_", "/")
        padded += "=" * (-len(padded) % 4)
        try:
            raw = base64.b64decode(padded, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == length:
            return raw
    raise ProtocolError(f"{what}={value[:80]!r} is neither a {length}-byte hex nor a base64 digest")


def sha256_from_fp(fp: str) -> bytes | None:
    """The SHA-256 named by a type-1 fingerprint (``1.<64 hex>``); None for other types or other shapes
    (servers use fingerprints as opaque labels too)."""
    kind, dot, data = fp.strip().partition(".")
    if not dot or kind != "1" or len(data) != 2 * SHA256_LEN or not _HEX.fullmatch(data):
        return None
    return bytes.fromhex(data)
