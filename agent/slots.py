"""The A/B slots: where each one lives, which one is running, and the checks before one is written.

A slot is configured as ``{device: /dev/...}``, ``{partlabel: ROOT-A}``, ``{partuuid: ...}`` or
``{file: PATH}`` (a regular file standing in for a partition). Block devices are found through udev
(pyudev, imported only when a partition has to be looked up).

Safety rules enforced before a byte is written: never the booted slot; never a mounted target; never a
payload larger than the target.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass

log = logging.getLogger("omaha-agent")

KINDS = ("device", "partlabel", "partuuid", "file")


class SlotError(Exception):
    """A slot cannot be found or must not be written; the message says which and why."""


@dataclass(frozen=True)
class SlotSpec:
    kind: str
    value: str

    def describe(self) -> str:
        return f"{self.kind}={self.value}"


def _udev_lookup(prop: str, value: str) -> str | None:
    try:
        import pyudev
        context = pyudev.Context()
        for device in context.list_devices(subsystem="block", DEVTYPE="partition"):
            if (device.properties.get(prop) or "").lower() == value.lower():
                return device.device_node
    except Exception:  # no udev here (a container, a chroot): the slot is simply not found
        return None
    return None


def resolve(spec: SlotSpec) -> str:
    """The path to open for ``spec``; ``SlotError`` if it does not exist."""
    if spec.kind in ("file", "device"):
        path = spec.value
    elif spec.kind == "partlabel":
        link = f"/dev/disk/by-partlabel/{spec.value}"
        path = link if os.path.exists(link) else _udev_lookup("ID_PART_ENTRY_NAME", spec.value)
    elif spec.kind == "partuuid":
        link = f"/dev/disk/by-partuuid/{spec.value.lower()}"
        path = link if os.path.exists(link) else _udev_lookup("ID_PART_ENTRY_UUID", spec.value)
    else:
        raise SlotError(f"unknown slot kind {spec.kind!r} (use one of {', '.join(KINDS)})")
    if not path or not os.path.exists(path):
        raise SlotError(f"slot {spec.describe()} not found")
    return os.path.realpath(path)


def kernel_cmdline(path: str = "/proc/cmdline") -> dict[str, str]:
    try:
        with open(path) as f:
            words = f.read().split()
    except OSError:
        return {}
    return dict(w.split("=", 1) if "=" in w else (w, "") for w in words)


def _identity(path: str) -> tuple:
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return ("blk", st.st_rdev)
    return ("file", st.st_dev, st.st_ino)


def booted_from_cmdline(specs: dict[str, SlotSpec], cmdline: dict[str, str]) -> str | None:
    explicit = cmdline.get("omaha_agent.slot", "").lower()
    if explicit in specs:
        return explicit
    root = cmdline.get("root", "")
    kind, _, value = root.partition("=")
    wanted = {"PARTUUID": "partuuid", "PARTLABEL": "partlabel"}.get(kind)
    if wanted:
        for slot, spec in specs.items():
            if spec.kind == wanted and spec.value.lower() == value.lower():
                return slot
    if root.startswith("/dev/"):
        for slot, spec in specs.items():
            if spec.kind == "device" and os.path.realpath(spec.value) == os.path.realpath(root):
                return slot
    return None


def booted_from_root_device(specs: dict[str, SlotSpec], root: str = "/") -> str | None:
    """The slot whose block device holds ``root`` (its st_dev), when the slots are block devices."""
    try:
        root_dev = os.stat(root).st_dev
    except OSError:
        return None
    for slot, spec in specs.items():
        try:
            st = os.stat(resolve(spec))
        except (SlotError, OSError):
            continue
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == root_dev:
            return slot
    return None


def detect_booted_from(specs: dict[str, SlotSpec], cmdline_path: str = "/proc/cmdline") -> tuple[str | None, str]:
    """The booted slot and where it was read: the kernel command line (``omaha_agent.slot=``, then ``root=``),
    else the block device holding ``/`` (fragile under dm-verity or an overlay root, so the source is named)."""
    readable = os.access(cmdline_path, os.R_OK)
    cmdline = kernel_cmdline(cmdline_path)
    slot = booted_from_cmdline(specs, cmdline)
    if slot:
        key = "omaha_agent.slot" if cmdline.get("omaha_agent.slot", "").lower() == slot else "root"
        return slot, f"the kernel command line ({key}={cmdline[key]})"
    why = "names no slot" if readable else "is unreadable"
    slot = booted_from_root_device(specs)
    if slot:
        return slot, f"the root filesystem's device ({cmdline_path} {why})"
    return None, f"neither {cmdline_path} (it {why}) nor the root filesystem's device"


def detect_booted(specs: dict[str, SlotSpec], cmdline_path: str = "/proc/cmdline") -> str | None:
    """The booted slot (see ``detect_booted_from``); logs which source said so."""
    slot, source = detect_booted_from(specs, cmdline_path)
    if slot:
        log.info("booted slot %s, read from %s", slot, source)
    else:
        log.warning("cannot tell the booted slot: %s names one", source)
    return slot


def _mounted_devices(mountinfo: str) -> set[int]:
    devices = set()
    try:
        with open(mountinfo) as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and ":" in fields[2]:
                    major, minor = fields[2].split(":")
                    devices.add(os.makedev(int(major), int(minor)))
    except OSError:
        pass
    return devices


def capacity(path: str) -> int:
    """Bytes a slot can hold: a block device's size, or a slot file's current size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def check_target(target: str, specs: dict[str, SlotSpec], booted: str | None, payload_size: int,
                 mountinfo: str = "/proc/self/mountinfo") -> str:
    """Refuses a write that could hurt the running system; returns the target's path."""
    if target not in specs:
        raise SlotError(f"no slot {target!r} configured")
    if booted == target:
        raise SlotError(f"slot {target} is the booted slot; it is never written")
    path = resolve(specs[target])
    ident = _identity(path)
    if booted in specs:
        try:
            same = _identity(resolve(specs[booted])) == ident
        except (SlotError, OSError):
            same = False
        if same:
            raise SlotError(f"slot {target} ({path}) is the same device as the booted slot {booted}")
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        if st.st_rdev in _mounted_devices(mountinfo):
            raise SlotError(f"slot {target} ({path}) is mounted; unmount it before an update")
        if st.st_rdev == os.stat("/").st_dev:
            raise SlotError(f"slot {target} ({path}) holds the running root filesystem")
    elif not stat.S_ISREG(st.st_mode):
        raise SlotError(f"slot {target} ({path}) is neither a block device nor a regular file")
    size = capacity(path)
    if payload_size > size:
        raise SlotError(f"payload of {payload_size} bytes is larger than slot {target} ({size} bytes)")
    return path
