"""Local files an operator names (an offline install's payload and its signature envelope), read so that no file
can hang the agent: only a regular file is opened (``O_NONBLOCK``, then ``fstat`` of the descriptor: a FIFO, a
device, a socket or a directory is refused before one byte is read), its size is known before any read, every
read is bounded by that size, and hashing runs in a thread that stops at the next chunk once it is cancelled.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import threading

from .text import clean

CHUNK = 1 << 20


class LocalFileError(Exception):
    """A local file that cannot be used; the message says which and why, in one line."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def shown(path: str) -> str:
    """A file name for a message (it came from outside: cleaned)."""
    return clean(path, 200)


def open_regular(path: str) -> tuple[int, int]:
    """``(fd, size)`` of the regular file at ``path``, opened read-only without blocking (a FIFO would block an
    ordinary open until a writer came). Raises ``LocalFileError``; ``FileNotFoundError`` when there is none."""
    if not os.path.isabs(path):
        raise LocalFileError(f"{shown(path)}: not an absolute path")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise LocalFileError(f"cannot read {shown(path)}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LocalFileError(f"{shown(path)} is {_kind(st.st_mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_small(path: str, limit: int) -> bytes | None:
    """The whole regular file at ``path`` when it holds at most ``limit`` bytes; None when there is no file.
    Raises ``LocalFileError`` (a larger file is refused before it is read)."""
    try:
        fd, size = open_regular(path)
    except FileNotFoundError:
        return None
    try:
        if size > limit:
            raise LocalFileError(f"{shown(path)} holds {size} bytes, more than the {limit} a signature envelope may")
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def _sha256(fd: int, size: int, stop: threading.Event) -> str:
    digest, offset = hashlib.sha256(), 0
    while offset < size:
        if stop.is_set():
            return ""
        block = os.pread(fd, min(CHUNK, size - offset), offset)
        if not block:
            raise LocalFileError(f"the file shrank while it was read ({offset} of {size} bytes)")
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


async def sha256(fd: int, size: int) -> str:
    """The SHA-256 of the first ``size`` bytes of the open file ``fd`` (never more are read), in a thread. A cancel
    stops the thread at its next chunk and waits for it, so no thread is left reading once this returns."""
    stop = threading.Event()
    work = asyncio.ensure_future(asyncio.to_thread(_sha256, fd, size, stop))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        stop.set()
        try:
            await work
        except Exception:  # noqa: S110 - cancelled: what the stopped thread ran into no longer matters
            pass
        raise
