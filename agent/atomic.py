"""Durable file replacement: a power cut leaves either the old or the new content, never a mix."""
from __future__ import annotations

import os
import tempfile


def fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """temp file in the same directory → write → fsync → rename over ``path`` → fsync the file again → fsync
    the directory. The second file fsync matters on FAT: a file's start cluster and size live in its directory
    entry, which the rename moves and only the file's own fsync writes; without it a power cut can leave the
    entry pointing at the replaced file's clusters, which the rename freed."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), mode)
            os.replace(tmp, path)
            os.fsync(f.fileno())
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)
