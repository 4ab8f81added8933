"""Signing an adaptive release on the build host: the statement that names the payload, the image and the chunk
files (``omaha-agent sign --chunks``), after checking that the chunk files describe one image frame by frame.

Only ``agent.trust`` (statement and envelope) and ``agent.adaptive.index`` are used; the chunker is not needed.
"""
from __future__ import annotations

import hashlib
import os

from .. import trust
from . import index

MAX_INDEX = 64 << 20  # an index this large would describe a 100 GiB image: refuse rather than read it


class ReleaseError(Exception):
    """The chunk files cannot be signed; the message is the one-line reason."""


def data_path_for(index_path: str) -> str:
    """The chunk data file beside an index: ``NAME.cidx`` -> ``NAME.czst``."""
    stem = index_path[:-len(".cidx")] if index_path.endswith(".cidx") else index_path
    return stem + ".czst"


def file_digest(path: str) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def load_index(path: str) -> index.ChunkIndex:
    try:
        size = os.path.getsize(path)
        if size > MAX_INDEX:
            raise ReleaseError(f"{path}: {size} bytes, larger than a chunk index may be ({MAX_INDEX >> 20} MiB)")
        with open(path, "rb") as f:
            return index.parse(f.read())
    except OSError as exc:
        raise ReleaseError(f"cannot read {path}: {exc.strerror or exc}") from None
    except index.BadIndex as exc:
        raise ReleaseError(f"{path}: {exc}") from None


def check_data(idx: index.ChunkIndex, data_path: str) -> None:
    """Each frame of ``data_path`` is one zstd frame holding exactly its chunk (length and SHA-256), and the
    chunks make the index's image. Reads the file once, one frame at a time."""
    import zstandard
    try:
        size = os.path.getsize(data_path)
    except OSError as exc:
        raise ReleaseError(f"cannot read {data_path}: {exc.strerror or exc}") from None
    if size != idx.data_size:
        raise ReleaseError(f"{data_path} is {size} bytes, but its index's frames add up to {idx.data_size} (not "
                           "the data file cut with this index?)")
    dctx = zstandard.ZstdDecompressor()
    image = hashlib.sha256()
    with open(data_path, "rb") as f:
        for i, (length, stored, flags, digest) in enumerate(idx):
            frame = f.read(stored)
            try:
                if zstandard.frame_content_size(frame) != length:
                    raise ReleaseError(f"{data_path}: frame {i} does not declare the {length} bytes of its chunk")
                chunk = dctx.decompress(frame)
            except zstandard.ZstdError as exc:
                raise ReleaseError(f"{data_path}: frame {i} is not one whole zstd frame ({exc})") from None
            if len(chunk) != length or hashlib.sha256(chunk).digest() != digest:
                raise ReleaseError(f"{data_path}: chunk {i} is not the one its index names (digest or length)")
            if flags & index.FLAG_ZERO and chunk.count(0) != length:
                raise ReleaseError(f"{data_path}: chunk {i} is flagged all zero but is not")
            image.update(chunk)
    if image.hexdigest() != idx.image_sha256:
        raise ReleaseError(f"{data_path}: the chunks do not make the image its index names (SHA-256)")


def chunk_refs(index_path: str, data_path: str | None = None, *, check: bool = True) -> tuple[trust.Artifact,
                                                                                             trust.Chunks]:
    """The statement's ``image`` and ``chunks`` for an index and its data file (default: beside it)."""
    data_path = data_path or data_path_for(index_path)
    idx = load_index(index_path)
    for path in (index_path, data_path):
        if not trust.relative_name(os.path.basename(path)):
            raise ReleaseError(f"{os.path.basename(path)!r} cannot be named in a release (letters, digits, "
                               "'.', '_', '-', '+' only)")
    if check:
        check_data(idx, data_path)
    try:
        data_sha, data_size = file_digest(data_path)
    except OSError as exc:
        raise ReleaseError(f"cannot read {data_path}: {exc.strerror or exc}") from None
    refs = trust.Chunks(trust.Artifact(os.path.basename(index_path), idx.digest(), len(idx.raw)),
                        trust.Artifact(os.path.basename(data_path), data_sha, data_size))
    return trust.Artifact(None, idx.image_sha256, idx.image_size), refs


def sign(payload: str, index_path: str, key, appid: str, version: str, track: str | None = None,
         board: str | None = None, *, check: bool = True) -> bytes:
    """The envelope of an adaptive release: ``payload`` (usually the chunk data file itself) plus the image and
    chunk files named by the index at ``index_path``."""
    image, refs = chunk_refs(index_path, check=check)
    try:
        sha, size = file_digest(payload)
    except OSError as exc:
        raise ReleaseError(f"cannot read {payload}: {exc.strerror or exc}") from None
    if os.path.dirname(os.path.abspath(payload)) != os.path.dirname(os.path.abspath(index_path)):
        raise ReleaseError("the chunk files must lie beside the payload (the device fetches them by name from "
                           "the payload URL's directory)")
    body = trust.statement(os.path.basename(payload), sha, appid, version, size, track, board, image=image,
                           chunks=refs)
    return trust.sign_statement(body, key)
