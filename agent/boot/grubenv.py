"""GRUB environment block backend (RAUC-style variable names).

The env block is the 1024-byte file GRUB's ``load_env``/``save_env`` use (``# GRUB Environment Block``
followed by ``NAME=value`` lines, padded with ``#``). Variables, per slot X in A, B:

* ``ORDER``  boot preference, e.g. ``B A``
* ``X_OK``   1 = confirmed good
* ``X_TRY``  trial attempts left (only looked at while ``X_OK`` is 0)

State: ``X_OK=1`` good; ``X_OK=0`` and ``X_TRY>0`` trial; otherwise bad. ``config/grub/grub.cfg`` walks
``ORDER``, boots the first good slot, or the first trial slot after counting its ``X_TRY`` down and saving.

Writes rewrite the existing block in place, as GRUB's own ``save_env`` does, then fsync. The block usually
sits on a FAT ESP, where a rename is not atomic: it allocates a new cluster in the FAT and frees the old one,
and a power cut soon after can leave the directory pointing at a cluster the FAT calls free (seen in the
QEMU test). An in-place rewrite changes no FAT metadata; the file keeps its clusters, so GRUB's blocklist
stays valid too. Our variables fit in the block's first 512-byte sector, and a sector write is atomic on
disks, so a torn write leaves the old variables or the new ones: the second sector is ``#`` padding in both.
Only a missing or short file is created with a temp file and a rename.
"""
from __future__ import annotations

import os
import stat

from ..atomic import write_atomic
from . import BootEnvMissing, BootError, SlotState, SlotStatus, check_slot, check_tries, other, reorder

HEADER = b"# GRUB Environment Block\n"
SIZE = 1024
MAX_TRIES = 9  # grub.cfg counts down with an if-chain from 9


def parse(block: bytes, where: str = "grubenv") -> dict[str, str]:
    if not block.startswith(HEADER):
        raise BootError(f"{where}: not a GRUB environment block (no '# GRUB Environment Block' header): check "
                        "boot.env, or move the file away and write a fresh block with 'omaha-agent provision'")
    env: dict[str, str] = {}
    for raw in block[len(HEADER):].split(b"\n"):
        line = raw.decode("utf-8", "replace")
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, value = line.split("=", 1)
        env[name] = value.replace("\\\\", "\\")
    return env


def render(env: dict[str, str], size: int = SIZE) -> bytes:
    body = HEADER
    for name, value in env.items():
        if "\n" in name or "=" in name or "\n" in value or "\\" in value:
            raise BootError(f"grubenv: cannot store {name}={value!r}")
        body += f"{name}={value}\n".encode()
    if len(body) > size:
        raise BootError(f"grubenv: {len(body)} bytes of variables do not fit in a {size}-byte block")
    return body + b"#" * (size - len(body))


def rewrite_in_place(fd: int, block: bytes) -> None:
    """Writes ``block`` over the file's first bytes (same length, same clusters) and waits for the disk."""
    done = 0
    while done < len(block):
        done += os.pwrite(fd, block[done:], done)
    os.fsync(fd)


def read(path: str) -> dict[str, str]:
    try:
        with open(path, "rb") as f:
            block = f.read(64 * 1024)
    except FileNotFoundError:
        raise BootEnvMissing(f"{path}: GRUB environment block not found (write the factory state with "
                             "'omaha-agent provision --slot a --version V')") from None
    except OSError as exc:
        raise BootError(f"{path}: cannot read the GRUB environment block: {exc.strerror}") from None
    if not block:  # GRUB's load_env finds no variables in it either
        raise BootEnvMissing(f"{path}: the GRUB environment block is empty (write the factory state with "
                             "'omaha-agent provision --slot a --version V')")
    return parse(block, path)


class GrubEnvBoot:
    name = "grubenv"

    def __init__(self, path: str):
        self.path = path

    def _read(self) -> dict[str, str]:
        return read(self.path)

    def _write(self, env: dict[str, str]) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = None
        except OSError as exc:
            raise BootError(f"{self.path}: cannot open the GRUB environment block: {exc.strerror}") from None
        try:
            if fd is not None:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_size >= SIZE:
                    rewrite_in_place(fd, render(env, st.st_size))
                    return
            write_atomic(self.path, render(env, SIZE))
        except OSError as exc:
            raise BootError(f"{self.path}: cannot write the GRUB environment block: {exc.strerror}") from None
        finally:
            if fd is not None:
                os.close(fd)

    def initialize(self, good: str = "a") -> None:
        """The factory state: ``good`` is good, the other slot bad, nothing armed; other variables are kept.
        Writing it again gives the same bytes."""
        try:
            env = self._read()
        except BootEnvMissing:
            env = {}
        env.update({"ORDER": f"{good.upper()} {other(good).upper()}", f"{good.upper()}_OK": "1",
                    f"{good.upper()}_TRY": "0", f"{other(good).upper()}_OK": "0",
                    f"{other(good).upper()}_TRY": "0"})
        self._write(env)

    def status(self) -> dict[str, SlotStatus]:
        env = self._read()
        out = {}
        for slot in ("a", "b"):
            ok = env.get(f"{slot.upper()}_OK", "0").strip()
            tries = env.get(f"{slot.upper()}_TRY", "0").strip()
            tries_left = int(tries) if tries.isdigit() else 0
            if ok == "1":
                out[slot] = SlotStatus(SlotState.GOOD)
            elif tries_left > 0:
                out[slot] = SlotStatus(SlotState.TRIAL, tries_left)
            else:
                out[slot] = SlotStatus(SlotState.BAD)
        return out

    def mark_bad(self, slot: str) -> None:
        x = check_slot(slot).upper()
        env = self._read()
        env.update({f"{x}_OK": "0", f"{x}_TRY": "0", "ORDER": reorder(env.get("ORDER", "A B"), last=slot)})
        self._write(env)

    def set_trial(self, slot: str, tries: int, version: str | None = None) -> None:
        x = check_slot(slot).upper()
        check_tries(tries, MAX_TRIES)
        env = self._read()
        env.update({f"{x}_OK": "0", f"{x}_TRY": str(tries), "ORDER": reorder(env.get("ORDER", "A B"), first=slot)})
        self._write(env)

    def mark_good(self, slot: str) -> None:
        x = check_slot(slot).upper()
        env = self._read()
        env.update({f"{x}_OK": "1", f"{x}_TRY": "0", "ORDER": reorder(env.get("ORDER", "A B"), first=slot)})
        self._write(env)
