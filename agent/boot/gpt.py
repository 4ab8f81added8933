"""GPT attribute-bit backend (the Chrome OS / Flatcar ``cgpt`` layout).

Bits of a partition entry's attributes: 48-51 priority, 52-55 tries, 56 successful. State: successful and
priority > 0 → good; not successful, tries > 0 and priority > 0 → trial; anything else → bad.

Both copies of the table are updated: the backup (entries, then header) first, then the primary, each
with its CRC32s recomputed and flushed, so a power cut leaves at least one valid copy with either the old
or the new state (firmware and GRUB's gptprio fall back to the backup when the primary's CRC fails).

Reading falls back the same way: when the primary header or its entries array fails its CRC (or the
header is gone), the backup is read, so a torn primary does not stop the agent from confirming a slot.
The next write repairs it: both entry arrays and both headers are rewritten from the copy that was read,
with fresh CRCs, backup first. A torn backup next to a good primary is rebuilt the same way.
"""
from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass

from . import BootError, SlotState, SlotStatus, check_slot, check_tries, other

SIGNATURE = b"EFI PART"
PRIORITY_SHIFT, TRIES_SHIFT, SUCCESSFUL_BIT = 48, 52, 56
MASK = (0xF << PRIORITY_SHIFT) | (0xF << TRIES_SHIFT) | (1 << SUCCESSFUL_BIT)
PRIMARY_ENTRIES_LBA = 2  # where the UEFI spec (and sfdisk, fdisk, sgdisk) put the primary entry array

log = logging.getLogger("omaha-agent")


@dataclass
class _Header:
    lba: int
    raw: bytearray
    entries_lba: int
    count: int
    entry_size: int


def _read_header(f, lba: int, sector: int, where: str) -> _Header:
    f.seek(lba * sector)
    raw = bytearray(f.read(sector))
    if raw[:8] != SIGNATURE:
        raise BootError(f"{where}: no GPT header at LBA {lba}")
    size = struct.unpack_from("<I", raw, 12)[0]
    if not 92 <= size <= sector:
        raise BootError(f"{where}: GPT header at LBA {lba} has a bad size {size}")
    check = bytearray(raw[:size])
    struct.pack_into("<I", check, 16, 0)
    if zlib.crc32(check) != struct.unpack_from("<I", raw, 16)[0]:
        raise BootError(f"{where}: GPT header at LBA {lba} fails its CRC")
    entries_lba, count, entry_size = struct.unpack_from("<QII", raw, 72)
    if count > 1024 or entry_size < 128 or entry_size > 4096:
        raise BootError(f"{where}: GPT header at LBA {lba} has an implausible entry table")
    return _Header(lba, raw, entries_lba, count, entry_size)


class GptBoot:
    name = "gpt"

    def __init__(self, disk: str, labels: dict[str, str] | None = None, sector: int | None = None):
        """``disk``: the whole disk (or an image file); ``labels``: slot → partition name (PARTLABEL)."""
        self.disk = disk
        self.labels = labels or {"a": "ROOT-A", "b": "ROOT-B"}
        self.sector = sector

    def _open(self, mode: str):
        try:
            return open(self.disk, mode)
        except OSError as exc:
            raise BootError(f"{self.disk}: cannot open the disk: {exc.strerror}") from None

    def _sector(self, f) -> int:
        if self.sector:
            return self.sector
        for size in (512, 4096):
            f.seek(size)
            if f.read(8) == SIGNATURE:
                self.sector = size
                return size
        for size in (512, 4096):  # the primary header is gone: a backup header in the last sector
            end = self._disk_sectors(f, size)
            if end > 2:
                f.seek((end - 1) * size)
                if f.read(8) == SIGNATURE:
                    self.sector = size
                    return size
        raise BootError(f"{self.disk}: no GPT found (looked at LBA 1 and the last LBA for 512- and 4096-byte "
                        "sectors)")

    def _disk_sectors(self, f, sector: int) -> int:
        f.seek(0, os.SEEK_END)
        return f.tell() // sector

    def _read_copy(self, f, lba: int, sector: int, where: str) -> tuple[_Header, bytearray]:
        """One copy of the table: its header and entry array, both CRC-checked (BootError if either fails)."""
        header = _read_header(f, lba, sector, self.disk)
        f.seek(header.entries_lba * sector)
        entries = bytearray(f.read(header.count * header.entry_size))
        if len(entries) != header.count * header.entry_size or \
                zlib.crc32(entries) != struct.unpack_from("<I", header.raw, 88)[0]:
            raise BootError(f"{self.disk}: {where} GPT entries fail their CRC")
        return header, entries

    @staticmethod
    def _mirror(good: _Header, lba: int, entries_lba: int) -> _Header:
        """The other copy's header rebuilt from a good one: MyLBA and AlternateLBA swapped, its own entry LBA."""
        raw = bytearray(good.raw)
        struct.pack_into("<QQ", raw, 24, lba, good.lba)
        struct.pack_into("<Q", raw, 72, entries_lba)
        return _Header(lba, raw, entries_lba, good.count, good.entry_size)

    def _tables(self, f):
        """(sector, primary header, backup header, entries): the entries from the primary if it is whole,
        else from the backup; a header that failed is rebuilt from the other, ready to be rewritten."""
        sector = self._sector(f)
        try:
            primary, entries = self._read_copy(f, 1, sector, "primary")
        except BootError as primary_error:
            last = self._disk_sectors(f, sector) - 1
            try:
                backup, entries = self._read_copy(f, last, sector, "backup")
            except BootError as backup_error:
                raise BootError(f"{primary_error}; the backup too: {backup_error}") from None
            table_sectors = -(-backup.count * backup.entry_size // sector)
            first_usable = struct.unpack_from("<Q", backup.raw, 40)[0]
            if PRIMARY_ENTRIES_LBA + table_sectors > first_usable:
                raise BootError(f"{primary_error}; the backup's first usable LBA {first_usable} leaves no room "
                                "to rebuild the primary")
            log.warning("%s; reading the backup GPT (it will be rewritten into the primary at the next change)",
                        primary_error)
            return sector, self._mirror(backup, 1, PRIMARY_ENTRIES_LBA), backup, entries
        backup_lba = struct.unpack_from("<Q", primary.raw, 32)[0]
        try:
            backup, backup_entries = self._read_copy(f, backup_lba, sector, "backup")
        except BootError as backup_error:
            table_sectors = -(-primary.count * primary.entry_size // sector)
            last_usable = struct.unpack_from("<Q", primary.raw, 48)[0]
            if last_usable + 1 + table_sectors > backup_lba:
                raise BootError(f"{backup_error}; the primary's last usable LBA {last_usable} leaves no room "
                                "to rebuild the backup") from None
            log.warning("%s; the primary GPT is whole (the backup will be rewritten at the next change)",
                        backup_error)
            return sector, primary, self._mirror(primary, backup_lba, last_usable + 1), entries
        if (backup.count, backup.entry_size) != (primary.count, primary.entry_size):
            raise BootError(f"{self.disk}: the primary and backup GPT headers describe different entry arrays")
        return sector, primary, backup, entries

    def _index(self, entries: bytearray, header: _Header, slot: str) -> int:
        label = self.labels[slot]
        for i in range(header.count):
            off = i * header.entry_size
            name = entries[off + 56: off + 128].decode("utf-16-le", "replace").split("\x00", 1)[0]
            if name == label and entries[off:off + 16] != bytes(16):
                return off
        raise BootError(f"{self.disk}: no partition named {label!r} for slot {slot}")

    def _attrs(self, f) -> dict[str, int]:
        _, primary, _, entries = self._tables(f)
        return {s: struct.unpack_from("<Q", entries, self._index(entries, primary, s) + 48)[0] for s in ("a", "b")}

    def status(self) -> dict[str, SlotStatus]:
        with self._open("rb") as f:
            attrs = self._attrs(f)
        out = {}
        for slot, value in attrs.items():
            priority = (value >> PRIORITY_SHIFT) & 0xF
            tries = (value >> TRIES_SHIFT) & 0xF
            successful = (value >> SUCCESSFUL_BIT) & 1
            if priority and successful:
                out[slot] = SlotStatus(SlotState.GOOD)
            elif priority and tries:
                out[slot] = SlotStatus(SlotState.TRIAL, tries)
            else:
                out[slot] = SlotStatus(SlotState.BAD)
        return out

    @staticmethod
    def bits(priority: int, tries: int, successful: int) -> int:
        return (priority << PRIORITY_SHIFT) | (tries << TRIES_SHIFT) | (successful << SUCCESSFUL_BIT)

    def _update(self, changes) -> None:
        """``changes(attrs) -> {slot: (priority, tries, successful)}``, applied to both tables."""
        with self._open("r+b") as f:
            sector, primary, backup, entries = self._tables(f)
            attrs = {s: struct.unpack_from("<Q", entries, self._index(entries, primary, s) + 48)[0]
                     for s in ("a", "b")}
            for slot, (priority, tries, successful) in changes(attrs).items():
                off = self._index(entries, primary, slot) + 48
                value = (attrs[slot] & ~MASK) | self.bits(priority, tries, successful)
                struct.pack_into("<Q", entries, off, value)
            crc = zlib.crc32(entries)
            for header in (backup, primary):  # backup first: the primary stays valid until the backup is done
                f.seek(header.entries_lba * sector)
                f.write(entries)
                f.flush()
                os.fsync(f.fileno())
                size = struct.unpack_from("<I", header.raw, 12)[0]
                struct.pack_into("<I", header.raw, 88, crc)
                struct.pack_into("<I", header.raw, 16, 0)
                struct.pack_into("<I", header.raw, 16, zlib.crc32(bytes(header.raw[:size])))
                f.seek(header.lba * sector)
                f.write(header.raw)
                f.flush()
                os.fsync(f.fileno())

    @staticmethod
    def _fields(value: int) -> tuple[int, int, int]:
        return ((value >> PRIORITY_SHIFT) & 0xF, (value >> TRIES_SHIFT) & 0xF, (value >> SUCCESSFUL_BIT) & 1)

    def initialize(self, good: str = "a") -> None:
        self._update(lambda attrs: {good: (2, 0, 1), other(good): (0, 0, 0)})

    def mark_bad(self, slot: str) -> None:
        check_slot(slot)
        self._update(lambda attrs: {slot: (0, 0, 0)})

    def set_trial(self, slot: str, tries: int, version: str | None = None) -> None:
        check_slot(slot)
        check_tries(tries, 15)

        def change(attrs):
            o_priority, o_tries, o_ok = self._fields(attrs[other(slot)])
            # the new slot gets the highest priority; the other keeps a lower, non-zero one as the fallback
            return {slot: (2, tries, 0), other(slot): (1 if o_priority else 0, o_tries, o_ok)}

        self._update(change)

    def mark_good(self, slot: str) -> None:
        check_slot(slot)

        def change(attrs):
            o_priority, o_tries, o_ok = self._fields(attrs[other(slot)])
            return {slot: (2, 0, 1), other(slot): (1 if o_priority else 0, o_tries, o_ok)}

        self._update(change)
