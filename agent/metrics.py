"""Metrics without I/O: the counters the daemon keeps (``Tally``) and the Prometheus text exposition (``render``).

The counters live as long as the process (a restart starts them at 0 again; Prometheus' ``rate`` and
``increase`` handle counter resets). ``Tally`` is told of every event the agent queues for the update server
(``event``) and of every status change (``observe``: the operation, the download's progress, a monotonic time);
``render`` turns a status snapshot and a tally into the exposition text. The exporter (``exporter.py``) writes
and serves it.
"""
from __future__ import annotations

from .machine import Operation
from .omaha.events import UPDATE_APPLIED, UPDATE_FAILED, UPDATED_AND_REBOOTED, ErrorCode
from .text import clean

RESULTS = ("installed", "failed", "rolled_back", "confirmed")
STAGES = ("check", "signature", "device", "download", "verify", "bootloader", "trial_boot", "health", "other")
MAX_LABEL = 200  # characters of a label value (a version, a slot name)

# the stage of a 3/0 event's error code
_STAGE = {
    ErrorCode.SIGNATURE: "signature", ErrorCode.INSTALL_DEVICE_OPEN: "device", ErrorCode.DOWNLOAD_TRANSFER: "download",
    ErrorCode.PAYLOAD_HASH_MISMATCH: "verify", ErrorCode.PAYLOAD_SIZE_MISMATCH: "verify",
    ErrorCode.READBACK_MISMATCH: "verify", ErrorCode.DECOMPRESS: "verify", ErrorCode.SET_BOOTABLE: "bootloader",
    ErrorCode.BOOTLOADER_FALLBACK: "trial_boot", ErrorCode.HEALTH_CHECK_FAILED: "health",
}
_ROLLED_BACK = {ErrorCode.BOOTLOADER_FALLBACK, ErrorCode.HEALTH_CHECK_FAILED}


class Tally:
    """The counters: updates by result, failures by stage, bytes and seconds downloaded."""

    def __init__(self):
        self.updates = dict.fromkeys(RESULTS, 0)
        self.failures = dict.fromkeys(STAGES, 0)
        self.download_bytes = 0
        self.reused_bytes = 0
        self._download_seconds = 0.0
        self._operation = Operation.STARTING.value
        self._downloading_since: float | None = None
        self._progress = None  # the last install.Progress counted (kept: its identity says "already counted")

    def event(self, event) -> None:
        """An event queued for the server: 3/1 installed, 3/2 confirmed, 3/0 failed or (a trial that did not
        boot, or failed its health check) rolled back; a 3/0 also counts a failure of its stage."""
        code = (event.eventtype, event.eventresult)
        if code == UPDATE_APPLIED:
            self.updates["installed"] += 1
        elif code == UPDATED_AND_REBOOTED:
            self.updates["confirmed"] += 1
        elif code == UPDATE_FAILED:
            self.updates["rolled_back" if event.errorcode in _ROLLED_BACK else "failed"] += 1
            self.failures[_STAGE.get(event.errorcode, "other")] += 1

    def observe(self, operation: str, progress, now: float) -> None:
        """A status change: ``operation`` (its value), the download's ``install.Progress`` (or None), ``now`` a
        monotonic time. A failed update check (checking → reporting-error) counts a ``check`` failure."""
        if progress is not None and progress is not self._progress:
            self.download_bytes += progress.fetched
            self.reused_bytes += getattr(progress, "reused", 0)
            self._progress = progress
        if operation == self._operation:
            return
        if self._operation == Operation.CHECKING.value and operation == Operation.REPORTING_ERROR.value:
            self.failures["check"] += 1
        if self._downloading_since is not None:
            self._download_seconds += max(0.0, now - self._downloading_since)
            self._downloading_since = None
        if operation == Operation.DOWNLOADING.value:
            self._downloading_since = now
        self._operation = operation

    def download_seconds(self, now: float) -> float:
        """Seconds spent in the downloading operation, the running download included."""
        running = max(0.0, now - self._downloading_since) if self._downloading_since is not None else 0.0
        return self._download_seconds + running


def label(value) -> str:
    """A label value as the exposition format wants it: cleaned text (``text.clean``), then backslash, double
    quote and newline escaped."""
    text = clean(value, MAX_LABEL)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return repr(float(value))


def _family(out: list, name: str, kind: str, text: str, samples) -> None:
    out.append(f"# HELP {name} {text}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        inner = ",".join(f'{key}="{label(val)}"' for key, val in labels)
        out.append(f"{name}{{{inner}}} {_number(value)}" if inner else f"{name} {_number(value)}")


def render(snapshot: dict, tally: Tally, backend: str, now: float) -> str:
    """The exposition (text format 0.0.4) of a status ``snapshot`` (``StatusBoard.snapshot``) and ``tally``;
    ``now`` is the monotonic time the running download's seconds are counted to."""
    out: list[str] = []
    current = snapshot.get("operation", "")
    _family(out, "omaha_agent_info", "gauge", "The running version, the booted slot and the boot backend.",
            [((("version", snapshot.get("current_version", "")), ("slot", snapshot.get("booted_slot", "")),
               ("backend", backend)), 1)])
    _family(out, "omaha_agent_operation", "gauge", "1 for the agent's current operation, 0 for the others.",
            [((("operation", op.value),), int(op.value == current)) for op in Operation])
    _family(out, "omaha_agent_last_check_timestamp_seconds", "gauge",
            "When the last update check was sent (Unix time; 0: never).", [((), snapshot.get("last_check", 0))])
    _family(out, "omaha_agent_updates_total", "counter",
            "Update outcomes reported to the server: installed (3/1), confirmed (3/2), failed or rolled_back (3/0).",
            [((("result", r),), n) for r, n in tally.updates.items()])
    _family(out, "omaha_agent_download_bytes_total", "counter",
            "Payload bytes taken from the update server (or an offline install's file).",
            [((), tally.download_bytes)])
    _family(out, "omaha_agent_reused_bytes_total", "counter",
            "Image bytes read from a slot instead of downloaded (adaptive updates).",
            [((), tally.reused_bytes)])
    _family(out, "omaha_agent_download_seconds_total", "counter", "Seconds spent downloading and writing payloads.",
            [((), round(tally.download_seconds(now), 3))])
    _family(out, "omaha_agent_pending_events", "gauge", "Events queued for the update server, not yet acknowledged.",
            [((), snapshot.get("pending_events", 0))])
    _family(out, "omaha_agent_failures_total", "counter", "Failures by the stage they happened in.",
            [((("stage", s),), n) for s, n in tally.failures.items()])
    return "\n".join(out) + "\n"
