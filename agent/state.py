"""The daemon's durable state: one JSON file, replaced atomically, and the pending-event queue in it.

Events leave the queue only once the server acknowledged them; a resend keeps its original request id and
creation time (for ``X-Request-Age``). The queue is bounded: past ``MAX_EVENTS`` the oldest progress events
(13/1, 14/1) go first, outcomes (3/x) last.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .atomic import write_atomic

STATE_FILE = "state.json"
MAX_EVENTS = 64


@dataclass
class State:
    ping: dict = field(default_factory=dict)
    cohort: dict = field(default_factory=dict)
    events: list = field(default_factory=list)  # {"requestid", "created", "version", "event": {...}}
    download: dict | None = None  # install.Checkpoint
    trial: dict | None = None  # {"slot", "version", "previous_version"}
    blocked: dict | None = None  # {"version", "until"}: do not install this version again before
    failures: int = 0
    last_check: float | None = None
    next_check: float | None = None
    retry_after_until: float | None = None
    last_error: str = ""

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _clean(data: dict) -> State:
    state = State()
    expected = {"ping": dict, "cohort": dict, "events": list, "download": (dict, type(None)),
                "trial": (dict, type(None)), "blocked": (dict, type(None)), "failures": int,
                "last_check": (int, float, type(None)), "next_check": (int, float, type(None)),
                "retry_after_until": (int, float, type(None)), "last_error": str}
    for key, kind in expected.items():
        if key in data and isinstance(data[key], kind) and not isinstance(data[key], bool):
            setattr(state, key, data[key])
    state.events = [e for e in state.events if isinstance(e, dict) and isinstance(e.get("event"), dict)]
    return state


class StateStore:
    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, STATE_FILE)

    def load(self) -> tuple[State, str | None]:
        """The stored state, or a fresh one with a warning when the file is missing or unreadable."""
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read(4 << 20))
        except FileNotFoundError:
            return State(), None
        except (OSError, ValueError) as exc:
            return State(), f"state file {self.path} unreadable ({exc}); starting afresh"
        if not isinstance(data, dict):
            return State(), f"state file {self.path} is not an object; starting afresh"
        return _clean(data), None

    def save(self, state: State) -> None:
        os.makedirs(self.directory, exist_ok=True)
        write_atomic(self.path, (json.dumps(state.to_json(), indent=1, sort_keys=True) + "\n").encode(), 0o600)


def enqueue(state: State, record: dict) -> None:
    state.events.append(record)
    while len(state.events) > MAX_EVENTS:
        progress = [i for i, e in enumerate(state.events) if e["event"].get("eventtype") in (13, 14)]
        state.events.pop(progress[0] if progress else 0)
