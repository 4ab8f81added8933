"""The time seam: the daemon reads the wall clock and sleeps only through a ``Clock``, so the schedule loop
(backoff, X-Retry-After, a check missed while the device slept) can be driven by a test's clock."""
from __future__ import annotations

import asyncio
import time


class Clock:
    """Wall-clock seconds (``now``) and a sleep that a wake-up event can cut short."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        """Sleeps ``seconds`` (real time) or until ``wake`` is set, whichever comes first."""
        if wake is None:
            await asyncio.sleep(seconds)
            return
        waiter = asyncio.ensure_future(wake.wait())  # (not wait_for: on Python 3.11 it can swallow a cancel)
        try:
            await asyncio.wait({waiter}, timeout=seconds)
        finally:
            waiter.cancel()


SYSTEM = Clock()
