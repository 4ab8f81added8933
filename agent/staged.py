"""Staged updates (``install.arm: on-apply | in-window``): written, verified and signature-checked, but not armed.

The install stops after its verify: the slot stays ``bad`` in the bootloader (it was marked so before writing), so
any reboot before the update is applied (a power cut, a panic, a user) boots the running slot again. The record
(``state.Staged``) names the slot, the version, the signed digest and size, and the boot it was verified in.

Arming (``arm``: the Apply command, or the reboot job just before an ``in-window`` reboot) follows the install's own
order: the slot's bytes are hashed again when the device booted since they were verified (anything may have
written the slot while the agent was not looking), the trial record is saved unarmed, ``set_trial``, then armed
and 3/1 queued. Bytes that no longer match the signed digest are refused: nothing is armed, the staged record is
dropped, 3/0 (hash mismatch) is queued and ``LastError`` says so; the next check downloads the update again.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace

from . import localfile, policy
from .boot import BootError
from .errors import CommandFailed
from .omaha.events import ErrorCategory, ErrorCode
from .slots import SlotError, resolve
from .state import Staged, Trial

log = logging.getLogger("omaha-agent")

KERNEL_BOOT_ID = "/proc/sys/kernel/random/boot_id"


class StagedRefused(CommandFailed):
    """The staged update cannot be armed (its bytes changed, or its slot is gone); it was dropped and reported."""


async def boot_id(ctx, path: str = KERNEL_BOOT_ID) -> str:
    """Which boot this is: the kernel's boot id (the sim backend counts its simulated boots); "" when unknown
    (then a staged update is always hashed again before it is armed)."""
    try:
        if hasattr(ctx.boot.control, "boot_id"):
            return await ctx.boot.boot_id()
        return (await asyncio.to_thread(_read_small, path)).strip()[:64]
    except (OSError, BootError, UnicodeDecodeError) as exc:
        log.warning("cannot tell which boot this is (%s): a staged update is hashed again before it is armed", exc)
        return ""


def _read_small(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(128).decode("ascii")


async def stage(ctx, slot: str, version: str, previous: str, pkg, result, images: tuple = ()) -> bool:
    """Records the verified, unarmed update; True once the record is on disk. The digest kept is the signed one
    (``pkg``'s); a compressed payload's image differs from it, so its digest is read back from the slot now, just
    after the payload's signed digest matched (``result``: the install's). ``images``: a release of several
    images, ``((group, sha256, size), ...)`` of what each left on its slot (``imageset``)."""
    boot = await boot_id(ctx)
    if images:
        sha256, size = images[0][1], images[0][2]
    elif result.compression:
        try:
            sha256, size = await slot_digest(ctx, slot, result.written), result.written
        except (OSError, SlotError, localfile.LocalFileError) as exc:
            from .install import InstallError
            raise InstallError(f"slot {slot} cannot be read back to stage it: {exc}", "readback") from None
    else:
        sha256, size = pkg.sha256_hex, pkg.size
    ctx.state.staged = Staged(slot, version, previous, sha256, size, boot, tuple(images))
    ctx.state.download, ctx.state.written = None, []
    log.info("%s staged on slot %s: verified, not armed (install.arm: %s)", version, slot, ctx.config.install.arm)
    return await ctx.save("the staged update")


async def slot_digest(ctx, slot: str, size: int, specs=None) -> str:
    """The SHA-256 of the first ``size`` bytes of ``slot`` (of the pair ``specs``; the root filesystem's when
    None), read from the slot now."""
    path = resolve((specs or ctx.config.slots)[slot])
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return await localfile.sha256(fd, size)
    finally:
        os.close(fd)


async def verify(ctx, staged: Staged) -> str | None:
    """Why the staged bytes may not be armed, or None: hashed again only when the device booted since staging."""
    now = await boot_id(ctx)
    if now and now == staged.boot_id:
        return None
    log.info("the device booted since %s was staged: hashing slot %s again (%d bytes)", staged.version, staged.slot,
             staged.size)
    groups = {g.name: g for g in ctx.config.groups}
    for group, sha256, size in staged.images or ((None, staged.sha256, staged.size),):
        where = f"slot {staged.slot}" + (f" of group {group}" if group else "")
        try:
            if group is not None and group not in groups:
                return f"slot group {group} is no longer configured"
            digest = await slot_digest(ctx, staged.slot, size, groups[group].specs if group else None)
        except (OSError, SlotError, KeyError, localfile.LocalFileError) as exc:
            return f"{where} cannot be read back: {exc}"
        if digest != sha256:
            return (f"{where} no longer holds the verified image (SHA-256 {digest[:16]}…, signed "
                    f"{sha256[:16]}…): something wrote to it since it was staged")
    return None


async def arm(ctx, reporter) -> Trial:
    """Arms the staged update and returns its armed trial record. Raises ``StagedRefused`` (dropped and reported)
    when its bytes changed, ``CommandFailed`` when its record cannot be saved, ``BootError`` when the bootloader
    cannot be written (the slot is marked bad again behind it; the staged record stays)."""
    state, staged = ctx.state, ctx.state.staged
    if staged is None:
        raise CommandFailed("no update is staged")
    why = await verify(ctx, staged)
    if why is not None:
        log.error("staged %s not armed: %s", staged.version, why)
        reporter.queue(policy.failed(ErrorCode.PAYLOAD_HASH_MISMATCH, ErrorCategory.DOWNLOAD, staged.previous_version,
                                     staged.version), staged.previous_version)
        state.staged = None
        state.last_error = f"staged update to {staged.version} not armed: {why}; the next check downloads it again"
        await ctx.save("the refused staged update")
        ctx.spawn(reporter.flush(), "sending the 3/0")
        raise StagedRefused(state.last_error)
    trial = Trial(staged.slot, staged.version, staged.previous_version, armed=False)
    state.trial = trial  # the record first: a crash after set_trial still finds it (settle arms it then)
    if not await ctx.save("the trial record"):
        state.trial = None
        raise CommandFailed(f"{ctx.save_error.partition('; ')[0]}: slot {staged.slot} is not armed without it")
    try:
        async with ctx.shutdown_delay(f"arming {staged.version} on slot {staged.slot}"):
            await ctx.boot.set_trial(staged.slot, ctx.config.boot.tries, staged.version)
    except BootError:
        try:  # a set_trial that timed out may still land: this queues after it in the bootloader's one thread
            await ctx.boot.mark_bad(staged.slot)
            state.trial = None
        except BootError as exc:  # the record stays unarmed: the next start reads which happened
            log.error("could not mark slot %s bad after a failed arm: %s", staged.slot, exc)
        await ctx.save()
        raise
    state.trial, state.staged = replace(trial, armed=True), None
    reporter.queue(policy.applied(staged.previous_version, staged.version), staged.previous_version)
    state.last_error = ""
    await ctx.save("the armed update")
    log.info("staged %s armed on slot %s (%s, %d tries)", staged.version, staged.slot, ctx.boot.name,
             ctx.config.boot.tries)
    ctx.spawn(reporter.flush(), "sending the 3/1")
    return state.trial
