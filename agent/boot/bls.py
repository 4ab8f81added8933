"""systemd-boot backend: Boot Loader Specification type #1 entries with boot counting in their file names.

Each slot has one entry file in ``ESP/loader/entries``, named ``omaha-RANK-SLOT[+LEFT[-DONE]].conf``; its
``options`` line carries ``omaha_agent.slot=SLOT`` (the image builder writes the entries: kernel, initrd,
``root=``; the agent only ever changes their names). The counter in the name is the state:

* ``omaha-2-b.conf``      good (no counter: systemd-boot boots it as it is)
* ``omaha-2-b+3.conf``    trial, 3 tries left; systemd-boot renames it to ``omaha-2-b+2-1.conf`` before each
                          attempt, down to ``omaha-2-b+0-3.conf``
* ``omaha-2-b+0-3.conf``  bad: no tries left. The entry is kept, never deleted, so it stays recoverable (it can
                          still be picked in the menu, and a later ``set_trial`` or ``mark_good`` revives it).

Which entry boots: systemd-boot sorts entries with no tries left after all others, then (for entries without
``sort-key``, as these are) by file name, highest version-sorted name first, and boots the first. The RANK is
what makes that the right one: ``set_trial`` gives the slot the highest rank of the two (``omaha-3-a+3.conf``
beats ``omaha-2-b.conf``), so the trial boots first while it has tries; when they are used up (``+0-N``) it
sorts last and the other slot boots. ``mark_good`` keeps the rank (raising it only if the other slot's is
higher). So ``loader.conf`` must not set ``default`` and the ``LoaderEntryDefault`` EFI variable
(``bootctl set-default``) must be unset: systemd-boot boots a default entry even when its tries are used up,
which would defeat the fallback. ``ordering_problems`` reports either.

mark_good does what ``systemd-bless-boot good`` does (drop the counter from the name) itself rather than call
it: ``systemd-bless-boot`` only acts on the entry that booted (``LoaderBootCountPath``) while the agent also
marks the other slot (a trial that fell back is marked bad from the old slot), it is not installed everywhere
(Debian's ``systemd-boot`` package), and it renames in place, which FAT cannot do safely (below). Mask
``systemd-bless-boot.service`` on images that use this backend: it would bless a trial at
``boot-complete.target`` before the agent's health commands decide.

A name change is not a ``rename()``. On vfat a rename adds the new directory entry and deletes the old one,
two writes that need not reach the disk together: a power cut can leave both names sharing one cluster chain
(cross-linked) or neither (a lost entry). So the entry is written under its new name, fsynced with its
directory, and only then is the old name removed (fsync again): a cut leaves the old name, or both names with
the same content, or the new one. With two files for one slot, the higher rank counts (an interrupted
``set_trial``: systemd-boot boots that one too), and at equal rank the worse state (an interrupted
``mark_good`` reads as still a trial, an interrupted ``mark_bad`` as bad): the agent then does the step again.
The next write for the slot removes the stale file. A file whose options do not name the slot of its name
(a write the cut tore) is ignored.

The slot that booted: the ``LoaderEntrySelected`` EFI variable (efivarfs: 4 bytes of attributes, then the
entry's id in UTF-16LE, NUL-terminated) names the entry; the slot is read from that entry's options.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from ..atomic import fsync_dir
from ..text import clean
from . import BootEnvMissing, BootError, SlotState, SlotStatus, check_slot, check_tries, other

log = logging.getLogger("omaha-agent")

LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
EFIVARS = "/sys/firmware/efi/efivars"
MAX_TRIES = 15
MAX_ENTRY = 16 * 1024  # an entry file is a few lines
MAX_ENTRIES = 1024  # files looked at in loader/entries
NAME = re.compile(r"omaha-(\d{1,9})-([ab])(?:\+(\d{1,5})(?:-(\d{1,5}))?)?\.conf", re.IGNORECASE)
COUNTER = re.compile(r"\+\d+(?:-\d+)?$")
SLOT_OPTION = re.compile(r"(?:^|\s)omaha_agent\.slot=(\S*)")


@dataclass(frozen=True)
class Entry:
    name: str
    rank: int
    slot: str
    left: int | None  # None: no counter (good)
    done: int

    @property
    def state(self) -> SlotState:
        if self.left is None:
            return SlotState.GOOD
        return SlotState.TRIAL if self.left > 0 else SlotState.BAD

    def worse(self) -> int:  # at equal rank the worse state counts: bad 0, trial 1, good 2
        return {SlotState.BAD: 0, SlotState.TRIAL: 1, SlotState.GOOD: 2}[self.state]


def entry_name(rank: int, slot: str, left: int | None = None, done: int = 0) -> str:
    if left is None:
        return f"omaha-{rank}-{slot}.conf"
    return f"omaha-{rank}-{slot}+{left}-{done}.conf" if done else f"omaha-{rank}-{slot}+{left}.conf"


def parse_name(name: str) -> Entry | None:
    m = NAME.fullmatch(name)
    if not m:
        return None
    left = int(m.group(3)) if m.group(3) is not None else None
    return Entry(name, int(m.group(1)), m.group(2).lower(), left, int(m.group(4) or 0))


def slot_option(text: str) -> str | None:
    """The ``omaha_agent.slot=`` value of an entry's ``options`` lines (the last one wins, as on a kernel
    command line); None without one."""
    found = None
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "options":
            for m in SLOT_OPTION.finditer(value):
                found = m.group(1).lower()
    return found


def entry_id(name: str) -> str:
    """An entry's id as it is compared with ``LoaderEntrySelected``: lower case, without ``.conf`` and without
    the boot counter (systemd-boot 252 keeps both in the id it exports, later versions drop the counter)."""
    base = name.lower()
    if base.endswith(".conf"):
        base = base[:-5]
    return COUNTER.sub("", base)


def read_efivar(efivars: str, name: str) -> str | None:
    """A string EFI variable of systemd-boot's vendor GUID (UTF-16LE after 4 bytes of attributes); None when
    it is absent or unreadable."""
    try:
        with open(os.path.join(efivars, f"{name}-{LOADER_GUID}"), "rb") as f:
            raw = f.read(4 + 2048)
    except OSError:
        return None
    if len(raw) < 6:
        return None
    text = raw[4:len(raw) - (len(raw) - 4) % 2].decode("utf-16-le", "replace")
    return clean(text.split("\0", 1)[0], 255) or None  # firmware-written text: printable before it is logged


class BlsBoot:
    name = "bls"

    def __init__(self, esp: str, efivars: str = EFIVARS):
        self.esp = esp
        self.efivars = efivars
        self.entries = os.path.join(esp, "loader", "entries")

    # -------------------------------------------------------------- reading
    def _names(self) -> list[str]:
        try:
            with os.scandir(self.entries) as it:
                names = []
                for item in it:
                    if len(names) >= MAX_ENTRIES:
                        break
                    if item.name.lower().endswith(".conf") and item.is_file(follow_symlinks=False):
                        names.append(item.name)
        except FileNotFoundError:
            raise BootError(f"{self.entries} does not exist: mount the EFI system partition at {self.esp} "
                            "(boot.esp) and install the slots' entries") from None
        except OSError as exc:
            raise BootError(f"{self.entries}: cannot list the boot entries: {exc.strerror}") from None
        return sorted(names)

    def _text(self, name: str) -> str:
        try:
            with open(os.path.join(self.entries, name), "rb") as f:
                return f.read(MAX_ENTRY).decode("utf-8", "replace")
        except OSError as exc:
            raise BootError(f"{self.entries}/{name}: cannot read the boot entry: {exc.strerror}") from None

    def _scan(self) -> tuple[dict[str, list[Entry]], dict[str, list[str]], dict[str, list[str]]]:
        """The agent's entries per slot (their options agree with their names), the other ``.conf`` files
        whose options name a slot (an image's entries before provisioning), and the agent's names whose
        options do not name their slot (torn: removed by the slot's next write)."""
        ours: dict[str, list[Entry]] = {"a": [], "b": []}
        foreign: dict[str, list[str]] = {"a": [], "b": []}
        torn: dict[str, list[str]] = {"a": [], "b": []}
        for name in self._names():
            entry = parse_name(name)
            slot = slot_option(self._text(name))
            if entry is not None:
                if slot == entry.slot:
                    ours[entry.slot].append(entry)
                else:
                    log.warning("%s/%s: its options do not say omaha_agent.slot=%s (a torn write?): ignored",
                                self.entries, name, entry.slot)
                    torn[entry.slot].append(name)
            elif slot in foreign:
                foreign[slot].append(name)
        return ours, foreign, torn

    @staticmethod
    def _current(entries: list[Entry]) -> Entry | None:
        return max(entries, key=lambda e: (e.rank, -e.worse(), -(e.left or 0))) if entries else None

    def _state(self) -> tuple[dict[str, Entry], dict[str, list[str]]]:
        """Each slot's entry, and the other names of each slot (stale duplicates, torn files)."""
        ours, _, torn = self._scan()
        if not ours["a"] and not ours["b"]:
            raise BootEnvMissing(f"{self.entries}: no omaha-RANK-SLOT entries (write the factory state with "
                                 "'omaha-agent provision --slot a --version V')")
        current = {}
        for slot in ("a", "b"):
            entry = self._current(ours[slot])
            if entry is None:
                raise BootError(f"{self.entries}: no boot entry for slot {slot} (a .conf file whose options carry "
                                f"omaha_agent.slot={slot}): install it and run 'omaha-agent provision' again")
            current[slot] = entry
        return current, {s: [e.name for e in ours[s] if e is not current[s]] + torn[s] for s in ("a", "b")}

    def status(self) -> dict[str, SlotStatus]:
        current, _ = self._state()
        return {slot: SlotStatus(e.state, e.left or 0) for slot, e in current.items()}

    # -------------------------------------------------------------- writing
    def _fsync_dir(self) -> None:
        try:
            fsync_dir(self.entries)
        except OSError as exc:
            raise BootError(f"{self.entries}: cannot flush the directory: {exc.strerror}") from None

    def _move(self, name: str, new: str, stale: list[str]) -> None:
        """The entry ``name`` under the name ``new``: written and flushed first, then ``name`` and the
        ``stale`` duplicates of its slot removed (see the module's docstring)."""
        if new != name:
            data = self._text(name).encode()
            path = os.path.join(self.entries, new)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                try:
                    done = 0
                    while done < len(data):
                        done += os.write(fd, data[done:])
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise BootError(f"{path}: cannot write the boot entry: {exc.strerror}") from None
            self._fsync_dir()
            stale = [name] + stale
        removed = False
        for old in stale:
            if old == new:
                continue
            try:
                os.unlink(os.path.join(self.entries, old))
                removed = True
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise BootError(f"{self.entries}/{old}: cannot remove the old boot entry: {exc.strerror}") from None
        if removed:
            self._fsync_dir()

    def set_trial(self, slot: str, tries: int, version: str | None = None) -> None:
        check_slot(slot)
        check_tries(tries, MAX_TRIES)
        current, others = self._state()
        top = max(e.rank for e in current.values())
        self._move(current[slot].name, entry_name(top + 1, slot, tries), others[slot])

    def mark_good(self, slot: str) -> None:
        check_slot(slot)
        current, others = self._state()
        mine, theirs = current[slot].rank, current[other(slot)].rank
        self._move(current[slot].name, entry_name(mine if mine > theirs else theirs + 1, slot), others[slot])

    def mark_bad(self, slot: str) -> None:
        check_slot(slot)
        current, others = self._state()
        entry = current[slot]
        self._move(entry.name, entry_name(entry.rank, slot, 0, entry.done), others[slot])

    def initialize(self, good: str = "a") -> None:
        """The factory state: ``good`` good (``omaha-1-X.conf``), the other slot bad (``omaha-0-Y+0.conf``),
        nothing armed. The entries may carry any name so far (an image's ``omaha-a.conf``): each slot's is
        the agent's own entry if there is one, else the one ``.conf`` file whose options name the slot.
        Running it again changes nothing."""
        check_slot(good)
        ours, foreign, torn = self._scan()
        for slot, rank, left in ((good, 1, None), (other(good), 0, 0)):
            entry = self._current(ours[slot])
            if entry is not None:
                name = entry.name
            elif len(foreign[slot]) == 1:
                name = foreign[slot][0]
            elif foreign[slot]:
                raise BootError(f"{self.entries}: {len(foreign[slot])} entries carry omaha_agent.slot={slot} "
                                f"({', '.join(foreign[slot][:3])}): keep one")
            else:
                raise BootError(f"{self.entries}: no boot entry for slot {slot} (a .conf file whose options "
                                f"carry omaha_agent.slot={slot}): install it first")
            self._move(name, entry_name(rank, slot, left), [e.name for e in ours[slot] if e.name != name] + torn[slot])

    # -------------------------------------------------------------- the booted entry
    def booted_slot(self) -> str | None:
        """The slot of the entry systemd-boot booted (``LoaderEntrySelected``); None when the variable is
        absent or names no entry of a slot (the kernel command line decides then)."""
        for problem in self.ordering_problems():
            log.warning("%s", problem)
        selected = read_efivar(self.efivars, "LoaderEntrySelected")
        if selected is None:
            log.info("no LoaderEntrySelected EFI variable in %s: the booted slot comes from the kernel "
                     "command line", self.efivars)
            return None
        wanted = entry_id(selected)
        try:
            for name in self._names():
                if entry_id(name) == wanted:
                    slot = slot_option(self._text(name))
                    if slot in ("a", "b"):
                        log.info("booted slot %s, read from the entry systemd-boot selected (LoaderEntrySelected=%s, "
                                 "file %s)", slot, selected[:80], clean(name, 255))
                        return slot
        except BootError as exc:
            log.warning("cannot read the entry systemd-boot selected: %s", exc)
            return None
        log.warning("systemd-boot booted entry %r, which names no slot (omaha_agent.slot=) in %s",
                    selected[:80], self.entries)
        return None

    def ordering_problems(self) -> list[str]:
        """Settings that make systemd-boot ignore the entries' order (and so the fallback), in one line each."""
        problems = []
        default = read_efivar(self.efivars, "LoaderEntryDefault")
        if default:
            problems.append(f"the LoaderEntryDefault EFI variable is set ({default[:80]!r}): systemd-boot boots "
                            "that entry even with its tries used up; clear it with: bootctl set-default ''")
        try:
            with open(os.path.join(self.esp, "loader", "loader.conf"), "rb") as f:
                lines = f.read(MAX_ENTRY).decode("utf-8", "replace").splitlines()
        except OSError:
            lines = []
        for line in lines:
            key, _, value = line.strip().partition(" ")
            if key == "default" and value.strip():
                problems.append(f"{self.esp}/loader/loader.conf sets 'default {value.strip()[:80]}': systemd-boot "
                                "boots that entry even with its tries used up; remove the line")
        return problems
