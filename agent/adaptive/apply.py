"""Writing an image from its chunks, in image order, through the installer's ring (``install._Pipeline``).

Each chunk is made in a worker thread and checked against its SHA-256 in the signed index before it is handed to
the ring: a zero chunk is made, a local one read from its slot (a mismatch, e.g. a root file system mounted
read-write or a bad block, makes it remote: fetched right away), a remote one decompressed from its frame (at
most its length). The ring hashes the whole image as it is written; it must equal the signed image digest
before the slot is armed. Remote frames arrive from ``ranges.RangeFetcher`` in a task of their own, a bounded
queue ahead of the writes.

A checkpoint (the state's ``Checkpoint``: the image's digest and size, and the byte offset of the next chunk,
durable on the slot) is saved every ``checkpoint_every`` bytes and when a transfer is cut; a restart resumes at
that chunk. A failure before the first byte was handed to the ring raises ``FullPath`` (the caller downloads the
full payload in the same attempt); a cut after it resumes from the checkpoint (a few times in this attempt, then
in the next one); anything else marks the release for the full download next time (``store.mark_failed``).
"""
from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import logging
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor

from ..install import RING, InstallError, InstallResult, Progress, _maybe_await, _Pipeline, _settle
from ..payload import PayloadError, SlotWriter
from ..state import Checkpoint
from .index import ChunkIndex
from .plan import LOCAL, REMOTE, ZERO, Plan, coalesce
from .prepare import Prepared
from .ranges import RangeError, RangeFetcher

log = logging.getLogger("omaha-agent")

BATCH = 1 << 20  # image bytes made per worker-thread call
QUEUE_BYTES = 4 << 20  # frames fetched ahead of the writes
MAX_CUTS = 3  # cuts in a row without progress before the attempt gives up (the next one resumes)


class FullPath(Exception):
    """Nothing was written yet: take the full download instead; the message says why."""


class _Refused(Exception):
    """The adaptive path cannot go on for this release (the next attempt takes the full download)."""

    def __init__(self, message: str, kind: str = "transfer"):
        super().__init__(message)
        self.kind = kind


def _frame_reader():
    import zstandard
    return zstandard.ZstdDecompressor()


class _Maker:
    """The worker-thread half: chunks made and checked (zero, local, remote)."""

    def __init__(self, index: ChunkIndex, plan: Plan, sources: dict):
        self.index, self.plan = index, plan
        self.sources = sources  # plan source → read-only fd
        self.offsets = index.offsets()
        self.dctx = _frame_reader()

    def chunk(self, i: int, frame: bytes | None) -> bytes | None:
        """Chunk ``i``'s bytes once they match its digest; None for a local chunk that does not."""
        length, _, _, digest = self.index.record(i)
        kind = self.plan.kinds[i]
        if kind == ZERO:
            data = bytes(length)
        elif kind == LOCAL and frame is None:
            try:
                data = os.pread(self.sources[self.plan.source[i]], length, self.plan.where[i])
            except OSError as exc:
                log.warning("chunk %d: reading it from its slot failed (%s); fetching it", i, exc.strerror or exc)
                return None
            if len(data) != length or hashlib.sha256(data).digest() != digest:
                return None
            return data
        else:
            try:
                reader = self.dctx.stream_reader(frame, read_across_frames=False)
                data = b""  # at most one byte more than the chunk's length is ever made
                while len(data) <= length and (piece := reader.read(length + 1 - len(data))):
                    data += piece
            except Exception as exc:  # zstandard.ZstdError: a frame that does not decompress
                raise _Refused(f"chunk {i}'s frame does not decompress ({str(exc)[:80]}): the chunk data file "
                               "does not match its signed index", "hash") from None
        if len(data) != length or hashlib.sha256(data).digest() != digest:
            raise _Refused(f"chunk {i} does not match its signed digest: the chunk data file does not match its "
                           "signed index", "hash")
        return data

    def batch(self, first: int, last: int, frames: dict) -> tuple[bytearray, list[int]]:
        """Chunks ``first`` to ``last`` (exclusive) as one run of bytes, and the local ones that did not match
        (their bytes are missing: the caller fetches them and calls ``chunk`` again)."""
        out, missed = bytearray(), []
        for i in range(first, last):
            data = self.chunk(i, frames.pop(i, None))
            if data is None:
                missed.append(i)
                data = b""
            out += data
        return out, missed


async def frames(fetcher: RangeFetcher, index: ChunkIndex, chunks: list[int], gap: int):
    """(chunk, frame bytes) for ``chunks`` (ascending), fetched as coalesced ranges."""
    if not chunks:
        return
    stored = index.stored_offsets()
    at_chunk, buf = 0, bytearray()
    async with contextlib.aclosing(fetcher.pieces(coalesce(index, chunks, gap))) as pieces:
        async for offset, data in pieces:
            view, pos = memoryview(data), offset
            while view and at_chunk < len(chunks):
                i = chunks[at_chunk]
                lo, hi = stored[i], stored[i + 1]
                if pos < lo:  # the bytes of a gap
                    skip = min(lo - pos, len(view))
                    view, pos = view[skip:], pos + skip
                    continue
                take = min(hi - pos, len(view))
                buf += view[:take]
                view, pos = view[take:], pos + take
                if pos == hi:
                    yield i, bytes(buf)
                    buf.clear()
                    at_chunk += 1


class Applier:
    """One adaptive install onto a slot: what ``Installer.install`` runs instead of ``Installer.stream``."""

    def __init__(self, installer, prepared: Prepared, release, store, booted_path: str | None,
                 checkpoint_every: int | None = None):
        self.installer = installer
        self.prep, self.release, self.store = prepared, release, store
        self.booted_path = booted_path
        self.checkpoint_every = checkpoint_every or installer.checkpoint_every
        self.taken = 0  # bytes downloaded (the index included)
        self.reused = 0  # image bytes read from a slot and written
        self._reported = self._reused_reported = 0
        self.cuts = 0  # transfers cut so far (each moves on to the next URL)

    async def stream(self, slot, path, capacity, pkg, version, resume=None, phases=None) -> InstallResult:
        try:
            return await self._apply(slot, path, capacity, version, resume, phases)
        except FullPath as exc:
            log.info("adaptive install of %s: %s; downloading the full payload", version, exc)
            self.installer._taken += self.taken
            return await self.installer.stream(slot, path, capacity, pkg, version, resume, phases)
        except _Refused as exc:
            await asyncio.to_thread(self.store.mark_failed, self.release.image.sha256)
            raise InstallError(f"adaptive install refused ({exc}); the next attempt downloads the full payload",
                               exc.kind) from None

    # ------------------------------------------------------------------------------------------------ the run
    async def _apply(self, slot, path, capacity, version, resume, phases) -> InstallResult:
        image, index, plan = self.release.image, self.prep.index, self.prep.plan
        if image.size <= 0 or image.size > capacity:
            raise InstallError(f"image of {image.size} bytes does not fit slot {slot} ({capacity} bytes)", "device")
        writer = SlotWriter(path, capacity, bytes.fromhex(image.sha256), None, decompress=False,
                            readback=self.installer.readback, direct=True)
        sources = {}
        try:
            await asyncio.to_thread(writer.open)
            sources = await asyncio.to_thread(self._open_sources, path)
        except PayloadError as exc:
            raise InstallError(str(exc), exc.kind) from None
        buffers = [mmap.mmap(-1, self.installer.chunk) for _ in range(RING)]
        pools = (ThreadPoolExecutor(1, "omaha-hash"), ThreadPoolExecutor(1, "omaha-write"), None)
        maker_pool = ThreadPoolExecutor(1, "omaha-chunks")
        self.started, self.cpu = time.monotonic(), time.process_time()
        self.taken = self.prep.raw_size
        try:
            first = await self._resume(writer, slot, version, resume)
            self.base = index.offsets()[first]
            if phases is not None:
                phases.downloading()
            await self._write_all(writer, slot, version, first, buffers, pools, maker_pool, sources)
            if phases is not None:
                phases.verifying()
            await asyncio.to_thread(writer.flush)
            try:
                await asyncio.to_thread(writer.verify, image.size)
                if self.installer.readback:
                    await asyncio.to_thread(writer.verify_readback)
            except PayloadError as exc:
                raise _Refused(f"the written image does not match its signed digest: {exc}", "hash") from None
            return InstallResult(version, self.prep.data_urls[0], self.taken, writer.written, "chunks",
                                 int((time.monotonic() - self.started) * 1000), self.base,
                                 int((time.process_time() - self.cpu) * 1000))
        finally:
            for pool in pools[:2]:
                pool.shutdown(wait=False)  # idle: the ring waited for every chunk
            # a batch still being made (its wait was cancelled) finishes before its slots' fds close (at most 1 MiB)
            try:
                await asyncio.shield(asyncio.to_thread(maker_pool.shutdown, True))
            finally:
                writer.close()
                for fd in sources.values():
                    os.close(fd)

    def _open_sources(self, target_path: str) -> dict:
        from .plan import BOOTED, TARGET
        out = {}
        for source, where in ((BOOTED, self.booted_path), (TARGET, target_path)):
            if where:
                try:
                    out[source] = os.open(where, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    log.warning("slot %s cannot be read (%s); its chunks are fetched", where, exc.strerror or exc)
        return out

    async def _resume(self, writer: SlotWriter, slot, version, cp) -> int:
        image, offsets = self.release.image, self.prep.index.offsets()
        if (cp is None or cp.compressed or cp.slot != slot or cp.version != version or cp.size != image.size
                or cp.sha256 != image.sha256 or cp.received <= 0):
            return 0
        first = bisect.bisect_right(offsets, cp.received) - 1  # the last chunk boundary at or before it
        try:
            await asyncio.to_thread(writer.rehash_prefix, offsets[first])
        except (PayloadError, OSError):
            writer.reset()
            return 0
        log.info("adaptive install of %s resumes at chunk %d (byte %d)", version, first, offsets[first])
        return first

    async def _write_all(self, writer, slot, version, first, buffers, pools, maker_pool, sources) -> None:
        index, plan = self.prep.index, self.prep.plan
        # a local chunk whose slot cannot be read is remote from the start
        kinds = plan.kinds
        if any(s not in sources for s in set(plan.source[i] for i in range(index.count) if kinds[i] == LOCAL)):
            kinds = type(kinds)(kinds)
            for i in range(index.count):
                if kinds[i] == LOCAL and plan.source[i] not in sources:
                    kinds[i] = REMOTE
            plan.kinds = kinds
        maker = _Maker(index, plan, sources)
        offsets = index.offsets()
        cuts, at = 0, first
        while True:
            fetcher = self._fetcher()
            if writer.received != offsets[at]:  # a cut left part of a batch behind: from the chunk's start
                await asyncio.to_thread(writer.rehash_prefix, offsets[at])
            pipe = _Pipeline(writer, buffers, pools, offsets[at])
            try:
                at = await self._run(maker, fetcher, pipe, slot, version, at, maker_pool)
                return
            except RangeError as exc:
                self.taken += fetcher.taken
                if pipe.fed + pipe.fill == offsets[at] and at == first and not cuts:
                    raise FullPath(str(exc)) from None  # nothing of this attempt reached the ring yet
                if exc.unsupported or exc.hostile:
                    await self._save(pipe, slot, version)
                    raise _Refused(str(exc)) from None
                before = offsets[at]
                await self._save(pipe, slot, version)
                at = bisect.bisect_right(offsets, writer.received) - 1
                cuts = 0 if offsets[at] > before else cuts + 1
                self.cuts += 1
                if cuts >= MAX_CUTS:
                    raise InstallError(f"chunk data transfer failed: {exc}", "transfer") from None
                log.info("adaptive install of %s: %s; going on from chunk %d", version, exc, at)
            except asyncio.CancelledError:
                await self._save(pipe, slot, version)
                raise
            except PayloadError as exc:
                await _settle(pipe)
                raise InstallError(str(exc), exc.kind) from None
            except OSError as exc:
                await _settle(pipe)
                raise InstallError(f"writing slot {slot}: {exc.strerror or exc}", "device") from None
            except BaseException:  # (a chunk refused, ...) no thread may still write once the writer closes
                await _settle(pipe)
                raise

    def _fetcher(self) -> RangeFetcher:
        headers = {"X-Goog-Update-SessionId": self.installer.sessionid} if self.installer.sessionid else {}
        urls = self.prep.data_urls  # a cut moves on to the next of the payload's URLs
        return RangeFetcher(self.installer.session, urls[self.cuts % len(urls)], self.release.chunks.data.size,
                            read_timeout=self.installer.read_timeout, headers=headers, limiter=self.installer.limiter)

    async def _run(self, maker: _Maker, fetcher: RangeFetcher, pipe: _Pipeline, slot, version, at: int,
                   pool) -> int:
        index, plan = self.prep.index, self.prep.plan
        offsets, loop = index.offsets(), asyncio.get_running_loop()
        remote = plan.remote_chunks(at)
        queue: asyncio.Queue = asyncio.Queue(max(4, QUEUE_BYTES // max(1, index.params.max_size)))
        producer = asyncio.ensure_future(self._produce(fetcher, remote, queue))
        since = 0
        try:
            while at < index.count:
                last = at + 1
                while last < index.count and offsets[last + 1] - offsets[at] <= BATCH:
                    last += 1
                got = {}
                for i in range(at, last):
                    if plan.kinds[i] == REMOTE:
                        item = await queue.get()
                        if isinstance(item, BaseException):
                            raise item
                        got[item[0]] = item[1]
                data, missed = await loop.run_in_executor(pool, maker.batch, at, last, got)
                if missed:
                    data = await self._refetch(maker, fetcher, data, at, last, missed, pool)
                self.reused += sum(offsets[i + 1] - offsets[i] for i in range(at, last)
                                   if plan.kinds[i] == LOCAL and i not in missed)
                await pipe.put(data)
                since += len(data)
                at = last
                if since >= self.checkpoint_every:
                    await pipe.finish()
                    await self._checkpoint(pipe.writer, slot, version)
                    since = 0
                self._progress(pipe.writer, fetcher)
            await pipe.finish()
            self.taken += fetcher.taken
            fetcher.taken = 0
            self._progress(pipe.writer, fetcher)
            return at
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await producer

    async def _produce(self, fetcher: RangeFetcher, remote: list[int], queue: asyncio.Queue) -> None:
        try:
            async for item in frames(fetcher, self.prep.index, remote, self.prep.plan.gap):
                await queue.put(item)
        except (RangeError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            await queue.put(exc)
            return
        await queue.put(RangeError("the chunk data ended before its last remote frame", hostile=True))

    async def _refetch(self, maker: _Maker, fetcher: RangeFetcher, data: bytearray, first: int, last: int,
                       missed: list[int], pool) -> bytearray:
        """The batch with its local chunks that did not match fetched and put in their places."""
        log.info("%d chunk(s) on the booted slot do not match their digest (changed since installed?); fetching "
                 "them", len(missed))
        extra = RangeFetcher(fetcher.session, fetcher.url, fetcher.size, read_timeout=fetcher.read_timeout,
                             headers=fetcher.headers, limiter=fetcher.limiter)
        extra.mode = fetcher.mode
        got = {}
        try:
            async for i, frame in frames(extra, self.prep.index, missed, 0):
                got[i] = frame
        finally:
            self.taken += extra.taken
        loop, offsets = asyncio.get_running_loop(), self.prep.index.offsets()
        out, pos = bytearray(), 0
        for i in range(first, last):
            length = offsets[i + 1] - offsets[i]
            if i in got:
                out += await loop.run_in_executor(pool, maker.chunk, i, got[i])
            else:
                out += data[pos:pos + length]
                pos += length
        return out

    async def _save(self, pipe: _Pipeline, slot, version) -> None:
        """Keeps what reached the ring before a cut, durable (nothing when a write failed)."""
        try:
            await pipe.finish()
        except (PayloadError, OSError):
            return
        if not pipe.broken:
            await self._checkpoint(pipe.writer, slot, version)

    async def _checkpoint(self, writer: SlotWriter, slot, version) -> None:
        await asyncio.to_thread(writer.flush)
        if self.installer.on_checkpoint is not None:
            image = self.release.image
            await _maybe_await(self.installer.on_checkpoint(
                Checkpoint(version, slot, image.sha256, image.size, writer.received, False)))

    def _progress(self, writer: SlotWriter, fetcher: RangeFetcher) -> None:
        taken = self.taken + fetcher.taken
        fetched, self._reported = taken - self._reported, taken
        reused, self._reused_reported = self.reused - self._reused_reported, self.reused
        elapsed = max(1e-6, time.monotonic() - self.started)
        self.installer.on_progress(Progress(writer.received, self.release.image.size,
                                            (writer.received - self.base) / elapsed, fetched, reused))
