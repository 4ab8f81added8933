"""The update flow without I/O: operations, their allowed transitions, and the policy decisions.

The runner (``daemon.py``) performs the I/O and asks this module what is allowed and what to report.
Every decision comes back with the reason a user sees in ``status``, on D-Bus and in the log.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .omaha import versions
from .omaha.events import (
    DOWNLOAD_FINISHED, DOWNLOAD_STARTED, UPDATE_APPLIED, UPDATE_FAILED, UPDATED_AND_REBOOTED, ErrorCategory, ErrorCode,
)
from .omaha.model import Event


class Operation(str, Enum):
    IDLE = "idle"
    CHECKING = "checking"
    UPDATE_AVAILABLE = "update-available"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    FINALIZING = "finalizing"
    NEED_REBOOT = "updated-need-reboot"
    REPORTING_ERROR = "reporting-error"


_O = Operation
TRANSITIONS: dict[Operation, set[Operation]] = {
    _O.IDLE: {_O.CHECKING, _O.NEED_REBOOT, _O.REPORTING_ERROR},
    _O.CHECKING: {_O.IDLE, _O.UPDATE_AVAILABLE, _O.REPORTING_ERROR, _O.NEED_REBOOT},
    _O.UPDATE_AVAILABLE: {_O.DOWNLOADING, _O.IDLE, _O.REPORTING_ERROR},
    _O.DOWNLOADING: {_O.VERIFYING, _O.REPORTING_ERROR, _O.IDLE},
    _O.VERIFYING: {_O.FINALIZING, _O.REPORTING_ERROR, _O.IDLE},
    _O.FINALIZING: {_O.NEED_REBOOT, _O.REPORTING_ERROR},
    _O.NEED_REBOOT: {_O.IDLE, _O.CHECKING},
    _O.REPORTING_ERROR: {_O.IDLE},
}


class Flow:
    """The current operation; refuses transitions the flow does not have."""

    def __init__(self, on_change=None):
        self.operation = Operation.IDLE
        self.on_change = on_change

    def to(self, operation: Operation) -> None:
        if operation == self.operation:
            return
        if operation not in TRANSITIONS[self.operation]:
            raise RuntimeError(f"flow cannot go from {self.operation.value} to {operation.value}")
        old, self.operation = self.operation, operation
        if self.on_change:
            self.on_change(old, operation)


@dataclass(frozen=True)
class Decision:
    ok: bool
    reason: str


def may_install(offer: str, current: str, *, trial_version: str | None, blocked: dict | None,
                rollback_allowed: bool, booted_good: bool, now: float) -> Decision:
    """Never rely on the server to compare versions."""
    if not booted_good:
        return Decision(False, "the running slot is not confirmed good yet; no update before it is")
    if versions.same(offer, current):
        return Decision(False, f"version {offer} is already running")
    if trial_version is not None and versions.same(offer, trial_version):
        return Decision(False, f"version {offer} is already installed and waits for a reboot")
    if blocked and versions.same(offer, str(blocked.get("version", ""))) and now < float(blocked.get("until", 0)):
        return Decision(False, f"version {offer} failed on this device; not retried before the backoff ends")
    if not versions.is_newer(offer, current) and not rollback_allowed:
        return Decision(False, f"version {offer} is older than {current}: a downgrade, refused "
                               "(set app.rollback_allowed to accept)")
    return Decision(True, f"update {current} -> {offer}")


class AfterBoot(str, Enum):
    NOTHING = "nothing"  # no trial was pending
    CONFIRM = "confirm"  # the trial slot booted: run the health step
    WAITING = "waiting"  # the trial slot still has its tries: no reboot yet
    FELL_BACK = "fell-back"  # a trial was pending but the old slot runs and the trial's tries are gone


def after_boot(trial: dict | None, booted: str | None, trial_still_bootable: bool) -> AfterBoot:
    """What to do on start-up. The bootloader is the authority: the old slot running while the trial slot
    still has tries means no reboot happened yet, not a fallback."""
    if not trial:
        return AfterBoot.NOTHING
    if booted == trial.get("slot"):
        return AfterBoot.CONFIRM
    return AfterBoot.WAITING if trial_still_bootable else AfterBoot.FELL_BACK


class Untracked(str, Enum):
    NOTHING = "nothing"  # the running slot is good (or unknown)
    CONFIRM = "confirm"  # an unconfirmed slot runs beside a good one: confirm it like a trial, or go back
    ADOPT = "adopt"  # an unconfirmed slot runs and no other slot is good: it is the device's only system


def untracked_boot(booted: str | None, booted_good: bool, other_good: bool) -> Untracked:
    """Asked when no trial record exists: is the running slot unconfirmed in the bootloader anyway (the state
    was lost, or another tool armed the slot)? Left alone, it falls back at the next reboot and no update ever
    starts (updates wait for a good running slot). So it is confirmed like a trial; and when no other slot is
    good there is nothing to go back to, so it is marked good at once: it is the system that boots."""
    if booted is None or booted_good:
        return Untracked.NOTHING
    return Untracked.CONFIRM if other_good else Untracked.ADOPT


BLOCK_BACKOFF = 24 * 3600


def block_until(now: float, previous: dict | None, version: str) -> dict:
    """A failed version is not offered again before a backoff that doubles on each failure (1 d .. 16 d)."""
    count = int(previous.get("count", 0)) + 1 if previous and previous.get("version") == version else 1
    return {"version": version, "until": now + BLOCK_BACKOFF * 2 ** min(count - 1, 4), "count": count}


def _event(code, **kw) -> Event:
    return Event(eventtype=int(code[0]), eventresult=int(code[1]), **kw)


def download_started(previous: str, nextv: str, total: int) -> Event:
    return _event(DOWNLOAD_STARTED, previousversion=previous, nextversion=nextv, total=total)


def download_finished(previous: str, nextv: str, downloaded: int, ms: int, url: str) -> Event:
    return _event(DOWNLOAD_FINISHED, previousversion=previous, nextversion=nextv, downloaded=downloaded,
                  total=downloaded, download_time_ms=ms, url=url)


def applied(previous: str, nextv: str) -> Event:
    return _event(UPDATE_APPLIED, previousversion=previous, nextversion=nextv)


def updated_and_rebooted(previous: str, new: str) -> Event:
    return _event(UPDATED_AND_REBOOTED, previousversion=previous, nextversion=new)


def failed(code: int, category: ErrorCategory, previous: str, nextv: str) -> Event:
    return _event(UPDATE_FAILED, errorcode=int(code), errorcat=int(category), previousversion=previous,
                  nextversion=nextv)


INSTALL_ERRORS = {
    "transfer": (ErrorCode.DOWNLOAD_TRANSFER, ErrorCategory.DOWNLOAD),
    "size": (ErrorCode.PAYLOAD_SIZE_MISMATCH, ErrorCategory.DOWNLOAD),
    "hash": (ErrorCode.PAYLOAD_HASH_MISMATCH, ErrorCategory.DOWNLOAD),
    "readback": (ErrorCode.READBACK_MISMATCH, ErrorCategory.INSTALL),
    "decompress": (ErrorCode.DECOMPRESS, ErrorCategory.UNPACK),
    "device": (ErrorCode.INSTALL_DEVICE_OPEN, ErrorCategory.INSTALL),
    "boot": (ErrorCode.SET_BOOTABLE, ErrorCategory.INSTALL),
}
