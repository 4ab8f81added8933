"""The adaptive step of the success scenario (test_qemu.py): the image's 2.0.0 and 2.1.0 as adaptive releases
(build-image.sh cuts them: payload-V.ext4.cidx and .czst), the guest's checks that find 2.1.0, and the bound on
the bytes the server may send for 2.1.0, derived from the two releases' chunk indexes."""
from __future__ import annotations

import hashlib
import os

from agent.adaptive.index import FLAG_ZERO
from agent.adaptive.plan import GAP
from agent.adaptive.release import data_path_for, load_index
from agent.tools.devserver import Image
from agent.tools.ranges import multipart_head

from .vm import BUILD, OPERATION

PART_OVERHEAD = 256  # bytes a multipart/byteranges part's boundary and headers may take (about 100 as served)

# for the boot on 2.0.0: once the agent is idle, a check now and again (its schedule would wait an hour) until one
# finds the update the test offers once 2.0.0 is confirmed; bounded in count
CHECK_UNTIL_FOUND = f"""#!/bin/sh
exec >/dev/kmsg 2>&1
n=0
while [ $n -lt 60 ]; do
  i=0
  until {OPERATION} 2>/dev/null | grep -q '"idle"'; do
    i=$((i + 1)); [ $i -gt 1800 ] && exit 1; sleep 1
  done
  echo "omaha-test-setup: check: $(omaha-agent check --wait --timeout 300 2>&1 | tail -n 1)"
  n=$((n + 1)); sleep 5
done
"""



def index_path(version: str) -> str:
    return os.path.join(BUILD, f"payload-{version}.ext4.cidx")


def release(appid: str, version: str) -> Image:
    """``version`` as an adaptive release: its chunk data is the payload (a valid zstd stream: the full path
    installs it as it is), its index beside it; both named in the signature."""
    cidx = index_path(version)
    if not os.path.exists(cidx):
        raise AssertionError(f"{cidx} is missing: make qemu-image cuts it (build-image.sh, chunk_root)")
    return Image(data_path_for(cidx), version, appid, chunk_index=cidx)


def names(version: str) -> set[str]:
    return {os.path.basename(index_path(version)), os.path.basename(data_path_for(index_path(version)))}


def sent_for(srv, version: str, fetches_from: int, streams_from: int) -> dict:
    """What the server sent for ``version`` since the marks: range answers (index and chunk data) and any
    whole-payload stream (the full path). ``resent``: bytes of the files an earlier answer had already sent (an
    answer the agent cut and went on from: what was in flight is sent again; a local chunk that failed its
    digest, fetched apart, whose frame a coalesced range had carried in a gap)."""
    ranged = [r for r in srv.fetches[fetches_from:] if r["name"] in names(version)]
    streamed = sum(s["sent_to"] - s["start"] for s in srv.streams[streams_from:])
    seen: dict[str, list[tuple[int, int]]] = {}
    resent = 0
    for r in ranged:
        spans = seen.setdefault(r["name"], [])
        for a, b in served_spans(r):
            resent += sum(max(0, min(b, d) - max(a, c)) for c, d in spans)
            spans.append((a, b))
    return {"bytes": sum(r.get("sent", 0) for r in ranged) + streamed, "answers": len(ranged),
            "full_path_bytes": streamed, "index_answers": sum(r["name"].endswith(".cidx") for r in ranged),
            "resent": resent}


def served_spans(record: dict) -> list[tuple[int, int]]:
    """The [first, end) spans of the file an answer's body carried, from the ranges it served and the bytes it
    sent (a multipart answer's part heads as agent/tools/ranges.py writes them)."""
    ranges, budget = record.get("ranges"), record.get("sent", 0)
    if ranges is None or not record.get("status") == 206:
        return [(0, budget)] if record.get("status") == 200 else []
    out = []
    for first, last in ranges:
        if len(ranges) > 1:
            budget -= len(multipart_head(first, last, record["size"], "application/octet-stream"))
        take = max(0, min(budget, last - first + 1))
        if take:
            out.append((first, first + take))
        budget -= take
        if budget <= 0:
            break
    return out


def bound(old_version: str, new_version: str, disk: str, source_offset: int) -> dict:
    """The most the server may send for ``new_version`` installed adaptively beside ``old_version``: the new
    index, the stored frames of every non-zero chunk of the new image whose digest the old index lacks, plus,
    per such chunk, a coalesced gap (plan.GAP) and a part's headers. The old slot ran while it was the booted
    one (mounted read-write), so a chunk the old index promises but the slot (at ``source_offset`` in ``disk``,
    read after the update) no longer holds is fetched too: those are counted apart (``drift``)."""
    old, new = load_index(index_path(old_version)), load_index(index_path(new_version))
    have, at = {}, 0
    for length, _, _, digest in old:
        have.setdefault((digest, length), at)
        at += length
    need = need_stored = drift = drift_stored = zero = 0
    with open(disk, "rb") as f:
        for length, stored, flags, digest in new:
            if flags & FLAG_ZERO:
                zero += length
                continue
            where = have.get((digest, length))
            if where is None:
                need, need_stored = need + 1, need_stored + stored
                continue
            f.seek(source_offset + where)
            if hashlib.sha256(f.read(length)).digest() != digest:
                drift, drift_stored = drift + 1, drift_stored + stored
    index_bytes = len(new.raw)
    limit = index_bytes + need_stored + drift_stored + (need + drift) * (GAP + PART_OVERHEAD) + PART_OVERHEAD
    return {"bound": limit, "index": index_bytes, "new_chunks": need, "new_stored": need_stored, "drift_chunks": drift,
            "drift_stored": drift_stored, "full": new.data_size, "image_size": new.image_size,
            "image_sha256": new.image_sha256, "zero_bytes": zero}
