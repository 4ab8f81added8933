"""The chunk index (format 1): what an image is made of, chunk by chunk, in image order.

A release cut into content-defined chunks has two artifacts beside its envelope:

* the **chunk data** file: one zstd frame per chunk, in image order, each compressed on its own with its
  content size in the frame header (so the file is a valid zstd stream: decompressed as a whole it is the image,
  and the full path can install it like any zstd payload);
* the **chunk index**: a fixed header and one fixed-size record per chunk, all integers big-endian::

    header (76 bytes)
      magic        8 bytes   b"OACIDX\\r\\n"
      version      u32       1
      chunker      u32       1 = FastCDC as pinned in the README ("Adaptive updates": gear table, masks)
      min_size     u32       the chunker's minimum chunk length     (4096 as released)
      avg_size     u32       its average (normal) length            (16384)
      max_size     u32       its maximum                            (65536)
      image_size   u64       the image's length in bytes
      image_sha256 32 bytes  the image's SHA-256
      count        u64       the number of records that follow
    record (41 bytes), per chunk
      length       u32       the chunk's length in the image (1 ... max_size)
      stored       u32       its frame's length in the chunk data file (1 ... bound(length))
      flags        u8        bit 0: the chunk is all zero bytes; other bits are 0
      sha256       32 bytes  the SHA-256 of the chunk's (uncompressed) bytes

A chunk's image offset is the sum of the lengths before it, its frame's offset in the data file the sum of the
stored lengths before it. The lengths add up to ``image_size`` and the stored lengths to the data file's size.
Parsing is bounded (the file's size is checked against the count before anything is read) and keeps the
records as the bytes they came in: a 1 GiB image's index (65 536 chunks, 2.7 MB) costs about that much memory.
"""
from __future__ import annotations

import hashlib
import struct
from array import array
from dataclasses import dataclass

MAGIC = b"OACIDX\r\n"
VERSION = 1
CHUNKER_FASTCDC = 1
HEADER = struct.Struct(">8sIIIIIQ32sQ")
RECORD = struct.Struct(">IIB32s")
FLAG_ZERO = 1
MAX_CHUNK = 1 << 20  # no chunker parameter above this is accepted (bounds every buffer the device allocates)


class BadIndex(ValueError):
    """The index is malformed; the message is the one-line reason."""


def stored_bound(length: int) -> int:
    """The most a chunk of ``length`` bytes may take as a zstd frame (zstd's compress bound, with room)."""
    return length + (length >> 7) + 512


@dataclass(frozen=True)
class Params:
    min_size: int = 4096
    avg_size: int = 16384
    max_size: int = 65536
    chunker: int = CHUNKER_FASTCDC


class ChunkIndex:
    """A parsed, bounds-checked index. Records are read on demand from the original bytes."""

    def __init__(self, raw: bytes, params: Params, image_size: int, image_sha256: str, count: int):
        self.raw = raw
        self.params = params
        self.image_size = image_size
        self.image_sha256 = image_sha256
        self.count = count
        self._offsets: array | None = None
        self._stored_offsets: array | None = None

    # --------------------------------------------------------------------------------------------- records
    def record(self, i: int) -> tuple[int, int, int, bytes]:
        """(length, stored, flags, sha256 digest bytes) of chunk ``i``."""
        if not 0 <= i < self.count:
            raise IndexError(i)
        return RECORD.unpack_from(self.raw, HEADER.size + i * RECORD.size)

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for i in range(self.count):
            yield RECORD.unpack_from(self.raw, HEADER.size + i * RECORD.size)

    def offsets(self) -> array:
        """Each chunk's image offset (count + 1 entries: the last is the image size)."""
        if self._offsets is None:
            self._sums()
        return self._offsets

    def stored_offsets(self) -> array:
        """Each chunk's frame offset in the data file (count + 1 entries: the last is the data file's size)."""
        if self._stored_offsets is None:
            self._sums()
        return self._stored_offsets

    @property
    def data_size(self) -> int:
        return self.stored_offsets()[-1]

    def _sums(self) -> None:
        offs, stored = array("Q", [0]), array("Q", [0])
        a = b = 0
        for length, size, _, _ in self:
            a += length
            b += size
            offs.append(a)
            stored.append(b)
        self._offsets, self._stored_offsets = offs, stored

    def digest(self) -> str:
        """The SHA-256 of the index file itself (what the signed statement names)."""
        return hashlib.sha256(self.raw).hexdigest()


def parse(raw: bytes, *, max_count: int | None = None) -> ChunkIndex:
    """Check ``raw`` completely and return the index; raises ``BadIndex`` with the reason otherwise."""
    if len(raw) < HEADER.size:
        raise BadIndex(f"the chunk index is {len(raw)} bytes, shorter than its {HEADER.size}-byte header")
    magic, version, chunker, lo, avg, hi, image_size, image_sha, count = HEADER.unpack_from(raw, 0)
    if magic != MAGIC:
        raise BadIndex("the chunk index does not start with its magic (not a chunk index, or damaged)")
    if version != VERSION:
        raise BadIndex(f"the chunk index is format {version}; this agent reads format {VERSION}")
    if chunker != CHUNKER_FASTCDC:
        raise BadIndex(f"the chunk index names chunker {chunker}, which this agent does not know")
    if not (0 < lo <= avg <= hi <= MAX_CHUNK):
        raise BadIndex(f"the chunk index's chunker sizes {lo}/{avg}/{hi} are not 0 < min <= avg <= max <= "
                          f"{MAX_CHUNK}")
    if max_count is not None and count > max_count:
        raise BadIndex(f"the chunk index has {count} chunks, more than the {max_count} allowed")
    if len(raw) != HEADER.size + count * RECORD.size:
        raise BadIndex(f"the chunk index is {len(raw)} bytes, but {count} chunks take "
                          f"{HEADER.size + count * RECORD.size}")
    if image_size and count > image_size // lo + 1 or not image_size and count:
        raise BadIndex(f"the chunk index has {count} chunks for a {image_size}-byte image with chunks of at "
                          f"least {lo} bytes")
    total = 0
    for i, (length, size, flags, _) in enumerate(RECORD.iter_unpack(memoryview(raw)[HEADER.size:])):
        if not 0 < length <= hi:
            raise BadIndex(f"chunk {i} is {length} bytes long, outside 1..{hi}")
        if length < lo and i != count - 1:
            raise BadIndex(f"chunk {i} is {length} bytes long, shorter than the minimum {lo} (only the last "
                              f"may be)")
        if not 0 < size <= stored_bound(length):
            raise BadIndex(f"chunk {i} is stored in {size} bytes, outside 1..{stored_bound(length)} for "
                              f"{length} bytes")
        if flags & ~FLAG_ZERO:
            raise BadIndex(f"chunk {i} has unknown flags {flags:#x}")
        total += length
    if total != image_size:
        raise BadIndex(f"the chunk index's lengths add up to {total} bytes, not the image's {image_size}")
    return ChunkIndex(bytes(raw), Params(lo, avg, hi, chunker), image_size, image_sha.hex(), count)


def build(records, image_size: int, image_sha256: str, params: Params = Params()) -> bytes:
    """The index file for ``records`` (an iterable of (length, stored, flags, sha256 digest bytes))."""
    body = bytearray()
    count = 0
    for length, size, flags, digest in records:
        body += RECORD.pack(length, size, flags, digest)
        count += 1
    head = HEADER.pack(MAGIC, VERSION, params.chunker, params.min_size, params.avg_size, params.max_size,
                       image_size, bytes.fromhex(image_sha256), count)
    return head + bytes(body)
