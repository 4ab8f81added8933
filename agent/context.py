"""What every part of the daemon shares: the configuration, the clock and randomness (injected), the bootloader
worker, the store, the status board, and what start-up found (the booted slot and the running version)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid

from .boot.worker import BootWorker
from .clock import Clock
from .config import Config
from .errors import describe
from .state import Store

log = logging.getLogger("omaha-agent")


class Context:
    def __init__(self, config: Config, clock: Clock, rng: random.Random, boot: BootWorker, store: Store):
        self.config = config
        self.clock = clock
        self.rng = rng
        self.boot = boot
        self.store = store
        self.booted: str | None = None
        self.version = config.app.version or "0.0.0"
        self.status = None  # the StatusBoard, set by the runner
        self.save_error = ""  # why the last save failed ("" once one succeeds): shown beside LastError
        self._save_failure: tuple | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def state(self):
        return self.store.state

    async def save(self, what: str = "the state") -> bool:
        """The one way the daemon saves its state, with one error policy: a failed save is logged and shown in
        ``LastError`` (beside what it already says), and the next save writes it again; it never raises, so no
        safety step (mark bad, reboot back) and no answer waits on a disk. Returns whether it is on disk; a
        caller whose next step must not happen before its record is durable checks that."""
        try:
            await self.store.commit()
        except OSError as exc:
            error = f"could not save {what} ({describe(exc)}); it is saved again at the next save"
            if (what, exc.strerror) != self._save_failure:  # once per cause, not at every retry
                log.error("%s", error)
            self.save_error, self._save_failure = error, (what, exc.strerror)
            if self.status is not None:
                self.status.notify()
            return False
        if self.save_error:
            log.info("the state is saved again")
            self.save_error, self._save_failure = "", None
            if self.status is not None:
                self.status.notify()
        return True

    def now(self) -> float:
        return self.clock.now()

    def shutdown_delay(self, why: str):
        """``async with``: a logind ``delay`` lock on shutdown while the agent writes (none on the sim backend)."""
        if self.config.boot.backend == "sim":
            return contextlib.nullcontext()
        from .logind import DelayLock
        return DelayLock(why)

    def guid(self) -> str:
        return "{" + str(uuid.UUID(int=self.rng.getrandbits(128), version=4)) + "}"

    def spawn(self, coro, what: str) -> asyncio.Task | None:
        """Runs ``coro`` in the background; its exception is logged, never lost."""
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (a synchronous caller)
            coro.close()
            return None
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, what))
        return task

    def _done(self, task: asyncio.Task, what: str) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("%s failed: %s: %s", what, type(exc).__name__, exc, exc_info=exc)

    async def cancel_background(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
