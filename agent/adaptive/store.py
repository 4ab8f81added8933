"""The verified chunk index of what each slot holds, kept under the state directory (``<state_dir>/chunks``).

* ``slot-<s>.idx``: the index of the image slot ``s`` holds, saved when the agent installed it (adaptive, or the
  full path of a release that has chunks), or given at provisioning for the factory image;
* ``slot-<s>.old.idx``: while slot ``s`` is being overwritten, the index of what it held before (the plan may
  still read chunks from it ahead of the writes);
* ``full``: the image digest of a release whose adaptive install failed after its first write: the next attempt
  at it takes the full download.

Each file is written atomically. A file that does not parse (damaged, stale format, too large) is ignored with a
log line: the index only ever saves downloads, and every chunk read through it is checked against the new
index's digest before it is written.
"""
from __future__ import annotations

import logging
import os

from ..atomic import fsync_dir, write_atomic
from .index import HEADER, RECORD, BadIndex, ChunkIndex, parse

log = logging.getLogger("omaha-agent")

MAX_INDEX = HEADER.size + RECORD.size * (1 << 20)  # 1 Mi chunks (16 GiB images at 16 KiB): 41 MiB
SLOTS = ("a", "b")


class ChunkStore:
    def __init__(self, state_dir: str, max_bytes: int = MAX_INDEX, shipped: str = ""):
        self.dir = os.path.join(state_dir, "chunks")
        self.max_bytes = max_bytes
        self.shipped = shipped  # the index of the image the device shipped with (config install.index)

    def _path(self, slot: str, old: bool = False) -> str:
        if slot not in SLOTS:
            raise ValueError(f"unknown slot {slot!r}")
        return os.path.join(self.dir, f"slot-{slot}{'.old' if old else ''}.idx")

    # -- reading
    def load(self, slot: str, old: bool = False) -> ChunkIndex | None:
        """The index of slot ``slot`` (of what it held before its current overwrite: ``old``), or None."""
        return self._read(self._path(slot, old))

    def booted(self, slot: str) -> ChunkIndex | None:
        """The index of the running slot: the saved one, else the one shipped in the image (when configured)."""
        found = self.load(slot)
        if found is None and self.shipped:
            found = self._read(self.shipped)
        return found

    def _read(self, path: str) -> ChunkIndex | None:
        try:
            with open(path, "rb") as f:
                raw = f.read(self.max_bytes + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("chunk index %s unreadable (%s); ignored", path, exc.strerror or exc)
            return None
        if len(raw) > self.max_bytes:
            log.warning("chunk index %s is larger than %d bytes; ignored", path, self.max_bytes)
            return None
        try:
            return parse(raw, max_count=(self.max_bytes - HEADER.size) // RECORD.size)
        except BadIndex as exc:
            log.warning("chunk index %s ignored: %s", path, exc)
            return None

    # -- writing
    def save(self, slot: str, raw: bytes) -> None:
        """Slot ``slot`` now holds the image ``raw`` (a verified index) describes; its old index goes."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        write_atomic(self._path(slot), raw, 0o600)
        self._remove(self._path(slot, old=True))

    def overwriting(self, slot: str, keep: bool) -> None:
        """Slot ``slot`` is about to be written: its index becomes the old one (``keep``: the plan reads ahead of
        the writes) or goes. Called before the first write."""
        current, old = self._path(slot), self._path(slot, old=True)
        if keep and os.path.exists(current):
            os.replace(current, old)
            fsync_dir(self.dir)
        else:
            self._remove(current)
            if not keep:
                self._remove(old)

    def drop(self, slot: str) -> None:
        """Nothing is known of slot ``slot`` any more."""
        self._remove(self._path(slot))
        self._remove(self._path(slot, old=True))

    def _remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        fsync_dir(self.dir)

    # -- the adaptive path that failed
    def failed(self, image_sha256: str) -> bool:
        try:
            with open(os.path.join(self.dir, "full"), "rb") as f:
                return f.read(128).decode("ascii", "replace").strip() == image_sha256
        except OSError:
            return False

    def mark_failed(self, image_sha256: str) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        write_atomic(os.path.join(self.dir, "full"), image_sha256.encode() + b"\n", 0o600)
