"""The update attempt (the owner's update job): check → offer → install policy → install → trial armed.

Order: 13/1 queued → an old trial record on the target is dropped → the target is marked bad → stream and verify
→ 14/1 → the post-install commands (``posthook``) → the trial recorded (unarmed) → the slot set for its trial
→ armed, 3/1 (under ``install.arm`` on-apply or in-window the job ends after the post-install commands with the
update staged instead: ``staged.py`` arms it later). A failure reports 3/0 with its code; a hash, size,
decompression or read-back failure blocks the version for a while. The job reports its
progress through ``advance`` (the owner applies it); it never sets the operation it ends in: the owner does, when
its task ends. Saves go through ``Context.save``; a record that must be durable before a bootloader write (the
replaced install, the trial before it is armed) fails the install when it cannot be saved.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace

from . import policy
from .boot import BootError, SlotState, other
from .install import InstallError, InstallHooks, InstallResult, Installer, Progress
from .errors import AttemptFailed
from .machine import OfferDeclined, Operation, may_install
from .omaha import NoUpdate, UpdateOffer, interpret
from .omaha.events import ErrorCategory, ErrorCode
from .slots import SlotError, capacity, check_target
from .state import Checkpoint, Trial

log = logging.getLogger("omaha-agent")


__all__ = ["AttemptFailed", "UpdateAttempt"]


class UpdateAttempt:
    def __init__(self, ctx, reporter):
        self.ctx = ctx
        self.reporter = reporter
        self.advance = _nowhere  # the owner's: applies the job's progress through the machine's transitions
        self.interactive = False  # the running check was asked for (not the schedule's)
        self.hurried = asyncio.Event()  # set when an interactive check reaches the running job (``hurry``)
        self.images = None  # imageset.ImageSet: the offer is a release of several images (slot groups)

    async def run(self, interactive: bool, advance=None) -> str:
        """One update check, and the install if one is offered and allowed. Returns what happened, in a line."""
        from .http import OmahaHttpError
        self.advance = advance or _nowhere
        self.interactive = interactive
        self.hurried = asyncio.Event()
        ctx, state = self.ctx, self.ctx.state
        try:
            req, answer = await self.reporter.check(interactive)
        except OmahaHttpError as exc:
            state.failures += 1
            state.last_error = str(exc)
            if exc.retry_after and exc.trusted:  # X-Retry-After binds only over verified TLS
                state.retry_after_until = ctx.now() + exc.retry_after
            await ctx.save()
            raise AttemptFailed(str(exc)) from None
        outcome = interpret(answer.response, ctx.config.app.id)
        if isinstance(outcome, NoUpdate):
            state.failures, state.last_error = 0, ""
            state.download, state.written = None, []  # a download of an update no longer offered is not resumed
            await ctx.save()
            return f"no update (running {ctx.version})"
        if not isinstance(outcome, UpdateOffer):
            state.failures += 1
            state.last_error = outcome.reason
            await ctx.save()
            raise AttemptFailed(outcome.reason)
        state.failures = 0
        return await self._offered(outcome, req.sessionid)

    def hurry(self) -> str:
        """An interactive check reached this running job: it goes on as an interactive one (machine.py note 12)."""
        from .network import WAITING
        self.interactive = True
        waiting = self.ctx.state.last_error.startswith(WAITING)
        self.hurried.set()
        return ("the download that waited for an unmetered connection starts now" if waiting else
                "an update job is running; it goes on as an interactive one (install.max_rate_interactive)")

    async def run_file(self, path: str, signature: str, version: str, advance=None) -> str:
        """An offline install: the same gate and path as an online offer, from a payload file and its envelope.
        The release is what the verified envelope says (version, digest, size); refusals are one line in
        ``LastError`` without an event (nothing trustworthy names the version). Only regular files are read
        (``localfile``); the payload's size is checked against the target slot before it is hashed, and its
        digest before one byte of it is written."""
        from . import localfile
        from .omaha import versions
        from .omaha.outcome import PackageOffer
        ctx, app = self.ctx, self.ctx.config.app
        self.advance = advance or _nowhere
        self.interactive = True
        signed = ctx.config.trust.require_signature
        refused = f"{localfile.shown(path)} not installed"
        if not os.path.isabs(path) or (signature and not os.path.isabs(signature)):
            raise AttemptFailed(f"{refused}: give absolute paths (the service does not share your working "
                                "directory)")
        if any(p != localfile.shown(p) for p in (path, signature)):
            raise AttemptFailed(f"{refused}: a path with control characters, or of over 200 characters, is refused")
        if signed and version:
            raise AttemptFailed(f"{refused}: give no version: signatures are required, and the signed statement "
                                "names the version")
        if not signed and not version:
            raise AttemptFailed(f"{refused}: give its version (no signature is required, so none says it)")
        if len(ctx.config.groups) > 1:
            raise AttemptFailed(f"{refused}: a file is one image; these slot groups take a release of several")
        if not signed and (why := versions.problem(version)):
            raise AttemptFailed(f"{refused}: the version {why}")
        try:
            fd, size = await asyncio.to_thread(localfile.open_regular, path)
        except (OSError, localfile.LocalFileError) as exc:
            raise AttemptFailed(f"{refused}: {_unreadable(exc, path)}") from None
        try:
            release = await self._file_release(fd, size, path, signature or path + ".sig", refused) if signed else None
            target = other(ctx.booted)
            try:
                slot_path = await asyncio.to_thread(check_target, target, ctx.config.slots, ctx.booted, size)
            except (SlotError, OSError) as exc:
                raise AttemptFailed(f"{refused}: {exc}") from None
            log.info("offline install of %s: hashing %d bytes (for slot %s, %s)", localfile.shown(path), size, target,
                     slot_path)
            try:
                sha256 = await localfile.sha256(fd, size)
            except (OSError, localfile.LocalFileError) as exc:
                raise AttemptFailed(f"{refused}: {_unreadable(exc, path)}") from None
        finally:
            os.close(fd)
        if release is not None:
            if sha256 != release.sha256:
                raise AttemptFailed(f"{refused}: its SHA-256 {sha256[:16]}… is not the signed {release.sha256[:16]}… "
                                    "(another file of the same size?)")
            version = release.version
        log.info("offline install of %s: version %s, %d bytes", path, version, size)
        pkg = PackageOffer(os.path.basename(path), ("file://" + path,), size, bytes.fromhex(sha256), None)
        return await self._offered(UpdateOffer(app.id, version, (pkg,)), "", verified=True)

    async def _file_release(self, fd: int, size: int, path: str, sig_path: str, refused: str):
        """The release the envelope at ``sig_path`` signs for the payload file (of ``size`` bytes)."""
        from . import localfile
        from .trust import MAX_ENVELOPE, SignatureError, TrustKeyError, check_release, load_public_keys, open_envelope
        app = self.ctx.config.app
        try:
            envelope = await asyncio.to_thread(localfile.read_small, sig_path, MAX_ENVELOPE)
        except (OSError, localfile.LocalFileError) as exc:
            raise AttemptFailed(f"{refused}: {_unreadable(exc, sig_path)}") from None
        try:
            if envelope is None:
                raise SignatureError(f"no signature envelope at {localfile.shown(sig_path)}")
            keys = await asyncio.to_thread(load_public_keys, self.ctx.config.trust.keys)
            release = await asyncio.to_thread(open_envelope, envelope, keys)
            check_release(release, appid=app.id, version=release.version, sha256_hex=release.sha256, size=size,
                          track=app.track, board=app.board)
        except (SignatureError, TrustKeyError) as exc:
            raise AttemptFailed(f"{refused}: signature refused: {exc}") from None
        return release

    async def _offered(self, offer: UpdateOffer, sessionid: str, verified: bool = False) -> str:
        ctx, state = self.ctx, self.ctx.state
        status = await ctx.boot.status()
        booted_good = ctx.booted is not None and status[ctx.booted].state is SlotState.GOOD
        blocked = state.blocked
        decision = may_install(offer.version, ctx.version, trial_version=state.trial.version if state.trial else None,
                               blocked_version=blocked.version if blocked else None,
                               blocked_until=blocked.until if blocked else 0.0,
                               rollback_allowed=ctx.config.app.rollback_allowed, booted_good=booted_good,
                               now=ctx.now(), blocked_rolled_back=bool(blocked and blocked.rolled_back),
                               staged_version=state.staged.version if state.staged else None,
                               waiting_rollback=bool(state.trial and state.trial.rollback))
        if isinstance(decision, OfferDeclined):
            log.info("offer of %s not taken: %s", offer.version, decision.reason)
            await ctx.save()
            return f"offer of {offer.version} not taken: {decision.reason}"
        from .groups import PlanError, grouped
        if len(offer.packages) != 1 and not grouped(ctx.config.groups):
            raise AttemptFailed(f"offer of {offer.version} has {len(offer.packages)} packages; a slot takes exactly one")
        ctx.status.offer(offer.version, offer.size)
        self.advance(Operation.UPDATE_AVAILABLE)
        try:
            from .imageset import for_offer
            try:  # each package to its slot group: None for one image (the one-image path)
                self.images = for_offer(ctx, offer, other(ctx.booted))
            except PlanError as exc:
                return await self._failed(offer, InstallError(str(exc), "packages"), other(ctx.booted))
            release = None
            if ctx.config.trust.require_signature and not verified:
                release = await self._verify_release(offer)
            return await self._install(offer, sessionid, release)
        except asyncio.CancelledError:
            # what resumes is the durable checkpoint the installer saved on its way out, not the last progress
            cp = ctx.state.download
            if cp is not None and cp.version == offer.version and cp.received > 0 and not cp.compressed:
                log.info("download cancelled; %d of %d bytes are saved and it resumes from there next time",
                         cp.received, cp.size)
            else:
                log.info("download cancelled; it starts from the beginning next time (nothing resumable was saved)")
            await self._unreplace(other(ctx.booted))
            ctx.status.clear_offer()
            raise

    async def _unreplace(self, target: str) -> None:
        """An install that stopped (cancelled or failed) while replacing an installed update: if its slot was not
        marked bad yet, that update is still installed (and may still boot): its record says so again; if it was,
        the record goes (the slot is bad on purpose: nothing to report)."""
        state = self.ctx.state
        if state.trial is None or not state.trial.replaced or state.trial.slot != target:
            return
        try:
            still = (await self.ctx.boot.status())[target].state is SlotState.TRIAL
        except (BootError, KeyError):
            still = True  # not known: keep it, so a fallback into it is still reported
        state.trial = replace(state.trial, replaced=False) if still else None
        await self.ctx.save()

    async def _verify_release(self, offer: UpdateOffer) -> None:
        """The release's DSSE envelope (``<payload URL>.sig``, same URLs in the same order) must be signed by a
        trusted key and describe exactly this offer; checked before the target slot is touched."""
        from .http import FetchError, fetch_small
        from .trust import MAX_ENVELOPE, SignatureError, TrustKeyError, check_release, load_public_keys, open_envelope
        ctx, pkg = self.ctx, offer.packages[0]
        target = other(ctx.booted)
        try:
            keys = await asyncio.to_thread(load_public_keys, ctx.config.trust.keys)
        except TrustKeyError as exc:
            raise AttemptFailed(f"update to {offer.version} not installed: {exc}") from None
        session, missing, errors = await self.reporter.http(), [], []
        envelope = None
        for url in pkg.urls:
            try:
                envelope = await fetch_small(session, url + ".sig", MAX_ENVELOPE, ctx.config.install.read_timeout)
                break
            except FetchError as exc:
                (missing if exc.missing else errors).append(str(exc))
        try:
            if envelope is None and errors and not missing:
                why = "could not fetch the release signature: " + "; ".join(errors[-2:])
                await self._failed(offer, InstallError(why, "transfer"), target)
            if envelope is None:
                raise SignatureError("no signature for the release (" + "; ".join((missing + errors)[-2:]) + ")")
            release = await asyncio.to_thread(open_envelope, envelope, keys)
            app = ctx.config.app
            check_release(release, appid=app.id, version=offer.version, sha256_hex=pkg.sha256_hex, size=pkg.size,
                          track=app.track, board=app.board, packages=offer.packages)
        except SignatureError as exc:
            await self._failed(offer, InstallError(f"signature refused: {exc}", "signature"), target)
        log.info("release %s: signature verified (sha256 %s, %d bytes)", offer.version, release.sha256[:16],
                 release.size)
        return release

    async def _install(self, offer: UpdateOffer, sessionid: str, release=None) -> str:
        from .adaptive.job import AdaptiveStep
        ctx, state = self.ctx, self.ctx.state
        pkg, target, previous, images = offer.packages[0], other(ctx.booted), ctx.version, self.images
        try:
            if images is not None:  # every group's member of the target letter
                path, size = await images.check()
            else:
                path = await asyncio.to_thread(check_target, target, ctx.config.slots, ctx.booted, pkg.size)
                size = await asyncio.to_thread(capacity, path)
        except (SlotError, OSError) as exc:
            return await self._failed(offer, InstallError(str(exc), "device"), target)
        if not self.interactive and ctx.config.install.on_metered == "wait":
            from .network import wait_for_unmetered
            await wait_for_unmetered(ctx, offer.version, self.hurried)
        installer = Installer(await self.reporter.http(), sessionid=sessionid,
                              read_timeout=ctx.config.install.read_timeout,
                              readback=ctx.config.install.verify == "readback", on_progress=self._progress,
                              on_checkpoint=self._checkpoint, max_rate=ctx.config.install.max_rate_interactive
                              if self.interactive else ctx.config.install.max_rate)
        adaptive = AdaptiveStep(ctx, installer.session, release if images is None else None, pkg, target)
        try:  # the chunk index is fetched and held to its signed digest before the slot is touched
            applier = await adaptive.choose(installer)
        except InstallError as exc:
            return await self._failed(offer, exc, target)
        ctx.status.adaptive(adaptive.planned, adaptive.saved)
        resume = state.download
        if resume is None:  # marks the download as started: a restart resumes it soon (schedule.after_restart)
            state.download = Checkpoint(offer.version, target, pkg.sha256_hex, pkg.size, 0, False, pkg.name)
        self.reporter.queue(policy.download_started(previous, offer.version, images.size if images else
                                                    adaptive.planned), previous)
        await ctx.save()
        await self.reporter.flush()
        log.info("downloading %s (%d bytes) onto slot %s from %s", offer.version, pkg.size, target, pkg.urls[0])
        # a shutdown asked for while the slot and the bootloader are written waits for the chunk and its checkpoint
        async with ctx.shutdown_delay(f"writing {offer.version} to slot {target}"):
            try:
                result = await installer.install(ctx.boot, target, path, size, pkg, offer.version,
                                                 ctx.config.boot.tries, resume, _Hooks(self, offer, target, previous),
                                                 stream=applier.stream if applier is not None else
                                                 images.stream_with(installer) if images is not None else None)
            except InstallError as exc:
                return await self._failed(offer, exc, target)
            await adaptive.installed()
            if state.staged is not None and state.staged.version == offer.version:  # install.arm: not now
                state.last_error = ""
                await ctx.save()
                await self.reporter.flush()
                return f"staged {offer.version} on slot {target}; it is armed by omaha-agent apply" + (
                    " or when the reboot window opens" if ctx.config.install.arm == "in-window" else "")
            log.info("slot %s set for a trial boot of %s (%s, %d tries)", target, offer.version, ctx.boot.name,
                     ctx.config.boot.tries)
            state.trial = replace(state.trial, armed=True)
            self.reporter.queue(policy.applied(previous, offer.version), previous)
            state.last_error = ""
            await ctx.save()
        log.info("verified %s: %d bytes in %.1f s (%.2f CPU s)%s", offer.version, result.received,
                 result.download_ms / 1000, result.cpu_ms / 1000,
                 f" ({result.compression}, {result.written} bytes on the slot)" if result.compression else "")
        await self.reporter.flush()
        return f"installed {offer.version} on slot {target}; it boots on trial after a reboot"

    def _progress(self, p: Progress) -> None:
        self.ctx.status.progress = p
        self.ctx.status.notify()

    async def _checkpoint(self, cp: Checkpoint) -> None:
        self.ctx.state.download = cp
        await self.ctx.save()

    async def _failed(self, offer: UpdateOffer, exc: InstallError, target: str) -> str:
        ctx, state = self.ctx, self.ctx.state
        code, category = policy.INSTALL_ERRORS.get(exc.kind, (ErrorCode.GENERIC, ErrorCategory.INSTALL))
        log.error("update to %s failed: %s", offer.version, exc)
        self.advance(Operation.REPORTING_ERROR)
        self.reporter.queue(policy.failed(code, category, ctx.version, offer.version), ctx.version)
        state.last_error = f"update to {offer.version} failed: {exc}"
        if state.trial is not None and state.trial.slot == target and not state.trial.armed:
            # recorded, but arming failed; a timed-out set_trial may still land in the bootloader's thread, so
            # the slot is marked bad behind it (the one worker thread runs them in order)
            try:
                await ctx.boot.mark_bad(target)
            except BootError as err:  # (not "exc": that name is this method's argument)
                log.error("could not mark slot %s bad after a failed arm: %s", target, err)
            state.trial = None
        else:
            await self._unreplace(target)
        if exc.kind != "transfer":
            state.download, state.written = None, []  # nothing worth resuming
        if exc.kind in ("hash", "size", "decompress", "readback", "signature", "postinstall", "packages"):
            state.blocked = policy.block_until(ctx.now(), state.blocked, offer.version)
        await ctx.save()
        await self.reporter.flush()
        ctx.status.clear_offer()
        raise AttemptFailed(state.last_error)


def _nowhere(operation: Operation) -> None:
    """No owner listens (the attempt run on its own)."""


def _unreadable(exc: BaseException, path: str) -> str:
    """Why a local file cannot be used, in a line (an ``OSError`` with where the service may read)."""
    from .localfile import LocalFileError, shown
    if isinstance(exc, LocalFileError):
        return str(exc)
    return (f"cannot read {shown(exc.filename or path)}: {exc.strerror or exc} (the service sees /media, /mnt, "
            "/run/media and /srv, not /home or /tmp)")


class _Hooks(InstallHooks):
    def __init__(self, attempt: UpdateAttempt, offer: UpdateOffer, target: str, previous: str):
        self.attempt, self.offer, self.target, self.previous = attempt, offer, target, previous

    async def before_write(self) -> None:
        state = self.attempt.ctx.state
        if state.trial is not None and state.trial.slot == self.target:
            # an installed update that never booted (Flatcar's ResetStatus left it armed) is being replaced:
            # said in its record first, so the slot marked bad below is never reported as that version failing
            # to boot, and a crash before the mark still finds the record (the slot may still boot it)
            log.info("replacing the installed %s on slot %s", state.trial.version, self.target)
            state.trial = replace(state.trial, replaced=True)
            if not await self.attempt.ctx.save(f"that {state.trial.version} is being replaced"):
                raise InstallError(f"{self.attempt.ctx.save_error.partition('; ')[0]}: slot {self.target} is left "
                                   "as it is", "state")

    async def writing(self) -> None:
        state = self.attempt.ctx.state
        if state.fallback is not None and state.fallback.slot == self.target:
            state.fallback = None  # its older system is being overwritten: no rollback to it any more
        if state.staged is not None and state.staged.slot == self.target:  # overwritten now: no longer staged
            log.info("replacing the staged %s on slot %s", state.staged.version, self.target)
            state.staged = None
            await self.attempt.ctx.save()
        if state.trial is not None and state.trial.replaced:  # its slot is marked bad now: the record goes
            state.trial = None
            await self.attempt.ctx.save()
        self.attempt.advance(Operation.DOWNLOADING)

    def downloading(self) -> None:
        self.attempt.advance(Operation.DOWNLOADING)

    def verifying(self) -> None:
        self.attempt.advance(Operation.VERIFYING)

    async def verified(self, result: InstallResult) -> bool | None:
        ctx, state = self.attempt.ctx, self.attempt.ctx.state
        self.attempt.reporter.queue(policy.download_finished(self.previous, self.offer.version, result.received,
                                                             result.download_ms, result.url), self.previous)
        self.attempt.advance(Operation.FINALIZING)
        if ctx.config.install.post_install:  # before anything is recorded or armed: a failure leaves the slot bad
            from .posthook import run_for
            await run_for(ctx, self.target, self.offer.version, self.previous)
        if ctx.config.install.arm != "immediately":  # staged: Apply or the reboot window arms it (staged.py)
            from . import staged
            await staged.stage(ctx, self.target, self.offer.version, self.previous, self.offer.packages[0], result,
                               self.attempt.images.images if self.attempt.images is not None else ())
            return False
        # record the intent first: a crash after set_trial still finds the trial on restart
        state.trial = Trial(self.target, self.offer.version, self.previous, armed=False)
        state.download, state.written = None, []
        if not await ctx.save("the trial record"):  # never armed without its record
            raise InstallError(f"{ctx.save_error.partition('; ')[0]}: slot {self.target} is not armed without it",
                               "state")

