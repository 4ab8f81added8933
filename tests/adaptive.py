"""Adaptive releases for the device tests, cut any way a test likes (the device needs no chunker), and nginx.

``Release.make`` writes an image's chunk data file (one zstd frame per chunk) and its index, with the lengths a
test gives (fixed 16 KiB cuts and a few odd ones by default); ``signed`` wraps them in a DSSE envelope whose
payload is the chunk data file (a valid zstd stream: the full path installs it too).
"""
from __future__ import annotations

import hashlib
import os

import zstandard

from agent import trust
from agent.adaptive import index as cindex
from tests import bench

APP = "{0a0b0c0d-1111-4222-8333-444455556666}"


def cuts(size: int, odd=(5000, 7777, 12345)) -> list[int]:
    """Lengths for an image of ``size`` bytes: 16 KiB chunks, a few odd ones (>= the 4 KiB minimum) in between."""
    out, at, k = [], 0, 0
    while at < size:
        n = odd[k % len(odd)] if odd and len(out) % 7 == 3 else 16384
        k += n != 16384
        n = min(n, size - at)
        out.append(n)
        at += n
    return out


class Release:
    def __init__(self, directory, version: str, image: bytes, lengths=None, name: str | None = None):
        self.dir, self.version, self.image = str(directory), version, image
        base = name or f"os-{version}"
        self.data_name, self.index_name = base + ".chunks", base + ".cidx"
        lengths = lengths or cuts(len(image))
        assert sum(lengths) == len(image)
        cctx = zstandard.ZstdCompressor(level=3, write_content_size=True)
        records, data, at = [], bytearray(), 0
        for n in lengths:
            piece = image[at:at + n]
            frame = cctx.compress(piece)
            records.append((n, len(frame), cindex.FLAG_ZERO if piece.count(0) == n else 0,
                            hashlib.sha256(piece).digest()))
            data += frame
            at += n
        self.image_sha = hashlib.sha256(image).hexdigest()
        self.index = cindex.build(records, len(image), self.image_sha)
        self.data = bytes(data)
        self.write()

    @property
    def data_path(self) -> str:
        return os.path.join(self.dir, self.data_name)

    @property
    def index_path(self) -> str:
        return os.path.join(self.dir, self.index_name)

    def write(self) -> None:
        with open(self.data_path, "wb") as f:
            f.write(self.data)
        with open(self.index_path, "wb") as f:
            f.write(self.index)

    def artifacts(self, index: bytes | None = None, data: bytes | None = None):
        """(image, chunks) as the statement names them (of other bytes than served: ``index``, ``data``)."""
        index, data = index or self.index, data or self.data
        return (trust.Artifact(None, self.image_sha, len(self.image)),
                trust.Chunks(trust.Artifact(self.index_name, hashlib.sha256(index).hexdigest(), len(index)),
                             trust.Artifact(self.data_name, hashlib.sha256(data).hexdigest(), len(data))))

    def release(self) -> trust.Release:
        image, chunks = self.artifacts()
        return trust.Release(self.data_name, hashlib.sha256(self.data).hexdigest(), APP, self.version,
                             len(self.data), image=image, chunks=chunks)

    def signed(self, key_path: str) -> bytes:
        """The envelope (written beside the data file as ``<data>.sig`` too)."""
        image, chunks = self.artifacts()
        body = trust.statement(self.data_name, hashlib.sha256(self.data).hexdigest(), APP, self.version,
                               len(self.data), image=image, chunks=chunks)
        envelope = trust.sign_statement(body, trust.load_private_key(key_path))
        with open(self.data_path + ".sig", "wb") as f:
            f.write(envelope)
        return envelope


class Nginx(bench.Nginx):
    """The benchmark's nginx with an access log of each answer's status, bytes and the Range asked for."""

    def __init__(self, root: str, workdir: str, directives: str = ""):
        super().__init__(root, workdir, directives, installer="make test", http=(
            "log_format ranges '$request_uri $status $body_bytes_sent \"$http_range\"';\n"
            f"  access_log {os.path.join(workdir, 'nginx')}/access.log ranges;"))

    def log(self) -> list[str]:
        with open(os.path.join(self.dir, "access.log")) as f:
            return f.read().splitlines()
