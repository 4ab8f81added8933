"""Hostile answers to an adaptive install: multipart bodies that break the rules (served by a small aiohttp server
that builds each answer by hand), a huge chunk index, an index longer than signed, an index lying about sizes."""
from __future__ import annotations

import hashlib
import os

import pytest
from aiohttp import web

from agent.adaptive import index as cindex
from agent.adaptive.prepare import check_index, fetch_index, prepare
from agent.adaptive.ranges import RangeError, RangeFetcher
from agent.adaptive.store import ChunkStore
from agent.http import make_session
from agent.install import InstallError
from agent.trust import Artifact, Chunks
from tests.adaptive import Release, cuts

DATA = os.urandom(200_000)
ASKED = [(1000, 2000), (5000, 6000), (9000, 12000)]


def _parts(ranges):
    return [(lo, hi - 1) for lo, hi in ranges]


def body(parts, boundary=b"XYZ", total=len(DATA), extra_header=b"", long_by=0, cut_at=None):
    out = bytearray()
    for a, b in parts:
        out += b"\r\n--" + boundary + b"\r\nContent-Type: application/octet-stream\r\n" + extra_header
        out += b"Content-Range: bytes %d-%d/%d\r\n\r\n" % (a, b, total)
        out += DATA[a:b + 1] + b"!" * long_by
    out += b"\r\n--" + boundary + b"--\r\n"
    return bytes(out[:cut_at]) if cut_at else bytes(out)


ok = _parts(ASKED)
CASES = {
    "extra part": (body(ok + [(20000, 20100)]), "more parts than ranges were asked for"),
    "overlapping parts": (body([ok[0], (1500, 2500), ok[2]]), "overlap or come out of order"),
    "out of order": (body([ok[1], ok[0], ok[2]]), "leaves out bytes asked for"),
    "part not asked for": (body([ok[0], (3000, 3100), ok[1], ok[2]]), "a part not asked for"),
    "beyond the ranges": (body([ok[0], ok[1], (9000, 15000)]), "reaches beyond the ranges asked for"),
    "huge part header": (body(ok, extra_header=b"X-Pad: " + b"a" * 100_000 + b"\r\n"), "longer than 1024 bytes"),
    "many part headers": (body(ok, extra_header=b"X-A: b\r\n" * 50), "more than 16 headers"),
    "another file's size": (body(ok, total=len(DATA) + 1), "of a 200001-byte file"),
    "part longer than said": (body(ok, long_by=3), "longer than its Content-Range"),
    "missing a range": (body(ok[:2]), "not followed by the boundary|ended before all the ranges"),
    "body cut short": (body(ok, cut_at=1500), "ended in the middle of its parts"),
    "no Content-Range": (body(ok).replace(b"Content-Range", b"Content-Rangx", 1), "is not 'bytes FIRST-LAST/SIZE'"),
}


class Crafted:
    def __init__(self, answer: bytes, content_type="multipart/byteranges; boundary=XYZ", status=206):
        self.answer, self.content_type, self.status, self.ranges = answer, content_type, status, []

    async def handle(self, request):
        self.ranges.append(request.headers.get("Range", ""))
        return web.Response(status=self.status, body=self.answer, headers={"Content-Type": self.content_type})

    async def __aenter__(self):
        app = web.Application()
        app.router.add_get("/data", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/data"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


async def collect(url, ranges=ASKED):
    session = make_session()
    try:
        fetcher = RangeFetcher(session, url, len(DATA), read_timeout=5)
        return [(o, bytes(d)) async for o, d in fetcher.pieces(ranges)]
    finally:
        await session.close()


async def test_a_well_formed_multipart_answer_gives_exactly_the_ranges_asked_for():
    async with Crafted(body(ok)) as srv:
        pieces = await collect(srv.url)
    assert b"".join(d for _, d in pieces) == b"".join(DATA[lo:hi] for lo, hi in ASKED)
    assert srv.ranges == ["bytes=1000-1999,5000-5999,9000-11999"]


async def test_a_server_coalescing_ranges_into_one_part_is_taken_and_its_gap_dropped():
    async with Crafted(body([(1000, 5999), ok[2]])) as srv:
        pieces = await collect(srv.url)
    assert b"".join(d for _, d in pieces) == b"".join(DATA[lo:hi] for lo, hi in ASKED)


@pytest.mark.parametrize("case", sorted(CASES))
async def test_a_hostile_multipart_answer_is_refused_with_a_reason(case):
    answer, says = CASES[case]
    async with Crafted(answer) as srv:
        with pytest.raises(RangeError, match=says) as err:
            await collect(srv.url)
    assert "\n" not in str(err.value) and len(str(err.value)) <= 400


async def test_a_single_range_answer_at_another_offset_is_refused():
    async with Crafted(DATA[0:1000], content_type="application/octet-stream") as srv:
        srv.status = 206
        session = make_session()
        try:
            fetcher = RangeFetcher(session, srv.url, len(DATA), read_timeout=5)
            fetcher.mode = "single"
            with pytest.raises(RangeError, match="is not 'bytes FIRST-LAST/SIZE'"):
                [p async for p in fetcher.pieces(ASKED)]
        finally:
            await session.close()


class FirstRangeOnly(Crafted):
    """Answers every Range request with its first range only, as a single 206 part."""

    def __init__(self):
        super().__init__(b"")

    async def handle(self, request):
        header = request.headers.get("Range", "")
        self.ranges.append(header)
        lo, hi = (int(x) for x in header[len("bytes="):].split(",")[0].split("-"))
        return web.Response(status=206, body=DATA[lo:hi + 1], headers={
            "Content-Type": "application/octet-stream", "Content-Range": f"bytes {lo}-{hi}/{len(DATA)}"})


async def test_a_server_answering_only_the_first_range_gets_the_others_one_by_one():
    async with FirstRangeOnly() as srv:
        pieces = await collect(srv.url)
    assert b"".join(d for _, d in pieces) == b"".join(DATA[lo:hi] for lo, hi in ASKED)
    assert srv.ranges == ["bytes=1000-1999,5000-5999,9000-11999", "bytes=5000-5999", "bytes=9000-11999"]


# ---------------------------------------------------------------------------------------------- the index
class IndexServer(Crafted):
    def __init__(self, files: dict):
        super().__init__(b"")
        self.files = files

    async def handle(self, request):
        name = request.match_info["name"]
        if name not in self.files:
            raise web.HTTPNotFound()
        return web.Response(body=self.files[name])

    async def __aenter__(self):
        app = web.Application()
        app.router.add_get("/{name}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/"
        return self

    __aexit__ = Crafted.__aexit__


@pytest.fixture
def rel(tmp_path):
    image = os.urandom(300_000)
    return Release(tmp_path, "2.0.0", image, cuts(len(image)))


def _with(rel, index: bytes | None = None, index_size: int | None = None, data_size: int | None = None):
    release = rel.release()
    ref = release.chunks.index
    idx = index if index is not None else rel.index
    chunks = Chunks(Artifact(ref.name, hashlib.sha256(idx).hexdigest(), index_size or len(idx)),
                    Artifact(release.chunks.data.name, release.chunks.data.sha256,
                             data_size or release.chunks.data.size))
    from dataclasses import replace
    return replace(release, chunks=chunks)


async def test_a_huge_signed_index_is_refused_before_it_is_fetched(rel):
    release = _with(rel, index_size=100 << 20)
    async with IndexServer({rel.index_name: rel.index}) as srv:
        session = make_session()
        try:
            with pytest.raises(InstallError, match="over the .*-byte limit"):
                await fetch_index(session, release, (srv.base + rel.data_name,), 5)
        finally:
            await session.close()


async def test_an_index_served_longer_than_signed_is_not_read_past_its_size(rel):
    release = rel.release()
    async with IndexServer({rel.index_name: rel.index + b"x" * 10_000_000}) as srv:
        session = make_session()
        try:
            with pytest.raises(InstallError, match="could not fetch the chunk index: .*larger than"):
                await fetch_index(session, release, (srv.base + rel.data_name,), 5)
        finally:
            await session.close()


def _lying(rel, stored_delta=0, length_delta=0, image_size=None):
    idx = cindex.parse(rel.index)
    records = list(idx)
    length, stored, flags, digest = records[0]
    records[0] = (length + length_delta, stored + stored_delta, flags, digest)
    return cindex.build(records, image_size or idx.image_size + length_delta, idx.image_sha256)


@pytest.mark.parametrize("lie,says", [
    (dict(stored_delta=5), "frames add up to"),
    (dict(length_delta=1), "describes another image"),
    (dict(image_size=1), "chunk index is unusable"),
])
def test_a_signed_index_lying_about_sizes_is_refused(rel, lie, says):
    lying = _lying(rel, **lie)
    with pytest.raises(InstallError, match=says):
        check_index(lying, _with(rel, index=lying))


async def test_a_signed_index_lying_about_sizes_refuses_the_install_before_the_slot_is_touched(rel, tmp_path):
    lying = _lying(rel, stored_delta=5)
    store = ChunkStore(str(tmp_path / "state"))
    store.save("a", rel.index)
    async with IndexServer({rel.index_name: lying}) as srv:
        session = make_session()
        try:
            with pytest.raises(InstallError, match="frames add up to") as err:
                await prepare(session, _with(rel, index=lying), (srv.base + rel.data_name,), store, "a", "b", 5)
        finally:
            await session.close()
    assert err.value.kind == "hash"


def test_a_frame_that_decompresses_to_more_than_its_chunk_is_refused(rel):
    import zstandard
    from agent.adaptive.apply import _Maker, _Refused
    from agent.adaptive.plan import make
    idx = cindex.parse(rel.index)
    plan = make(idx, None)
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(64 << 20))  # 64 MiB of zeros in a few KiB
    maker = _Maker(idx, plan, {})
    with pytest.raises(_Refused, match="chunk 0 does not match its signed digest"):
        maker.chunk(0, bomb)


async def test_an_answer_with_a_huge_header_is_refused_in_one_line():
    class Huge(Crafted):
        async def handle(self, request):
            return web.Response(status=206, body=body(ok), headers={
                "Content-Type": "multipart/byteranges; boundary=XYZ", "X-Pad": "a" * 20000})
    async with Huge(b"") as srv:
        with pytest.raises(RangeError) as err:
            await collect(srv.url)
    assert "\n" not in str(err.value) and len(str(err.value)) <= 400 and not err.value.unsupported


async def test_a_boundary_that_is_not_a_token_is_not_parsed_as_multipart():
    async with Crafted(body(ok, boundary=b"XY Z"), content_type='multipart/byteranges; boundary="XY Z"') as srv:
        with pytest.raises(RangeError, match="Content-Range '' is not"):
            await collect(srv.url)
