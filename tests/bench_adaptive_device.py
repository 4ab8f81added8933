"""The device side of an adaptive update on one of ``tests/bench_adaptive.py``'s pairs, measured.

A slot holding the old image (the old image file itself, read only) and the chunk store holding its index; the new
release's chunk files served by nginx on 127.0.0.1; the agent's ``prepare`` (the index fetched, held to its
digest, planned against the old one: the local scan) and ``Applier`` (chunks read from the old slot, the rest
fetched with multi-range requests, the slot verified against the signed image digest) run in a child process
(``tests/childmem.py``), so its peak RSS is its own. What the link carried and how many requests it took come from
nginx's access log (``$body_bytes_sent``: the index and every range answer, multipart headers and gaps included).
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import time

from tests.adaptive import Nginx
from tests.childmem import run_in_child

APP = "{0a0b0c0d-1111-4222-8333-444455556666}"
MB = 1e6


def apply_in_child(base: str, fields: dict, old_image: str, slot_b: str, state: str) -> dict:
    """Runs in the child: the adaptive install of the release ``fields`` describe onto ``slot_b``, the booted slot
    ``a`` holding ``old_image``. Wall and CPU time cover ``prepare`` (index fetch and plan) and the apply."""
    from agent import trust
    from agent.adaptive.apply import Applier
    from agent.adaptive.prepare import Prepared, prepare
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
            cpu, wall = time.process_time(), time.monotonic()
            prep = await prepare(session, release, urls, ChunkStore(state), "a", "b", 60)
            if not isinstance(prep, Prepared):
                return {"full": prep}
            planned = time.monotonic() - wall
            pkg = PackageOffer(release.name, urls, release.size, bytes.fromhex(release.sha256), None)
            applier = Applier(Installer(session), prep, release, ChunkStore(state), old_image)
            result = await applier.stream("b", slot_b, os.path.getsize(slot_b), pkg, "2.0.0")
            return {"received": result.received, "reused": applier.reused, "wall_s": time.monotonic() - wall,
                    "cpu_s": time.process_time() - cpu, "plan_s": planned, "planned": prep.plan.remote_bytes,
                    "method": result.compression}
        finally:
            await session.close()
    return asyncio.run(run())


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def same_bytes(a: str, b: str, size: int) -> bool:
    """The first ``size`` bytes of ``a`` and ``b`` are equal (read 4 MiB at a time)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        left = size
        while left > 0:
            n = min(4 << 20, left)
            if fa.read(n) != fb.read(n):
                return False
            left -= n
    return True


def measure(label: str, pair: dict, workdir: str, results: dict) -> None:
    """``pair`` as ``bench_adaptive.pair_figures`` answers it; figures go into ``results`` as
    ``adaptive_<label>_<figure>``."""
    from agent.adaptive.index import parse
    from agent.adaptive.store import ChunkStore
    with open(pair["old_index"], "rb") as f:
        old_raw = f.read()
    with open(pair["new_index"], "rb") as f:
        new_raw = f.read()
    new = parse(new_raw)
    served = os.path.dirname(pair["new_index"])
    assert os.path.dirname(pair["new_data"]) == served
    device = os.path.join(workdir, f"device-{label}")
    os.makedirs(device, exist_ok=True)
    slot_b = os.path.join(device, "slot-b.img")
    with open(slot_b, "wb") as f:
        f.truncate(new.image_size)
    state = os.path.join(device, "state")
    ChunkStore(state).save("a", old_raw)
    data_size = os.path.getsize(pair["new_data"])
    fields = {"image": [new.image_sha256, new.image_size],
              "index": [os.path.basename(pair["new_index"]), hashlib.sha256(new_raw).hexdigest(), len(new_raw)],
              "data": [os.path.basename(pair["new_data"]), _digest(pair["new_data"]), data_size]}
    nginx = Nginx(served, device)
    try:
        report = run_in_child("tests.bench_adaptive_device", "apply_in_child", nginx.base, fields, pair["old"],
                              slot_b, state, timeout=3600)
        log = [line.split() for line in nginx.log()]
    finally:
        nginx.close()
    fig = report["result"]
    if "full" in fig:
        print(f"adaptive ({label} pair): the device took the full path: {fig['full']}", flush=True)
        results[f"adaptive_{label}_device"] = f"full path: {fig['full']}"
        return
    wire = sum(int(parts[2]) for parts in log)
    correct = same_bytes(slot_b, pair["new"], new.image_size)
    figures = {"wire_mb": wire / MB, "agent_received_mb": fig["received"] / MB, "full_zstd_mb": data_size / MB,
               "wire_ratio": wire / data_size, "requests": len(log), "wall_s": fig["wall_s"], "cpu_s": fig["cpu_s"],
               "plan_s": fig["plan_s"], "reused_mb": fig["reused"] / MB,
               "peak_rss_mib": report["peak_mib"], "rss_growth_mib": report["peak_mib"] - report["base_mib"],
               "correct": correct}
    for k, v in figures.items():
        results[f"adaptive_{label}_{k}"] = round(v, 4) if isinstance(v, float) else v
    print(f"adaptive ({label} pair, device): fetched {wire / MB:.1f} MB in {len(log)} requests (index and ranges, "
          f"multipart included; the agent counted {fig['received'] / MB:.1f} MB) of a {data_size / MB:.1f} MB chunk "
          f"data file = {figures['wire_ratio']:.3f}; {fig['reused'] / MB:.0f} MB reused from the old slot; "
          f"{fig['wall_s']:.1f} s wall ({fig['plan_s']:.2f} s index and plan), {fig['cpu_s']:.1f} s CPU; peak RSS "
          f"{report['peak_mib']:.1f} MiB (+{figures['rss_growth_mib']:.1f} during the update); the slot "
          f"{'equals' if correct else 'DIFFERS FROM'} the new image", flush=True)
    os.unlink(slot_b)
