"""Before an adaptive install: fetch the release's chunk index, hold it to its signed digest, plan it.

``prepare`` answers a ``Prepared`` (the index, its URLs and the plan) or None with the reason the full download
is taken (no index for the booted slot, the server has no index, the plan fetches too much). An index that does
not match its signed digest or size, or that describes another image than the signed one, is refused
(``InstallError``): the server is not trusted for this release.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from urllib.parse import urljoin

from ..install import InstallError
from ..trust import Release
from .index import HEADER, RECORD, BadIndex, ChunkIndex, parse
from .plan import Plan, make
from .store import MAX_INDEX, ChunkStore

log = logging.getLogger("omaha-agent")


@dataclass
class Prepared:
    index: ChunkIndex
    raw_size: int  # bytes of the index downloaded
    data_urls: list[str]
    plan: Plan
    index_url: str = ""


def beside(url: str, name: str) -> str:
    """``name`` (a plain file name) in the directory of the payload URL ``url``."""
    return urljoin(url, name)


async def fetch_index(session, release: Release, urls, read_timeout: float,
                      cap: int = MAX_INDEX) -> tuple[bytes, str]:
    """The release's chunk index, from beside the first payload URL that has it; its size and digest are the
    signed ones. Raises ``InstallError`` ("hash": it does not match; "transfer": none could be fetched)."""
    from ..http import FetchError, fetch_small
    ref = release.chunks.index
    if ref.size > cap:
        raise InstallError(f"the signed chunk index is {ref.size} bytes, over the {cap}-byte limit", "size")
    errors = []
    for url in urls:
        where = beside(url, ref.name)
        try:
            raw = await fetch_small(session, where, ref.size, read_timeout)
        except FetchError as exc:
            errors.append(str(exc))
            continue
        if len(raw) != ref.size or hashlib.sha256(raw).hexdigest() != ref.sha256:
            raise InstallError(f"the chunk index {ref.name} does not match its signed digest and size ({len(raw)} "
                               f"bytes, signed {ref.size}): refused", "hash")
        return raw, where
    raise InstallError("could not fetch the chunk index: " + "; ".join(errors[-2:]), "transfer")


def check_index(raw: bytes, release: Release) -> ChunkIndex:
    """The signed index, parsed and held to the signed image and data file."""
    try:
        index = parse(raw, max_count=(MAX_INDEX - HEADER.size) // RECORD.size)
    except BadIndex as exc:
        raise InstallError(f"the signed chunk index is unusable: {exc}", "hash") from None
    if index.image_size != release.image.size or index.image_sha256 != release.image.sha256:
        raise InstallError("the signed chunk index describes another image than the signed one", "hash")
    if index.data_size != release.chunks.data.size:
        raise InstallError(f"the signed chunk index's frames add up to {index.data_size} bytes, the signed chunk "
                           f"data file has {release.chunks.data.size}", "hash")
    return index


async def prepare(session, release: Release, urls, store: ChunkStore, booted: str | None, target: str,
                  read_timeout: float) -> "Prepared | str":
    """The plan of an adaptive install of ``release`` onto ``target``, or the reason (a line) the full download
    is taken. Raises ``InstallError`` for an index that breaks its signature."""
    if await asyncio.to_thread(store.failed, release.image.sha256):
        return "the adaptive install of this release failed after its first write"
    sources = await asyncio.to_thread(lambda: (store.booted(booted) if booted else None, store.load(target),
                                               store.load(target, old=True)))
    if sources[0] is None and sources[1] is None and sources[2] is None:
        return f"no chunk index is known for slot {booted} (this update saves one for the next)"
    try:
        raw, where = await fetch_index(session, release, urls, read_timeout)
    except InstallError as exc:
        if exc.kind != "transfer":
            raise
        return str(exc)  # the server has no index (or cannot send it now): the payload still installs
    index = await asyncio.to_thread(check_index, raw, release)
    plan = await asyncio.to_thread(make, index, sources[0], sources[1] or sources[2],
                                   data_size=release.chunks.data.size)
    if plan.full:
        return plan.full
    return Prepared(index, len(raw), [beside(u, release.chunks.data.name) for u in urls], plan, where)
