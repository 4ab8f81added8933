"""A simulated bootloader for any Linux machine, no root: two slot files and a JSON env file.

The env file records, per slot, its state, tries left and the version written to it, plus the boot order
and the slot that is "running". ``reboot()`` applies a real bootloader's rules: the first trial slot in the
order with tries left is booted and loses a try; a slot whose image cannot boot (it starts with
``SIM-PANIC``, the simulated kernel panic) is retried until its tries are gone; then the good slot boots.
"""
from __future__ import annotations

import json

from ..atomic import write_atomic
from . import BootError, SlotState, SlotStatus, check_slot, check_tries, other

PANIC_MAGIC = b"SIM-PANIC"
MAX_TRIES = 15


class SimBoot:
    name = "sim"

    def __init__(self, env_path: str, slot_paths: dict[str, str] | None = None):
        self.path = env_path
        self.slot_paths = slot_paths or {}

    def _read(self) -> dict:
        try:
            with open(self.path, "rb") as f:
                env = json.loads(f.read(1 << 20))
        except FileNotFoundError:
            raise BootError(f"{self.path}: simulated bootloader env not found (run 'omaha-agent demo' or "
                            "write it with 'omaha-agent provision --slot a --version V')") from None
        except (OSError, ValueError) as exc:
            raise BootError(f"{self.path}: unreadable simulated bootloader env: {exc}") from None
        slots = env.get("slots") if isinstance(env, dict) else None
        if not isinstance(slots, dict) or set(slots) != {"a", "b"} or env.get("booted") not in ("a", "b"):
            raise BootError(f"{self.path}: simulated bootloader env lacks 'booted' or the slots a and b")
        return env

    def _write(self, env: dict) -> None:
        write_atomic(self.path, (json.dumps(env, indent=2, sort_keys=True) + "\n").encode())

    def initialize(self, good: str = "a", version: str = "1.0.0") -> None:
        self._write({"booted": good, "order": [good, other(good)], "boots": 0,
                     "slots": {good: {"state": "good", "tries": 0, "version": version},
                               other(good): {"state": "bad", "tries": 0, "version": None}}})

    def booted_slot(self) -> str:
        return self._read()["booted"]

    def boot_id(self) -> str:
        """Which simulated boot this is (the count of boots since the env was written)."""
        return f"sim-{int(self._read().get('boots') or 0)}"

    def status(self) -> dict[str, SlotStatus]:
        env = self._read()
        out = {}
        for slot in ("a", "b"):
            s = env["slots"][slot]
            state = SlotState(s.get("state", "bad")) if s.get("state") in ("good", "trial", "bad") else SlotState.BAD
            tries = int(s.get("tries") or 0) if state is SlotState.TRIAL else 0
            if state is SlotState.TRIAL and tries == 0:
                state = SlotState.BAD  # as on a real bootloader: a trial with no tries left is not bootable
            out[slot] = SlotStatus(state, tries, s.get("version"))
        return out

    def _change(self, slot: str, **values) -> None:
        env = self._read()
        env["slots"][slot].update(values)
        order = [s for s in env.get("order", ["a", "b"]) if s in ("a", "b")]
        order += [s for s in ("a", "b") if s not in order]
        if values.get("state") in ("good", "trial"):
            order.remove(slot)
            order.insert(0, slot)
        elif values.get("state") == "bad":
            order.remove(slot)
            order.append(slot)
        env["order"] = order
        self._write(env)

    def mark_bad(self, slot: str) -> None:
        self._change(check_slot(slot), state="bad", tries=0)

    def set_trial(self, slot: str, tries: int, version: str | None = None) -> None:
        check_tries(tries, MAX_TRIES)
        self._change(check_slot(slot), state="trial", tries=tries, version=version)

    def mark_good(self, slot: str) -> None:
        self._change(check_slot(slot), state="good", tries=0)

    def _panics(self, slot: str) -> bool:
        path = self.slot_paths.get(slot)
        if not path:
            return False
        try:
            with open(path, "rb") as f:
                return f.read(len(PANIC_MAGIC)) == PANIC_MAGIC
        except OSError:
            return True

    def reboot(self, max_boots: int = 32) -> str:
        """Emulate reboots until a slot comes up; returns the slot booted."""
        env = self._read()
        for _ in range(max_boots):
            env["boots"] = int(env.get("boots", 0)) + 1
            chosen = None
            for slot in env.get("order", ["a", "b"]):
                s = env["slots"].get(slot, {})
                if s.get("state") == "good":
                    chosen = slot
                    break
                if s.get("state") == "trial" and int(s.get("tries") or 0) > 0:
                    s["tries"] = int(s["tries"]) - 1
                    chosen = slot
                    break
            if chosen is None:
                raise BootError("simulated bootloader: no bootable slot (both bad) - the device is bricked")
            if self._panics(chosen):
                continue  # the kernel did not come up: the firmware tries again
            env["booted"] = chosen
            self._write(env)
            return chosen
        raise BootError(f"simulated bootloader: nothing came up in {max_boots} boots")
