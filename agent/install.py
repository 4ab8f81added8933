"""The streaming installer: download → hash → write → fsync → verify, then hand the slot to the bootloader.

Order, and nothing else: mark the target ``bad`` → stream the payload onto it (hashing as bytes arrive,
writing in aligned 1 MiB chunks from a worker thread) → fsync → verify size and every hash (and optionally
re-read the slot) → set the target for a trial boot. A failure at any step leaves the target ``bad`` and
the booted slot untouched.

URLs are tried in the server's order; a TCP/HTTP error, a short body, or a size/hash mismatch moves to the
next one. A transfer cut in the middle resumes with an HTTP Range request from the bytes already written;
across a daemon restart it resumes from the last durable checkpoint, rebuilding the hash state by reading
back the prefix already on the slot. A server that ignores Range (answers 200) restarts cleanly from 0.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from .boot import BootError
from .boot.worker import BootWorker
from .omaha.outcome import PackageOffer
from .payload import PayloadError, SlotWriter
from .state import Checkpoint

CHUNK = 1 << 20
CHECKPOINT_EVERY = 16 << 20
MAX_ATTEMPTS = 64


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    rate: float  # bytes per second over this attempt

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


class InstallError(Exception):
    """The update could not be installed; ``kind`` says which step failed (transfer, size, hash, readback,
    decompress, device, boot) so the daemon can report the right error code."""

    def __init__(self, message: str, kind: str = "transfer"):
        super().__init__(message)
        self.kind = kind


class InstallHooks:
    """What runs between the install steps; the daemon's update attempt fills them in."""

    async def before_write(self) -> None:
        """Before the target is marked bad."""

    async def writing(self) -> None:
        """The target is marked bad; the download starts."""

    async def verified(self, result: "InstallResult") -> None:
        """The payload is on the slot and verified; the slot is armed next."""


class _TransferFailed(Exception):
    pass


OnProgress = Callable[[Progress], None]
OnCheckpoint = Callable[[Checkpoint], Awaitable[None] | None]


async def _maybe_await(value) -> None:
    if asyncio.iscoroutine(value):
        await value


class _Feeder:
    """Hands chunks to ``SlotWriter.feed`` in a worker thread while the next chunk downloads: one chunk in
    flight at most, so memory stays at two chunks and the network and the disk work at the same time.

    A cancelled wait never abandons a running feed (the thread cannot be stopped): it waits for the thread
    to finish, then re-raises the cancellation, so nobody touches the writer while the thread still does."""

    def __init__(self, writer: SlotWriter):
        self.writer = writer
        self.inflight: asyncio.Future | None = None
        self.broken = False  # a chunk failed while a cancellation waited: the writer was reset

    async def submit(self, data: bytes) -> None:
        await self.wait()
        self.inflight = asyncio.get_running_loop().run_in_executor(None, self.writer.feed, data)

    async def wait(self) -> None:
        fut, cancelled = self.inflight, False
        if fut is None:
            return
        while not fut.done():
            try:
                await asyncio.wait({fut})
            except asyncio.CancelledError:
                cancelled = True
        self.inflight = None
        if cancelled:
            if fut.exception() is not None:
                self.writer.reset()  # the failed chunk may be half counted: keep nothing of this attempt
                self.broken = True
            raise asyncio.CancelledError
        fut.result()


class Installer:
    def __init__(self, session, *, sessionid: str = "", read_timeout: float = 60.0, readback: bool = False,
                 on_progress: OnProgress | None = None, on_checkpoint: OnCheckpoint | None = None,
                 chunk: int = CHUNK, checkpoint_every: int = CHECKPOINT_EVERY):
        self.session = session
        self.sessionid = sessionid
        self.read_timeout = read_timeout
        self.readback = readback
        self.on_progress = on_progress or (lambda p: None)
        self.on_checkpoint = on_checkpoint
        self.chunk = chunk
        self.checkpoint_every = checkpoint_every

    async def install(self, boot: BootWorker, slot: str, path: str, capacity: int, pkg: PackageOffer,
                      version: str, tries: int, resume: Checkpoint | None = None,
                      hooks: "InstallHooks | None" = None) -> InstallResult:
        """The whole ordered sequence onto ``slot`` (already checked by ``slots.check_target``): the one install
        path, for the daemon and the tests alike. ``hooks`` run between the steps (the daemon records the
        trial before it is armed, so a crash after arming still finds it)."""
        hooks = hooks or InstallHooks()
        await hooks.before_write()
        try:
            await boot.mark_bad(slot)
        except BootError as exc:
            raise InstallError(f"could not mark slot {slot} bad before writing: {exc}", "boot") from None
        await hooks.writing()
        result = await self.stream(slot, path, capacity, pkg, version, resume)
        await hooks.verified(result)
        try:
            await boot.set_trial(slot, tries, version)
        except BootError as exc:
            raise InstallError(f"could not set slot {slot} for a trial boot: {exc}", "boot") from None
        return result

    async def stream(self, slot: str, path: str, capacity: int, pkg: PackageOffer, version: str,
                     resume: Checkpoint | None = None) -> InstallResult:
        """Download ``pkg`` onto ``path`` and verify it; raises ``InstallError``."""
        if pkg.size <= 0:  # the hash of nothing "verifies" whatever the slot held before: never arm that
            raise InstallError(f"payload size {pkg.size}: an empty image cannot be installed", "size")
        if pkg.size > capacity:
            raise InstallError(f"payload of {pkg.size} bytes is larger than slot {slot} ({capacity} bytes)", "device")
        writer = SlotWriter(path, capacity, pkg.sha256, pkg.sha1, readback=self.readback)
        try:
            await asyncio.to_thread(writer.open)
        except PayloadError as exc:
            raise InstallError(str(exc), exc.kind) from None
        try:
            resumed_from = await self._resume(writer, slot, pkg, version, resume)
            return await self._fetch_all(writer, slot, pkg, version, resumed_from)
        finally:
            writer.close()

    async def _resume(self, writer: SlotWriter, slot: str, pkg: PackageOffer, version: str,
                      cp: Checkpoint | None) -> int:
        if (cp is None or cp.compressed or cp.slot != slot or cp.version != version or cp.size != pkg.size
                or cp.sha256 != pkg.sha256_hex or cp.received <= 0):
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
            cp = Checkpoint(version, slot, pkg.sha256_hex, pkg.size, writer.received, writer.compression is not None)
            await _maybe_await(self.on_checkpoint(cp))

    async def _fetch_all(self, writer: SlotWriter, slot: str, pkg: PackageOffer, version: str,
                         resumed_from: int) -> InstallResult:
        errors: list[str] = []
        kinds: list[str] = []
        started = time.monotonic()
        # Cycle through the URLs. An attempt that moved the download forward does not count against the
        # budget (a flaky link resumes as long as it makes progress); two rounds without progress end it.
        budget, attempt = 2 * len(pkg.urls), 0
        while budget > 0 and attempt < MAX_ATTEMPTS:
            url = pkg.urls[attempt % len(pkg.urls)]
            attempt += 1
            before = writer.received
            try:
                await self._fetch(url, writer, slot, pkg, version)
                await asyncio.to_thread(writer.flush)
                await asyncio.to_thread(writer.verify, pkg.size)
                if self.readback:
                    await asyncio.to_thread(writer.verify_readback)
                return InstallResult(version, url, writer.received, writer.written, writer.compression,
                                     int((time.monotonic() - started) * 1000), resumed_from)
            except PayloadError as exc:
                errors.append(f"{url}: {exc}")
                kinds.append(exc.kind)
                if exc.kind == "device":
                    break
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
        from .http import RedirectRefused, open_get

        # identity: a Range is counted in the bytes as sent, so a resume needs the body as sent (aiohttp would
        # otherwise ask for gzip and hand over decoded bytes)
        headers = {"Accept-Encoding": "identity"}
        if self.sessionid:
            headers["X-Goog-Update-SessionId"] = self.sessionid
        if offset:
            headers["Range"] = f"bytes={offset}-"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=self.read_timeout)
        buffer = bytearray()
        since_checkpoint = 0
        feeder = _Feeder(writer)
        fed = offset  # bytes handed to the feeder (the writer's own count lags while a chunk is in flight)
        attempt_start, attempt_base = time.monotonic(), offset
        encoded = False  # the server sent Content-Encoding anyway: what arrived cannot be resumed with a Range
        try:
            async with await open_get(self.session, url, headers=headers, timeout=timeout) as resp:
                encoded = resp.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")
                if encoded and resp.status == 206:  # a Range of an encoded body: its offsets are not ours
                    writer.reset()
                    raise _TransferFailed(f"server sent a resumed body with Content-Encoding "
                                          f"{resp.headers['Content-Encoding'][:40]!r}; starting over from byte 0")
                if resp.status == 206 and offset:
                    start = _content_range_start(resp.headers.get("Content-Range", ""))
                    if start != offset:
                        raise _TransferFailed(f"server resumed at byte {start}, asked for {offset}")
                elif resp.status == 200:
                    if offset:  # Range ignored: the body starts at byte 0
                        writer.reset()
                        fed = attempt_base = 0
                elif resp.status == 416 and offset:  # the server cannot resume there: start over from 0
                    writer.reset()
                    raise _TransferFailed(f"HTTP 416: the server cannot resume at byte {offset}")
                else:
                    raise _TransferFailed(f"HTTP {resp.status} {resp.reason or ''}".strip())
                complete_body = resp.content_length is not None  # aiohttp raises if it is not satisfied
                async for data in resp.content.iter_chunked(1 << 16):
                    buffer += data
                    if fed + len(buffer) > pkg.size:
                        raise PayloadError(f"server sent more than the promised {pkg.size} bytes", "size")
                    if len(buffer) >= self.chunk:
                        await feeder.submit(bytes(buffer))
                        fed += len(buffer)
                        since_checkpoint += len(buffer)
                        buffer.clear()
                        if since_checkpoint >= self.checkpoint_every and not encoded:
                            await feeder.wait()
                            await self._checkpoint(writer, slot, pkg, version)
                            since_checkpoint = 0
                        self._progress(writer, pkg, attempt_start, attempt_base)
                if buffer:
                    await feeder.submit(bytes(buffer))
                    buffer.clear()
                await feeder.wait()
        except asyncio.CancelledError:
            await self._save_partial(feeder, buffer, slot, pkg, version, encoded)
            raise
        except RedirectRefused as exc:
            raise _TransferFailed(str(exc)) from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            await self._save_partial(feeder, buffer, slot, pkg, version, encoded)
            raise _TransferFailed(_describe(exc)) from None
        except PayloadError:
            await _settle(feeder)
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

    async def _save_partial(self, feeder: _Feeder, buffer: bytearray, slot, pkg, version,
                            encoded: bool = False) -> None:
        """Keep what arrived before a cut (or a cancel), durable, so the next attempt resumes after it; a
        body the server content-encoded cannot be resumed (its Range counts encoded bytes): start over."""
        writer = feeder.writer
        try:
            if encoded:
                await _settle(feeder)
                writer.reset()
                return
            await feeder.wait()
            if feeder.broken:
                return
            if buffer:
                await asyncio.to_thread(writer.feed, bytes(buffer))
                buffer.clear()
            await self._checkpoint(writer, slot, pkg, version)
        except PayloadError:
            writer.reset()

    def _progress(self, writer: SlotWriter, pkg: PackageOffer, start: float, base: int) -> None:
        elapsed = max(1e-6, time.monotonic() - start)
        self.on_progress(Progress(writer.received, pkg.size, (writer.received - base) / elapsed))


async def _settle(feeder: _Feeder) -> None:
    """Lets a chunk in flight finish before the caller resets the writer; its own error no longer matters."""
    try:
        await feeder.wait()
    except PayloadError:
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
