"""Weekly maintenance windows, as pure arithmetic on wall-clock seconds (no I/O, no clock of its own).

A window is a set of weekdays (names or ranges: ``[sat, sun]``, ``[mon-fri]``), a start time ("HH:MM") and a
length in minutes, in a time zone: ``UTC``, the device's ``local`` zone, or an IANA name. Starts are wall-clock times in that zone, so a window at 02:00 local
opens at 02:00 before and after a DST change; its length is real elapsed minutes. A start that does not exist
on the day the clocks go forward (02:30 in most of Europe) opens an hour later by the wall clock (fold=0);
one that happens twice on the day they go back opens at the first. A window may run past midnight and past
the end of the week (Sunday 23:00 for 3 hours ends Monday 02:00).
"""
from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass
from datetime import timezone, tzinfo

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_LENGTH = 7 * 24 * 60  # minutes: a window longer than a week is every moment


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 = Monday
    start: int  # minutes after midnight, wall clock in ``tz``
    length: int  # minutes
    tz: tzinfo = timezone.utc

    def openings(self, around: float):
        """(start, end) in epoch seconds of every occurrence from 8 days before ``around`` to 8 days after."""
        day = dt.datetime.fromtimestamp(around, self.tz).date()
        hour, minute = divmod(self.start, 60)
        for offset in range(-8, 9):
            d = day + dt.timedelta(days=offset)
            if d.weekday() in self.days:
                start = dt.datetime(d.year, d.month, d.day, hour, minute, tzinfo=self.tz).timestamp()
                yield start, start + self.length * 60


def open_until(windows: list[Window] | tuple[Window, ...], now: float) -> float | None:
    """The end of the (latest-ending) window open at ``now``, or None when none is open."""
    ends = [end for w in windows for start, end in w.openings(now) if start <= now < end]
    return max(ends) if ends else None


def next_opening(windows, after: float) -> float | None:
    """The first window start strictly after ``after`` (None only without windows)."""
    starts = [start for w in windows for start, _ in w.openings(after) if start > after]
    if not starts:  # a window on no day cannot be configured; without windows there is no opening
        return None
    return min(starts)


def allowed_at(windows, t: float) -> float:
    """The first moment at or after ``t`` inside a window: ``t`` itself when one is open then."""
    if not windows or open_until(windows, t) is not None:
        return t
    nxt = next_opening(windows, t)
    return t if nxt is None else nxt


def after_current(windows, now: float) -> float:
    """The first opening after the window open at ``now`` has ended (giving up on this window)."""
    end = open_until(windows, now)
    return allowed_at(windows, end if end is not None else now)


def local_zone() -> tzinfo:
    """The device's own zone: ``TZ`` when it names one, else /etc/localtime, else UTC."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    try:
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return timezone.utc


def zone(name: str) -> tzinfo:
    """``UTC``, ``local`` or an IANA zone name; ValueError with a one-line reason otherwise."""
    if name.upper() == "UTC":
        return timezone.utc
    if name == "local":
        return local_zone()
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"{name[:60]!r} is not a time zone: use UTC, local or a name like Europe/Berlin") from None


_START = re.compile(r"([0-9]{1,2}):([0-9]{2})")
_NAMES = {**{d: i for i, d in enumerate(DAYS)},
          **{d: i for i, d in enumerate(("monday", "tuesday", "wednesday", "thursday", "friday", "saturday",
                                          "sunday"))}}


def parse_start(text: str) -> int:
    """"HH:MM" (ASCII digits) → minutes after midnight; ValueError with a one-line reason otherwise."""
    m = _START.fullmatch(text)
    if not (m and int(m[1]) <= 23 and int(m[2]) <= 59):
        raise ValueError(f"{text[:20]!r} is not a time of day: use \"HH:MM\", e.g. \"02:30\"")
    return int(m[1]) * 60 + int(m[2])


def parse_days(value) -> frozenset[int]:
    """Weekdays (0 = Monday) from a list of day names (``mon`` or ``monday``, any case) and ranges (``mon-fri``,
    ``fri-mon`` wraps over the weekend), or from one such name or range. Anything else (a comma or space
    separated string, a misspelt or shortened word) is a ValueError with a one-line reason."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("days must be a list of weekdays, e.g. [sat, sun] or [mon-fri]")
    days: set[int] = set()
    for item in items:
        first, dash, last = item.partition("-") if isinstance(item, str) else ("", "", "")
        a, b = _NAMES.get(first.strip().lower()), _NAMES.get(last.strip().lower()) if dash else None
        if a is None or (dash and b is None):
            raise ValueError(f"days: {str(item)[:40]!r} is not a weekday (mon, tue, wed, thu, fri, sat, sun) or a "
                             "range of them (mon-fri); give several as a list: [sat, sun]")
        days.update(range(a, a + 1) if not dash else ((a + i) % 7 for i in range((b - a) % 7 + 1)))
    return frozenset(days)


def describe(t: float, tz: tzinfo = timezone.utc) -> str:
    return dt.datetime.fromtimestamp(t, tz).strftime("%a %Y-%m-%d %H:%M %Z")
