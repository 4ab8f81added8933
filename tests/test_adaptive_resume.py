"""An adaptive install cut in the middle: a connection that drops mid-body (the same attempt goes on from its
checkpoint) and a stop (cancelled: the next run resumes at the checkpointed chunk); the image is exact either way.
nginx serves the ranges; the cut is a small TCP relay on 127.0.0.1 that closes after a number of bytes."""
from __future__ import annotations

import asyncio
import random

import pytest

from agent.adaptive.apply import Applier
from agent.adaptive.index import parse
from agent.adaptive.prepare import Prepared, prepare
from agent.adaptive.store import ChunkStore
from agent.http import make_session
from agent.install import InstallError, Installer
from agent.omaha.outcome import PackageOffer
from tests.adaptive import Nginx, Release, cuts
from tests.test_adaptive_apply import need_nginx, slot_holds

SLOT = 8 << 20


class CutRelay:
    """Relays 127.0.0.1 connections to ``port``; the first connection is closed after ``cut`` bytes to the client."""

    def __init__(self, port: int, cut: int, then: int | None = None):
        self.port, self.cut, self.cuts = port, cut, 0
        self.then = then or port  # where the later connections go

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def handle(self, reader, writer):
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.port if self.cuts == 0 else self.then)
        budget = self.cut if self.cuts == 0 else None
        if budget is not None:
            self.cuts += 1

        async def up():
            while data := await reader.read(65536):
                up_w.write(data)
                await up_w.drain()

        async def down():
            nonlocal budget
            while data := await up_r.read(65536):
                if budget is not None:
                    data = data[:budget]
                    budget -= len(data)
                writer.write(data)
                await writer.drain()
                if budget == 0:
                    return

        task = asyncio.ensure_future(up())
        try:
            await down()
        except (ConnectionError, OSError):
            pass
        finally:
            task.cancel()
            writer.close()
            up_w.close()


@pytest.fixture
def spread(tmp_path):
    """(release 1, release 2, slots, store): a third of the chunks changed, spread over the whole image."""
    www = tmp_path / "www"
    www.mkdir()
    rng = random.Random(3)
    size = 3 << 20
    old = rng.randbytes(size)
    new = bytearray(old)
    lengths = cuts(size)
    offs = [0]
    for n in lengths:
        offs.append(offs[-1] + n)
    for i in range(0, len(lengths), 3):
        new[offs[i]:offs[i + 1]] = rng.randbytes(offs[i + 1] - offs[i])
    r1, r2 = Release(www, "1.0.0", old, lengths), Release(www, "2.0.0", bytes(new), lengths)
    slots = {}
    for s, content in (("a", old), ("b", b"")):
        p = tmp_path / f"slot-{s}.img"
        with open(p, "wb") as f:
            f.write(content)
            f.truncate(SLOT)
        slots[s] = str(p)
    store = ChunkStore(str(tmp_path / "state"))
    store.save("a", r1.index)
    return www, r1, r2, slots, store


async def run(r2, slots, store, session, base, resume=None, on_progress=None, checkpoints=None):
    release = r2.release()
    urls = (base + r2.data_name,)
    prep = await prepare(session, release, urls, store, "a", "b", 10)
    assert isinstance(prep, Prepared), prep
    installer = Installer(session, checkpoint_every=512 << 10, on_progress=on_progress,
                          on_checkpoint=(checkpoints.append if checkpoints is not None else None))
    pkg = PackageOffer(r2.data_name, urls, len(r2.data), bytes.fromhex(release.sha256), None)
    applier = Applier(installer, prep, release, store, slots["a"])
    return prep, await applier.stream("b", slots["b"], SLOT, pkg, r2.version, resume)


async def test_a_connection_cut_mid_body_goes_on_from_the_checkpointed_chunk_in_the_same_attempt(spread, tmp_path):
    need_nginx()
    www, r1, r2, slots, store = spread
    nginx = Nginx(str(www), str(tmp_path))
    plan_bytes = None
    checkpoints = []
    session = make_session()
    try:
        probe = await prepare(session, r2.release(), (nginx.base + r2.data_name,), store, "a", "b", 10)
        plan_bytes = probe.plan.remote_bytes
        relay = CutRelay(nginx.port, int(plan_bytes * 0.6))
        port = await relay.start()
        await session.close()
        session = make_session()
        prep, result = await run(r2, slots, store, session, f"http://127.0.0.1:{port}/", checkpoints=checkpoints)
    finally:
        await session.close()
        nginx.close()
    assert relay.cuts == 1
    assert slot_holds(slots["b"], r2.image)
    ranged = [line for line in nginx.log() if r2.data_name in line and line.split()[1] == "206"]
    assert len(ranged) == 2, nginx.log()
    offsets = parse(r2.index).offsets()
    assert checkpoints and checkpoints[0].received in offsets and 0 < checkpoints[0].received < len(r2.image)
    # the second request starts after what the first one delivered, at the checkpointed chunk
    first_ranges = ranged[0].split('"')[1]
    second_ranges = ranged[1].split('"')[1]
    assert second_ranges.count(",") < first_ranges.count(",")
    assert result.received < plan_bytes * 1.7 + len(r2.index)
    print(f"\ncut after {int(plan_bytes * 0.6)} bytes: {result.received} bytes fetched in all, planned {plan_bytes}")


async def test_a_stopped_install_resumes_at_its_checkpointed_chunk_and_the_image_is_exact(spread, tmp_path):
    need_nginx()
    www, r1, r2, slots, store = spread
    nginx = Nginx(str(www), str(tmp_path))
    checkpoints = []
    session = make_session()
    try:
        task = None

        def stop_halfway(p):
            if p.done >= len(r2.image) // 2 and not task.done():
                task.cancel()  # as a daemon stopping: the checkpoint is saved on the way out

        task = asyncio.ensure_future(run(r2, slots, store, session, nginx.base, on_progress=stop_halfway,
                                         checkpoints=checkpoints))
        with pytest.raises(asyncio.CancelledError):
            await task
        assert checkpoints, "a stop saves a checkpoint"
        cp = checkpoints[-1]
        assert cp.sha256 == r2.image_sha and cp.size == len(r2.image)
        assert len(r2.image) // 2 <= cp.received < len(r2.image)
        assert not slot_holds(slots["b"], r2.image)
        first_log = len(nginx.log())
        prep, result = await run(r2, slots, store, session, nginx.base, resume=cp)
    finally:
        await session.close()
        nginx.close()
    assert slot_holds(slots["b"], r2.image)
    offsets = parse(r2.index).offsets()
    assert result.resumed_from == cp.received and cp.received in offsets
    later = nginx.log()[first_log:]
    assert len(later) == 2  # the index, and one multi-range request for the chunks after the checkpoint
    assert result.received < prep.plan.remote_bytes * 0.7 + len(r2.index)


async def test_ranges_refused_after_the_first_write_fail_the_attempt_and_the_next_takes_the_full_path(spread,
                                                                                                     tmp_path):
    need_nginx()
    from tests.test_adaptive_apply import NoRangeServer
    www, r1, r2, slots, store = spread
    nginx = Nginx(str(www), str(tmp_path))
    norange = NoRangeServer(www)
    norange_base = await norange.start()
    session = make_session()
    try:
        probe = await prepare(session, r2.release(), (nginx.base + r2.data_name,), store, "a", "b", 10)
        norange_port = int(norange_base.rstrip("/").rsplit(":", 1)[1])
        relay = CutRelay(nginx.port, int(probe.plan.remote_bytes * 0.6), then=norange_port)
        port = await relay.start()
        with pytest.raises(InstallError, match="does not serve byte ranges.*the next attempt downloads the full") as err:
            await run(r2, slots, store, session, f"http://127.0.0.1:{port}/")
        assert err.value.kind == "transfer"
        assert store.failed(r2.image_sha)
        again = await prepare(session, r2.release(), (nginx.base + r2.data_name,), store, "a", "b", 10)
    finally:
        await session.close()
        await norange.runner.cleanup()
        nginx.close()
    assert again == "the adaptive install of this release failed after its first write"
