"""Policy without I/O: what a start-up finds about the last update, how long a failed version is blocked, and
the events each step reports. The state machine itself is ``machine.py``."""
from __future__ import annotations

from enum import Enum

from .omaha.events import (
    DOWNLOAD_FINISHED, DOWNLOAD_STARTED, UPDATE_APPLIED, UPDATE_FAILED, UPDATED_AND_REBOOTED, ErrorCategory, ErrorCode,
)
from .omaha.model import Event
from .state import Blocked, Trial


class AfterBoot(str, Enum):
    NOTHING = "nothing"  # no trial was pending
    CONFIRM = "confirm"  # the trial slot booted: run the health step
    WAITING = "waiting"  # the trial slot still has its tries: no reboot yet
    FELL_BACK = "fell-back"  # a trial was pending but the old slot runs and the trial's tries are gone


def after_boot(trial: Trial | None, booted: str | None, trial_still_bootable: bool) -> AfterBoot:
    """What to do on start-up. The bootloader is the authority: the old slot running while the trial slot
    still has tries means no reboot happened yet, not a fallback."""
    if not trial:
        return AfterBoot.NOTHING
    if booted == trial.slot:
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
BLOCK_MAX = BLOCK_BACKOFF * 2 ** 4


def block_until(now: float, previous: Blocked | None, version: str, rolled_back: bool = False) -> Blocked:
    """A failed version is not offered again before a backoff that doubles on each failure (1 d .. 16 d); so is
    a version an operator rolled back from (``rolled_back``: the same backoff, counted the same way). A newer
    version is never blocked by it."""
    count = previous.count + 1 if previous and previous.version == version else 1
    return Blocked(version, now + min(BLOCK_MAX, BLOCK_BACKOFF * 2 ** min(count - 1, 4)), count, rolled_back)


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
    "signature": (ErrorCode.SIGNATURE, ErrorCategory.DOWNLOAD),
    "readback": (ErrorCode.READBACK_MISMATCH, ErrorCategory.INSTALL),
    "decompress": (ErrorCode.DECOMPRESS, ErrorCategory.UNPACK),
    "device": (ErrorCode.INSTALL_DEVICE_OPEN, ErrorCategory.INSTALL),
    "boot": (ErrorCode.SET_BOOTABLE, ErrorCategory.INSTALL),
    "postinstall": (ErrorCode.POST_INSTALL_FAILED, ErrorCategory.INSTALL),
    "packages": (ErrorCode.OMAHA_RESPONSE, ErrorCategory.INSTALL),  # the packages do not fit the slot groups
    "rehash": (ErrorCode.PAYLOAD_HASH_MISMATCH, ErrorCategory.DOWNLOAD),  # a slot changed since its image verified
}
