"""The daemon's status snapshot as D-Bus values (a{sv}, property values). Imports dbus-next's Variant only."""
from __future__ import annotations

from dbus_next import Variant

# property name -> (snapshot key, D-Bus signature)
PROPERTIES = {
    "Operation": ("operation", "s"),
    "Progress": ("progress", "d"),
    "CurrentVersion": ("current_version", "s"),
    "NewVersion": ("new_version", "s"),
    "NewSize": ("new_size", "t"),
    "BytesDownloaded": ("bytes_downloaded", "t"),
    "PlannedBytes": ("planned_bytes", "t"),
    "SavedBytes": ("saved_bytes", "t"),
    "LastCheckTime": ("last_check", "x"),
    "NextCheckTime": ("next_check", "x"),
    "BootedSlot": ("booted_slot", "s"),
    "LastError": ("last_error", "s"),
    "Slots": ("slots", "a{sa{sv}}"),
    "RebootVersion": ("reboot_version", "s"),
    "RebootTime": ("reboot_time", "x"),
    "RebootWaitingFor": ("reboot_waiting_for", "s"),
}


def variant(value) -> Variant:
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        return Variant("x", value)
    if isinstance(value, float):
        return Variant("d", value)
    if isinstance(value, dict):
        return Variant("a{sv}", {str(k): variant(v) for k, v in value.items()})
    return Variant("s", "" if value is None else str(value))


def slots_value(slots: dict) -> dict:
    """``{"a": {"state": "good", "tries_left": 0, "version": "1.0.0"}, ...}`` as a{sa{sv}}; a bootloader read
    error arrives as ``{"error": msg}`` and becomes an empty map (the message is in LastError and the log)."""
    return {name: {k: variant(v) for k, v in entry.items() if v is not None}
            for name, entry in slots.items() if isinstance(entry, dict)}


def property_value(name: str, snapshot: dict):
    key, signature = PROPERTIES[name]
    value = snapshot.get(key)
    if signature == "s":
        return "" if value is None else str(value)
    if signature == "d":
        return float(value or 0.0)
    if signature in ("t", "x"):
        return max(0, int(value or 0)) if signature == "t" else int(value or 0)
    return slots_value(value or {})


def status_dict(snapshot: dict) -> dict:
    out = {key: variant(value) for key, value in snapshot.items() if key != "slots"}
    out["last_check"] = Variant("x", int(snapshot.get("last_check") or 0))
    out["next_check"] = Variant("x", int(snapshot.get("next_check") or 0))
    out["new_size"] = Variant("t", max(0, int(snapshot.get("new_size") or 0)))
    out["bytes_downloaded"] = Variant("t", max(0, int(snapshot.get("bytes_downloaded") or 0)))
    for key in ("planned_bytes", "saved_bytes"):
        out[key] = Variant("t", max(0, int(snapshot.get(key) or 0)))
    out["progress"] = Variant("d", float(snapshot.get("progress") or 0.0))
    out["rate"] = Variant("d", float(snapshot.get("rate") or 0.0))
    out["slots"] = Variant("a{sa{sv}}", slots_value(snapshot.get("slots") or {}))
    return out


def unwrap(value):
    """Variants (nested) back to plain Python values, for the client side."""
    if isinstance(value, Variant):
        return unwrap(value.value)
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value
