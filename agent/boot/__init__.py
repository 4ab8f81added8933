"""Boot control: one small interface over the bootloaders (GRUB env, GPT attribute bits, U-Boot env, sim).

Slot states, whatever the backend:

* ``good``  boots; confirmed healthy.
* ``trial`` bootable with ``tries_left`` attempts, not yet confirmed.
* ``bad``   never boot it.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

SLOTS = ("a", "b")


class SlotState(str, Enum):
    GOOD = "good"
    TRIAL = "trial"
    BAD = "bad"


@dataclass(frozen=True)
class SlotStatus:
    state: SlotState
    tries_left: int = 0
    version: str | None = None  # only the sim backend records it

    def to_json(self) -> dict:
        out = {"state": self.state.value, "tries_left": self.tries_left}
        if self.version is not None:
            out["version"] = self.version
        return out


class BootError(Exception):
    """The bootloader's state could not be read or written; the message says which file and why."""


class BootEnvMissing(BootError):
    """The bootloader's env is missing or empty (a first boot before provisioning): the bootloader itself sees no
    slot good or armed. Nothing in it can be lost by writing a fresh one."""


class BootControl(Protocol):
    name: str

    def status(self) -> dict[str, SlotStatus]: ...

    def mark_bad(self, slot: str) -> None: ...

    def set_trial(self, slot: str, tries: int, version: str | None = None) -> None: ...

    def mark_good(self, slot: str) -> None: ...


def other(slot: str) -> str:
    return "b" if slot == "a" else "a"


def check_slot(slot: str) -> str:
    if slot not in SLOTS:
        raise BootError(f"unknown slot {slot!r} (slots are 'a' and 'b')")
    return slot


def check_tries(tries: int, maximum: int = 15) -> int:
    if not isinstance(tries, int) or isinstance(tries, bool) or not 1 <= tries <= maximum:
        raise BootError(f"tries must be a whole number from 1 to {maximum}, not {tries!r}")
    return tries


def reorder(order: str, first: str | None = None, last: str | None = None) -> str:
    """A boot order string like ``"B A"`` with ``first`` moved to the front or ``last`` to the back."""
    names = [x for x in order.split() if x in ("A", "B")]
    names += [x for x in ("A", "B") if x not in names]
    if first:
        names.remove(first.upper())
        names.insert(0, first.upper())
    if last:
        names.remove(last.upper())
        names.append(last.upper())
    return " ".join(names)
