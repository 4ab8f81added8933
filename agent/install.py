"""The streaming installer: download → hash → write → fsync → verify, then hand the slot to the bootloader.

Order, and nothing else: mark the target ``bad`` → stream the payload onto it (1 MiB chunks in a ring of
three reused buffers, each hashed and written in two threads while the next downloads; a body of the
expected length is read from the socket straight into the ring, ``http.DirectBody``; aligned writes
bypass the page cache) → fsync → verify size and every hash (and optionally re-read the slot) → set the
target for a trial boot. A failure at any step leaves the target ``bad`` and
the booted slot untouched.

URLs are tried in the server's order; a TCP/HTTP error, a short body, or a size/hash mismatch moves to the
next one. A transfer cut in the middle resumes with an HTTP Range request from the bytes already written;
across a daemon restart it resumes from the last durable checkpoint, rebuilding the hash state by reading
back the prefix already on the slot. A server that ignores Range (answers 200) restarts cleanly from 0.
"""
from __future__ import annotations

import asyncio
import collections
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Awaitable, Callable

from .boot import BootError
from .boot.worker import BootWorker
from .omaha.outcome import PackageOffer
from .payload import PayloadError, SlotWriter
from .state import Checkpoint
from .text import clean

CHUNK = 1 << 20
RING = 3  # chunks in memory: one being filled, the others hashed and written
CHECKPOINT_EVERY = 64 << 20
MAX_ATTEMPTS = 64


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    rate: float  # bytes per second over this attempt
    fetched: int = 0  # bytes taken from the source since the previous report (the metrics add them up)
    reused: int = 0  # image bytes read from a slot instead of fetched, since the previous report (adaptive)

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


@dataclass(frozen=True)
class InstallResult:
    version: str
    url: str
    received: int
    written: int
    compression: str | None
    download_ms: int
    resumed_from: int
    cpu_ms: int = 0  # the process's CPU time over the download (all its threads: hashing and writes included)


class InstallError(Exception):
    """The update could not be installed; ``kind`` says which step failed (transfer, size, hash, readback,
    decompress, device, boot) so the daemon can report the right error code."""

    def __init__(self, message: str, kind: str = "transfer"):
        super().__init__(clean(message, 1000))  # it quotes URLs, file names and what servers answered
        self.kind = kind


class InstallHooks:
    """What runs between the install steps; the daemon's update attempt fills them in."""

    async def before_write(self) -> None:
        """Before the target is marked bad."""

    async def writing(self) -> None:
        """The target is marked bad; the download starts."""

    def downloading(self) -> None:
        """A download from one of the URLs starts (again, after a URL that failed verification)."""

    def verifying(self) -> None:
        """The payload is on the slot; its size and hashes (and the read-back) are checked now."""

    async def verified(self, result: "InstallResult") -> bool | None:
        """The payload is on the slot and verified; the slot is armed next, unless this returns False."""


class _TransferFailed(Exception):
    pass


OnProgress = Callable[[Progress], None]
OnCheckpoint = Callable[[Checkpoint], Awaitable[None] | None]


async def _maybe_await(value) -> None:
    if asyncio.iscoroutine(value):
        await value


def _retrieved(future) -> None:
    if not future.cancelled():
        future.exception()


class _Pipeline:
    """Moves the body into a small ring of reused, page-aligned buffers (copied from the HTTP client's pieces by
    ``put``, or read there by the caller through ``space`` and ``commit``) and hands each filled chunk to the
    writer: for an uncompressed payload, hashing (one thread, in order; a SHA-1 in a third) and writing (another
    thread, O_DIRECT when aligned) of a chunk run at the same time as each other and as the download of the next
    chunks; a compressed one goes through ``SlotWriter.feed`` in the writing thread. Chunk boundaries lie
    at multiples of the chunk size in the payload, so after a resume at an odd offset the writes align again.
    Memory: ``RING`` chunks, whatever the payload's size.

    Waiting never abandons a running thread (it cannot be stopped): a cancelled wait lets every chunk in flight
    finish, then re-raises the cancellation, so nobody touches the writer while a thread still does. A chunk
    that failed while a cancellation waited, or with an I/O error, resets the writer (its counts may be ahead
    of the slot): ``broken`` says so, and nothing of this attempt is checkpointed."""

    def __init__(self, writer: SlotWriter, buffers: list, pools: tuple, offset: int):
        self.writer = writer
        self.buffers = buffers
        self.hash_pool, self.write_pool, self.sha1_pool = pools
        self.fed = offset  # payload bytes handed to the threads
        self.inflight: collections.deque = collections.deque()  # (buffer index, futures), oldest first
        self.free = collections.deque(range(len(buffers)))
        self.current: int | None = None  # the buffer being filled
        self.fill = 0
        self.broken = False
        self.plain = None if offset == 0 else writer.decoder is None  # decided by the first bytes at offset 0

    @property
    def full(self) -> bool:
        """Whether ``space`` has to wait for a chunk in flight."""
        return self.current is None and not self.free

    @property
    def pending(self) -> int:
        """Bytes received but not yet handed to the threads."""
        return self.fill

    async def put(self, data: bytes) -> list[int]:
        """Copies ``data`` into the ring; returns the sizes of the chunks it handed on."""
        handed, view, pos = [], memoryview(data), 0
        while pos < len(view):
            if self.current is None:
                self.current = await self._acquire()
            size = len(self.buffers[self.current])
            limit = size - (self.fed % size)
            take = min(limit - self.fill, len(view) - pos)
            self.buffers[self.current][self.fill:self.fill + take] = view[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == limit:
                handed.append(self._submit())
        return handed

    async def space(self) -> memoryview:
        """Where the next bytes go: the rest of the chunk being filled (for reads straight into the ring)."""
        if self.current is None:
            self.current = await self._acquire()
        buf = self.buffers[self.current]
        return memoryview(buf)[self.fill:len(buf) - (self.fed % len(buf))]

    def commit(self, n: int) -> int:
        """``n`` bytes landed at the start of ``space()``; the size of the chunk this handed on (0: none)."""
        self.fill += n
        size = len(self.buffers[self.current])
        return self._submit() if self.fill == size - (self.fed % size) else 0

    async def finish(self) -> None:
        """Hands on the partly filled chunk, and waits for every chunk in flight."""
        if self.fill:
            self._submit()
        await self.drain()

    def _submit(self) -> int:
        index, n, offset = self.current, self.fill, self.fed
        buf = self.buffers[index]
        view = memoryview(buf)[:n]
        if self.plain is None:
            self.plain = self.writer.plain(view)
        # the threads' futures, not the loop's: a chunk done while nobody waits for it does not wake the loop
        # (a capped download sleeps between its reads; each completion used to wake it once more)
        if self.plain:
            aligned = offset % len(buf) == 0
            futures = (self.hash_pool.submit(self.writer.hash_plain, view, False),
                       self.write_pool.submit(self.writer.write_plain, view, offset, aligned))
            if self.writer.sha1 is not None:  # both digests the server gave are verified: each in its own thread
                futures += (self.sha1_pool.submit(self.writer.sha1_plain, view),)
        else:
            futures = (self.write_pool.submit(self.writer.feed, view),)
        self.inflight.append((index, futures))
        self.current, self.fill = None, 0
        self.fed += n
        return n

    async def _acquire(self) -> int:
        if not self.free:
            await self._settle(1)
        return self.free.popleft()

    async def drain(self) -> None:
        await self._settle(len(self.inflight))

    async def _settle(self, count: int) -> None:
        """Waits for the ``count`` oldest chunks in flight (for all of them after a failure or a cancel)."""
        cancelled = False
        while True:
            entries = list(self.inflight)[:count]
            futures = [f for _, fs in entries for f in fs]
            while pending := [f for f in futures if not f.done()]:  # (read once: a thread may finish meanwhile)
                waited = {asyncio.wrap_future(f) for f in pending}  # (the loop wakes for these)
                for w in waited:  # a failure is read from the pool's future: its loop copy is never "unretrieved"
                    w.add_done_callback(_retrieved)
                try:
                    await asyncio.wait(waited)
                except asyncio.CancelledError:
                    cancelled = True
            failed = next((f.exception() for f in futures if f.exception() is not None), None)
            if (cancelled or failed is not None) and count < len(self.inflight):
                count = len(self.inflight)  # nothing may run in a thread once we give up: wait for the rest too
                continue
            break
        for _ in range(count):
            index, _ = self.inflight.popleft()
            self.free.append(index)
        if cancelled:
            if failed is not None:
                self._break()
            raise asyncio.CancelledError
        if failed is not None:
            if not isinstance(failed, PayloadError):  # an I/O error: the counts may be ahead of the slot
                self._break()
                if isinstance(failed, OSError):  # the slot's device, not the network: no other URL helps
                    raise PayloadError(f"writing slot {self.writer.path}: {failed.strerror or failed}",
                                       "device") from None
            raise failed

    def _break(self) -> None:
        self.writer.reset()
        self.broken = True
        self.current, self.fill = None, 0


class Installer:
    def __init__(self, session, *, sessionid: str = "", read_timeout: float = 60.0, readback: bool = False,
                 on_progress: OnProgress | None = None, on_checkpoint: OnCheckpoint | None = None,
                 chunk: int = CHUNK, checkpoint_every: int = CHECKPOINT_EVERY, max_rate: int | None = None):
        from .ratelimit import bucket
        self.session = session
        self.limiter = bucket(max_rate, chunk)  # bytes/s over the network (``ratelimit``); None: as fast as it comes
        self.sessionid = sessionid
        self.read_timeout = read_timeout
        self.readback = readback
        self.on_progress = on_progress or (lambda p: None)
        self.on_checkpoint = on_checkpoint
        self.chunk = chunk
        self.checkpoint_every = checkpoint_every
        self._taken = self._reported = 0  # bytes taken from the sources, and how many of them a Progress told

    async def install(self, boot: BootWorker, slot: str, path: str, capacity: int, pkg: PackageOffer,
                      version: str, tries: int, resume: Checkpoint | None = None,
                      hooks: "InstallHooks | None" = None, stream=None) -> InstallResult:
        """The whole ordered sequence onto ``slot`` (already checked by ``slots.check_target``): the one install
        path, for the daemon and the tests alike. ``hooks`` run between the steps (the daemon records the
        trial before it is armed, so a crash after arming still finds it). ``stream``: what writes and verifies
        the image instead of ``self.stream`` (an adaptive install, ``adaptive.apply``)."""
        hooks = hooks or InstallHooks()
        await hooks.before_write()
        try:
            await boot.mark_bad(slot)
        except BootError as exc:
            raise InstallError(f"could not mark slot {slot} bad before writing: {exc}", "boot") from None
        await hooks.writing()
        result = await (stream or self.stream)(slot, path, capacity, pkg, version, resume, phases=hooks)
        if await hooks.verified(result) is False:  # staged: verified and left unarmed (install.arm)
            return result
        try:
            await boot.set_trial(slot, tries, version)
        except BootError as exc:
            raise InstallError(f"could not set slot {slot} for a trial boot: {exc}", "boot") from None
        return result

    async def stream(self, slot: str, path: str, capacity: int, pkg: PackageOffer, version: str,
                     resume: Checkpoint | None = None, phases: "InstallHooks | None" = None) -> InstallResult:
        """Download ``pkg`` onto ``path`` and verify it; raises ``InstallError``."""
        if pkg.size <= 0:  # the hash of nothing "verifies" whatever the slot held before: never arm that
            raise InstallError(f"payload size {pkg.size}: an empty image cannot be installed", "size")
        if pkg.size > capacity:
            raise InstallError(f"payload of {pkg.size} bytes is larger than slot {slot} ({capacity} bytes)", "device")
        writer = SlotWriter(path, capacity, pkg.sha256, pkg.sha1, readback=self.readback, direct=True)
        try:
            await asyncio.to_thread(writer.open)
        except PayloadError as exc:
            raise InstallError(str(exc), exc.kind) from None
        # page-aligned (anonymous mmap), reused for every chunk of every attempt
        self._buffers = [mmap.mmap(-1, self.chunk) for _ in range(RING)]
        self._pools = (ThreadPoolExecutor(1, "omaha-hash"), ThreadPoolExecutor(1, "omaha-write"),
                       ThreadPoolExecutor(1, "omaha-sha1"))  # (its thread starts only when a SHA-1 is given)
        try:
            resumed_from = await self._resume(writer, slot, pkg, version, resume)
            return await self._fetch_all(writer, slot, pkg, version, resumed_from, phases or InstallHooks())
        finally:
            for pool in self._pools:
                pool.shutdown(wait=False)  # idle: every chunk was waited for
            self._buffers = []
            writer.close()

    async def _resume(self, writer: SlotWriter, slot: str, pkg: PackageOffer, version: str,
                      cp: Checkpoint | None) -> int:
        if (cp is None or cp.compressed or cp.slot != slot or cp.version != version or cp.size != pkg.size
                or cp.sha256 != pkg.sha256_hex or cp.received <= 0 or (cp.package and cp.package != pkg.name)):
            return 0
        try:
            await asyncio.to_thread(writer.rehash_prefix, cp.received)
        except (PayloadError, OSError):
            writer.reset()
            return 0
        return cp.received

    async def _checkpoint(self, writer: SlotWriter, slot: str, pkg: PackageOffer, version: str) -> None:
        await asyncio.to_thread(writer.flush)
        if self.on_checkpoint is not None:
            cp = Checkpoint(version, slot, pkg.sha256_hex, pkg.size, writer.received, writer.compression is not None,
                            pkg.name)
            await _maybe_await(self.on_checkpoint(cp))

    async def _fetch_all(self, writer: SlotWriter, slot: str, pkg: PackageOffer, version: str,
                         resumed_from: int, phases: "InstallHooks") -> InstallResult:
        errors: list[str] = []
        kinds: list[str] = []
        started, cpu = time.monotonic(), time.process_time()
        # Cycle through the URLs. An attempt that moved the download forward does not count against the
        # budget (a flaky link resumes as long as it makes progress); two rounds without progress end it.
        budget, attempt = 2 * len(pkg.urls), 0
        while budget > 0 and attempt < MAX_ATTEMPTS:
            url = pkg.urls[attempt % len(pkg.urls)]
            attempt += 1
            before = writer.received
            try:
                fetch = self._fetch_file if url.startswith("file://") else self._fetch
                phases.downloading()
                await fetch(url, writer, slot, pkg, version)
                phases.verifying()
                await asyncio.to_thread(writer.flush)
                await asyncio.to_thread(writer.verify, pkg.size)
                if self.readback:
                    await asyncio.to_thread(writer.verify_readback)
                return InstallResult(version, url, writer.received, writer.written, writer.compression,
                                     int((time.monotonic() - started) * 1000), resumed_from,
                                     int((time.process_time() - cpu) * 1000))
            except PayloadError as exc:
                errors.append(f"{url}: {exc}")
                kinds.append(exc.kind)
                if exc.kind == "device":  # the slot failed, not the download: said as it is
                    raise InstallError(str(exc), "device") from None
                writer.reset()  # what came from this URL cannot be trusted: start over from byte 0
                budget -= 1
            except _TransferFailed as exc:
                errors.append(f"{url}: {exc}")
                kinds.append("transfer")
                if writer.received <= before:
                    budget -= 1
        kind = kinds[-1] if kinds and all(k == kinds[-1] for k in kinds) else "transfer"
        raise InstallError("download failed from every URL: " + "; ".join(errors[-4:]), kind)

    async def _fetch(self, url: str, writer: SlotWriter, slot: str, pkg: PackageOffer, version: str) -> None:
        import aiohttp

        offset = writer.received
        if offset >= pkg.size:  # a checkpoint taken after the last byte: nothing left to fetch, only to verify
            return
        from .http import DirectBody, RedirectRefused, open_get

        # identity: a Range is counted in the bytes as sent, so a resume needs the body as sent (aiohttp would
        # otherwise ask for gzip and hand over decoded bytes)
        headers = {"Accept-Encoding": "identity"}
        if self.sessionid:
            headers["X-Goog-Update-SessionId"] = self.sessionid
        if offset:
            headers["Range"] = f"bytes={offset}-"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=self.read_timeout)
        pipe: _Pipeline | None = None
        attempt_start, attempt_base = time.monotonic(), offset
        encoded = False  # the server sent Content-Encoding anyway: what arrived cannot be resumed with a Range
        try:
            async with await open_get(self.session, url, headers=headers, timeout=timeout) as resp:
                encoded = resp.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")
                if encoded and resp.status == 206:  # a Range of an encoded body: its offsets are not ours
                    writer.reset()
                    raise _TransferFailed(f"server sent a resumed body with Content-Encoding "
                                          f"'{clean(resp.headers['Content-Encoding'], 40)}'; starting over from byte 0")
                if resp.status == 206 and offset:
                    start = _content_range_start(resp.headers.get("Content-Range", ""))
                    if start != offset:
                        raise _TransferFailed(f"server resumed at byte {start}, asked for {offset}")
                elif resp.status == 200:
                    if offset:  # Range ignored: the body starts at byte 0
                        writer.reset()
                        offset = attempt_base = 0
                elif resp.status == 416 and offset:  # the server cannot resume there: start over from 0
                    writer.reset()
                    raise _TransferFailed(f"HTTP 416: the server cannot resume at byte {offset}")
                else:
                    raise _TransferFailed(f"HTTP {resp.status} {clean(resp.reason or '', 80)}".strip())
                complete_body = resp.content_length is not None  # aiohttp raises if it is not satisfied
                pipe = _Pipeline(writer, self._buffers, self._pools, offset)
                head, body = b"", None
                if not encoded and complete_body and offset + resp.content_length == pkg.size:
                    # the expected body, as is: read from the socket straight into the ring
                    head, body = DirectBody.take(resp, self.read_timeout)
                await self._pump(resp.content.iter_any(), pipe, slot, pkg, version, attempt_start, attempt_base,
                                 checkpoints=not encoded, head=head, body=body, limiter=self.limiter)
        except asyncio.CancelledError:
            await self._save_partial(pipe, slot, pkg, version, encoded)
            raise
        except RedirectRefused as exc:
            raise _TransferFailed(str(exc)) from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            await self._save_partial(pipe, slot, pkg, version, encoded)
            raise _TransferFailed(_describe(exc)) from None
        except PayloadError:
            await _settle(pipe)
            raise
        self._progress(writer, pkg, attempt_start, attempt_base)
        if writer.received < pkg.size:
            if complete_body:  # the server sent all it meant to: its payload is smaller than it said
                raise PayloadError(f"server sent {writer.received} bytes, it promised {pkg.size}", "size")
            received = writer.received
            if encoded:
                writer.reset()
            else:
                await self._checkpoint(writer, slot, pkg, version)
            raise _TransferFailed(f"short body: {received} of {pkg.size} bytes")

    async def _pump(self, pieces, pipe: "_Pipeline", slot: str, pkg: PackageOffer, version: str, attempt_start: float,
                    attempt_base: int, checkpoints: bool = True, head: bytes = b"", body=None, limiter=None) -> None:
        """Feeds the pieces of a body onto the slot through ``pipe``, with checkpoints (unless the body cannot be
        resumed: a content-encoded one) and progress. With ``body`` (an ``http.DirectBody``), ``head`` and then
        what ``body`` reads straight into the ring instead of ``pieces``. With ``limiter`` (a
        ``ratelimit.TokenBucket``) each read is at most its quantum and waits for its tokens."""
        since_checkpoint = 0

        async def handed_on(size: int) -> None:
            nonlocal since_checkpoint
            since_checkpoint += size
            if since_checkpoint >= self.checkpoint_every and checkpoints:
                await pipe.drain()
                await self._checkpoint(pipe.writer, slot, pkg, version)
                since_checkpoint = 0
            self._progress(pipe.writer, pkg, attempt_start, attempt_base)

        async def put(data) -> None:
            if pipe.fed + pipe.pending + len(data) > pkg.size:
                raise PayloadError(f"the source sent more than the promised {pkg.size} bytes", "size")
            handed = await pipe.put(data)
            self._taken += len(data)
            if handed:
                await handed_on(sum(handed))
            if limiter is not None:
                await limiter.spend(len(data))

        if head:
            await put(head)
        if body is None:
            async for data in pieces:
                await put(data)
        else:
            try:
                while body.left:  # the body's length is the payload's rest: never more than promised
                    if pipe.full:
                        body.pause()
                    view = await pipe.space()
                    if limiter is not None:
                        view = view[:limiter.quantum]
                    try:
                        n = await body.fill(view)
                    except asyncio.CancelledError:
                        if body.landed:  # what arrived before the cancel: the checkpoint keeps it
                            pipe.commit(body.landed)
                        raise
                    handed = pipe.commit(n)
                    self._taken += n
                    if handed:
                        await handed_on(handed)
                    if limiter is not None:
                        body.pause()  # nothing is read (or spilled) while the rate holds this back
                        await limiter.spend(n)
            finally:
                body.close()
        await pipe.finish()

    async def _fetch_file(self, url: str, writer: SlotWriter, slot: str, pkg: PackageOffer, version: str) -> None:
        """A ``file://`` source (an offline install): read in chunks off the event loop, same pipeline."""
        offset = writer.received
        if offset >= pkg.size:
            return
        from .localfile import LocalFileError, open_regular, shown
        path, pipe = url[len("file://"):], None
        attempt_start = time.monotonic()
        try:  # a regular file only, opened without blocking; never more than the release's size is read
            fd, _ = await asyncio.to_thread(open_regular, path)
        except (OSError, LocalFileError) as exc:
            raise _TransferFailed(f"cannot read {shown(path)}: {getattr(exc, 'strerror', None) or exc}") from None

        async def pieces():
            at = offset
            while at < pkg.size and (data := await asyncio.to_thread(os.pread, fd, min(self.chunk, pkg.size - at), at)):
                at += len(data)
                yield data

        try:
            pipe = _Pipeline(writer, self._buffers, self._pools, offset)
            await self._pump(pieces(), pipe, slot, pkg, version, attempt_start, offset)
        except asyncio.CancelledError:
            await self._save_partial(pipe, slot, pkg, version)
            raise
        except OSError as exc:
            await self._save_partial(pipe, slot, pkg, version)
            raise _TransferFailed(f"reading {shown(path)}: {exc.strerror or exc}") from None
        except PayloadError:
            await _settle(pipe)
            raise
        finally:
            os.close(fd)
        self._progress(writer, pkg, attempt_start, offset)
        if writer.received < pkg.size:
            raise PayloadError(f"{shown(path)} holds {writer.received} bytes, the release has {pkg.size}", "size")

    async def _save_partial(self, pipe: "_Pipeline | None", slot, pkg, version, encoded: bool = False) -> None:
        """Keep what arrived before a cut (or a cancel), durable, so the next attempt resumes after it; a body the
        server content-encoded cannot be resumed (its Range counts encoded bytes): start over."""
        if pipe is None:
            return
        if encoded:
            await _settle(pipe)
            pipe.writer.reset()
            return
        try:
            await pipe.finish()  # the partly filled chunk too; waits for every chunk in flight
        except PayloadError:
            pipe.writer.reset()
            return
        except OSError:  # a chunk failed to write: the pipe broke and reset the writer
            return
        if not pipe.broken:
            await self._checkpoint(pipe.writer, slot, pkg, version)

    def _progress(self, writer: SlotWriter, pkg: PackageOffer, start: float, base: int) -> None:
        elapsed = max(1e-6, time.monotonic() - start)
        fetched, self._reported = self._taken - self._reported, self._taken
        self.on_progress(Progress(writer.received, pkg.size, (writer.received - base) / elapsed, fetched))


async def _settle(pipe: "_Pipeline | None") -> None:
    """Lets the chunks in flight finish before the caller resets the writer; their own errors no longer matter."""
    if pipe is None:
        return
    try:
        await pipe.drain()
    except (PayloadError, OSError):
        pass


def _content_range_start(value: str) -> int | None:
    # "bytes 100-199/200"
    try:
        unit, _, rest = value.strip().partition(" ")
        return int(rest.split("-", 1)[0]) if unit == "bytes" else None
    except ValueError:
        return None


def _describe(exc: BaseException) -> str:
    from .http import describe_error
    return describe_error(exc, "timed out waiting for data")
