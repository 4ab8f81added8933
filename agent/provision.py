"""Factory provisioning: the boot state a new device starts from, written by the backends' own code.

Slot ``slot`` good, the other slot bad (empty), nothing armed. With ``image_root`` no running system is
involved: the paths in the configuration are taken inside that directory (the grubenv and sim env files, the
U-Boot ``fw_env.config`` and the env files it names, the ESP of systemd-boot's entries), except for the gpt backend, whose state is the partition
table: there ``image_root`` is the disk image file itself. Running it twice gives the same bytes.
"""
from __future__ import annotations

import os
import sys
import tempfile

from .boot import other
from .config import Config, load
from .omaha import versions
from .slots import detect_booted

DEFAULT_FW_CONFIG = "/etc/fw_env.config"


class ProvisionError(Exception):
    """Provisioning cannot go ahead; the message says why and what to do."""


def inside(root: str | None, path: str) -> str:
    """``path`` as seen from the image tree at ``root`` (itself without one)."""
    return os.path.join(root, path.lstrip("/")) if root else path


def _parent_exists(path: str, what: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ProvisionError(f"{directory} does not exist: create it (or mount the partition that holds the "
                             f"{what}) and run provision again")


def _fw_config_inside(source: str, root: str, out) -> list[tuple[str, int]]:
    """Writes ``source`` (an fw_env.config) to ``out`` with each env path taken inside ``root``; returns the
    (path, size) of each env copy."""
    try:
        with open(source) as f:
            lines = f.read(64 * 1024).splitlines()
    except OSError as exc:
        raise ProvisionError(f"{source}: cannot read the U-Boot env configuration ({exc.strerror}): install "
                             "fw_env.config in the image first") from None
    copies = []
    for line in lines:
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 3:
            raise ProvisionError(f"{source}: {line.strip()[:80]!r} is not 'FILE OFFSET SIZE'")
        try:
            size = int(fields[2], 0)
        except ValueError:
            raise ProvisionError(f"{source}: {fields[2][:40]!r} is not a size") from None
        fields[0] = inside(root, fields[0])
        copies.append((fields[0], size))
        out.write(" ".join(fields) + "\n")
    if not copies:
        raise ProvisionError(f"{source}: names no env file")
    return copies


def _blank_copies(copies: list[tuple[str, int]]) -> None:
    """A missing env file is created blank (zeros, its configured size), as U-Boot would find unwritten storage."""
    for path, size in copies:
        if not os.path.exists(path):
            _parent_exists(path, "U-Boot env")
            with open(path, "wb") as f:
                f.truncate(size)


def _uboot(config: Config, slot: str, root: str | None) -> str:
    from .boot.uboot import UBootBoot
    source = inside(root, config.boot.fw_config or DEFAULT_FW_CONFIG)
    with tempfile.NamedTemporaryFile("w", prefix="omaha-agent-fw_env.", suffix=".config") as tmp:
        copies = _fw_config_inside(source, root or "", tmp)
        tmp.flush()
        _blank_copies(copies)
        UBootBoot(tmp.name).initialize(slot)
    return f"U-Boot env {' and '.join(path for path, _ in copies)}"


def provision(config: Config, slot: str, version: str, image_root: str | None = None,
              index: str | None = None) -> str:
    """Writes the factory boot state; returns one line saying what was written where."""
    if slot not in ("a", "b"):
        raise ProvisionError(f"unknown slot {slot!r}: use --slot a or --slot b")
    why = versions.problem(version)
    if why:
        raise ProvisionError(f"--version: {why}")
    raw_index = _read_index(index) if index else None
    backend = config.boot.backend
    if image_root is None:
        booted = detect_booted(config.slots)
        if booted is not None and booted != slot:
            raise ProvisionError(f"slot {booted} runs: provisioning slot {slot} would mark the running slot bad; "
                                 f"use --slot {booted}, or --image-root for an image being built")
    elif backend == "gpt":
        if not os.path.isfile(image_root):
            raise ProvisionError(f"{image_root} is not a disk image file: the gpt backend keeps its state in the "
                                 "partition table, so pass the disk image as --image-root")
    elif not os.path.isdir(image_root):
        raise ProvisionError(f"{image_root} is not a directory: pass the image tree as --image-root")
    if backend == "grubenv":
        from .boot.grubenv import GrubEnvBoot
        path = inside(image_root, config.boot.env)
        _parent_exists(path, "GRUB environment block")
        GrubEnvBoot(path).initialize(slot)
        where = f"GRUB env block {path}"
    elif backend == "sim":
        from .boot.sim import SimBoot
        path = inside(image_root, config.boot.env)
        _parent_exists(path, "simulated bootloader env")
        SimBoot(path).initialize(slot, version)
        where = f"sim env {path}"
    elif backend == "bls":
        from .boot.bls import BlsBoot
        from .boot import BootError
        esp = inside(image_root, config.boot.esp)
        _parent_exists(os.path.join(esp, "loader", "entries", "x"), "systemd-boot entries")
        try:
            BlsBoot(esp).initialize(slot)
        except BootError as exc:
            raise ProvisionError(str(exc)) from None
        where = f"systemd-boot entries in {esp}/loader/entries"
    elif backend == "gpt":
        from .boot.gpt import GptBoot
        disk = image_root or config.boot.disk
        GptBoot(disk, dict(config.boot.labels)).initialize(slot)
        labels = dict(config.boot.labels)
        where = f"GPT attributes of {labels[slot]} and {labels[other(slot)]} on {disk}"
    else:
        where = _uboot(config, slot, image_root)
    kept = "recorded in the env" if backend == "sim" else \
        f"the agent reads it from {config.app.version_file or 'app.version'}"
    line = f"{where}: slot {slot} good (version {version}, {kept}), slot {other(slot)} bad, nothing armed"
    if raw_index is not None:
        line += "; " + _keep_index(config, slot, raw_index, image_root if backend != "gpt" else None)
    return line


def _read_index(path: str) -> bytes:
    """The factory image's chunk index, checked (before anything is written)."""
    from .adaptive.index import BadIndex, parse
    from .adaptive.store import MAX_INDEX
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_INDEX + 1)
        if len(raw) > MAX_INDEX:
            raise BadIndex(f"larger than {MAX_INDEX} bytes")
        parse(raw)
    except OSError as exc:
        raise ProvisionError(f"--index {path}: cannot read it ({exc.strerror or exc})") from None
    except BadIndex as exc:
        raise ProvisionError(f"--index {path}: not a chunk index ({exc}); give the .cidx file the release was "
                             "cut with") from None
    return raw


def _keep_index(config: Config, slot: str, raw: bytes, root: str | None) -> str:
    """Saves the factory image's chunk index as slot ``slot``'s, under the state directory."""
    from .adaptive.index import parse
    from .adaptive.store import ChunkStore
    index = parse(raw)
    store = ChunkStore(inside(root, config.state_dir))
    try:
        store.drop("a" if slot == "b" else "b")
        store.save(slot, raw)
    except OSError as exc:
        raise ProvisionError(f"cannot save the chunk index under {store.dir} ({exc.strerror or exc})") from None
    return f"chunk index of slot {slot} kept ({index.count} chunks, image {index.image_sha256[:16]}…)"



def main(args) -> int:
    """``omaha-agent provision``: one line on stdout, or one line on stderr and exit 1."""
    try:
        print(provision(load(args.config), args.slot, args.version, args.image_root, getattr(args, "index", None)))
    except ProvisionError as exc:
        print(f"omaha-agent: {exc}", file=sys.stderr)
        return 1
    return 0
