"""Slot groups: a release of several images, each written to the inactive member of its own A/B pair.

``slots:`` in the configuration is either one pair (``{a: SPEC, b: SPEC}``: one group, named ``rootfs``, that
takes any single package) or named groups, each ``{a: SPEC, b: SPEC, package: GLOB}``; the first group holds the
root filesystem (the booted slot is read from it). The bootloader keeps its state per slot letter, so the groups
switch as one set: every group's ``b`` member is written, and one ``set_trial(b)`` arms them all.

``plan`` maps an offer's packages to the groups by their globs (``fnmatch`` on the Omaha package name): each
package to exactly one group, each group exactly one package, in the offer's order.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from .slots import KINDS, SlotSpec

DEFAULT_GROUP = "rootfs"
GROUP_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
MAX_GROUPS = 8
GROUP_KEYS = ("a", "b", "package")


@dataclass(frozen=True)
class SlotGroup:
    """One A/B pair and the Omaha package it takes (``package``: a glob; "" takes any single package)."""

    name: str
    a: SlotSpec
    b: SlotSpec
    package: str = ""

    @property
    def specs(self) -> dict[str, SlotSpec]:
        return {"a": self.a, "b": self.b}


class PlanError(Exception):
    """The offer's packages do not fit the configured groups; the message says which and why, in a line."""


def grouped(groups: tuple[SlotGroup, ...]) -> bool:
    """Whether the configuration names groups (the new form), rather than one implicit pair."""
    return bool(groups) and bool(groups[0].package)


def plan(packages, groups: tuple[SlotGroup, ...]) -> tuple[tuple[object, SlotGroup], ...]:
    """Each package of the offer (in its order) with the group it goes to. Raises ``PlanError``."""
    from .text import clean
    if not grouped(groups):
        if len(packages) != 1:
            raise PlanError(f"the offer has {len(packages)} packages; slot a/b takes exactly one (configure slot "
                            "groups for a release of several images)")
        return ((packages[0], groups[0]),)
    names = ", ".join(repr(clean(p.name, 80)) for p in packages[:MAX_GROUPS + 1]) or "none"
    globs = ", ".join(f"{g.name}: {g.package!r}" for g in groups)
    problems, taken, pairs = [], {}, []
    for pkg in packages:
        fits = [g for g in groups if fnmatch.fnmatchcase(pkg.name, g.package)]
        if not fits:
            problems.append(f"package {clean(pkg.name, 80)!r} matches no group")
        elif len(fits) > 1:
            problems.append(f"package {clean(pkg.name, 80)!r} matches groups {', '.join(g.name for g in fits)}")
        elif fits[0].name in taken:
            problems.append(f"group {fits[0].name} matches {taken[fits[0].name]!r} and {clean(pkg.name, 80)!r}")
        else:
            taken[fits[0].name] = clean(pkg.name, 80)
            pairs.append((pkg, fits[0]))
    problems += [f"group {g.name} gets no package" for g in groups if g.name not in taken]
    if problems:
        raise PlanError(f"the offered packages ({names}) do not fit the slot groups ({globs}): "
                        + "; ".join(problems[:3]))
    return tuple(pairs)


# ---------------------------------------------------------------------------------------------- configuration
def _spec(r, key: str, value, name: str) -> SlotSpec:
    if not isinstance(value, dict) or len(value) != 1:
        r.fail(key, f"slot {name} must be one of " + ", ".join("{%s: ...}" % k for k in KINDS))
    (kind, text), = value.items()
    if kind not in KINDS or not isinstance(text, str) or not text:
        r.fail(key, f"slot {name} must be one of " + ", ".join("{%s: ...}" % k for k in KINDS))
    return SlotSpec(kind, text)


def parse_slots(r, raw: dict, same) -> tuple[dict[str, SlotSpec], tuple[SlotGroup, ...]]:
    """The ``slots`` section (``raw``, read through the config reader ``r``): the first group's ``{a, b}`` and
    every group. ``same(spec, spec)`` says whether two specs name one device."""
    def group_like(value) -> bool:
        return isinstance(value, dict) and bool(set(map(str, value)) & set(GROUP_KEYS))

    if "a" in raw or "b" in raw or not raw:
        named = [str(k)[:40] for k in raw if k not in ("a", "b") and group_like(raw[k])]
        if named:
            r.fail(f"slots.{named[0]}", "mixes the two forms of slots: give either slots a and b, or named groups "
                                        "each with a, b and package")
        specs = {}
        for name in ("a", "b"):
            if name not in raw:
                r.fail("slots", f"slot {name} must be one of " + ", ".join("{%s: ...}" % k for k in KINDS))
            specs[name] = _spec(r, f"slots.{name}", raw[name], name)
        for extra in raw:
            if extra not in ("a", "b"):
                r.fail(f"slots.{str(extra)[:40]}", "only slots a and b exist")
        if same(specs["a"], specs["b"]):
            r.fail("slots.b", f"slots a and b are the same ({specs['a'].describe()[:80]} and "
                              f"{specs['b'].describe()[:80]}): an update would overwrite the running system")
        return specs, (SlotGroup(DEFAULT_GROUP, specs["a"], specs["b"]),)
    if len(raw) > MAX_GROUPS:
        r.fail("slots", f"{len(raw)} slot groups; at most {MAX_GROUPS}")
    groups, seen = [], []  # seen: (spec, where) of every member so far
    for key, value in raw.items():
        name = str(key)
        where = f"slots.{name[:40]}"
        if not isinstance(key, str) or not GROUP_NAME.fullmatch(name):
            r.fail(where, "a slot group's name is a lower-case letter, then up to 31 letters, digits, '_' or '-'")
        if not isinstance(value, dict):
            r.fail(where, "a slot group is a mapping: {a: SPEC, b: SPEC, package: GLOB}")
        for k in value:
            if k not in GROUP_KEYS:
                r.fail(f"{where}.{str(k)[:40]}", "unknown key (known: a, b, package)")
        for k in GROUP_KEYS:
            if value.get(k) is None:
                r.fail(where, f"group {name} needs {k} (a, b and package)")
        pattern = value["package"]
        if not isinstance(pattern, str) or not pattern.strip() or len(pattern) > 255:
            r.fail(f"{where}.package", "must be the package's name or a glob (e.g. \"rootfs*.img*\"), at most 255 "
                                       "characters")
        a, b = _spec(r, f"{where}.a", value["a"], "a"), _spec(r, f"{where}.b", value["b"], "b")
        for letter, spec in (("a", a), ("b", b)):
            for other, other_where in seen:
                if same(spec, other):
                    r.fail(f"{where}.{letter}", f"{spec.describe()[:80]} is also {other_where}: each slot of each "
                                                "group needs its own device")
            seen.append((spec, f"{where}.{letter}"))
        groups.append(SlotGroup(name, a, b, pattern))
    return groups[0].specs, tuple(groups)
