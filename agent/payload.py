"""Writing a payload onto a slot while hashing it: the synchronous part of the installer.

``SlotWriter.feed()`` takes the bytes as served, hashes them (SHA-256 and/or SHA-1, whichever the server
gave), decompresses them if they are gzip, xz or zstd (detected by magic bytes), and writes the result at
the next offset of the slot. An uncompressed payload takes a faster way: ``hash_plain()`` and
``write_plain()`` run at the same time in two threads on the same buffer, and an aligned chunk in a
page-aligned buffer is written with ``O_DIRECT`` (no copy into the page cache, which then does not grow with
the payload). Everything here runs in worker threads; nothing touches the event loop. The whole image is
never held in memory: at most a few chunks and the decompressor's window.
"""
from __future__ import annotations

import errno
import hashlib
import lzma
import os
import zlib

READ_CHUNK = 1 << 20
ALIGN = 4096  # O_DIRECT: offsets, lengths and buffer addresses are multiples of this (>= any logical block size)

MAGIC = {b"\x1f\x8b": "gzip", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


class PayloadError(Exception):
    """The payload does not fit, does not decompress, or does not match what the server promised."""

    def __init__(self, message: str, kind: str = "transfer"):
        super().__init__(message)
        self.kind = kind  # transfer | size | hash | readback | decompress | device


def sniff(head: bytes) -> str | None:
    for magic, name in MAGIC.items():
        if head.startswith(magic):
            return name
    return None


class _Decoder:
    """Decompresses in bounded steps: whatever the compression ratio, at most ``READ_CHUNK`` bytes of output
    exist at once, and each is passed to ``sink`` (a hostile payload cannot blow up memory)."""

    def __init__(self, kind: str, sink):
        self.kind = kind
        self.sink = sink
        if kind == "gzip":
            self.obj = zlib.decompressobj(wbits=47)
        elif kind == "xz":
            self.obj = lzma.LZMADecompressor()
        else:
            try:
                import zstandard
            except ImportError:
                raise PayloadError("payload is zstd-compressed but the zstandard module is not installed "
                                   "(pip install 'omaha-agent[zstd]')", "decompress") from None
            self.obj = zstandard.ZstdDecompressor().stream_writer(self, write_size=READ_CHUNK,
                                                                  write_return_read=True)

    def write(self, data: bytes) -> int:  # called by zstandard's stream_writer with decompressed output
        self.sink(data)
        return len(data)

    def feed(self, data) -> None:
        if self.kind == "zstd":
            self.obj.write(data)
        elif self.kind == "gzip":
            out = self.obj.decompress(data, READ_CHUNK)
            self.sink(out)
            while self.obj.unconsumed_tail:
                self.sink(self.obj.decompress(self.obj.unconsumed_tail, READ_CHUNK))
        else:
            self.sink(self.obj.decompress(data, READ_CHUNK))
            while not self.obj.eof and not self.obj.needs_input:
                self.sink(self.obj.decompress(b"", READ_CHUNK))

    @property
    def complete(self) -> bool:
        return self.kind == "zstd" or bool(self.obj.eof)


class SlotWriter:
    """Hash-while-writing into an open slot. Offsets: ``received`` counts served bytes, ``written`` counts
    bytes put on the slot (they differ only for compressed payloads)."""

    def __init__(self, path: str, capacity: int, sha256: bytes | None, sha1: bytes | None,
                 decompress: bool = True, readback: bool = False, direct: bool = False):
        self.path = path
        self.direct = direct  # try O_DIRECT for aligned chunks of page-aligned buffers
        self.dfd = -1
        self.capacity = capacity
        self.want_sha256 = sha256
        self.want_sha1 = sha1
        self.decompress = decompress
        self.readback = readback
        self.fd = -1
        self.reset()

    # -- lifecycle
    def open(self) -> None:
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise PayloadError(f"cannot open slot {self.path} for writing: {exc.strerror}", "device") from None
        if self.direct:
            try:
                self.dfd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
            except OSError:  # a file system without O_DIRECT (tmpfs): every write goes through the page cache
                self.dfd = -1

    def close(self) -> None:
        for name in ("fd", "dfd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def reset(self) -> None:
        """Start over from byte 0 (a new URL after a bad hash, or a server that ignored Range)."""
        self.received = 0
        self.written = 0
        self.sha256 = hashlib.sha256()
        self.sha1 = hashlib.sha1() if self.want_sha1 is not None else None
        self.out_sha256 = hashlib.sha256() if self.readback else None
        self.compression: str | None = None
        self.decoder = None

    # -- resume
    def rehash_prefix(self, offset: int) -> None:
        """Rebuild the hash state for ``offset`` bytes already on the slot (uncompressed payloads only)."""
        self.reset()
        with open(self.path, "rb") as f:
            remaining = offset
            while remaining > 0:
                block = f.read(min(READ_CHUNK, remaining))
                if not block:
                    raise PayloadError(f"slot {self.path} is shorter than the resume offset {offset}", "device")
                self._hash_in(block)
                if self.out_sha256 is not None:
                    self.out_sha256.update(block)
                remaining -= len(block)
        self.received = self.written = offset

    # -- streaming
    def _hash_in(self, data) -> None:
        self.sha256.update(data)
        if self.sha1 is not None:
            self.sha1.update(data)

    def _write_out(self, data: bytes) -> None:
        if not data:
            return
        if self.written + len(data) > self.capacity:
            raise PayloadError(f"payload expands beyond the slot's {self.capacity} bytes", "size")
        view = memoryview(data)
        offset = self.written
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n
        if self.out_sha256 is not None:
            self.out_sha256.update(data)
        self.written += len(data)

    def plain(self, head) -> bool:
        """Whether a stream starting with ``head`` (at byte 0) is written as served (not decompressed)."""
        return not self.decompress or sniff(bytes(head[:8])) is None

    def hash_plain(self, data, sha1: bool = True) -> None:
        """The hashing half of ``feed`` for an uncompressed payload; runs beside ``write_plain`` of the same bytes.
        ``sha1=False``: the SHA-1 (when the server gave one) is left to ``sha1_plain`` in a thread of its own."""
        self.sha256.update(data)
        if sha1 and self.sha1 is not None:
            self.sha1.update(data)
        if self.out_sha256 is not None:  # written as served: the slot's hash is the payload's
            self.out_sha256.update(data)
        self.received += len(data)

    def sha1_plain(self, data) -> None:
        """The SHA-1 part of ``hash_plain`` (in order, in one thread), beside the SHA-256 of the same bytes."""
        self.sha1.update(data)

    def write_plain(self, data, offset: int, aligned: bool = False) -> None:
        """The writing half of ``feed`` for an uncompressed payload: ``data`` at ``offset`` of the slot, with
        O_DIRECT when ``aligned`` (a page-aligned buffer) and offset and length are multiples of ``ALIGN``."""
        end = offset + len(data)
        if end > self.capacity:
            raise PayloadError(f"payload expands beyond the slot's {self.capacity} bytes", "size")
        fd = self.fd
        if aligned and self.dfd >= 0 and offset % ALIGN == 0 and len(data) % ALIGN == 0:
            fd = self.dfd
        view = memoryview(data)
        while view:
            try:
                n = os.pwrite(fd, view, offset)
            except OSError as exc:
                if fd != self.dfd or exc.errno != errno.EINVAL:
                    raise
                os.close(self.dfd)  # O_DIRECT refused after all: the page cache from now on
                self.dfd, fd = -1, self.fd
                continue
            view = view[n:]
            offset += n
        self.written = end

    def feed(self, data) -> None:
        if self.received == 0 and self.decompress:  # compression is decided by the payload's first bytes
            self.compression = sniff(bytes(data[:8]))
            self.decoder = _Decoder(self.compression, self._write_out) if self.compression else None
        self._hash_in(data)
        self.received += len(data)
        if self.decoder is None:
            self._write_out(data)
            return
        try:
            self.decoder.feed(data)
        except (PayloadError, OSError):  # (an OSError is the slot's write of what was decoded, not the payload)
            raise
        except Exception as exc:  # zlib.error, lzma.LZMAError, EOFError, zstandard.ZstdError ...
            raise PayloadError(f"{self.compression} payload is corrupt: {exc}", "decompress") from None

    def flush(self) -> None:
        """Make everything written so far durable."""
        os.fsync(self.fd)

    # -- verification
    def verify(self, size: int) -> None:
        if self.received != size:
            raise PayloadError(f"received {self.received} bytes, the server promised {size}", "size")
        if self.want_sha256 is not None and self.sha256.digest() != self.want_sha256:
            raise PayloadError(f"SHA-256 mismatch: got {self.sha256.hexdigest()}, expected "
                               f"{self.want_sha256.hex()}", "hash")
        if self.want_sha1 is not None and self.sha1.digest() != self.want_sha1:
            raise PayloadError(f"SHA-1 mismatch: got {self.sha1.hexdigest()}, expected {self.want_sha1.hex()}",
                               "hash")
        if self.decoder is not None and not self.decoder.complete:
            raise PayloadError(f"{self.compression} payload ends before its end-of-stream marker", "decompress")

    def verify_readback(self) -> None:
        """Re-read what was written and hash it again (``verify: readback``)."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            remaining = self.written
            while remaining > 0:
                block = f.read(min(READ_CHUNK, remaining))
                if not block:
                    break
                digest.update(block)
                remaining -= len(block)
        if self.out_sha256 is None or digest.digest() != self.out_sha256.digest():
            raise PayloadError(f"slot {self.path} does not read back what was written", "readback")
