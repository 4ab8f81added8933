"""Cutting an image into content-defined chunks (the build host's side of adaptive updates).

``cut()`` reads a raw image once, as a stream, and writes the release's two chunk files (format: ``index.py``):
``NAME.czst``, one zstd frame per chunk in image order, and ``NAME.cidx``, the chunk index. The cut points are
FastCDC 2020 as pinned in the README ("Adaptive updates"), computed by ``pyfastcdc`` (a build-host dependency,
the ``build`` extra; the device never imports this module). Frames are compressed in worker threads (zstandard
releases the GIL), at most ``2 * threads`` batches of about 1 MiB in flight, so memory does not grow with the
image.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import index

NORMALIZATION = 1  # FastCDC's normalised chunking level (NC): masks of avg bits + 1 and avg bits - 1
BATCH = 1 << 20  # bytes of chunks handed to a worker at once
# The gear table every cutter must use: SHA-256 of its 256 entries as big-endian u64 (README "Adaptive updates")
GEAR_SHA256 = "9df0a720752a7d211fdebaf39bed01610983756fc340a1cfef41052b7356ae73"


class CutError(Exception):
    """The image cannot be cut; the message is the one-line reason."""


@dataclass(frozen=True)
class CutResult:
    index_path: str
    data_path: str
    image_size: int
    image_sha256: str
    chunks: int
    zero_chunks: int
    data_size: int
    index_size: int
    index_sha256: str
    data_sha256: str
    seconds: float


def chunker(params: index.Params = index.Params()):
    """The pinned FastCDC chunker for ``params`` (raises ``CutError`` when pyfastcdc is not installed)."""
    try:
        from pyfastcdc import FastCDC
    except ImportError:
        raise CutError("cutting an image needs pyfastcdc (the build host's extra: pip install "
                       "'omaha-agent[build]')") from None
    if params.chunker != index.CHUNKER_FASTCDC:
        raise CutError(f"chunker {params.chunker} is not known (only {index.CHUNKER_FASTCDC}, FastCDC)")
    return FastCDC(params.avg_size, min_size=params.min_size, max_size=params.max_size,
                   normalized_chunking=NORMALIZATION, seed=0)


def chunks(stream, params: index.Params = index.Params()):
    """Yield each chunk of ``stream`` (a binary file object) as bytes, in order."""
    for c in chunker(params).cut_stream(stream):
        yield bytes(c.data)


def _compress_batch(local, level: int, pieces: list[bytes]) -> list[bytes]:
    cctx = getattr(local, "cctx", None)
    if cctx is None:
        import zstandard
        cctx = local.cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
    return [cctx.compress(p) for p in pieces]


def cut(image: str, out_dir: str | None = None, *, name: str | None = None, level: int = 19,
        threads: int | None = None, params: index.Params = index.Params()) -> CutResult:
    """Cut ``image`` into ``out_dir/NAME.cidx`` and ``out_dir/NAME.czst`` (NAME: the image's file name).

    Both files are written beside their final names and renamed into place when complete."""
    try:
        import zstandard  # noqa: F401
    except ImportError:
        raise CutError("compressing chunks needs zstandard (pip install 'omaha-agent[build]')") from None
    if not 1 <= level <= 22:
        raise CutError(f"zstd level {level} is outside 1..22")
    name = name or os.path.basename(image)
    out_dir = out_dir or os.path.dirname(os.path.abspath(image))
    index_path, data_path = os.path.join(out_dir, name + ".cidx"), os.path.join(out_dir, name + ".czst")
    threads = threads or os.cpu_count() or 1
    started = time.monotonic()
    image_hash, data_hash = hashlib.sha256(), hashlib.sha256()
    zeros = bytes(params.max_size)
    records = bytearray()  # the index's records, 41 bytes a chunk: the only thing that grows with the image
    totals = {"image": 0, "stored": 0, "zero": 0, "count": 0}
    local = threading.local()
    pending: deque = deque()  # (future of the frames, [(length, flags, sha256)]) per batch, in image order

    def drain(until: int) -> None:
        while len(pending) > until:
            future, metas = pending.popleft()
            for frame, (length, flags, digest) in zip(future.result(), metas):
                if len(frame) > index.stored_bound(length):
                    raise CutError(f"a {length}-byte chunk compressed to {len(frame)} bytes, more than the "
                                   "index allows")
                records.extend(index.RECORD.pack(length, len(frame), flags, digest))
                out.write(frame)
                data_hash.update(frame)
                totals["stored"] += len(frame)

    try:
        src = open(image, "rb")
    except OSError as exc:
        raise CutError(f"cannot read {image}: {exc.strerror or exc}") from None
    try:
        out = open(data_path + ".tmp", "wb")
    except OSError as exc:
        src.close()
        raise CutError(f"cannot write {data_path}: {exc.strerror or exc}") from None
    try:
        with src, out, ThreadPoolExecutor(threads) as pool:
            batch: list[bytes] = []
            metas: list[tuple[int, int, bytes]] = []
            size = 0
            for piece in chunks(src, params):
                image_hash.update(piece)
                flags = index.FLAG_ZERO if piece == zeros[:len(piece)] else 0
                totals["zero"] += flags
                totals["count"] += 1
                totals["image"] += len(piece)
                metas.append((len(piece), flags, hashlib.sha256(piece).digest()))
                batch.append(piece)
                size += len(piece)
                if size >= BATCH:
                    pending.append((pool.submit(_compress_batch, local, level, batch), metas))
                    batch, metas, size = [], [], 0
                    drain(2 * threads)
            if batch:
                pending.append((pool.submit(_compress_batch, local, level, batch), metas))
            drain(0)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        _unlink(data_path + ".tmp")
        raise CutError(f"cutting {image}: {exc.strerror or exc}") from None
    except BaseException:
        _unlink(data_path + ".tmp")
        raise
    raw = index.HEADER.pack(index.MAGIC, index.VERSION, params.chunker, params.min_size, params.avg_size,
                            params.max_size, totals["image"], image_hash.digest(), totals["count"]) + bytes(records)
    index.parse(raw)  # what the device will check, checked here first
    try:
        with open(index_path + ".tmp", "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(data_path + ".tmp", data_path)
        os.replace(index_path + ".tmp", index_path)
    except OSError as exc:
        _unlink(index_path + ".tmp")
        _unlink(data_path + ".tmp")
        raise CutError(f"cannot write {index_path}: {exc.strerror or exc}") from None
    return CutResult(index_path, data_path, totals["image"], image_hash.hexdigest(), totals["count"],
                     totals["zero"], totals["stored"], len(raw),
                     hashlib.sha256(raw).hexdigest(), data_hash.hexdigest(), time.monotonic() - started)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
