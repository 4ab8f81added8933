"""The runner: wires configuration, adapters and the pure core, and owns the event loop.

One update, as data: check → offer → mark the target bad → stream + verify → set trial (state saved first)
→ events 13/1, 14/1, 3/1 queued → reboot (policy) → on start: booted the trial slot? health → mark good →
3/2; otherwise mark it bad → 3/0. Events leave the queue only when the server acknowledged them.
"""
from __future__ import annotations

import asyncio
import logging
import os
import platform
import random
import time
import uuid

from . import __version__, engine, schedule
from .boot import BootControl, BootError, SlotState, other
from .config import Config
from .engine import AfterBoot, Operation
from .install import Checkpoint, InstallError, Installer, Progress
from .omaha import NoUpdate, UpdateOffer, interpret
from .omaha import pings, request as build
from .omaha.events import ErrorCategory, ErrorCode, event_label
from .omaha.model import Event
from .slots import SlotError, capacity, check_target, detect_booted, resolve
from .state import State, StateStore, enqueue

log = logging.getLogger("omaha-agent")


class AgentError(Exception):
    """A run that could not do what it was asked; the message is the one-line reason for the user."""


def make_boot(config: Config) -> BootControl:
    b = config.boot
    if b.backend == "sim":
        from .boot.sim import SimBoot
        paths = {s: spec.value for s, spec in config.slots.items() if spec.kind == "file"}
        return SimBoot(b.env, paths)
    if b.backend == "grubenv":
        from .boot.grubenv import GrubEnvBoot
        return GrubEnvBoot(b.env)
    if b.backend == "gpt":
        from .boot.gpt import GptBoot
        return GptBoot(b.disk, dict(b.labels))
    from .boot.uboot import UBootBoot
    return UBootBoot(b.fw_config)


def os_release_version(path: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                if key == "VERSION_ID":
                    return value.strip().strip('"').strip("'") or None
    except OSError:
        return None
    return None


def _guid(rng: random.Random) -> str:
    return "{" + str(uuid.UUID(int=rng.getrandbits(128), version=4)) + "}"


class Agent:
    def __init__(self, config: Config, *, clock=time.time, rng: random.Random | None = None,
                 boot: BootControl | None = None):
        self.config = config
        self.clock = clock
        self.rng = rng or random.SystemRandom()
        self.boot = boot or make_boot(config)
        self.store = StateStore(config.state_dir)
        self.state = State()
        self.flow = engine.Flow(self._changed)
        self.booted: str | None = None
        self.version = config.app.version or "0.0.0"
        self.progress: Progress | None = None
        self.new_version = ""
        self.new_size = 0
        self.listeners: list = []  # callables(snapshot) - the D-Bus service subscribes here
        self.slots: dict = {}  # the bootloader's view, re-read off the event loop when the operation changes
        self.boot_complete = asyncio.Event()  # set by ConfirmBoot (omaha-agent-confirm.service)
        self.wait_for_boot_complete = False  # the service mode sets this when health.after is boot-complete
        self.confirming: dict | None = None  # a trial boot waiting for boot-complete.target
        self._background: set[asyncio.Task] = set()
        self.session = None
        self.wakeup = asyncio.Event()
        self.interactive_request = False
        self._lock = asyncio.Lock()
        self._flush_lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ state and status
    def _changed(self, old: Operation, new: Operation) -> None:
        log.info("operation: %s -> %s%s", old.value, new.value,
                 f" ({self.version} -> {self.new_version})" if self.new_version else "")
        self.notify()
        self._spawn(self.refresh_slots())

    def _spawn(self, coro) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (a synchronous caller): nothing to refresh in the background
            coro.close()
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def refresh_slots(self) -> None:
        self.slots = await asyncio.to_thread(self.slot_status)
        self.notify()

    def notify(self) -> None:
        snap = self.snapshot()
        for listener in list(self.listeners):
            try:
                listener(snap)
            except Exception:  # a broken listener never stops an update
                log.exception("status listener failed")

    def save(self) -> None:
        self.store.save(self.state)

    def slot_status(self) -> dict:
        try:
            status = self.boot.status()
        except BootError as exc:
            return {"error": str(exc)}
        out = {}
        for slot, st in status.items():
            entry = st.to_json()
            trial = self.state.trial or {}
            if slot == self.booted and st.state is SlotState.BAD and trial.get("slot") == slot:
                entry.update(state="trial", tries_left=0)  # running on its last try, not yet confirmed
            if slot == self.booted and "version" not in entry:
                entry["version"] = self.version
            if slot == trial.get("slot") and "version" not in entry:
                entry["version"] = trial.get("version")
            out[slot] = entry
        return out

    def snapshot(self) -> dict:
        p = self.progress
        return {
            "operation": self.flow.operation.value, "progress": p.fraction if p else 0.0,
            "current_version": self.version, "new_version": self.new_version, "new_size": self.new_size,
            "bytes_downloaded": p.done if p else 0, "rate": p.rate if p else 0.0,
            "last_check": self.state.last_check or 0, "next_check": self.state.next_check or 0,
            "booted_slot": self.booted or "", "last_error": self.state.last_error, "slots": self.slots,
            "pending_events": len(self.state.events), "waiting_for_boot_complete": self.confirming is not None,
        }

    # ------------------------------------------------------------------ start-up
    def detect(self) -> None:
        if hasattr(self.boot, "booted_slot"):
            self.booted = self.boot.booted_slot()
        else:
            self.booted = detect_booted(self.config.slots)
        version = None
        if self.config.boot.backend == "sim":
            try:
                version = self.boot.status()[self.booted].version
            except (BootError, KeyError):
                version = None
        elif self.config.app.version_file:
            version = os_release_version(self.config.app.version_file)
        self.version = version or self.config.app.version or "0.0.0"

    async def start(self, on_ready=None) -> None:
        """Loads the state, finds the booted slot, then (after ``on_ready``: the service is reachable) settles
        the last update: confirm a trial boot, report a fallback, or keep waiting for a reboot."""
        self.state, warning = await asyncio.to_thread(self.store.load)
        if warning:
            log.warning("%s", warning)
        await asyncio.to_thread(self.detect)
        self.slots = await asyncio.to_thread(self.slot_status)
        log.info("started: version %s, booted slot %s, backend %s", self.version, self.booted or "unknown",
                 self.config.boot.backend)
        if self.wait_for_boot_complete:  # settling is quick then: a trial only starts waiting for ConfirmBoot
            await self.after_boot()
        if on_ready is not None:
            await on_ready()
        if not self.wait_for_boot_complete:  # health commands may be slow: the service is ready before
            await self.after_boot()
        await self.refresh_slots()

    async def after_boot(self) -> None:
        trial = self.state.trial
        if not trial:
            trial = await self._untracked_trial()
        bootable = False
        if trial:
            try:
                status = await asyncio.to_thread(self.boot.status)
                bootable = status[trial["slot"]].state is SlotState.TRIAL
            except (BootError, KeyError):
                bootable = not trial.get("armed")  # unknown: keep an unarmed trial rather than drop it
        if trial and not trial.get("armed"):
            # a crash between recording the trial and arming it: the bootloader says which happened
            # (booting the slot, or its tries left, prove set_trial ran; otherwise the install did not finish)
            armed = bootable or self.booted == trial.get("slot")
            self.state.trial = trial = dict(trial, armed=True) if armed else None
            await asyncio.to_thread(self.save)
        outcome = engine.after_boot(trial, self.booted, bootable)
        if outcome is AfterBoot.WAITING:
            self.new_version = trial.get("version", "")
            self.flow.to(Operation.NEED_REBOOT)
        elif outcome is AfterBoot.CONFIRM:
            if self.wait_for_boot_complete:
                self.confirming = trial
                self._spawn(self._confirm_after_boot_complete(trial))
                log.info("slot %s boots on trial: its health check runs once boot-complete.target is reached",
                         self.booted)
            else:
                await self._confirm(trial)
        elif outcome is AfterBoot.FELL_BACK:
            await self._fell_back(trial)

    async def _untracked_trial(self) -> dict | None:
        """A trial record for a running slot the bootloader does not call good although no record names it
        (``engine.untracked_boot``); None when there is nothing to settle."""
        if self.booted is None:
            return None
        try:
            status = await asyncio.to_thread(self.boot.status)
            booted_good = status[self.booted].state is SlotState.GOOD
            other_good = status[other(self.booted)].state is SlotState.GOOD
        except (BootError, KeyError):
            return None
        decision = engine.untracked_boot(self.booted, booted_good, other_good)
        blocked = self.state.blocked or {}
        if decision is engine.Untracked.CONFIRM and blocked.get("version") == self.version:
            # this version already failed here (its 3/0 is sent); the slot waits for the reboot back
            log.warning("slot %s runs %s, which failed here; reboot to go back to slot %s", self.booted,
                        self.version, other(self.booted))
            return None
        if decision is engine.Untracked.CONFIRM:
            log.warning("slot %s runs unconfirmed and no trial record names it (was the state lost?): "
                        "confirming it as a trial of %s", self.booted, self.version)
            self.state.trial = {"slot": self.booted, "version": self.version, "armed": True, "untracked": True}
            await asyncio.to_thread(self.save)
            return self.state.trial
        if decision is engine.Untracked.ADOPT:
            log.warning("slot %s runs unconfirmed and no other slot is good: marking it good, it is the "
                        "system this device boots", self.booted)
            try:
                await asyncio.to_thread(self.boot.mark_good, self.booted)
            except BootError as exc:
                log.error("could not mark slot %s good: %s", self.booted, exc)
        return None

    async def _confirm_after_boot_complete(self, trial: dict) -> None:
        timeout = self.config.health.boot_complete_timeout
        try:
            await asyncio.wait_for(self.boot_complete.wait(), timeout)
            failure = None
        except asyncio.TimeoutError:
            failure = f"boot-complete.target was not reached within {timeout} s"
        async with self._lock:
            if self.confirming is not trial:  # MarkGood settled it meanwhile
                return
            self.confirming = None
            await self._confirm(trial, failure)
            await self.refresh_slots()
        await self.flush_events()

    def confirm_boot(self) -> str:
        """``ConfirmBoot`` on D-Bus: the system reached boot-complete.target, run the trial's health check."""
        self.boot_complete.set()
        if self.confirming is None:
            return "no trial boot waits for confirmation"
        return f"boot complete: checking the health of slot {self.booted}"

    async def _confirm(self, trial: dict, failure: str | None = None) -> None:
        ok, reason = (False, failure) if failure else await self.run_health()
        previous, new = trial.get("previous_version", "0.0.0.0"), trial.get("version", self.version)
        if ok:
            await self._trial_good(trial)
            self.state.blocked = None
            await asyncio.to_thread(self.save)
            log.info("slot %s is good: updated %s -> %s after reboot; reporting 3/2", self.booted, previous, new)
            return
        log.error("health check failed on slot %s (%s): marking it bad and going back", self.booted, reason)
        await asyncio.to_thread(self.boot.mark_bad, self.booted)
        self._queue(engine.failed(ErrorCode.HEALTH_CHECK_FAILED, ErrorCategory.INSTALL, previous, new), new)
        self.state.trial = None
        self.state.blocked = engine.block_until(self.clock(), self.state.blocked, new)
        self.state.last_error = f"health check failed on {new}: {reason}"
        await asyncio.to_thread(self.save)
        await self.reboot(f"health check of {new} failed")

    async def _fell_back(self, trial: dict) -> None:
        slot, new = trial["slot"], trial.get("version", "")
        log.error("the trial boot of %s on slot %s did not come up: the bootloader fell back to slot %s",
                  new, slot, self.booted)
        try:
            await asyncio.to_thread(self.boot.mark_bad, slot)
        except BootError as exc:
            log.error("could not mark slot %s bad: %s", slot, exc)
        self._queue(engine.failed(ErrorCode.BOOTLOADER_FALLBACK, ErrorCategory.INSTALL,
                                  trial.get("previous_version", self.version), new), self.version)
        self.state.trial = None
        self.state.blocked = engine.block_until(self.clock(), self.state.blocked, new)
        self.state.last_error = f"version {new} did not boot; fell back to {self.version}"
        await asyncio.to_thread(self.save)

    async def run_health(self) -> tuple[bool, str]:
        env = dict(os.environ, OMAHA_AGENT_SLOT=self.booted or "", OMAHA_AGENT_VERSION=self.version)
        try:
            env["OMAHA_AGENT_DEVICE"] = resolve(self.config.slots[self.booted])
        except (SlotError, KeyError):
            pass
        for command in self.config.health.commands:
            proc = await asyncio.create_subprocess_shell(command, env=env, stdout=asyncio.subprocess.DEVNULL,
                                                         stderr=asyncio.subprocess.PIPE)
            try:
                _, err = await asyncio.wait_for(proc.communicate(), self.config.health.timeout)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
                return False, f"{command!r} did not finish in {self.config.health.timeout} s"
            if proc.returncode != 0:
                detail = err.decode(errors="replace").strip().splitlines()
                return False, f"{command!r} exited {proc.returncode}" + (f": {detail[-1][:200]}" if detail else "")
        return True, "healthy"

    # ------------------------------------------------------------------ talking to the server
    def client_info(self, version: str | None = None) -> build.ClientInfo:
        app = self.config.app
        machineid = None
        if app.send_machine_id:
            try:
                with open("/etc/machine-id") as f:
                    machineid = f.read().strip() or None
            except OSError:
                machineid = None
        return build.ClientInfo(
            appid=app.id, version=version or self.version, track=app.track, board=app.board,
            hardware_class=app.hardware_class, protocol=self.config.server.protocol, updaterversion=__version__,
            os_version=platform.release(), arch=platform.machine(), machineid=machineid,
            targetversionprefix=app.targetversionprefix, rollback_allowed=app.rollback_allowed)

    async def _session(self):
        if self.session is None:
            from .http import make_session
            self.session = make_session(self.config.server.ca_file, self.config.server.timeout)
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def _queue(self, event: Event, version: str) -> None:
        enqueue(self.state, {"requestid": _guid(self.rng), "sessionid": _guid(self.rng), "created": self.clock(),
                             "version": version, "event": event.__dict__})
        log.info("event %s queued (%s -> %s)", event_label(event.eventtype, event.eventresult),
                 event.previousversion, event.nextversion)

    async def flush_events(self) -> bool:
        """Send queued events oldest first; each leaves the queue once acknowledged. False if any is left.
        One flush at a time: the post-boot confirmation and the check loop may both ask for one."""
        async with self._flush_lock:
            return await self._flush_events()

    async def _flush_events(self) -> bool:
        from .http import OmahaHttpError, post
        while self.state.events:
            record = self.state.events[0]
            try:
                event = Event(**record["event"])
            except TypeError:
                self.state.events.pop(0)  # not an event this version understands
                continue
            req = build.event_report(self.client_info(), (event,), requestid=record["requestid"],
                                     sessionid=record.get("sessionid", ""), version=record.get("version"),
                                     installdate=self._installdate(), cohort=self._cohort())
            age = max(0, int(self.clock() - float(record.get("created", self.clock()))))
            try:  # a resend says how old it is, and keeps its request id so the server can deduplicate
                await post(await self._session(), self.config.server.url, req, interactive=None,
                           request_age=age if record.get("attempts") else None, timeout=self.config.server.timeout)
            except OmahaHttpError as exc:
                record["attempts"] = int(record.get("attempts", 0)) + 1
                await asyncio.to_thread(self.save)
                log.warning("event %s not delivered (%s); kept for later", event_label(event.eventtype,
                                                                                        event.eventresult), exc)
                return False
            self.state.events.pop(0)
            await asyncio.to_thread(self.save)
            log.info("event %s delivered", event_label(event.eventtype, event.eventresult))
        return True

    def _installdate(self) -> int | None:
        return pings.PingState.from_json(self.state.ping).install_date

    def _cohort(self) -> build.Cohort:
        c = self.state.cohort
        return build.Cohort(c.get("cohort", ""), c.get("cohorthint", ""), c.get("cohortname", ""))

    async def check(self, interactive: bool = False) -> str:
        """One update check, and the install if one is offered. Returns what happened, in a line."""
        async with self._lock:
            return await self._check(interactive)

    async def _check(self, interactive: bool) -> str:
        from .http import OmahaHttpError, post
        if self.flow.operation is Operation.NEED_REBOOT:
            return f"version {self.new_version} is installed and waits for a reboot"
        self.flow.to(Operation.CHECKING)
        now = self.clock()
        ping_state = pings.PingState.from_json(self.state.ping)
        req = build.update_check(self.client_info(), requestid=_guid(self.rng), sessionid=_guid(self.rng),
                                 interactive=interactive, ping=pings.ping_for(ping_state, now),
                                 cohort=self._cohort(), installdate=ping_state.install_date)
        self.state.last_check = now
        try:
            answer = await post(await self._session(), self.config.server.url, req, interactive=interactive,
                                timeout=self.config.server.timeout)
        except OmahaHttpError as exc:
            self.state.failures += 1
            self.state.last_error = str(exc)
            if exc.retry_after:
                self.state.retry_after_until = self.clock() + exc.retry_after
            await asyncio.to_thread(self.save)
            self.flow.to(Operation.IDLE)
            raise AgentError(str(exc)) from None
        if answer.retry_after:
            self.state.retry_after_until = self.clock() + answer.retry_after
        self.state.ping = pings.after_reply(ping_state, now, answer.response.daystart, _guid(self.rng)).to_json()
        app = answer.response.app(self.config.app.id)
        if app is not None:
            for key in ("cohort", "cohorthint", "cohortname"):
                if getattr(app, key) is not None:
                    self.state.cohort[key] = getattr(app, key)
        outcome = interpret(answer.response, self.config.app.id)
        if isinstance(outcome, NoUpdate):
            self.state.failures = 0
            self.state.last_error = ""
            self.state.download = None  # a partial download of an update no longer offered is not resumed
            await asyncio.to_thread(self.save)
            self.flow.to(Operation.IDLE)
            return f"no update (running {self.version})"
        if not isinstance(outcome, UpdateOffer):
            self.state.failures += 1
            self.state.last_error = outcome.reason
            await asyncio.to_thread(self.save)
            self.flow.to(Operation.IDLE)
            raise AgentError(outcome.reason)
        self.state.failures = 0
        return await self._offered(outcome, req.sessionid)

    async def _offered(self, offer: UpdateOffer, sessionid: str) -> str:
        status = await asyncio.to_thread(self.boot.status)
        booted_good = self.booted is not None and status[self.booted].state is SlotState.GOOD
        trial = self.state.trial or {}
        decision = engine.may_install(offer.version, self.version, trial_version=trial.get("version"),
                                      blocked=self.state.blocked, rollback_allowed=self.config.app.rollback_allowed,
                                      booted_good=booted_good, now=self.clock())
        if not decision.ok:
            log.info("offer of %s not taken: %s", offer.version, decision.reason)
            await asyncio.to_thread(self.save)
            self.flow.to(Operation.IDLE)
            return f"offer of {offer.version} not taken: {decision.reason}"
        if len(offer.packages) != 1:
            self.flow.to(Operation.IDLE)
            raise AgentError(f"offer of {offer.version} has {len(offer.packages)} packages; a slot takes exactly one")
        self.new_version, self.new_size = offer.version, offer.size
        self.flow.to(Operation.UPDATE_AVAILABLE)
        return await self._install(offer, sessionid)

    async def _install(self, offer: UpdateOffer, sessionid: str) -> str:
        pkg = offer.packages[0]
        target = other(self.booted)
        previous = self.version
        try:
            path = await asyncio.to_thread(check_target, target, self.config.slots, self.booted, pkg.size)
            size = await asyncio.to_thread(capacity, path)
        except (SlotError, OSError) as exc:
            return await self._install_failed(offer, InstallError(str(exc), "device"))
        resume = Checkpoint.from_json(self.state.download) if self.state.download else None
        if resume is None:  # marks the download as started: a restart resumes it soon (schedule.after_restart)
            self.state.download = Checkpoint(offer.version, target, pkg.sha256_hex, pkg.size, 0, False).to_json()
        self._queue(engine.download_started(previous, offer.version, pkg.size), previous)
        await asyncio.to_thread(self.save)
        await self.flush_events()
        self.flow.to(Operation.DOWNLOADING)

        def on_progress(p: Progress) -> None:
            self.progress = p
            self.notify()

        async def on_checkpoint(cp: Checkpoint) -> None:
            self.state.download = cp.to_json()
            await asyncio.to_thread(self.save)

        installer = Installer(await self._session(), sessionid=sessionid, read_timeout=self.config.install.read_timeout,
                              readback=self.config.install.verify == "readback", on_progress=on_progress,
                              on_checkpoint=on_checkpoint)
        log.info("downloading %s (%d bytes) onto slot %s from %s", offer.version, pkg.size, target, pkg.urls[0])
        try:
            await asyncio.to_thread(self.boot.mark_bad, target)
            result = await installer.stream(target, path, size, pkg, offer.version, resume)
        except BootError as exc:
            return await self._install_failed(offer, InstallError(f"could not mark slot {target} bad: {exc}", "boot"))
        except InstallError as exc:
            return await self._install_failed(offer, exc)
        except asyncio.CancelledError:
            log.info("download cancelled at %d bytes; it resumes next time", self.progress.done if self.progress else 0)
            self.flow.to(Operation.IDLE)
            self.new_version, self.progress = "", None
            raise
        self.flow.to(Operation.VERIFYING)
        log.info("verified %s: %d bytes in %.1f s%s", offer.version, result.received, result.download_ms / 1000,
                 f" ({result.compression}, {result.written} bytes on the slot)" if result.compression else "")
        self._queue(engine.download_finished(previous, offer.version, result.received, result.download_ms, result.url),
                    previous)
        self.flow.to(Operation.FINALIZING)
        # record the intent first: a crash after set_trial still finds the trial on restart
        self.state.trial = {"slot": target, "version": offer.version, "previous_version": previous, "armed": False}
        self.state.download = None
        await asyncio.to_thread(self.save)
        try:
            await asyncio.to_thread(self.boot.set_trial, target, self.config.boot.tries, offer.version)
        except BootError as exc:
            self.state.trial = None
            return await self._install_failed(offer, InstallError(f"could not set slot {target} for a trial boot: "
                                                                  f"{exc}", "boot"))
        self.state.trial["armed"] = True
        self._queue(engine.applied(previous, offer.version), previous)
        self.state.last_error = ""
        await asyncio.to_thread(self.save)
        self.flow.to(Operation.NEED_REBOOT)
        await self.flush_events()
        if self.config.reboot.policy == "immediate":
            await self.reboot(f"update to {offer.version} installed")
        return f"installed {offer.version} on slot {target}; it boots on trial after a reboot"

    async def _install_failed(self, offer: UpdateOffer, exc: InstallError) -> str:
        code, category = engine.INSTALL_ERRORS.get(exc.kind, (ErrorCode.GENERIC, ErrorCategory.INSTALL))
        log.error("update to %s failed: %s", offer.version, exc)
        self.flow.to(Operation.REPORTING_ERROR)
        self._queue(engine.failed(code, category, self.version, offer.version), self.version)
        self.state.last_error = f"update to {offer.version} failed: {exc}"
        if exc.kind != "transfer":
            self.state.download = None  # nothing worth resuming
        if exc.kind in ("hash", "size", "decompress", "readback"):
            self.state.blocked = engine.block_until(self.clock(), self.state.blocked, offer.version)
        await asyncio.to_thread(self.save)
        await self.flush_events()
        self.new_version, self.progress = "", None
        self.flow.to(Operation.IDLE)
        raise AgentError(self.state.last_error)

    # ------------------------------------------------------------------ reboot and mark-good
    async def reboot(self, why: str, force: bool = False) -> None:
        if self.config.reboot.policy != "immediate" and not force:
            log.info("reboot needed (%s); policy is manual", why)
            return
        log.info("rebooting: %s", why)
        if self.config.boot.backend == "sim":
            booted = await asyncio.to_thread(self.boot.reboot)
            log.info("simulated reboot: slot %s came up", booted)
            return
        from .logind import reboot
        await reboot()

    async def mark_good(self) -> str:
        """External health confirmation (``MarkGood`` on D-Bus): the booted trial slot is good."""
        trial = self.state.trial
        self.confirming = None  # an external health check replaces the wait for boot-complete.target
        if trial and trial.get("slot") == self.booted:
            await self._trial_good(trial)
            await asyncio.to_thread(self.save)
            self._spawn(self.flush_events())  # the 3/2 goes out now; the caller does not wait for the server
        else:
            await asyncio.to_thread(self.boot.mark_good, self.booted)
        await self.refresh_slots()
        return f"slot {self.booted} marked good"

    async def _trial_good(self, trial: dict) -> None:
        """The booted trial slot is confirmed: mark it good and queue the 3/2 (the caller saves the state)."""
        previous, new = trial.get("previous_version", "0.0.0.0"), trial.get("version", self.version)
        await asyncio.to_thread(self.boot.mark_good, self.booted)
        self._queue(engine.updated_and_rebooted(previous, new), new)
        self.state.trial = None

    # ------------------------------------------------------------------ the two ways to run
    async def run_once(self) -> str:
        try:
            await self.start()
            delivered = await self.flush_events()
            result = await self.check(interactive=True)
            if not delivered and self.state.events:
                delivered = await self.flush_events()
            if self.state.events:
                raise AgentError(f"{len(self.state.events)} event(s) could not be delivered; they are kept")
            return result
        finally:
            await self.close()

    def _schedule_policy(self) -> schedule.Policy:
        s = self.config.schedule
        return schedule.Policy(interval=s.interval, initial_delay=s.initial_delay, backoff_base=s.backoff_base,
                               backoff_cap=s.backoff_cap)

    def request_check(self, interactive: bool) -> bool:
        """Wakes the loop for a check now; False when a check (or its download) is already running."""
        if self._task is not None:
            return False
        self.interactive_request = self.interactive_request or interactive
        self.wakeup.set()
        return True

    def reset_status(self) -> str:
        """Flatcar's ResetStatus: back to idle from a finished update or a reported error. An installed update
        stays armed in the bootloader and still boots on the next reboot."""
        if self.flow.operation in (Operation.NEED_REBOOT, Operation.REPORTING_ERROR):
            self.flow.to(Operation.IDLE)
        elif self.flow.operation is not Operation.IDLE:
            raise AgentError(f"cannot reset while {self.flow.operation.value}")
        return "idle"

    async def reboot_now(self) -> str:
        """``Reboot`` on D-Bus: only when an installed update waits for it."""
        if self.flow.operation is not Operation.NEED_REBOOT:
            raise AgentError(f"no update waits for a reboot (the agent is {self.flow.operation.value})")
        await self.reboot(f"asked to boot {self.new_version}", force=True)
        return f"rebooting into {self.new_version}"

    async def run_forever(self, stop: asyncio.Event, on_ready=None) -> None:
        await self.start(on_ready)
        await self.flush_events()  # a fallback's 3/0 (or anything left from before) goes out now, not at the next check
        policy = self._schedule_policy()
        nxt = schedule.after_restart(self.state.next_check, self.clock(), self.rng, policy,
                                     interrupted_download=self.state.download is not None)

        async def stop_wakes_the_loop():
            await stop.wait()
            self.wakeup.set()
            if self._task is not None:
                self._task.cancel()  # a download in progress keeps its checkpoint and resumes next time

        watcher = asyncio.create_task(stop_wakes_the_loop())
        try:
            while not stop.is_set():
                self.state.next_check = nxt.at
                self.notify()
                log.info("next check in %d s (%s)", max(0, nxt.at - self.clock()), nxt.reason)
                interactive = await self._sleep_until(nxt.at, stop)
                if stop.is_set():
                    break
                if not interactive and not schedule.background_allowed(self.clock(), self.state.retry_after_until):
                    nxt = schedule.NextCheck(self.state.retry_after_until, "server asked to wait (X-Retry-After)")
                    continue
                await self.flush_events()
                try:
                    self._task = asyncio.create_task(self.check(interactive))
                    log.info("%s", await self._task)
                except AgentError as exc:
                    log.warning("check failed: %s", exc)
                except asyncio.CancelledError:
                    if stop.is_set():
                        break
                finally:
                    self._task = None
                retry = None
                if self.state.retry_after_until:
                    retry = max(0, int(self.state.retry_after_until - self.clock()))
                nxt = schedule.next_check(self.clock(), self.rng, policy, self.state.failures, retry)
        finally:
            watcher.cancel()
            for task in list(self._background):
                task.cancel()
            await asyncio.to_thread(self.save)
            await self.close()

    async def _sleep_until(self, when: float, stop: asyncio.Event) -> bool:
        """Sleeps in short steps (wall-clock jumps and suspend are noticed). Returns early when a check is
        requested, with whether it is interactive; False when the scheduled time came."""
        while not stop.is_set():
            if self.wakeup.is_set():
                self.wakeup.clear()
                interactive, self.interactive_request = self.interactive_request, False
                return interactive
            remaining = when - self.clock()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self.wakeup.wait(), min(remaining, 30))
            except asyncio.TimeoutError:
                pass
        return False

    def cancel(self) -> bool:
        if self._task is not None and self.flow.operation is Operation.DOWNLOADING:
            self._task.cancel()
            return True
        return False
