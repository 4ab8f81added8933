"""The trial settler: what start-up finds about the last update, and the health step that decides a trial.

At start-up: which slot runs and which version; then the trial record against the bootloader (``policy``):
the trial slot booted → confirm it (health step, then good and 3/2, or bad, 3/0 code 45 and a reboot back);
the old slot runs and the trial's tries are gone → it fell back (bad, 3/0 code 44, the version blocked);
the trial slot still has its tries → keep waiting for the reboot. A running slot the bootloader does not call
good although no record names it is confirmed like a trial, or adopted when no other slot is good; so is the
running slot when the bootloader's env is missing or empty (a first boot before provisioning).
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace
from enum import Enum

from . import policy, schedule
from .procgroup import kill_group
from .omaha import versions
from .boot import BootEnvMissing, BootError, SlotState, other
from .errors import describe
from .omaha.events import ErrorCategory, ErrorCode
from .reboot import reboot
from .slots import SlotError, detect_booted, resolve
from .state import Fallback, Trial

log = logging.getLogger("omaha-agent")


class Found(str, Enum):
    NOTHING = "nothing"  # no trial to settle: idle
    WAITING = "waiting"  # an armed trial waits for its reboot
    TRIAL_BOOT = "trial-boot"  # the trial slot runs: its health step decides


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


class Settler:
    def __init__(self, ctx, reporter):
        self.ctx = ctx
        self.reporter = reporter

    # -------------------------------------------------------------- start-up
    async def detect(self) -> None:
        """The booted slot and the running version."""
        ctx = self.ctx
        ctx.booted = await ctx.boot.booted_slot() or await asyncio.to_thread(detect_booted, ctx.config.slots)
        version = None
        if ctx.config.boot.backend == "sim":
            try:
                version = (await ctx.boot.status())[ctx.booted].version
            except (BootError, KeyError):
                version = None
        elif ctx.config.app.version_file:
            version = os_release_version(ctx.config.app.version_file)
        ctx.version = version or ctx.config.app.version or "0.0.0"

    def sanitize(self) -> None:
        """Times the wall clock can no longer reach soon (it moved back since they were stored) are brought
        within their longest legal wait."""
        state, now = self.ctx.state, self.ctx.now()
        state.retry_after_until = schedule.within(state.retry_after_until, now, schedule.RETRY_AFTER_CAP)
        if state.blocked is not None:
            state.blocked = replace(state.blocked, until=schedule.within(state.blocked.until, now, policy.BLOCK_MAX))

    async def settle(self) -> Found:
        """Settles the last update against the bootloader; commits what changed. Raises ``BootError`` when the
        bootloader cannot be read: nothing is decided then (the next start settles again)."""
        ctx, state = self.ctx, self.ctx.state
        if ctx.booted is None:
            if state.trial is not None:
                log.error("cannot tell which slot runs: the %s trial is left as it is until a start that can",
                          state.trial.version)
            return Found.NOTHING
        trial = state.trial or await self._untracked_trial()
        bootable = False
        if trial:
            bootable = (await ctx.boot.status())[trial.slot].state is SlotState.TRIAL
        if trial and not trial.armed:
            # a crash between recording the trial and arming it: the bootloader says which happened
            # (booting the slot, or its tries left, prove set_trial ran; otherwise the install did not finish)
            armed = bootable or ctx.booted == trial.slot
            state.trial = trial = replace(trial, armed=True) if armed else None
            if armed and not trial.rollback:  # its 3/1 was never queued (a rollback has none)
                self.reporter.queue(policy.applied(trial.previous_version, trial.version), trial.previous_version)
            await ctx.save()
        if trial and trial.replaced and not bootable and ctx.booted != trial.slot:
            log.info("the installed %s was being replaced by a new install; it is gone", trial.version)
            state.trial = None  # marked bad on purpose, not a failed boot: nothing to report
            await ctx.save()
            return Found.NOTHING
        found = policy.after_boot(trial, ctx.booted, bootable)
        if found is policy.AfterBoot.WAITING:
            ctx.status.offer(trial.version, 0)
            return Found.WAITING
        if found is policy.AfterBoot.CONFIRM:
            return Found.TRIAL_BOOT
        if found is policy.AfterBoot.FELL_BACK:
            await self._fell_back(trial)
        return Found.NOTHING

    async def _untracked_trial(self) -> Trial | None:
        """A trial record for a running slot the bootloader does not call good although no record names it
        (``policy.untracked_boot``); None when there is nothing to settle."""
        ctx = self.ctx
        if ctx.booted is None:
            return None
        try:
            status = await ctx.boot.status()
            booted_good = status[ctx.booted].state is SlotState.GOOD
            other_good = status[other(ctx.booted)].state is SlotState.GOOD
        except BootEnvMissing as exc:
            # a first boot before provisioning: the bootloader sees nothing good or armed either, so the
            # running slot is adopted (written good, never bad) and the other slot is bad, as it boots
            log.warning("%s: adopting the running slot %s as good, the other slot bad", exc, ctx.booted)
            try:
                await ctx.boot.adopt(ctx.booted)
            except BootError as error:
                log.error("could not adopt slot %s: %s", ctx.booted, error)
            return None
        except (BootError, KeyError):
            return None
        decision = policy.untracked_boot(ctx.booted, booted_good, other_good)
        blocked = ctx.state.blocked
        if decision is policy.Untracked.CONFIRM and blocked is not None and versions.same(blocked.version, ctx.version):
            # this version already failed here (its 3/0 is queued): a stop came between marking it bad and the
            # reboot back, or the policy is manual; the reboot back happens now unless it is manual
            log.warning("slot %s runs %s, which failed here; reboot to go back to slot %s", ctx.booted,
                        ctx.version, other(ctx.booted))
            try:
                await reboot(ctx, f"slot {ctx.booted} runs {ctx.version}, which failed here")
            except Exception as exc:  # logind refused: the slot is marked bad, the next reboot goes back anyway
                log.error("could not reboot back to slot %s: %s", other(ctx.booted), describe(exc))
            return None
        if decision is policy.Untracked.CONFIRM:
            log.warning("slot %s runs unconfirmed and no trial record names it (was the state lost?): "
                        "confirming it as a trial of %s", ctx.booted, ctx.version)
            ctx.state.trial = Trial(ctx.booted, ctx.version, armed=True, untracked=True)
            await ctx.save()
            return ctx.state.trial
        if decision is policy.Untracked.ADOPT:
            log.warning("slot %s runs unconfirmed and no other slot is good: marking it good, it is the "
                        "system this device boots", ctx.booted)
            try:
                await ctx.boot.mark_good(ctx.booted)
            except BootError as exc:
                log.error("could not mark slot %s good: %s", ctx.booted, exc)
        return None

    async def _fell_back(self, trial: Trial) -> None:
        ctx, state = self.ctx, self.ctx.state
        log.error("the trial boot of %s on slot %s did not come up: the bootloader fell back to slot %s",
                  trial.version, trial.slot, ctx.booted)
        try:
            await ctx.boot.mark_bad(trial.slot)
        except BootError as exc:
            log.error("could not mark slot %s bad: %s", trial.slot, exc)
        self.reporter.queue(policy.failed(ErrorCode.BOOTLOADER_FALLBACK, ErrorCategory.INSTALL,
                                          trial.previous_version, trial.version), ctx.version)
        state.trial = None
        state.blocked = policy.block_until(ctx.now(), state.blocked, trial.version)
        state.last_error = f"version {trial.version} did not boot; fell back to {ctx.version}"
        await ctx.save()

    # -------------------------------------------------------------- the trial's verdict
    async def health_step(self, failure: str | None = None) -> bool:
        """The health job: run the health commands (unless ``failure`` already says why the trial failed),
        then confirm the trial or fail it. Returns whether the trial is good."""
        trial = self.ctx.state.trial
        if trial is None or trial.slot != self.ctx.booted:
            return True
        ok, reason = (False, failure) if failure else await self.run_health()
        if ok:
            await self.confirm(trial)
            return True
        await self.fail(trial, reason)
        return False

    async def confirm(self, trial: Trial) -> None:
        """The booted trial slot is good: mark it good, queue 3/2, unblock (a rollback blocks the version it left
        instead), record what the other slot keeps, commit."""
        ctx, state = self.ctx, self.ctx.state
        async with ctx.shutdown_delay(f"confirming {trial.version} on slot {trial.slot}"):
            await ctx.boot.mark_good(trial.slot)
            self.reporter.queue(policy.updated_and_rebooted(trial.previous_version, trial.version), trial.version)
            state.trial = None
            state.blocked = (policy.block_until(ctx.now(), state.blocked, trial.previous_version, rolled_back=True)
                             if trial.rollback else None)
            state.fallback = None if trial.untracked else Fallback(other(trial.slot), trial.previous_version)
            state.last_error = ""
            await ctx.save()
        how = "rolled back" if trial.rollback else "updated"
        log.info("slot %s is good: %s %s -> %s after reboot; reporting 3/2", trial.slot, how,
                 trial.previous_version, trial.version)

    async def fail(self, trial: Trial, reason: str) -> None:
        ctx, state = self.ctx, self.ctx.state
        log.error("health check failed on slot %s (%s): marking it bad and going back", trial.slot, reason)
        async with ctx.shutdown_delay(f"marking slot {trial.slot} bad"):  # released before the reboot below
            await ctx.boot.mark_bad(trial.slot)  # first: a crash before the commit confirms the trial afresh
            state.trial = None
            state.blocked = policy.block_until(ctx.now(), state.blocked, trial.version)
            state.last_error = f"health check failed on {trial.version}: {reason}"
            self.reporter.queue(policy.failed(ErrorCode.HEALTH_CHECK_FAILED, ErrorCategory.INSTALL,
                                              trial.previous_version, trial.version), trial.version)
            await ctx.save("the failed trial")  # a failed save is shown; the reboot back happens anyway
        try:
            await reboot(ctx, f"health check of {trial.version} failed")
        except Exception as exc:  # the slot is marked bad: the next reboot, whoever asks for it, goes back
            log.error("could not reboot back from the failed %s: %s", trial.version, describe(exc))
            state.last_error += f"; could not reboot back ({describe(exc)}): reboot to go back to the other slot"

    async def run_health(self) -> tuple[bool, str]:
        ctx = self.ctx
        env = dict(os.environ, OMAHA_AGENT_SLOT=ctx.booted or "", OMAHA_AGENT_VERSION=ctx.version)
        try:
            env["OMAHA_AGENT_DEVICE"] = resolve(ctx.config.slots[ctx.booted])
        except (SlotError, KeyError):
            pass
        timeout = ctx.config.health.timeout
        for command in ctx.config.health.commands:
            try:  # its own process group: a timeout or a stop ends the command and everything it started
                proc = await asyncio.create_subprocess_shell(command, env=env, stdout=asyncio.subprocess.DEVNULL,
                                                             stderr=asyncio.subprocess.PIPE, start_new_session=True)
            except OSError as exc:
                return False, f"{command!r} could not start: {exc}"
            try:
                _, err = await asyncio.wait_for(proc.communicate(), timeout)
            except asyncio.TimeoutError:
                await kill_group(proc)
                return False, f"{command!r} did not finish in {timeout} s"
            except asyncio.CancelledError:
                await kill_group(proc)
                raise
            if proc.returncode != 0:
                detail = err.decode(errors="replace").strip().splitlines()
                return False, f"{command!r} exited {proc.returncode}" + (f": {detail[-1][:200]}" if detail else "")
        return True, "healthy"
