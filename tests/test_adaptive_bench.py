"""The adaptive bench's parts (tests/bench_adaptive.py): deterministic ext4 images, the synthetic pair, and the
index-level count of the bytes a device fetches."""
import hashlib
import os
import subprocess
import time

import pytest

from agent.adaptive import index

from . import bench_adaptive as ba
from .conftest import need_tool

pytest.importorskip("pyfastcdc")


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def ext4_tools():
    for tool in ("mke2fs", "debugfs", "dumpe2fs", "e2fsck"):
        need_tool(tool)


def test_one_tree_written_twice_makes_the_same_ext4_bytes(tmp_path, ext4_tools):
    images = []
    for n in (1, 2):
        tree = tmp_path / f"tree{n}"
        tree.mkdir()
        ba.synthetic_tree(str(tree), 8, new=True)
        if n == 1:
            time.sleep(1.1)  # the second tree's files get later ctimes (mke2fs copies them; mkfs resets them)
        images.append(str(tmp_path / f"img{n}.ext4"))
        ba.mkfs(str(tree), images[-1], 32)
    assert sha(images[0]) == sha(images[1])
    fsck = subprocess.run(["e2fsck", "-fn", images[0]], capture_output=True, text=True,
                          env=dict(os.environ, PATH=ba.PATH))
    assert fsck.returncode == 0, fsck.stdout[-800:]


def record(data: bytes, stored: int, zero=False):
    return (len(data), stored, index.FLAG_ZERO if zero else 0, hashlib.sha256(data).digest())


def test_wire_bytes_count_every_new_chunk_the_old_image_lacks_except_zero_ones():
    a, b, c, z = b"a" * 5000, b"b" * 5000, b"c" * 5000, bytes(5000)
    old = index.parse(index.build([record(a, 10), record(b, 20)], 10000, "00" * 32))
    new = index.parse(index.build([record(a, 11), record(c, 30), record(z, 5, zero=True), record(c, 31),
                                   record(b, 21)], 25000, "00" * 32))
    assert ba.wire_bytes(old, new) == (61, 2)


def test_the_synthetic_pair_needs_a_small_share_of_the_full_download(tmp_path, ext4_tools):
    old, new = ba.synthetic_pair(str(tmp_path), 48)
    assert sha(old) != sha(new)
    results = {}
    ba.pair_figures("synthetic", old, new, 1, results)
    print(f"\nsynthetic 48 MiB pair: wire {results['adaptive_synthetic_chunk_wire_mb']:.2f} MB of "
          f"{results['adaptive_synthetic_full_zstd_mb']:.2f} MB")
    assert 0 < results["adaptive_synthetic_wire_chunks"] < results["adaptive_synthetic_chunks"] / 4
    assert 0 < results["adaptive_synthetic_chunk_wire_ratio"] < 0.3


def test_device_figures_apply_the_synthetic_pair_from_nginx_and_count_what_the_link_carried(tmp_path, ext4_tools):
    from .test_adaptive_apply import need_nginx
    need_nginx()
    old, new = ba.synthetic_pair(str(tmp_path), 48)
    results = {}
    pair = ba.pair_figures("synthetic", old, new, 1, results)
    ba.device_figures("synthetic", pair, str(tmp_path), results)
    r = {k[len("adaptive_synthetic_"):]: v for k, v in results.items() if k.startswith("adaptive_synthetic_")}
    assert r["correct"] is True
    index_mb = os.path.getsize(pair["new_index"]) / 1e6
    # the link carried the index and at least every chunk the old image lacks (ranges add only their headers)
    assert r["chunk_wire_mb"] + index_mb <= r["wire_mb"] + 1e-4
    assert r["wire_mb"] < r["chunk_wire_mb"] + index_mb + 1, r
    assert 0 < r["wire_ratio"] < 0.3 and r["requests"] >= 2
    assert r["reused_mb"] > 0 and r["peak_rss_mib"] > 0 and r["cpu_s"] > 0
