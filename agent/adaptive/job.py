"""The update job's adaptive step: choose the adaptive or the full path for a verified release, keep the slots'
indexes as they change, and say what the plan saves.

Called by ``attempt.UpdateAttempt._install`` once the release's signature and statement held: ``choose`` returns
the ``Applier`` whose ``stream`` writes the image (None: the full path, as for a release without chunks), after
the target's index was set aside (``overwriting``); ``installed`` saves the new slot's index (fetched now when the
full path installed a release that has chunks: the next update is adaptive).
"""
from __future__ import annotations

import asyncio
import logging

from ..install import InstallError
from ..slots import SlotError, resolve
from .apply import Applier
from .prepare import Prepared, check_index, fetch_index, prepare
from .store import ChunkStore

log = logging.getLogger("omaha-agent")


class AdaptiveStep:
    def __init__(self, ctx, session, release, pkg, target: str):
        self.ctx, self.session, self.release, self.pkg, self.target = ctx, session, release, pkg, target
        config = ctx.config.install
        self.store = ChunkStore(ctx.config.state_dir, shipped=config.index)
        self.prepared: Prepared | None = None
        self.applier: Applier | None = None
        self.enabled = release is not None and release.chunks is not None and release.image is not None

    async def choose(self, installer) -> "Applier | None":
        """The applier for this install, or None (the full path). Raises ``InstallError`` for a chunk index that
        breaks its signature (nothing was written)."""
        if not self.enabled:
            await asyncio.to_thread(self.store.drop, self.target)
            return None
        if not self.ctx.config.install.adaptive:
            why = "adaptive updates are off (install.adaptive)"
            found = why
        else:
            found = await prepare(self.session, self.release, self.pkg.urls, self.store, self.ctx.booted,
                                  self.target, self.ctx.config.install.read_timeout)
        if not isinstance(found, Prepared):
            log.info("release %s: full download: %s", self.release.version, found)
            await asyncio.to_thread(self.store.overwriting, self.target, False)
            return None
        self.prepared = found
        plan = found.plan
        log.info("release %s: adaptive install: %d chunks local, %d zero, %d fetched (%d of %d bytes of chunk "
                 "data, %d bytes reused)", self.release.version, plan.counts["local"], plan.counts["zero"],
                 plan.counts["remote"], plan.remote_bytes, self.release.chunks.data.size, plan.reused_bytes)
        booted_path = None
        if self.ctx.booted in self.ctx.config.slots:
            try:
                booted_path = await asyncio.to_thread(resolve, self.ctx.config.slots[self.ctx.booted])
            except (SlotError, OSError) as exc:
                log.warning("the booted slot cannot be found (%s); its chunks are fetched", exc)
        await asyncio.to_thread(self.store.overwriting, self.target, True)
        self.applier = Applier(installer, found, self.release, self.store, booted_path)
        return self.applier

    @property
    def planned(self) -> int:
        """Bytes this install plans to download (the payload's size on the full path)."""
        if self.prepared is None:
            return self.pkg.size
        return self.prepared.plan.remote_bytes + self.prepared.raw_size

    @property
    def saved(self) -> int:
        return max(0, self.pkg.size - self.planned) if self.prepared is not None else 0

    async def installed(self) -> None:
        """The target holds the release's image, verified: keep its index for the next update."""
        if not self.enabled:
            return
        try:
            if self.prepared is not None:
                raw = self.prepared.index.raw
            else:
                raw, _ = await fetch_index(self.session, self.release, self.pkg.urls,
                                           self.ctx.config.install.read_timeout)
                await asyncio.to_thread(check_index, raw, self.release)
            await asyncio.to_thread(self.store.save, self.target, raw)
        except (InstallError, OSError) as exc:
            log.warning("the chunk index of %s is not kept (%s); the next update takes the full download",
                        self.release.version, exc)
