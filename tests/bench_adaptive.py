"""``make bench``'s adaptive-update figures: what a device holding the old image would fetch for the new one.

Two pairs of ext4 root file systems, each made deterministically (``mke2fs -d`` with a fixed UUID and hash seed,
``E2FSPROGS_FAKE_TIME`` and ``SOURCE_DATE_EPOCH``), cut with ``agent.adaptive.cut`` (zstd level
``BENCH_ADAPTIVE_LEVEL``, 19 by default, 3 under ``BENCH_QUICK``):

* **real** (skipped under ``BENCH_QUICK``; needs root, mmdebstrap and the Debian mirror): Debian 12 ``minbase``
  with a fixed package set from ``bookworm`` alone (old), and the same set from ``bookworm``,
  ``bookworm-updates`` and ``bookworm-security`` with the kernel held at bookworm's (new): a monthly security
  update. The root trees, images and cuts are cached under ``build/adaptive/`` by a key of their inputs.
* **synthetic**: a generated tree of text, binaries and zero-filled files, and the same tree with 3 % of the
  files edited, a few added early in directory order (so the files after them move) and a few removed.

Index-level figures per pair (``PAIR`` is ``real`` or ``synthetic``): ``adaptive_PAIR_full_zstd_mb`` (the new
chunk data file: what the full path downloads), ``adaptive_PAIR_chunk_wire_mb`` (the stored bytes of every chunk of
the new index whose digest the old index does not hold and that is not all zero: what a device fetches, before
range overhead), ``adaptive_PAIR_chunk_wire_ratio``. Then the device side, measured (``device_figures``):
``adaptive_PAIR_wire_mb`` (what the link really carried), ``_wire_ratio``, ``_requests``, ``_wall_s``, ``_cpu_s``,
``_peak_rss_mib``, ``_correct``; the real pair's (or under ``BENCH_QUICK`` the synthetic pair's, as
``adaptive_pair`` says) are also given without a prefix, as the issue names them.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
import time

from agent.adaptive import index
from agent.adaptive.cut import cut

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "build", "adaptive")
PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
FAKE_TIME = 1700000000  # 2023-11-14: every timestamp mke2fs writes, and the trees' mtimes
FS_UUID = "5e1f0c2a-3b4d-4c6e-8f70-91a2b3c4d5e6"
HASH_SEED = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"
MB = 1e6
REAL_PACKAGES = ("systemd-sysv,udev,openssh-server,python3,iproute2,curl,kmod,initramfs-tools,"
                 "linux-image-amd64")
OLD_SOURCES = ("deb http://deb.debian.org/debian bookworm main",)
NEW_SOURCES = OLD_SOURCES + ("deb http://deb.debian.org/debian bookworm-updates main",
                             "deb http://deb.debian.org/debian-security bookworm-security main")
HOLD_KERNEL = "Package: linux-image-*\nPin: release n=bookworm\nPin-Priority: 1001\n"


# ---------------------------------------------------------------------------------------------- images
def mkfs(tree: str, image: str, size_mib: int) -> None:
    """A deterministic ext4 image of ``tree``: the same tree gives the same bytes. mke2fs 1.47.0 copies each
    file's ctime (the moment the tree was written, which no one can set) into its inode, so every used inode's
    ctime is then set to ``FAKE_TIME`` with debugfs."""
    if os.path.exists(image):
        os.unlink(image)
    env = dict(os.environ, PATH=PATH, E2FSPROGS_FAKE_TIME=str(FAKE_TIME), SOURCE_DATE_EPOCH=str(FAKE_TIME))
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-L", "rootfs", "-U", FS_UUID,
                    "-E", f"hash_seed={HASH_SEED},root_owner=0:0,nodiscard", "-d", tree, image, f"{size_mib}M"],
                   check=True, env=env, capture_output=True)
    script = image + ".debugfs"
    with open(script, "w") as f:
        for ino in used_inodes(image, env):
            f.write(f"sif <{ino}> ctime @{FAKE_TIME}\n")
    subprocess.run(["debugfs", "-w", "-f", script, image], check=True, env=env, capture_output=True)
    os.unlink(script)


def used_inodes(image: str, env: dict) -> list[int]:
    """The inode numbers in use, from dumpe2fs's per-group free ranges."""
    out = subprocess.run(["dumpe2fs", image], check=True, env=env, capture_output=True, text=True).stdout
    per_group = int(re.search(r"^Inodes per group:\s+(\d+)", out, re.M).group(1))
    used, group = [], -1
    for line in out.splitlines():
        if re.match(r"Group \d+:", line):
            group += 1
        m = re.match(r"\s+Free inodes: (.*)", line)
        if m and group >= 0:
            free = set()
            for part in filter(None, (p.strip() for p in m.group(1).split(","))):
                a, _, b = part.partition("-")
                free.update(range(int(a), int(b or a) + 1))
            first = group * per_group + 1
            used.extend(i for i in range(first, first + per_group) if i not in free)
    return used


def _text(rng: random.Random, size: int, words: list[str]) -> bytes:
    out, n = [], 0
    while n < size:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) + "\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def _binary(rng: random.Random, size: int) -> bytes:
    """Half random, half repeated pieces of itself: compresses like machine code (about 2:1)."""
    seed = rng.randbytes(max(1, size // 2))
    out = bytearray(seed)
    while len(out) < size:
        a = rng.randrange(len(seed))
        out += seed[a:a + rng.randint(16, 256)]
    return bytes(out[:size])


def synthetic_tree(root: str, total_mib: int, new: bool, seed: int = 26) -> None:
    """The synthetic pair's tree: ``new`` edits 3 % of the files, adds 1 % early in directory order (so the
    files after them are allocated elsewhere) and removes 1 %."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(1, 6)).hex() for _ in range(3000)]
    files, total = [], 0
    while total < total_mib << 20:
        size = int(min(4 << 20, max(200, rng.lognormvariate(9.5, 1.6))))
        kind = rng.choices(("text", "bin", "zero"), (0.45, 0.5, 0.05))[0]
        files.append((f"d{len(files) // 40:03d}/f{len(files) % 40:02d}", size, kind, rng.random()))
        total += size
    edits = random.Random(seed + 1)
    for i, (name, size, kind, fseed) in enumerate(files):
        fate = edits.random()
        if new and fate < 0.01:
            continue  # removed
        data_rng = random.Random(fseed)
        data = (_text(data_rng, size, words) if kind == "text" else _binary(data_rng, size) if kind == "bin"
                else bytes(size))
        if new and fate < 0.04:  # edited: a few bytes changed and a few inserted, somewhere inside
            at = edits.randrange(max(1, len(data)))
            data = data[:at] + b"patched %d\n" % i + data[at + 20:]
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if new and fate > 0.99:  # a new file just before this one (same directory, sorted first)
            extra = os.path.join(os.path.dirname(path), "a" + os.path.basename(name))
            with open(extra, "wb") as f:
                f.write(_binary(random.Random(fseed + 1), max(4096, size // 2)))
            os.utime(extra, (FAKE_TIME, FAKE_TIME))
        with open(path, "wb") as f:
            f.write(data)
        os.utime(path, (FAKE_TIME, FAKE_TIME))
    for d in sorted({os.path.dirname(os.path.join(root, n)) for n, *_ in files}) + [root]:
        os.utime(d, (FAKE_TIME, FAKE_TIME))


def synthetic_pair(workdir: str, image_mib: int) -> tuple[str, str]:
    images = []
    for name, new in (("old", False), ("new", True)):
        tree = os.path.join(workdir, f"tree-{name}")
        shutil.rmtree(tree, ignore_errors=True)
        os.makedirs(tree)
        synthetic_tree(tree, image_mib // 2, new)
        image = os.path.join(workdir, f"synthetic-{name}.ext4")
        mkfs(tree, image, image_mib)
        shutil.rmtree(tree)
        images.append(image)
    return images[0], images[1]


def _mmdebstrap(sources: tuple[str, ...], tar: str, hold_kernel: bool, debs: str) -> None:
    hooks = [f"--setup-hook=mkdir -p {debs} \"$1\"/var/cache/apt/archives/",
             f"--setup-hook=sync-in {debs} /var/cache/apt/archives/"]
    if hold_kernel:
        hooks.append("--setup-hook=mkdir -p \"$1\"/etc/apt/preferences.d && printf '%s' '" + HOLD_KERNEL +
                     "' > \"$1\"/etc/apt/preferences.d/hold-kernel")
    hooks += [f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
              "--customize-hook=rm -rf \"$1\"/var/cache/apt/archives/*.deb \"$1\"/var/lib/apt/lists/*"]
    env = dict(os.environ, PATH=PATH, SOURCE_DATE_EPOCH=str(FAKE_TIME))
    subprocess.run(["mmdebstrap", "--mode=root", "--variant=minbase", f"--include={REAL_PACKAGES}",
                    "--skip=download/empty", *hooks, "bookworm", tar + ".part.tar", *sources],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.replace(tar + ".part.tar", tar)  # (mmdebstrap picks the format by the name's ending)


def real_pair(image_mib: int) -> tuple[str, str]:
    """The real pair's images under build/adaptive/ (built once: mmdebstrap, then mke2fs -d)."""
    key = hashlib.sha256(repr((REAL_PACKAGES, OLD_SOURCES, NEW_SOURCES, HOLD_KERNEL, image_mib, FS_UUID,
                               HASH_SEED, FAKE_TIME, 1)).encode()).hexdigest()[:12]
    os.makedirs(CACHE, exist_ok=True)
    images = []
    for name, sources, hold in (("old", OLD_SOURCES, False), ("new", NEW_SOURCES, True)):
        image = os.path.join(CACHE, f"real-{name}-{key}.ext4")
        images.append(image)
        if os.path.exists(image):
            continue
        tar = os.path.join(CACHE, f"real-{name}-{key}.tar")
        if not os.path.exists(tar):
            started = time.monotonic()
            _mmdebstrap(sources, tar, hold, os.path.join(CACHE, "debs"))
            print(f"adaptive: mmdebstrap of the {name} tree took {time.monotonic() - started:.0f} s", flush=True)
        tree = os.path.join(CACHE, f"tree-{name}")
        shutil.rmtree(tree, ignore_errors=True)
        os.makedirs(tree)
        subprocess.run(["tar", "-C", tree, "--numeric-owner", "-xpf", tar], check=True)
        mkfs(tree, image + ".part", image_mib)
        os.replace(image + ".part", image)
        shutil.rmtree(tree)
    return images[0], images[1]


# ---------------------------------------------------------------------------------------------- figures
def read_index(path: str) -> index.ChunkIndex:
    with open(path, "rb") as f:
        return index.parse(f.read())


def wire_bytes(old: index.ChunkIndex, new: index.ChunkIndex) -> tuple[int, int]:
    """(stored bytes, chunks) of the new index's chunks a device holding the old image fetches: neither among the
    old image's chunks nor all zero. Each occurrence counts (a plan fetches a chunk wherever it is needed)."""
    have = {rec[3] for rec in old}
    wire = count = 0
    for length, stored, flags, digest in new:
        if not flags & index.FLAG_ZERO and digest not in have:
            wire += stored
            count += 1
    return wire, count


def cut_cached(image: str, level: int) -> tuple[str, str, float]:
    """(index, data, seconds) of ``image`` cut at ``level`` (cached beside the image: a cut is deterministic)."""
    stem = f"{os.path.basename(image)}.L{level}"
    idx, data = os.path.join(os.path.dirname(image), stem + ".cidx"), os.path.join(os.path.dirname(image),
                                                                                   stem + ".czst")
    if os.path.exists(idx) and os.path.exists(data):
        return idx, data, 0.0
    result = cut(image, os.path.dirname(image), name=stem, level=level)
    return result.index_path, result.data_path, result.seconds


def pair_figures(label: str, old: str, new: str, level: int, results: dict) -> dict:
    old_idx, _, old_s = cut_cached(old, level)
    new_idx, new_data, new_s = cut_cached(new, level)
    a, b = read_index(old_idx), read_index(new_idx)
    wire, chunks = wire_bytes(a, b)
    full = os.path.getsize(new_data)
    fig = {"image_mb": b.image_size / MB, "chunks": len(b), "zero_chunks": sum(r[2] & 1 for r in b),
           "full_zstd_mb": full / MB, "chunk_wire_mb": wire / MB, "wire_chunks": chunks,
           "chunk_wire_ratio": wire / full,
           "index_mb": len(b.raw) / MB, "level": level}
    if new_s:
        fig["cut_mb_s"] = b.image_size / MB / new_s
    for k, v in fig.items():
        results[f"adaptive_{label}_{k}"] = round(v, 4) if isinstance(v, float) else v
    cut_note = f", cut at {fig['cut_mb_s']:.0f} MB/s" if "cut_mb_s" in fig else " (cuts cached)"
    print(f"adaptive ({label} pair, zstd {level}): {fig['image_mb']:.0f} MB image in {len(b)} chunks "
          f"({fig['zero_chunks']} zero){cut_note}; full path {fig['full_zstd_mb']:.1f} MB, adaptive "
          f"{fig['chunk_wire_mb']:.1f} MB in {chunks} chunks = {fig['chunk_wire_ratio']:.3f} of it; index "
          f"{fig['index_mb']:.2f} MB", flush=True)
    return {"old": old, "new": new, "old_index": old_idx, "new_index": new_idx, "new_data": new_data}


def device_figures(label: str, pair: dict, workdir: str, results: dict) -> None:
    """The device side on a pair (``tests/bench_adaptive_device.py``): the new image applied in a child process onto
    a slot holding the old one, from the chunk files nginx serves: ``adaptive_<label>_wire_mb`` (what the link
    carried: the index and every range answer, multipart overhead included), ``_wire_ratio`` (of the chunk data
    file), ``_requests``, ``_wall_s`` and ``_cpu_s`` (the index fetch and plan included), ``_peak_rss_mib`` and
    ``_correct`` (the slot equals the new image byte for byte)."""
    from . import bench_adaptive_device
    bench_adaptive_device.measure(label, pair, workdir, results)


def file_ranges(image: str, path: str) -> list[tuple[int, int]]:
    """The byte ranges (start, end) of the blocks holding ``path`` in an ext4 ``image`` (debugfs ``blocks``)."""
    out = subprocess.run(["debugfs", "-R", f"blocks {path}", image], check=True, capture_output=True, text=True,
                         env=dict(os.environ, PATH=PATH)).stdout.split()
    return [(int(b) * 4096, int(b) * 4096 + 4096) for b in out if b.isdigit()]


def wire_within(old: index.ChunkIndex, new: index.ChunkIndex, ranges: list[tuple[int, int]]) -> int:
    """The wire bytes of the new index's fetched chunks that overlap ``ranges``."""
    have, offs = {rec[3] for rec in old}, new.offsets()
    starts = sorted(ranges)
    total, j = 0, 0
    for i, (length, stored, flags, digest) in enumerate(new):
        a, b = offs[i], offs[i] + length
        while j < len(starts) and starts[j][1] <= a:
            j += 1
        if j < len(starts) and starts[j][0] < b and not flags & index.FLAG_ZERO and digest not in have:
            total += stored
    return total


def image_advice(old: str, new: str, workdir: str, results: dict) -> None:
    """The two effects the README's image-building advice rests on, on the real pair at zstd level 3: the share of
    the wire that is the regenerated (compressed) initramfs, and what a non-deterministic mkfs (random UUID and
    hash seed, real timestamps) of the new tree adds."""
    a, b = (read_index(cut_cached(p, 3)[0]) for p in (old, new))
    base = wire_bytes(a, b)[0]
    initrd = [n for n in subprocess.run(["debugfs", "-R", "ls -p /boot", new], capture_output=True, text=True,
                                        env=dict(os.environ, PATH=PATH)).stdout.split("/")
              if n.startswith("initrd.img-")]
    rd = sum(wire_within(a, b, file_ranges(new, f"/boot/{n}")) for n in initrd)
    tar = new.replace(".ext4", ".tar")
    tree, loose = os.path.join(workdir, "tree-loose"), os.path.join(workdir, "loose.ext4")
    os.makedirs(tree)
    subprocess.run(["tar", "-C", tree, "--numeric-owner", "-xpf", tar], check=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-L", "rootfs", "-d", tree, loose,
                    f"{os.path.getsize(new) >> 20}M"], check=True, capture_output=True,
                   env=dict(os.environ, PATH=PATH))
    shutil.rmtree(tree)
    result = cut(loose, workdir, name="loose", level=3)
    c = read_index(result.index_path)
    loose_wire, rebuild = wire_bytes(a, c)[0], wire_bytes(b, c)[0]
    results.update({"adaptive_real_l3_wire_mb": round(base / MB, 2),
                    "adaptive_real_l3_initramfs_wire_mb": round(rd / MB, 2),
                    "adaptive_real_l3_nondeterministic_mkfs_wire_mb": round(loose_wire / MB, 2),
                    "adaptive_real_l3_nondeterministic_rebuild_wire_mb": round(rebuild / MB, 2)})
    print(f"adaptive (real pair, zstd 3): wire {base / MB:.1f} MB, of which the regenerated initramfs "
          f"{rd / MB:.1f} MB; the new tree made with a plain mke2fs -d (random UUID and hash seed, real time): "
          f"{loose_wire / MB:.1f} MB; the same tree made both ways (a rebuild with nothing changed): "
          f"{rebuild / MB:.1f} MB (0 when both are deterministic)", flush=True)


def headline(results: dict, label: str) -> None:
    """The figures the issue names, unprefixed, from ``label``'s pair (the real one when it was built)."""
    results["adaptive_pair"] = label
    for k in ("full_zstd_mb", "wire_mb", "wire_ratio", "requests", "wall_s", "cpu_s", "peak_rss_mib", "correct"):
        if f"adaptive_{label}_{k}" in results:
            results[f"adaptive_{k}"] = results[f"adaptive_{label}_{k}"]


def run(quick: bool, workdir: str, results: dict) -> None:
    level = int(os.environ.get("BENCH_ADAPTIVE_LEVEL") or (3 if quick else 19))
    synthetic_mib = 256 if quick else 1024
    started = time.monotonic()
    old, new = synthetic_pair(workdir, synthetic_mib)
    print(f"adaptive: synthetic pair of {synthetic_mib} MiB ext4 images built in {time.monotonic() - started:.0f} s",
          flush=True)
    device_figures("synthetic", pair_figures("synthetic", old, new, level, results), workdir, results)
    headline(results, "synthetic")
    if quick:
        return
    try:
        started = time.monotonic()
        old, new = real_pair(1024)
        print(f"adaptive: real pair ready in {time.monotonic() - started:.0f} s (cached under {CACHE})", flush=True)
    except (subprocess.CalledProcessError, OSError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        why = err.decode(errors="replace").strip().splitlines()[-1:] or [str(exc)]
        print(f"adaptive: real pair not built ({why[0][:200]}); its figures are missing", flush=True)
        results["adaptive_real"] = f"not built: {why[0][:200]}"
        return
    pair = pair_figures("real", old, new, level, results)
    device_figures("real", pair, workdir, results)
    headline(results, "real")
    image_advice(old, new, workdir, results)
