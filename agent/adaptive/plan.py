"""The plan of an adaptive install (pure: no I/O): where each chunk of the new image comes from.

Each chunk of the target index is **zero** (flagged all-zero: made here), **local** (a chunk with the same
SHA-256 and length is on a slot the agent holds an index for: read at that offset, checked, written) or
**remote** (its frame is fetched from the chunk data file). Remote frames are fetched as byte ranges of the data
file, neighbours joined over gaps of at most ``gap`` bytes (a gap costs fewer bytes than another part would).
When the remote ranges come to more than ``FULL_SHARE`` of the data file, the full download is the better deal.

Sources are the booted slot's index (any offset) and the target slot's own earlier content: a chunk there is
usable only at an offset the writes have not reached when it is read (at or after the chunk's own offset, since
the image is written in order). Every local read is checked against the chunk's digest before it is written, so
a source that changed since its index was saved costs a fetch, never a wrong byte.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from .index import FLAG_ZERO, ChunkIndex

ZERO, LOCAL, REMOTE = 0, 1, 2
BOOTED, TARGET = 0, 1  # the sources, in the order they are preferred
FULL_SHARE = 0.80
GAP = 4096  # bytes of a gap between two remote frames worth fetching rather than starting another part


@dataclass
class Plan:
    """Per chunk: ``kinds[i]`` (ZERO, LOCAL, REMOTE), for a local chunk ``source[i]`` and ``where[i]`` (its
    offset on that slot). Totals over the whole image."""

    index: ChunkIndex
    kinds: array
    source: array
    where: array
    remote_bytes: int = 0  # bytes of the data file the coalesced ranges cover
    reused_bytes: int = 0  # image bytes read from a slot
    zero_bytes: int = 0
    full: str = ""  # why the full download is taken instead ("" = adaptive)
    gap: int = GAP
    counts: dict = field(default_factory=dict)

    def ranges(self, start: int = 0, kinds=None) -> list[tuple[int, int]]:
        """The data file's byte ranges ``[first, end)`` holding the remote frames of chunks ``start`` onwards."""
        return coalesce(self.index, self.remote_chunks(start, kinds), self.gap)

    def remote_chunks(self, start: int = 0, kinds=None) -> list[int]:
        kinds = self.kinds if kinds is None else kinds
        return [i for i in range(start, self.index.count) if kinds[i] == REMOTE]


def coalesce(index: ChunkIndex, chunks, gap: int = GAP) -> list[tuple[int, int]]:
    """The frames of ``chunks`` (ascending) as byte ranges, joined where they lie at most ``gap`` bytes apart."""
    stored = index.stored_offsets()
    out: list[list[int]] = []
    for i in chunks:
        lo, hi = stored[i], stored[i + 1]
        if out and lo - out[-1][1] <= gap:
            out[-1][1] = hi
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def _key(digest: bytes, length: int) -> int:
    """A chunk's first 8 digest bytes and its length, as one int (a dict of these costs ~100 bytes a chunk; a
    collision only costs a local read that fails its check, then a fetch)."""
    return int.from_bytes(digest[:8], "big") << 32 | length


def _lookup(index: ChunkIndex) -> dict:
    """A chunk's key → its offset in ``index``'s image (the first one wins)."""
    found, at = {}, 0
    for length, _, _, digest in index:
        found.setdefault(_key(digest, length), at)
        at += length
    return found


def make(target: ChunkIndex, booted: ChunkIndex | None, earlier: ChunkIndex | None = None, *,
         data_size: int | None = None, gap: int = GAP, full_share: float = FULL_SHARE) -> Plan:
    """The plan for ``target`` given the booted slot's index and the target slot's ``earlier`` content (either
    may be None). ``data_size`` is the signed size of the data file (the index's own sum otherwise)."""
    count = target.count
    kinds, source, where = array("B", bytes(count)), array("B", bytes(count)), array("Q", bytes(8 * count))
    maps = [(_lookup(booted) if booted is not None else {}), (_lookup(earlier) if earlier is not None else {})]
    reused = zeros = 0
    at = 0
    for i, (length, _, flags, digest) in enumerate(target):
        key = _key(digest, length)
        if flags & FLAG_ZERO:
            kinds[i] = ZERO
            zeros += length
        elif key in maps[BOOTED]:
            kinds[i], source[i], where[i] = LOCAL, BOOTED, maps[BOOTED][key]
            reused += length
        elif key in maps[TARGET] and maps[TARGET][key] >= at:
            kinds[i], source[i], where[i] = LOCAL, TARGET, maps[TARGET][key]
            reused += length
        else:
            kinds[i] = REMOTE
        at += length
    plan = Plan(target, kinds, source, where, reused_bytes=reused, zero_bytes=zeros, gap=gap)
    plan.remote_bytes = sum(hi - lo for lo, hi in plan.ranges())
    plan.counts = {k: kinds.count(v) for k, v in (("zero", ZERO), ("local", LOCAL), ("remote", REMOTE))}
    size = target.data_size if data_size is None else data_size
    if size and plan.remote_bytes > full_share * size:
        plan.full = (f"{plan.remote_bytes} of the chunk data's {size} bytes would be fetched (over "
                     f"{int(full_share * 100)} %): the full download is taken")
    return plan
