"""The install of a release of several images (slot groups, ``groups.py``): each image streamed onto the inactive
member of its group, in the offer's order, each verified against its own digest and size.

It is the installer's ``stream`` for the whole set, so the install's order holds around it: the target letter is
marked bad once before the first image, and the set is armed once (one ``set_trial``) after the last one verified
and the post-install commands ran. Nothing is armed while an image is missing or unverified; any failure leaves
the letter bad.

Resume per image: the download checkpoint names its package (``Checkpoint.package``); an image written and
verified is recorded (``state.written``) so a restart does not download it again, but every image not streamed
in this run is hashed again from its slot before the set is armed (``staged.slot_digest``): a mismatch fails the
install (errorcode 10; the version is not blocked: the download was good, the slot changed) and the next attempt
downloads every image.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from .install import InstallError, InstallResult
from .slots import SlotError, capacity, check_target
from .state import Checkpoint, Written

log = logging.getLogger("omaha-agent")


def for_offer(ctx, offer, target: str) -> "ImageSet | None":
    """The image set of ``offer`` for the ``target`` letter, or None when it is one image for the root
    filesystem's pair (the one-image path). Raises ``groups.PlanError`` when its packages do not fit the groups."""
    from .groups import plan
    pairs = plan(offer.packages, ctx.config.groups)
    return ImageSet(ctx, pairs, target, offer.version) if len(pairs) > 1 else None


class ImageSet:
    def __init__(self, ctx, plan, target: str, version: str):
        self.ctx, self.plan, self.target, self.version = ctx, plan, target, version
        self.places: dict[str, tuple[str, int]] = {}  # group name: (path, capacity) of its target member
        self.images: tuple = ()  # ((group, sha256, size), ...) each image left on its slot, once all verified

    @property
    def size(self) -> int:
        return sum(pkg.size for pkg, _ in self.plan)

    async def check(self) -> tuple[str, int]:
        """Every group's target member may be written and holds its image (``slots.check_target`` with the
        group's own pair; the booted letter is the same for all). The first one's path and capacity.
        Raises ``SlotError`` or ``OSError``."""
        for pkg, group in self.plan:
            try:
                path = await asyncio.to_thread(check_target, self.target, group.specs, self.ctx.booted, pkg.size)
            except SlotError as exc:
                raise SlotError(f"group {group.name}: {exc}") from None
            self.places[group.name] = (path, await asyncio.to_thread(capacity, path))
        return self.places[self.plan[0][1].name]

    def stream_with(self, installer):
        """The installer's ``stream`` for the whole set (``Installer.install(..., stream=...)``)."""
        async def stream(slot, path, size, pkg, version, resume=None, phases=None) -> InstallResult:
            return await self._stream(installer, slot, resume, phases)
        return stream

    def _kept(self, slot: str) -> dict:
        """The images of this release already written and verified on ``slot`` (by package name); the records
        of anything else go."""
        state, wanted = self.ctx.state, {pkg.name: (pkg, group) for pkg, group in self.plan}
        kept = [w for w in state.written if w.version == self.version and w.slot == slot and w.package in wanted
                and (w.group, w.sha256, w.size) == (wanted[w.package][1].name, wanted[w.package][0].sha256_hex,
                                                    wanted[w.package][0].size)]
        state.written = kept
        return {w.package: w for w in kept}

    async def _stream(self, installer, slot: str, resume, phases) -> InstallResult:
        ctx, state = self.ctx, self.ctx.state
        kept = self._kept(slot)
        total, base, results, images, skipped = self.size, 0, [], [], []
        report = installer.on_progress
        try:
            for pkg, group in self.plan:
                record = kept.get(pkg.name)
                if record is not None:
                    log.info("%s: %s is already on slot %s of group %s (verified before a restart); it is hashed "
                             "again before the set is armed", self.version, pkg.name, slot, group.name)
                    skipped.append((record, group))
                    images.append((group.name, record.image_sha256, record.image_size))
                    base += pkg.size
                    continue
                path, room = self.places[group.name]
                cp = resume if resume is not None and resume.package == pkg.name else None
                offset = base
                installer.on_progress = lambda p, offset=offset: report(replace(p, done=offset + p.done, total=total))
                log.info("%s: writing %s (%d bytes) onto slot %s of group %s (%s)", self.version, pkg.name, pkg.size,
                         slot, group.name, path)
                result = await installer.stream(slot, path, room, pkg, self.version, cp, phases)
                sha256, size = pkg.sha256_hex, pkg.size
                if result.compression:  # what the slot holds is the decompressed image: its digest, read now
                    sha256, size = await self._digest(slot, result.written, group), result.written
                results.append(result)
                images.append((group.name, sha256, size))
                state.written.append(Written(self.version, slot, group.name, pkg.name, pkg.sha256_hex, pkg.size,
                                             sha256, size))
                state.download = self._next(slot, kept)  # a restart still finds a download under way
                await ctx.save()  # not required: without it a restart downloads this image again
                base += pkg.size
        finally:
            installer.on_progress = report
        for record, group in skipped:  # nothing is armed on a record's word: the slot's bytes are hashed again
            digest = await self._digest(slot, record.image_size, group)
            if digest != record.image_sha256:
                raise InstallError(f"slot {slot} of group {group.name} no longer holds {record.package} (SHA-256 "
                                   f"{digest[:16]}…, verified {record.image_sha256[:16]}…)", "rehash")
        self.images = tuple(images)
        first = results[0] if results else None
        return InstallResult(self.version, first.url if first else self.plan[0][0].urls[0],
                             sum(r.received for r in results) + sum(r.size for r, _ in skipped),
                             sum(size for _, _, size in images),
                             next((r.compression for r in results if r.compression), None),
                             sum(r.download_ms for r in results), sum(r.resumed_from for r in results),
                             sum(r.cpu_ms for r in results))

    def _next(self, slot: str, kept: dict) -> Checkpoint | None:
        """The starting checkpoint of the next image still to be written, or None."""
        done = kept.keys() | {w.package for w in self.ctx.state.written}
        pkg = next((p for p, _ in self.plan if p.name not in done), None)
        return None if pkg is None else Checkpoint(self.version, slot, pkg.sha256_hex, pkg.size, 0, False, pkg.name)

    async def _digest(self, slot: str, size: int, group) -> str:
        from . import localfile, staged
        try:
            return await staged.slot_digest(self.ctx, slot, size, group.specs)
        except (OSError, SlotError, localfile.LocalFileError) as exc:
            raise InstallError(f"slot {slot} of group {group.name} cannot be read back: {exc}", "readback") from None
