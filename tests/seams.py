"""Test seams: a clock the test drives (the daemon's time seam, agent/clock.py) and a bootloader that fails on
demand around the real sim backend (the real bootloaders cannot be broken at a chosen call here)."""
import asyncio
import time

from agent.boot import BootError
from agent.clock import Clock


class FakeClock(Clock):
    """Virtual wall-clock time: ``sleep`` advances it at once (yielding to the loop), but never past an earlier
    sleeper's deadline: concurrent sleeps of 30 s and 480 s end 480 s later, not 510, whatever order the loop
    runs them in. ``suspend(after, seconds)`` makes the clock jump ``seconds`` ahead the first time it passes
    ``after``, as a device waking from suspend. While ``held``, no sleep advances it (a test acts at a moment
    of its choosing, however loaded the machine is)."""

    def __init__(self, start: float = 1_800_000_000.0):
        self.t = start
        self.jumps: list[tuple[float, float]] = []
        self.woke_at: list[float] = []
        self.held = False
        self._deadlines: list[float] = []

    def now(self) -> float:
        return self.t

    def suspend(self, after: float, seconds: float) -> None:
        self.jumps.append((after, seconds))

    async def sleep(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        if wake is not None and wake.is_set():
            return
        deadline = self.t + max(0.0, seconds)
        self._deadlines.append(deadline)
        try:
            # bounded: each pass either advances the clock or waits 1 ms for an earlier sleeper (or a release)
            while self.t < deadline and (self.held or deadline > min(self._deadlines)):
                await asyncio.sleep(0.001)
        finally:
            self._deadlines.remove(deadline)
        self._advance(deadline)
        await asyncio.sleep(0.001)

    def _advance(self, deadline: float) -> None:
        self.t = max(self.t, deadline)
        for after, jump in list(self.jumps):
            if self.t >= after:
                self.jumps.remove((after, jump))
                self.t += jump
                self.woke_at.append(self.t)


class FaultyBoot:
    """The sim bootloader, failing on demand: ``fail(method, mode)`` with mode ``error`` (BootError), ``hang``
    (blocks for ``hang_s``: the worker's timeout fires) or ``corrupt`` (garbage written into the env file, then
    the real call runs and finds it). ``heal()`` stops the faults and restores the env."""

    name = "sim"

    def __init__(self, sim, hang_s: float = 1.5):
        self.sim = sim
        self.hang_s = hang_s
        self.faults: dict[str, str] = {}
        self.calls: list[str] = []
        self._good_env: bytes | None = None

    def fail(self, method: str, mode: str) -> None:
        self.faults[method] = mode

    def heal(self) -> None:
        self.faults.clear()
        if self._good_env is not None:
            with open(self.sim.path, "wb") as f:
                f.write(self._good_env)
            self._good_env = None

    def _call(self, method: str, *args):
        self.calls.append(method)
        mode = self.faults.get(method)
        if mode == "error":
            raise BootError(f"injected failure in {method}")
        if mode == "hang":
            time.sleep(self.hang_s)
        if mode == "corrupt" and self._good_env is None:
            with open(self.sim.path, "rb") as f:
                self._good_env = f.read()
            with open(self.sim.path, "wb") as f:
                f.write(b"\x00corrupt env")
        return getattr(self.sim, method)(*args)

    def status(self):
        return self._call("status")

    def mark_bad(self, slot):
        return self._call("mark_bad", slot)

    def mark_good(self, slot):
        return self._call("mark_good", slot)

    def set_trial(self, slot, tries, version=None):
        return self._call("set_trial", slot, tries, version)

    def booted_slot(self):
        return self._call("booted_slot")

    def reboot(self):
        return self._call("reboot")
