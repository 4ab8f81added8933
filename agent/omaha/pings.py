"""User counting: the ``<ping>`` values and the stored counters they come from (pure; time is an argument).

Days-based (``a``/``r``): whole 24-hour periods since the start of the server's day on which the previous
active / roll-call ping was sent (-1: never). That day start is derived from ``daystart.elapsed_seconds``.
Date-based (``ad``/``rd``): the ``daystart.elapsed_days`` of the previous reply (-1: never).
``ping_freshness`` is rotated whenever the counters are stored. ``installdate`` is the first ``elapsed_days``
rounded down to a week.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .model import DayStart, Ping

DAY = 86400


@dataclass(frozen=True)
class PingState:
    active_daystart: float | None = None  # wall-clock start of the server day of the last active ping
    rollcall_daystart: float | None = None
    active_days: int | None = None  # elapsed_days of the last active ping
    rollcall_days: int | None = None
    freshness: str = ""
    install_date: int | None = None

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict) -> "PingState":
        """Only well-typed values are kept (a day start is a finite number, a day count an integer, the
        freshness a string); anything else is as if never stored."""
        kinds = {"active_daystart": (int, float), "rollcall_daystart": (int, float), "active_days": int,
                 "rollcall_days": int, "freshness": str, "install_date": int}
        clean = {}
        for k, v in (data if isinstance(data, dict) else {}).items():
            if k not in kinds or isinstance(v, bool) or not isinstance(v, kinds[k]):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                continue
            clean[k] = v
        return cls(**clean)


def _days_since(daystart: float | None, now: float) -> int:
    if daystart is None:
        return -1
    return max(0, int((now - daystart) // DAY))


def ping_for(state: PingState, now: float, active: bool = True) -> Ping:
    """The ``<ping>`` to send with an update check at ``now``."""
    return Ping(
        active=1 if active else 0,
        a=_days_since(state.active_daystart, now) if active else None,
        r=_days_since(state.rollcall_daystart, now),
        ad=(state.active_days if state.active_days is not None else -1) if active else -2,
        rd=state.rollcall_days if state.rollcall_days is not None else -1,
        ping_freshness=state.freshness,
    )


def after_reply(state: PingState, now: float, daystart: DayStart, new_freshness: str,
                active: bool = True) -> PingState:
    """The counters to store once a reply to a ping was parsed. ``new_freshness`` is a fresh random value
    (the caller's randomness); it replaces the old one because the counters change."""
    changes: dict = {"freshness": new_freshness}
    if daystart.elapsed_seconds is not None:
        start = now - min(daystart.elapsed_seconds, DAY)
        changes["rollcall_daystart"] = start
        if active:
            changes["active_daystart"] = start
    if daystart.elapsed_days is not None:
        changes["rollcall_days"] = daystart.elapsed_days
        if active:
            changes["active_days"] = daystart.elapsed_days
        if state.install_date is None:
            changes["install_date"] = daystart.elapsed_days - daystart.elapsed_days % 7
    return replace(state, **changes)
