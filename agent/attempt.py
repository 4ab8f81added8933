"""The update attempt (the owner's update job): check → offer → install policy → install → trial armed.

Order: 13/1 queued → an old trial record on the target is dropped → the target is marked bad → stream and verify
→ 14/1 → the trial recorded (unarmed) → the slot set for its trial → armed, 3/1. A failure reports 3/0 with its
code; a hash, size, decompression or read-back failure blocks the version for a while. The job never sets the
operation it ends in: the owner does, when it ends (``machine.JobDone``).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from . import policy
from .boot import SlotState, other
from .install import InstallError, InstallHooks, InstallResult, Installer, Progress
from .machine import Decline, Operation, may_install
from .omaha import NoUpdate, UpdateOffer, interpret
from .omaha.events import ErrorCategory, ErrorCode
from .slots import SlotError, capacity, check_target
from .state import Checkpoint, Trial

log = logging.getLogger("omaha-agent")


class AttemptFailed(Exception):
    """The attempt failed; the message is the one-line reason (also in ``LastError``)."""


class UpdateAttempt:
    def __init__(self, ctx, reporter):
        self.ctx = ctx
        self.reporter = reporter

    async def run(self, interactive: bool) -> str:
        """One update check, and the install if one is offered and allowed. Returns what happened, in a line."""
        from .http import OmahaHttpError
        ctx, state = self.ctx, self.ctx.state
        try:
            req, answer = await self.reporter.check(interactive)
        except OmahaHttpError as exc:
            state.failures += 1
            state.last_error = str(exc)
            if exc.retry_after:
                state.retry_after_until = ctx.now() + exc.retry_after
            await ctx.store.commit()
            raise AttemptFailed(str(exc)) from None
        outcome = interpret(answer.response, ctx.config.app.id)
        if isinstance(outcome, NoUpdate):
            state.failures, state.last_error = 0, ""
            state.download = None  # a partial download of an update no longer offered is not resumed
            await ctx.store.commit()
            return f"no update (running {ctx.version})"
        if not isinstance(outcome, UpdateOffer):
            state.failures += 1
            state.last_error = outcome.reason
            await ctx.store.commit()
            raise AttemptFailed(outcome.reason)
        state.failures = 0
        return await self._offered(outcome, req.sessionid)

    async def _offered(self, offer: UpdateOffer, sessionid: str) -> str:
        ctx, state = self.ctx, self.ctx.state
        status = await ctx.boot.status()
        booted_good = ctx.booted is not None and status[ctx.booted].state is SlotState.GOOD
        blocked = state.blocked
        decision = may_install(offer.version, ctx.version, trial_version=state.trial.version if state.trial else None,
                               blocked_version=blocked.version if blocked else None,
                               blocked_until=blocked.until if blocked else 0.0,
                               rollback_allowed=ctx.config.app.rollback_allowed, booted_good=booted_good,
                               now=ctx.now())
        if isinstance(decision, Decline):
            log.info("offer of %s not taken: %s", offer.version, decision.reason)
            await ctx.store.commit()
            return f"offer of {offer.version} not taken: {decision.reason}"
        if len(offer.packages) != 1:
            raise AttemptFailed(f"offer of {offer.version} has {len(offer.packages)} packages; a slot takes exactly one")
        ctx.status.offer(offer.version, offer.size)
        ctx.status.flow.to(Operation.UPDATE_AVAILABLE)
        try:
            return await self._install(offer, sessionid)
        except asyncio.CancelledError:
            # what resumes is the durable checkpoint the installer saved on its way out, not the last progress
            cp = ctx.state.download
            if cp is not None and cp.version == offer.version and cp.received > 0 and not cp.compressed:
                log.info("download cancelled; %d of %d bytes are saved and it resumes from there next time",
                         cp.received, cp.size)
            else:
                log.info("download cancelled; it starts from the beginning next time (nothing resumable was saved)")
            ctx.status.clear_offer()
            raise

    async def _install(self, offer: UpdateOffer, sessionid: str) -> str:
        ctx, state = self.ctx, self.ctx.state
        pkg, target, previous = offer.packages[0], other(ctx.booted), ctx.version
        try:
            path = await asyncio.to_thread(check_target, target, ctx.config.slots, ctx.booted, pkg.size)
            size = await asyncio.to_thread(capacity, path)
        except (SlotError, OSError) as exc:
            return await self._failed(offer, InstallError(str(exc), "device"), target)
        resume = state.download
        if resume is None:  # marks the download as started: a restart resumes it soon (schedule.after_restart)
            state.download = Checkpoint(offer.version, target, pkg.sha256_hex, pkg.size, 0, False)
        self.reporter.queue(policy.download_started(previous, offer.version, pkg.size), previous)
        await ctx.store.commit()
        await self.reporter.flush()
        installer = Installer(await self.reporter.http(), sessionid=sessionid,
                              read_timeout=ctx.config.install.read_timeout,
                              readback=ctx.config.install.verify == "readback", on_progress=self._progress,
                              on_checkpoint=self._checkpoint)
        log.info("downloading %s (%d bytes) onto slot %s from %s", offer.version, pkg.size, target, pkg.urls[0])
        try:
            result = await installer.install(ctx.boot, target, path, size, pkg, offer.version,
                                             ctx.config.boot.tries, resume, _Hooks(self, offer, target, previous))
        except InstallError as exc:
            return await self._failed(offer, exc, target)
        state.trial = replace(state.trial, armed=True)
        self.reporter.queue(policy.applied(previous, offer.version), previous)
        state.last_error = ""
        await ctx.store.commit()
        log.info("verified %s: %d bytes in %.1f s%s", offer.version, result.received, result.download_ms / 1000,
                 f" ({result.compression}, {result.written} bytes on the slot)" if result.compression else "")
        await self.reporter.flush()
        return f"installed {offer.version} on slot {target}; it boots on trial after a reboot"

    def _progress(self, p: Progress) -> None:
        self.ctx.status.progress = p
        self.ctx.status.notify()

    async def _checkpoint(self, cp: Checkpoint) -> None:
        self.ctx.state.download = cp
        await self.ctx.store.commit()

    async def _failed(self, offer: UpdateOffer, exc: InstallError, target: str) -> str:
        ctx, state = self.ctx, self.ctx.state
        code, category = policy.INSTALL_ERRORS.get(exc.kind, (ErrorCode.GENERIC, ErrorCategory.INSTALL))
        log.error("update to %s failed: %s", offer.version, exc)
        ctx.status.flow.to(Operation.REPORTING_ERROR)
        self.reporter.queue(policy.failed(code, category, ctx.version, offer.version), ctx.version)
        state.last_error = f"update to {offer.version} failed: {exc}"
        if state.trial is not None and state.trial.slot == target and not state.trial.armed:
            state.trial = None  # recorded, but the slot was never armed
        if exc.kind != "transfer":
            state.download = None  # nothing worth resuming
        if exc.kind in ("hash", "size", "decompress", "readback"):
            state.blocked = policy.block_until(ctx.now(), state.blocked, offer.version)
        await ctx.store.commit()
        await self.reporter.flush()
        ctx.status.clear_offer()
        raise AttemptFailed(state.last_error)


class _Hooks(InstallHooks):
    def __init__(self, attempt: UpdateAttempt, offer: UpdateOffer, target: str, previous: str):
        self.attempt, self.offer, self.target, self.previous = attempt, offer, target, previous

    async def before_write(self) -> None:
        state = self.attempt.ctx.state
        if state.trial is not None and state.trial.slot == self.target:
            # an installed update that never booted (Flatcar's ResetStatus left it armed): its record goes
            # first, so a failure below can never be reported as that version not booting
            log.info("replacing the installed %s on slot %s", state.trial.version, self.target)
            state.trial = None
            await self.attempt.ctx.store.commit()

    async def writing(self) -> None:
        self.attempt.ctx.status.flow.to(Operation.DOWNLOADING)

    async def verified(self, result: InstallResult) -> None:
        ctx, state = self.attempt.ctx, self.attempt.ctx.state
        ctx.status.flow.to(Operation.VERIFYING)
        self.attempt.reporter.queue(policy.download_finished(self.previous, self.offer.version, result.received,
                                                             result.download_ms, result.url), self.previous)
        ctx.status.flow.to(Operation.FINALIZING)
        # record the intent first: a crash after set_trial still finds the trial on restart
        state.trial = Trial(self.target, self.offer.version, self.previous, armed=False)
        state.download = None
        await ctx.store.commit()

