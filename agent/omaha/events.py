"""Event types and results (the V3 table and the CoreOS/Flatcar subset), and the agent's error codes."""
from __future__ import annotations

from enum import IntEnum


class EventType(IntEnum):
    UNKNOWN = 0
    DOWNLOAD_COMPLETE = 1
    INSTALL_COMPLETE = 2
    UPDATE_COMPLETE = 3
    UNINSTALL_COMPLETE = 4
    DOWNLOAD_STARTED = 5
    INSTALL_STARTED = 6
    NEW_APP_INSTALL_STARTED = 9
    SETUP_STARTED = 10
    SETUP_FINISHED = 11
    UPDATE_STARTED = 12
    UPDATE_DOWNLOAD_STARTED = 13
    UPDATE_DOWNLOAD_FINISHED = 14
    UPDATE_INSTALL_STARTED = 15
    SETUP_UPDATE_BEGIN = 16
    SETUP_UPDATE_COMPLETE = 17
    REGISTER_PRODUCT_COMPLETE = 20
    OEM_INSTALL_FIRST_CHECK = 30
    APP_COMMAND_STARTED = 40
    APP_COMMAND_ENDED = 41
    ACTION = 42
    UPDATE_CHECK_FAILURE = 50
    SETUP_FAILURE = 100
    COM_SERVER_FAILURE = 102
    SETUP_UPDATE_FAILURE = 103
    UPDATE_COMPLETE_HELD = 800  # CoreOS: installed, completion held back by the instance


class EventResult(IntEnum):
    ERROR = 0
    SUCCESS = 1
    SUCCESS_REBOOT = 2
    SUCCESS_RESTART_BROWSER = 3
    CANCELLED = 4
    ERROR_INSTALLER_MSI = 5
    ERROR_INSTALLER_OTHER = 6
    NO_UPDATE = 7
    ERROR_INSTALLER_SYSTEM = 8
    UPDATE_DEFERRED = 9
    ERROR_HANDOFF = 10


# The CoreOS/Flatcar event table, as (eventtype, eventresult) pairs.
DOWNLOAD_STARTED = (EventType.UPDATE_DOWNLOAD_STARTED, EventResult.SUCCESS)  # 13/1
DOWNLOAD_FINISHED = (EventType.UPDATE_DOWNLOAD_FINISHED, EventResult.SUCCESS)  # 14/1
UPDATE_APPLIED = (EventType.UPDATE_COMPLETE, EventResult.SUCCESS)  # 3/1: slot set for a trial boot
UPDATE_APPLIED_HELD = (EventType.UPDATE_COMPLETE_HELD, EventResult.SUCCESS)  # 800/1
UPDATED_AND_REBOOTED = (EventType.UPDATE_COMPLETE, EventResult.SUCCESS_REBOOT)  # 3/2
UPDATE_FAILED = (EventType.UPDATE_COMPLETE, EventResult.ERROR)  # 3/0


class ErrorCategory(IntEnum):
    NONE = 0
    DOWNLOAD = 1
    UNPACK = 2
    INSTALL = 3
    SERVICE = 4
    UPDATE_CHECK = 5


class ErrorCode(IntEnum):
    """``errorcode`` of a 3/0 event. Numbers follow update_engine's where one exists, so fleet dashboards
    built for Flatcar read them the same way; HTTP failures are 2000 + status."""

    GENERIC = 1
    OMAHA_REQUEST = 2
    OMAHA_RESPONSE = 3  # offer unusable: no hash, no size, bad URL ...
    POST_INSTALL_FAILED = 5  # an install.post_install command failed (update_engine's postinstall code)
    SET_BOOTABLE = 6  # the boot backend failed to mark a slot
    INSTALL_DEVICE_OPEN = 7  # target slot missing, mounted, booted or too small
    DOWNLOAD_TRANSFER = 9  # every URL failed
    PAYLOAD_HASH_MISMATCH = 10
    PAYLOAD_SIZE_MISMATCH = 11
    READBACK_MISMATCH = 12  # the slot re-read after writing did not hash right
    DECOMPRESS = 13  # compressed payload is corrupt
    SIGNATURE = 18  # the release's signature is missing, invalid, or does not describe the offer
    BOOTLOADER_FALLBACK = 44  # a trial boot never came up: the firmware booted the old slot again
    HEALTH_CHECK_FAILED = 45  # the new slot booted but its health commands failed
    CANCELLED = 48
    HTTP_BASE = 2000

    @classmethod
    def http(cls, status: int) -> int:
        return int(cls.HTTP_BASE) + int(status)


def event_label(eventtype: int, eventresult: int) -> str:
    """``13/1`` style label used in logs and by the development server."""
    return f"{int(eventtype)}/{int(eventresult)}"
