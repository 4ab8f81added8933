"""Text that came from outside (a server, a file name, logind, a configuration file), made safe where it enters.

``clean`` turns anything (bytes or str) into valid, printable UTF-8 of bounded length, before it is logged,
stored, published on D-Bus or printed: bytes are decoded as UTF-8 (an invalid byte becomes ``\\xNN``), a lone
surrogate (an undecodable byte that a decoder kept, or a ``\\udNNN`` escape in JSON) becomes ``\\xNN`` or
``\\udNNN``, any other character that is not printable (C0 and C1 controls, DEL, bidi and format marks,
unassigned code points) its ``\\x``/``\\u``/``\\U`` escape; runs of white space become one space; past ``limit``
characters the text is cut and ends with ``…``. Clean text passes through unchanged: ``clean(clean(x)) ==
clean(x)``, and ``is_clean(t)`` says whether ``t`` needs nothing done.

``shown`` does the same to every string in a decoded structure (a status dict) for a terminal.
"""
from __future__ import annotations

import re

MAX_TEXT = 400  # characters: a line of LastError, a server's reason, an inhibitor's why

_WHITE = re.compile(r"\s+")


def _escape(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte kept by "surrogateescape"
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def clean(value, limit: int = MAX_TEXT) -> str:
    """``value`` (str, bytes, or anything with a str()) as valid printable UTF-8 of at most ``limit`` characters."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value[:limit * 4 + 4]).decode("utf-8", "surrogateescape")
    elif isinstance(value, str):
        text = value
    else:
        text = str(value)
    text = text[:limit * 8 + 8]  # escapes lengthen text at most eightfold: no more is ever looked at
    if not text.isprintable() or "  " in text or text != text.strip():
        text = _WHITE.sub(" ", text).strip()
        if not text.isprintable():
            text = "".join(ch if ch.isprintable() else _escape(ch) for ch in text)
    if len(text) > limit:
        text = text[:max(0, limit - 1)] + "…"
    return text


def is_clean(text, limit: int = MAX_TEXT) -> bool:
    """Whether ``text`` is a str that ``clean`` would leave as it is."""
    return isinstance(text, str) and len(text) <= limit and clean(text, limit) == text


def shown(obj, limit: int = 4096):
    """``obj`` with every string in it (dict keys and values, list items) cleaned, for printing to a terminal."""
    if isinstance(obj, str):
        return clean(obj, limit)
    if isinstance(obj, dict):
        return {shown(k, limit): shown(v, limit) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(shown(v, limit) for v in obj)
    return obj
