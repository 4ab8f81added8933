"""The daemon's durable state as typed records, one JSON file replaced atomically, and the one way to save it.

Records: the trial (``Trial``), the staged update (``Staged``: written and verified, not armed), the download
checkpoint (``Checkpoint``), the blocked version (``Blocked``), the
version the other slot keeps (``Fallback``, what a rollback boots) and the event queue (``EventRecord``). Events leave the queue only once the server acknowledged them; a resend keeps
its original request id and creation time (for ``X-Request-Age``). The queue is bounded: past ``MAX_EVENTS`` the
oldest progress events (13/1, 14/1) go first, outcomes (3/x) last.

``Store.commit`` is the one save: it snapshots the state on the event loop and writes in a thread, one write at
a time; a snapshot older than one already written is never written over it. A file damaged by hand, by a bug or
by a failing disk never stops the daemon: what is malformed is dropped with a warning that names it. Text is
held to the rules it had when it entered (``text.clean``, ``versions.problem``): ``last_error`` that breaks them
is repaired, a record whose text breaks them is dropped (a lone surrogate or a control character in the file
cannot reach D-Bus, the log or a terminal).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

from .atomic import write_atomic
from .omaha.model import Event
from .omaha import versions
from .omaha.request import cohort_value_ok
from .text import clean, is_clean

STATE_FILE = "state.json"
MAX_EVENTS = 64
MAX_FILE = 4 << 20
MAX_LAST_ERROR = 2000  # characters
MAX_FIELD = 4096  # characters of any other text in the file (a URL in an event is the longest)
_VERSIONS = ("version", "previous_version", "nextversion", "previousversion")
SLOTS = ("a", "b")


@dataclass(frozen=True)
class Trial:
    """An installed update: armed once its slot is set for a trial boot."""

    slot: str
    version: str
    previous_version: str = "0.0.0.0"
    armed: bool = False
    untracked: bool = False  # found running unconfirmed without a record (state lost, or another tool)
    replaced: bool = False  # a new install is replacing it: if it turns out unbootable, that was on purpose
    rollback: bool = False  # an operator's rollback to the older system on that slot (nothing was installed)


@dataclass(frozen=True)
class Blocked:
    """A version that failed here: not installed again before ``until``."""

    version: str
    until: float
    count: int = 1
    rolled_back: bool = False  # blocked because an operator rolled back from it, not because it failed


@dataclass(frozen=True)
class Fallback:
    """The version the other slot holds, still good, after an update over it was confirmed (a rollback's target;
    the bootloaders other than sim do not record versions)."""

    slot: str
    version: str


@dataclass(frozen=True)
class Staged:
    """An update written to ``slot`` and verified against its signed digest, not armed (``install.arm``):
    ``boot_id`` is the boot it was verified in; armed in a later boot only after its slot is hashed again."""

    slot: str
    version: str
    previous_version: str
    sha256: str  # hex, the signed digest of the image's first ``size`` bytes on the slot
    size: int
    boot_id: str
    images: tuple = ()  # a release of several images: ((group, sha256, size), ...), each hashed again likewise


MAX_POSTPONED = 366 * 86400  # seconds: no configuration postpones a reboot further (config: durations up to a year)


@dataclass(frozen=True)
class Postponed:
    """A reboot an operator postponed: a restart keeps its time and the bound counted from ``first``."""

    version: str
    at: float  # the postponed time (epoch seconds)
    first: float  # the first time announced for this version's reboot


@dataclass(frozen=True)
class Checkpoint:
    """What survives a restart: which payload, how far it is durable on the slot."""

    version: str
    slot: str
    sha256: str
    size: int
    received: int
    compressed: bool
    package: str = ""  # the Omaha package it is for ("" in a state written before slot groups)


@dataclass(frozen=True)
class Written:
    """One image of a release of several (slot groups), written to its group's slot and verified in an install
    not yet armed: a restart does not download it again, it hashes the slot again before the set is armed."""

    version: str
    slot: str
    group: str
    package: str  # the Omaha package's name
    sha256: str  # the package's digest (hex), as offered and signed
    size: int
    image_sha256: str  # the bytes it left on the slot: the package's own, or what it decompressed to
    image_size: int


@dataclass
class EventRecord:
    requestid: str
    sessionid: str
    created: float
    version: str
    event: Event
    attempts: int = 0


@dataclass
class State:
    ping: dict = field(default_factory=dict)
    cohort: dict = field(default_factory=dict)
    events: list[EventRecord] = field(default_factory=list)
    download: Checkpoint | None = None
    trial: Trial | None = None
    blocked: Blocked | None = None
    failures: int = 0
    last_check: float | None = None
    next_check: float | None = None
    retry_after_until: float | None = None
    last_error: str = ""
    fleet_lock: str = ""  # the FleetLock group whose reboot slot may be held (asked for, not yet given back)
    postponed: Postponed | None = None
    fallback: Fallback | None = None
    staged: Staged | None = None
    written: list[Written] = field(default_factory=list)  # slot groups: the images of an install already verified

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("download", "trial", "blocked", "postponed", "fallback", "staged"):
            out[key] = asdict(out[key]) if out[key] is not None else None
        out["events"] = [dict(asdict(e), event={k: v for k, v in e.event.__dict__.items()}) for e in self.events]
        out["written"] = [asdict(w) for w in self.written]
        return out

    def enqueue(self, record: EventRecord) -> None:
        self.events.append(record)
        while len(self.events) > MAX_EVENTS:
            progress = [i for i, e in enumerate(self.events) if e.event.eventtype in (13, 14)]
            self.events.pop(progress[0] if progress else 0)


# ---------------------------------------------------------------------------------------------- reading
def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _kind(value, kinds) -> bool:
    """``value`` is of ``kinds``: a bool only where bool is asked for, a float only when finite."""
    if isinstance(value, bool):
        return kinds is bool
    return isinstance(value, kinds) and (not isinstance(value, float) or math.isfinite(value))


def _text_ok(name: str, value) -> bool:
    """A text field as it could have entered: a version by the version rule ("" allowed), anything else clean."""
    if not isinstance(value, str):
        return True
    if name in _VERSIONS:
        return value == "" or versions.problem(value) is None
    return is_clean(value, MAX_FIELD)


def _texts_ok(obj, depth: int = 0) -> bool:
    """Every string in ``obj`` (keys too) is clean text, and it nests at most 8 deep."""
    if isinstance(obj, str):
        return is_clean(obj, MAX_FIELD)
    if isinstance(obj, dict):
        return depth < 8 and all(_texts_ok(k, depth + 1) and _texts_ok(v, depth + 1) for k, v in obj.items())
    if isinstance(obj, list):
        return depth < 8 and all(_texts_ok(v, depth + 1) for v in obj)
    return True


def _record(cls, data, kinds: dict, check=lambda r: True):
    """``cls(**data)`` when every field present has its kind and the required ones are there; else None."""
    if not isinstance(data, dict):
        return None
    args = {}
    for name in (f.name for f in fields(cls)):
        if name in data:
            if not _kind(data[name], kinds[name]) or not _text_ok(name, data[name]):
                return None
            args[name] = data[name]
    try:
        record = cls(**args)
    except TypeError:  # a required field is missing
        return None
    return record if check(record) else None


def trial_from(data) -> Trial | None:
    return _record(Trial, data, {"slot": str, "version": str, "previous_version": str, "armed": bool,
                                 "untracked": bool, "replaced": bool, "rollback": bool}, lambda t: t.slot in SLOTS)


def blocked_from(data) -> Blocked | None:
    return _record(Blocked, data, {"version": str, "until": (int, float), "count": int, "rolled_back": bool},
                   lambda b: b.count >= 1)


def fallback_from(data) -> Fallback | None:
    return _record(Fallback, data, {"slot": str, "version": str}, lambda f: f.slot in SLOTS and bool(f.version))


def _hex64(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _images(value) -> bool:
    """A staged set's images: at most 8 of [group, sha256, size]."""
    return isinstance(value, (list, tuple)) and len(value) <= 8 and all(
        isinstance(i, (list, tuple)) and len(i) == 3 and isinstance(i[0], str) and is_clean(i[0], 32)
        and _hex64(i[1]) and _kind(i[2], int) and i[2] > 0 for i in value)


def staged_from(data) -> Staged | None:
    if isinstance(data, dict) and "images" in data:  # JSON has lists: the record holds tuples
        if not _images(data["images"]):
            return None
        data = dict(data, images=tuple(tuple(i) for i in data["images"]))
    return _record(Staged, data, {"slot": str, "version": str, "previous_version": str, "sha256": str, "size": int,
                                  "boot_id": str, "images": tuple},
                   lambda t: (t.slot in SLOTS and bool(t.version) and t.size > 0 and _hex64(t.sha256)
                              and len(t.boot_id) <= 64))


def written_from(data) -> Written | None:
    return _record(Written, data, {"version": str, "slot": str, "group": str, "package": str, "sha256": str,
                                   "size": int, "image_sha256": str, "image_size": int},
                   lambda w: (w.slot in SLOTS and bool(w.version) and 0 < len(w.package) <= 255 and w.size > 0
                              and w.image_size > 0 and _hex64(w.sha256) and _hex64(w.image_sha256)))


def postponed_from(data) -> Postponed | None:
    return _record(Postponed, data, {"version": str, "at": (int, float), "first": (int, float)},
                   lambda p: 0 < len(p.version) <= 256 and p.first <= p.at <= p.first + MAX_POSTPONED)


def checkpoint_from(data) -> Checkpoint | None:
    return _record(Checkpoint, data, {"version": str, "slot": str, "sha256": str, "size": int, "received": int,
                                      "compressed": bool, "package": str}, lambda c: 0 <= c.received <= c.size)


def _event_kinds() -> dict:
    out = {}
    for f in fields(Event):
        text = str(f.type)
        out[f.name] = (int, type(None)) if "None" in text and "int" in text else int if "int" in text else str
    return out


def event_record_from(data) -> EventRecord | None:
    if not isinstance(data, dict) or not isinstance(data.get("event"), dict):
        return None
    event, kinds = data["event"], _event_kinds()
    if not {"eventtype", "eventresult"} <= event.keys() or any(k not in kinds or not _kind(v, kinds[k])
                                                                  or not _text_ok(k, v) for k, v in event.items()):
        return None
    rest = {k: v for k, v in data.items() if k != "event"}
    rest.setdefault("sessionid", "")
    rest.setdefault("version", "")
    record = _record(_EventFields, rest, {"requestid": str, "sessionid": str, "created": (int, float),
                                          "version": str, "attempts": int},
                     lambda r: bool(r.requestid) and r.attempts >= 0)
    if record is None:
        return None
    return EventRecord(record.requestid, record.sessionid, record.created, record.version, Event(**event),
                       record.attempts)


@dataclass(frozen=True)
class _EventFields:
    requestid: str
    sessionid: str
    created: float
    version: str
    attempts: int = 0


_PLAIN = {"ping": dict, "cohort": dict, "failures": int, "last_check": (int, float, type(None)),
          "next_check": (int, float, type(None)), "retry_after_until": (int, float, type(None)), "last_error": str,
          "fleet_lock": str}
_RECORDS = {"trial": trial_from, "blocked": blocked_from, "download": checkpoint_from, "postponed": postponed_from,
            "fallback": fallback_from, "staged": staged_from}


def from_json(data: dict) -> tuple[State, list[str]]:
    """The state ``data`` describes, keeping only what is well-formed, and the names of what was dropped."""
    state, dropped = State(), []
    for key, kind in _PLAIN.items():
        if key in data:
            value = data[key]
            ok = (_kind(value, kind) and (key != "failures" or 0 <= value <= 1_000_000)
                  and (key != "fleet_lock" or is_clean(value, 256)) and (key != "ping" or _texts_ok(value)))
            if ok and key == "last_error" and not is_clean(value, MAX_LAST_ERROR):
                value = clean(value, MAX_LAST_ERROR)
                dropped.append("last_error's unprintable text (repaired)")
            if ok:
                setattr(state, key, value)
            else:
                dropped.append(key)
    for key, parse in _RECORDS.items():
        if data.get(key) is not None:
            record = parse(data[key])
            if record is None:
                dropped.append(key)
            setattr(state, key, record)
    state.cohort = {k: v for k, v in state.cohort.items()
                    if k in ("cohort", "cohorthint", "cohortname") and cohort_value_ok(v)}
    raw = data.get("events", [])
    if not isinstance(raw, list):
        dropped.append("events")
        raw = []
    events = [e for e in map(event_record_from, raw) if e is not None]
    if len(events) != len(raw):
        dropped.append(f"{len(raw) - len(events)} malformed event(s)")
    state.events = events[-MAX_EVENTS:]
    raw = data.get("written", [])
    if not isinstance(raw, list):
        raw = [None]  # (one malformed record)
    state.written = [w for w in map(written_from, raw[:8]) if w is not None]
    if len(state.written) != len(raw):
        dropped.append("written")
    return state, dropped


# ---------------------------------------------------------------------------------------------- the store
class Store:
    """The state in memory (``state``) and on disk. ``commit`` is the one way to save it."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, STATE_FILE)
        self.state = State()
        self._lock = asyncio.Lock()
        self._made = 0  # the newest snapshot taken
        self._latest: tuple[int, bytes] | None = None
        self._written = 0  # the newest snapshot on disk
        self._refused = False  # load() found a file it may not read: nothing is ever written over it

    def load(self) -> str | None:
        """Reads the stored state into ``state``; returns a warning for the log when something was dropped.
        Refuses (``OSError``) a file that exists but cannot be read: starting afresh would overwrite it."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_FILE + 1)
        except FileNotFoundError:
            self.state = State()
            return None
        except OSError as exc:
            self._refused = True
            raise OSError(f"state file {self.path} cannot be read ({exc.strerror or exc}): fix its permissions "
                          f"or move it away; refusing to start and overwrite it") from None
        try:
            if len(raw) > MAX_FILE:
                raise ValueError(f"larger than {MAX_FILE >> 20} MiB")
            # bytes that are not UTF-8 become lone surrogates: only the text holding them is dropped or repaired
            data = json.loads(raw.decode("utf-8", "surrogateescape"))
        except (ValueError, RecursionError) as exc:
            self.state = State()
            return f"state file {self.path} unreadable ({str(exc)[:200]}); starting afresh{self._keep_damaged()}"
        if not isinstance(data, dict):
            self.state = State()
            return f"state file {self.path} is not an object; starting afresh{self._keep_damaged()}"
        self.state, dropped = from_json(data)
        return f"state file {self.path}: dropped what was malformed ({', '.join(dropped)})" if dropped else None

    def _keep_damaged(self) -> str:
        """Moves a damaged state file aside (for whoever investigates) before a fresh one replaces it."""
        try:
            os.replace(self.path, self.path + ".damaged")
        except OSError:
            return ""
        return f" (the damaged file is kept as {self.path}.damaged)"

    def _encode(self) -> bytes:
        return (json.dumps(self.state.to_json(), indent=1, sort_keys=True) + "\n").encode()

    def _write(self, data: bytes) -> None:
        os.makedirs(self.directory, exist_ok=True)
        write_atomic(self.path, data, 0o600)

    async def commit(self) -> None:
        """Saves the state as it is now. Saves are serialised; one that finds a newer snapshot already written
        returns at once, and a waiting one writes the newest snapshot taken. Raises ``OSError``."""
        if self._refused:
            return
        self._made += 1
        self._latest = (self._made, self._encode())
        mine = self._made
        async with self._lock:
            if self._written >= mine:
                return
            number, data = self._latest
            write = asyncio.ensure_future(asyncio.to_thread(self._write, data))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:  # the write goes on in its thread: wait for it before letting go
                await asyncio.wait({write})  # of the lock, so no older snapshot can land after a newer one
                if not write.exception():  # (a failed write never replaces the cancel: the caller is cancelled)
                    self._written = number
                raise
            self._written = number

    def commit_now(self) -> None:
        """The synchronous save, for a process without an event loop (the CLI's offline commands)."""
        if self._refused:
            return
        self._made += 1
        self._write(self._encode())
        self._written = self._made
