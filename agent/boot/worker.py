"""Bootloader access for the daemon: one thread, one writer. Every read and write of the bootloader state goes
through here, in order, off the event loop; a call that does not return within ``timeout`` fails with a
``BootError`` (the thread may still be stuck in it: later calls queue behind it and time out too, until it
returns). Any error of a backend becomes a ``BootError`` with a one-line message."""
from __future__ import annotations

import asyncio
import concurrent.futures

from . import BootControl, BootError, SlotStatus

TIMEOUT = 60.0


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class BootWorker:
    def __init__(self, control: BootControl, timeout: float = TIMEOUT):
        self.control = control
        self.timeout = timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="boot")

    @property
    def name(self) -> str:
        return getattr(self.control, "name", type(self.control).__name__)

    async def _call(self, what: str, fn, *args):
        try:
            future = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except RuntimeError:  # closed (the daemon stops): a late caller gets the error every caller handles
            raise BootError(f"the bootloader is no longer open: the agent is stopping ({what})") from None
        future.add_done_callback(_retrieved)  # a call its caller stopped waiting for never logs a lost error
        # asyncio.wait, not wait_for: on Python 3.11 wait_for returns the result and swallows a cancel that comes
        # as the call ends, so a cancelled job would go on (the call itself always runs to its end in the thread)
        done, _ = await asyncio.wait({future}, timeout=self.timeout)
        if not done:
            raise BootError(f"the bootloader did not answer within {self.timeout:g} s ({what})")
        try:
            return future.result()
        except BootError:
            raise
        except Exception as exc:  # a backend's bug or an OS error: contained like a bootloader error
            raise BootError(f"{what} failed: {type(exc).__name__}: {str(exc)[:200]}") from None

    async def status(self) -> dict[str, SlotStatus]:
        return await self._call("reading the slot states", self.control.status)

    async def mark_bad(self, slot: str) -> None:
        await self._call(f"marking slot {slot} bad", self.control.mark_bad, slot)

    async def mark_good(self, slot: str) -> None:
        await self._call(f"marking slot {slot} good", self.control.mark_good, slot)

    async def set_trial(self, slot: str, tries: int, version: str | None = None) -> None:
        await self._call(f"setting slot {slot} for a trial boot", self.control.set_trial, slot, tries, version)

    async def adopt(self, slot: str) -> None:
        """A missing or empty env (``BootEnvMissing``) gets the factory state with ``slot`` good, the other bad."""
        await self._call(f"writing a fresh bootloader env with slot {slot} good", self.control.initialize, slot)

    async def refill(self, slot: str) -> bool:
        """The backend's start-of-run refill of a good slot's boot attempts (U-Boot); False when it has none."""
        if not hasattr(self.control, "refill"):
            return False
        return await self._call(f"refilling slot {slot}'s boot attempts", self.control.refill, slot)

    async def booted_slot(self) -> str | None:
        """The backend's own answer (the sim backend records it); None when it has none."""
        if not hasattr(self.control, "booted_slot"):
            return None
        return await self._call("reading the booted slot", self.control.booted_slot)

    async def boot_id(self) -> str:
        """The backend's own boot identity (the sim backend counts its simulated boots)."""
        return await self._call("reading the boot id", self.control.boot_id)

    async def reboot(self) -> str:
        """The sim backend's emulated reboot; returns the slot that came up."""
        return await self._call("rebooting the simulated device", self.control.reboot)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
