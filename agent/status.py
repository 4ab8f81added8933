"""Status publication: the operation, progress and the bootloader's view, as one snapshot for D-Bus, sd_notify
and the CLI. Listeners (the D-Bus service, the notifier) are called on every change; a failing one is logged
and never stops an update. Slot states are re-read off the event loop when the operation changes."""
from __future__ import annotations

import logging

from .boot import BootError, SlotState, SlotStatus
from .machine import Flow, Operation
from .state import Fallback, Trial

log = logging.getLogger("omaha-agent")


def slot_view(status: dict[str, SlotStatus], booted: str | None, version: str, trial: Trial | None,
              fallback: Fallback | None = None) -> dict:
    """The bootloader's view for people: a running slot on its last try is still shown as a trial; a slot's
    version where the bootloader, the running system, the trial or the recorded fallback (what a rollback
    boots) knows it."""
    out = {}
    for slot, st in status.items():
        entry = st.to_json()
        if trial is not None and slot == booted and st.state is SlotState.BAD and trial.slot == slot:
            entry.update(state="trial", tries_left=0)  # running on its last try, not yet confirmed
        if slot == booted and "version" not in entry:
            entry["version"] = version
        if trial is not None and slot == trial.slot and "version" not in entry:
            entry["version"] = trial.version
        if fallback is not None and slot == fallback.slot and st.state is SlotState.GOOD and "version" not in entry:
            entry["version"] = fallback.version
        out[slot] = entry
    return out


class StatusBoard:
    def __init__(self, ctx):
        self.ctx = ctx
        self.flow = Flow(self._changed)
        self.progress = None  # install.Progress while downloading
        self.new_version = ""
        self.new_size = 0
        self.planned_bytes = self.saved_bytes = 0  # what the install downloads, and saves (adaptive updates)
        self.slots: dict = {}
        self.booted_good = False  # the bootloader's word on the running slot at the last read (False: unreadable)
        self.listeners: list = []  # callables(snapshot)
        self.trust = ""  # what a release must carry to be installed, in words (set at start-up)
        self.reboot: dict | None = None  # the planned reboot: version, time, waiting_for (reboot.Rebooter)

    @property
    def operation(self) -> Operation:
        return self.flow.operation

    def _changed(self, old: Operation, new: Operation) -> None:
        log.info("operation: %s -> %s%s", old.value, new.value,
                 f" ({self.ctx.version} -> {self.new_version})" if self.new_version else "")
        self.notify()
        self.ctx.spawn(self.refresh_slots(), "re-reading the slot states")

    def offer(self, version: str, size: int) -> None:
        self.new_version, self.new_size = version, size

    def adaptive(self, planned: int, saved: int) -> None:
        self.planned_bytes, self.saved_bytes = planned, saved
        self.notify()

    def clear_offer(self) -> None:
        self.new_version, self.new_size, self.progress = "", 0, None
        self.planned_bytes = self.saved_bytes = 0

    async def refresh_slots(self) -> None:
        try:
            status = await self.ctx.boot.status()
            self.slots = slot_view(status, self.ctx.booted, self.ctx.version, self.ctx.state.trial,
                                   self.ctx.state.fallback)
            running = status.get(self.ctx.booted)
            self.booted_good = running is not None and running.state is SlotState.GOOD
        except BootError as exc:
            self.slots = {"error": str(exc)}
            self.booted_good = False
        self.notify()

    def notify(self) -> None:
        snap = self.snapshot()
        for listener in list(self.listeners):
            try:
                listener(snap)
            except Exception:  # a broken listener never stops an update
                log.exception("status listener failed")

    def snapshot(self) -> dict:
        p, state = self.progress, self.ctx.state
        return {
            "operation": self.flow.operation.value, "progress": p.fraction if p else 0.0,
            "current_version": self.ctx.version, "new_version": self.new_version, "new_size": self.new_size,
            "bytes_downloaded": p.done if p else 0, "rate": p.rate if p else 0.0,
            "planned_bytes": self.planned_bytes, "saved_bytes": self.saved_bytes,
            "last_check": state.last_check or 0, "next_check": state.next_check or 0,
            "booted_slot": self.ctx.booted or "",
            "last_error": "; ".join(e for e in (state.last_error, self.ctx.save_error) if e), "slots": self.slots,
            "pending_events": len(state.events),
            "waiting_for_boot_complete": self.flow.operation is Operation.AWAITING_BOOT_COMPLETE,
            "trust": self.trust,
            "reboot_version": self.reboot["version"] if self.reboot else "",
            "reboot_time": int(self.reboot["time"]) if self.reboot else 0,
            "reboot_waiting_for": self.reboot["waiting_for"] if self.reboot else "",
        }
