"""Memory of an adaptive install does not grow with the image (beyond its index, 41 bytes a chunk): the apply runs
in a child process (tests/childmem.py) against nginx, for a 32 MiB and a 128 MiB image; figures are printed."""
from __future__ import annotations

import asyncio
import os
import random
import time

from tests.adaptive import APP, Nginx, Release, cuts
from tests.childmem import run_in_child
from tests.test_adaptive_apply import need_nginx


def make_pair(www, size: int):
    rng = random.Random(size)
    old = b"".join(rng.randbytes(1 << 20) for _ in range(size >> 20)) + rng.randbytes(size % (1 << 20))
    new = bytearray(old)
    lengths = cuts(size)
    offs = [0]
    for n in lengths:
        offs.append(offs[-1] + n)
    for i in range(0, len(lengths), 10):  # a tenth of the chunks changed, spread over the image
        new[offs[i]:offs[i + 1]] = rng.randbytes(offs[i + 1] - offs[i])
    return (Release(www, "1.0.0", old, lengths, name=f"old-{size}"),
            Release(www, "2.0.0", bytes(new), lengths, name=f"new-{size}"))


def apply_in_child(base: str, fields: dict, slot_a: str, slot_b: str, state: str) -> dict:
    """Runs in the child: the adaptive install of the release ``fields`` describe onto ``slot_b`` (from
    ``slot_a``); the artifacts are read from nginx only."""
    from agent import trust
    from agent.adaptive.apply import Applier
    from agent.adaptive.prepare import prepare
    from agent.adaptive.store import ChunkStore
    from agent.http import make_session
    from agent.install import Installer
    from agent.omaha.outcome import PackageOffer

    release = trust.Release(fields["data"][0], fields["data"][1], APP, "2.0.0", fields["data"][2],
                            image=trust.Artifact(None, *fields["image"]),
                            chunks=trust.Chunks(trust.Artifact(*fields["index"]), trust.Artifact(*fields["data"])))

    async def run():
        session = make_session()
        try:
            urls = (base + release.name,)
            store = ChunkStore(state)
            prep = await prepare(session, release, urls, store, "a", "b", 30)
            installer = Installer(session)
            pkg = PackageOffer(release.name, urls, release.size, bytes.fromhex(release.sha256), None)
            applier = Applier(installer, prep, release, store, slot_a)
            cpu, wall = time.process_time(), time.monotonic()
            result = await applier.stream("b", slot_b, os.path.getsize(slot_b), pkg, "2.0.0")
            return {"received": result.received, "reused": applier.reused, "wall_s": time.monotonic() - wall,
                    "cpu_s": time.process_time() - cpu, "planned": prep.plan.remote_bytes}
        finally:
            await session.close()
    return asyncio.run(run())


def test_adaptive_apply_memory_does_not_grow_with_the_image(tmp_path):
    need_nginx()
    www = tmp_path / "www"
    www.mkdir()
    figures = {}
    for mib in (32, 128):
        size = mib << 20
        r1, r2 = make_pair(www, size)
        slots = {s: str(tmp_path / f"slot-{s}-{mib}.img") for s in "ab"}
        with open(slots["a"], "wb") as f:
            f.write(r1.image)
        with open(slots["b"], "wb") as f:
            f.truncate(size)
        state = str(tmp_path / f"state-{mib}")
        from agent.adaptive.store import ChunkStore
        ChunkStore(state).save("a", r1.index)
        nginx = Nginx(str(www), str(tmp_path / f"n{mib}"))
        try:
            image, chunks = r2.artifacts()
            fields = {"image": [image.sha256, image.size],
                      "index": [chunks.index.name, chunks.index.sha256, chunks.index.size],
                      "data": [chunks.data.name, chunks.data.sha256, chunks.data.size]}
            report = run_in_child("tests.test_adaptive_memory", "apply_in_child", nginx.base, fields, slots["a"],
                                  slots["b"], state, timeout=300)
        finally:
            nginx.close()
        with open(slots["b"], "rb") as f:
            assert f.read() == r2.image
        fig = report["result"]
        fig["growth_mib"] = report["peak_mib"] - report["base_mib"]
        fig["peak_mib"] = report["peak_mib"]
        figures[mib] = fig
        print(f"\n{mib} MiB image: fetched {fig['received'] / 2**20:.1f} MiB of {len(r2.data) / 2**20:.1f}, reused "
              f"{fig['reused'] / 2**20:.1f} MiB, {fig['wall_s']:.2f} s wall, {fig['cpu_s']:.2f} s CPU, peak RSS "
              f"{fig['peak_mib']:.1f} MiB (+{fig['growth_mib']:.1f} during the apply)")
        del r1, r2
    # four times the image: the growth differs by little more than the index and the plan (~50 bytes a chunk)
    assert figures[128]["growth_mib"] - figures[32]["growth_mib"] < 8, figures
