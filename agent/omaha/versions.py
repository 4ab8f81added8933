"""Version ordering.

Dotted integers follow the V3 text: ``1.2`` == ``1.2.0.0``, leading zeros are ignored (``1.005`` > ``1.4``),
the first differing element decides.

Real-world versions that are not dotted integers get a documented total order that extends it:

* ``+build`` metadata is ignored (as in semver): ``1.0+a`` == ``1.0+b``.
* A ``-pre`` suffix after the first dash marks a pre-release, lower than the same version without it
  (``1.2.3-rc1`` < ``1.2.3``); two pre-releases of one version compare by their suffix with these same rules.
* Each dot-separated element is split into runs of ASCII digits (compared as numbers) and other text
  (compared as strings); a text run sorts below a number (``1.2a`` < ``1.2.1`` is decided by ``2a`` vs ``2``:
  ``2`` < ``2a``). So Chrome OS's ``14092.106.2021_11_08_1354`` orders by build, branch, then date.
* Trailing zero elements are dropped, so the V3 equality holds for every version.

``key()`` never raises; every string has a key, and keys of any two strings compare.

``problem()`` is the one rule for what may be a version at all, whatever names it (an online offer, the version
argument of an offline install, a signed statement): 1 to ``MAX_VERSION`` printable characters (no control
character, no line break, no lone surrogate).
"""
from __future__ import annotations

import functools
import re

from ..text import clean

_RUN = re.compile(r"[0-9]+|[^0-9]+")
MAX_VERSION = 128  # Chrome OS's 14092.106.2021_11_08_1354 is 25


def problem(version) -> str | None:
    """Why ``version`` cannot be a version (one short line, the text quoted and cut), or None when it can."""
    if not isinstance(version, str) or not version:
        return "no version is given"
    if len(version) > MAX_VERSION or not version.isprintable():
        why = f"at most {MAX_VERSION} printable characters"
    elif clean(version, MAX_VERSION) != version:
        why = "white space at an end, or twice in a row"
    else:
        return None
    shown = repr(version[:40]) + (f" (+{len(version) - 40} more characters)" if len(version) > 40 else "")
    return f"{shown} is not a version ({why})"
_ZERO = ((1, 0, ""),)


def _number(run: str) -> tuple:
    """A run of digits as a key that orders as its number, without ``int()`` (which refuses more than 4300
    digits): fewer significant digits sort lower, equal counts compare digit by digit."""
    digits = run.lstrip("0")
    return (1, len(digits), digits)


def _element(text: str) -> tuple:
    return tuple(_number(run) if run[0] in "0123456789" else (0, run) for run in _RUN.findall(text))


def _core(text: str) -> tuple:
    elements = [_element(part) for part in text.split(".")]
    while elements and elements[-1] in (_ZERO, ()):
        elements.pop()
    return tuple(elements)


@functools.lru_cache(maxsize=256)
def key(version: str) -> tuple:
    """A sort key for ``version``: equal keys mean equal versions."""
    text = str(version).strip()
    if text[:1] in ("v", "V") and text[1:2].isdigit():
        text = text[1:]
    text = text.split("+", 1)[0]
    core, dash, pre = text.partition("-")
    if dash:
        return (_core(core), (0, _core(pre)))
    return (_core(core), (1,))


def compare(a: str, b: str) -> int:
    ka, kb = key(a), key(b)
    return (ka > kb) - (ka < kb)


def is_newer(candidate: str, current: str) -> bool:
    """True only when ``candidate`` sorts strictly above ``current``."""
    return key(candidate) > key(current)


def same(a: str, b: str) -> bool:
    return key(a) == key(b)


def matches_prefix(version: str, prefix: str) -> bool:
    """``targetversionprefix`` semantics: ``1.2.3`` matches ``1.2.3.4`` but not ``1.2.34``; ``1.2.3$`` is exact."""
    if not prefix:
        return True
    if prefix.endswith("$"):
        return same(version, prefix[:-1])
    want = [p for p in prefix.strip(".").split(".")]
    have = version.split(".")
    if len(have) < len(want):
        have += ["0"] * (len(want) - len(have))
    return all(_element(h) == _element(w) for h, w in zip(have, want))
