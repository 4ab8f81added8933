"""The build host's chunk cutter (agent/adaptive/cut.py, ``omaha-agent chunk``): real images cut by the real
chunker, checked with zstandard and the zstd tool, against the index parser the device uses, and against a
plain reference of the cut rule the README pins."""
import hashlib
import os
import random
import shutil
import struct
import subprocess
import sys

import pytest
import zstandard

from agent.adaptive import cut as cutmod
from agent.adaptive import index

from .childmem import in_child

pytest.importorskip("pyfastcdc")

M64 = (1 << 64) - 1
# README "Adaptive updates": the masks for an average of 16384 (2^14) with normalisation level 1
MASK_S = 0x0000D90F03530000  # bits 14 + 1 = 15: before the average length
MASK_L = 0x0000D90303530000  # bits 14 - 1 = 13: from the average length on


def gear_table() -> list[int]:
    from pyfastcdc.py.constants import GEAR  # the table itself; its digest is what the README pins
    return list(GEAR)


def reference_lengths(data: bytes, lo=4096, avg=16384, hi=65536) -> list[int]:
    """The README's cut rule, one byte at a time."""
    gear = gear_table()
    out, start = [], 0
    while start < len(data):
        remaining = len(data) - start
        if remaining <= lo:
            out.append(remaining)
            break
        n = min(remaining, hi)
        center = (min(avg, n) // 2) * 2
        end = (n // 2) * 2
        length, h = n, 0
        for i in range(lo, end):
            h = ((h << 1) + gear[data[start + i]]) & M64
            if not h & (MASK_S if i < center else MASK_L):
                length = i
                break
        out.append(length)
        start += length
    return out


def image_bytes(size: int, seed: int) -> bytes:
    """Text-like and random stretches and a run of zeros: compressible, with structure for the chunker."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(2, 9)).hex() for _ in range(400)]
    parts, total = [], 0
    while total < size:
        kind = rng.random()
        if kind < 0.5:
            piece = " ".join(rng.choice(words) for _ in range(rng.randint(200, 4000))).encode()
        elif kind < 0.9:
            piece = rng.randbytes(rng.randint(1000, 60000))
        else:
            piece = bytes(rng.randint(70000, 200000))
        parts.append(piece)
        total += len(piece)
    return b"".join(parts)[:size]


def write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def read_index(path) -> index.ChunkIndex:
    with open(path, "rb") as f:
        return index.parse(f.read())


def test_the_gear_table_is_the_pinned_one():
    raw = b"".join(struct.pack(">Q", g) for g in gear_table())
    assert len(gear_table()) == 256
    assert hashlib.sha256(raw).hexdigest() == cutmod.GEAR_SHA256


def test_the_chunker_cuts_where_the_readme_rule_cuts():
    data = image_bytes(3 << 20, seed=7)
    got = [len(c) for c in cutmod.chunks(__import__("io").BytesIO(data))]
    assert sum(got) == len(data)
    assert got == reference_lengths(data)
    assert len(got) > 40  # the rule cut, not just max-size pieces
    assert len(set(got)) > 30


def test_the_data_file_is_one_zstd_stream_of_the_image_and_each_frame_one_chunk(tmp_path):
    data = image_bytes(6 << 20, seed=1)
    img = write(tmp_path / "rootfs.ext4", data)
    os.makedirs(tmp_path / "out")
    r = cutmod.cut(img, str(tmp_path / "out"), level=3)
    assert r.data_path == str(tmp_path / "out" / "rootfs.ext4.czst")
    with open(r.data_path, "rb") as f:
        blob = f.read()
    with zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True) as reader:
        assert reader.read() == data
    if shutil.which("zstd"):
        out = subprocess.run(["zstd", "-dc", r.data_path], capture_output=True, check=True).stdout
        assert out == data
    idx = read_index(r.index_path)
    offs, soffs = idx.offsets(), idx.stored_offsets()
    assert idx.data_size == len(blob) == r.data_size
    for i, (length, stored, flags, digest) in enumerate(idx):
        frame = blob[soffs[i]:soffs[i] + stored]
        assert zstandard.frame_content_size(frame) == length
        chunk = zstandard.ZstdDecompressor().decompress(frame)
        assert chunk == data[offs[i]:offs[i] + length]
        assert hashlib.sha256(chunk).digest() == digest


def test_the_index_names_the_image_and_its_chunks(tmp_path):
    data = image_bytes(5 << 20, seed=2)
    r = cutmod.cut(write(tmp_path / "img", data), level=3)
    idx = read_index(r.index_path)
    assert (idx.image_size, idx.image_sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert idx.params == index.Params()
    assert [rec[0] for rec in idx] == reference_lengths(data)
    assert r.index_sha256 == idx.digest() and r.chunks == len(idx)
    zero = [i for i, rec in enumerate(idx) if rec[2] & index.FLAG_ZERO]
    assert zero and r.zero_chunks == len(zero)
    offs = idx.offsets()
    for i, (length, _, flags, _) in enumerate(idx):
        assert (data[offs[i]:offs[i] + length] == bytes(length)) == bool(flags & index.FLAG_ZERO)


def digests(path) -> list[bytes]:
    return [rec[3] for rec in read_index(path)]


def test_an_edit_in_the_middle_changes_only_the_chunks_around_it(tmp_path):
    data = image_bytes(8 << 20, seed=3)
    mid = len(data) // 2
    inserted = data[:mid] + b"a new line in the middle of a file\n" * 3 + data[mid:]
    overwritten = data[:mid] + bytes(b ^ 0x55 for b in data[mid:mid + 100]) + data[mid + 100:]
    old = digests(cutmod.cut(write(tmp_path / "old", data), level=1).index_path)
    for name, new_data in (("inserted", inserted), ("overwritten", overwritten)):
        new = digests(cutmod.cut(write(tmp_path / name, new_data), level=1).index_path)
        fresh = [d for d in new if d not in set(old)]
        assert 1 <= len(fresh) <= 3, (name, len(fresh), len(new))
    # the same insertion under fixed 16 KiB blocks would change every block after it
    blocks = lambda b: {hashlib.sha256(b[i:i + 16384]).digest() for i in range(0, len(b), 16384)}  # noqa: E731
    assert len(blocks(inserted) - blocks(data)) > len(new) // 3


def test_two_cuts_of_one_image_are_the_same_bytes_whatever_the_threads(tmp_path):
    img = write(tmp_path / "img", image_bytes(4 << 20, seed=4))
    os.makedirs(tmp_path / "a")
    os.makedirs(tmp_path / "b")
    a = cutmod.cut(img, str(tmp_path / "a"), level=5, threads=1)
    b = cutmod.cut(img, str(tmp_path / "b"), level=5, threads=4)
    for x, y in ((a.index_path, b.index_path), (a.data_path, b.data_path)):
        with open(x, "rb") as f, open(y, "rb") as g:
            assert f.read() == g.read()


def test_an_empty_image_cuts_to_an_empty_index(tmp_path):
    r = cutmod.cut(write(tmp_path / "empty", b""), level=3)
    idx = read_index(r.index_path)
    assert (len(idx), idx.image_size, r.data_size) == (0, 0, 0)


def test_the_chunk_command_writes_both_files_and_says_so(tmp_path):
    img = write(tmp_path / "rootfs.img", image_bytes(2 << 20, seed=5))
    out = tmp_path / "rel"
    os.makedirs(out)
    done = subprocess.run([sys.executable, "-m", "agent.cli", "chunk", img, "-o", str(out), "--level", "3"],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(out)) == ["rootfs.img.cidx", "rootfs.img.czst"]
    assert "chunks" in done.stdout and "MB/s" in done.stdout
    missing = subprocess.run([sys.executable, "-m", "agent.cli", "chunk", str(tmp_path / "nope")],
                             capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "cannot read" in missing.stderr and "Traceback" not in missing.stderr


def cut_sized(path: str, mib: int) -> int:
    """Writes a ``mib`` MiB image at ``path`` and cuts it (run in a child process: tests/childmem.py)."""
    rng = random.Random(mib)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(rng.randbytes(1 << 19) + bytes(1 << 19) if i % 2 else rng.randbytes(1 << 20))
    return cutmod.cut(path, level=1).chunks


def test_cutting_a_larger_image_takes_no_more_memory(tmp_path):
    small, grow_small = in_child("tests.test_adaptive_cut", "cut_sized", str(tmp_path / "s"), 16)
    large, grow_large = in_child("tests.test_adaptive_cut", "cut_sized", str(tmp_path / "l"), 256, timeout=300)
    print(f"\ncut peak RSS rise: {grow_small:.1f} MiB for 16 MiB, {grow_large:.1f} MiB for 256 MiB")
    assert large > 10 * small
    assert grow_large < grow_small + 12  # the index grows (41 bytes a chunk); nothing else may
