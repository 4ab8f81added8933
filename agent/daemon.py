"""The runner: wires the configuration, the adapters and the owner, and runs the schedule loop.

Two ways to run: ``run_once`` (settle, deliver events, one check, exit) and ``run_forever`` (the schedule loop,
until ``stop``). Both only hand commands to the owner (``owner.py``), as the D-Bus methods do.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import os
import random

from . import schedule
from .attempt import UpdateAttempt
from .boot import BootControl, BootError
from .boot.worker import TIMEOUT as BOOT_TIMEOUT, BootWorker
from .clock import SYSTEM, Clock
from .config import Config
from .context import Context
from .exporter import Exporter
from .machine import Check, NoOp, Settle
from .errors import describe
from .owner import Owner, Reply
from .reporter import Reporter
from .settle import Settler
from .state import Store
from .status import StatusBoard

log = logging.getLogger("omaha-agent")

LATE = 60  # a planned check found this late on waking up was missed while the device slept


class AgentError(Exception):
    """A run that could not do what it was asked; the message is the one-line reason for the user."""


def make_boot(config: Config) -> BootControl:
    b = config.boot
    if b.backend == "sim":
        from .boot.sim import SimBoot
        paths = {s: spec.value for s, spec in config.slots.items() if spec.kind == "file"}
        return SimBoot(b.env, paths)
    if b.backend == "grubenv":
        from .boot.grubenv import GrubEnvBoot
        return GrubEnvBoot(b.env)
    if b.backend == "bls":
        from .boot.bls import BlsBoot
        return BlsBoot(b.esp, b.efivars)
    if b.backend == "gpt":
        from .boot.gpt import GptBoot
        return GptBoot(b.disk, dict(b.labels))
    from .boot.uboot import UBootBoot
    return UBootBoot(b.fw_config)


def trust_line(config: Config) -> str:
    """What a release must carry to be installed, in words (``GetStatus``'s ``trust``); counts key files only,
    so an idle daemon never imports the crypto library."""
    import glob
    if not config.trust.require_signature:
        return "unsigned releases accepted (trust.require_signature is false)"
    files = {p for pattern in config.trust.keys for p in (glob.glob(pattern) if glob.has_magic(pattern) else
                                                          [pattern] if os.path.exists(pattern) else [])}
    if not files:
        return (f"no trusted key in {', '.join(config.trust.keys)}: every update is refused until one is "
                "installed (or set trust.require_signature: false)")
    return f"signed releases only ({len(files)} key file{'s' if len(files) != 1 else ''})"


class Agent:
    def __init__(self, config: Config, *, clock: Clock = SYSTEM, rng: random.Random | None = None,
                 boot: BootControl | None = None, boot_timeout: float | None = None):
        worker = BootWorker(boot or make_boot(config), boot_timeout or BOOT_TIMEOUT)
        self.ctx = Context(config, clock, rng or random.SystemRandom(), worker, Store(config.state_dir))
        self.ctx.status = StatusBoard(self.ctx)
        self.reporter = Reporter(self.ctx)
        self.settler = Settler(self.ctx, self.reporter)
        self.owner = Owner(self.ctx, self.settler, UpdateAttempt(self.ctx, self.reporter))
        metrics = config.metrics
        self.exporter = Exporter(self.ctx, self.reporter) if metrics.textfile or metrics.socket else None
        self.wakeup = asyncio.Event()  # the schedule loop re-plans (a job ended, or a stop)

    # -------------------------------------------------------------- what the D-Bus layer and the CLI use
    @property
    def config(self) -> Config:
        return self.ctx.config

    @property
    def status(self) -> StatusBoard:
        return self.ctx.status

    @property
    def listeners(self) -> list:
        return self.ctx.status.listeners

    def snapshot(self) -> dict:
        return self.ctx.status.snapshot()

    async def submit(self, command) -> Reply:
        return await self.owner.submit(command)

    # -------------------------------------------------------------- start-up
    async def start(self, on_ready=None, wait_for_boot_complete: bool = False, once: bool = False) -> Reply:
        """Loads the state, finds the booted slot, starts the owner and settles the last update (a trial boot's
        health step runs as a job, or waits for ``ConfirmBoot``); then ``on_ready`` (the service is reachable)."""
        ctx = self.ctx
        try:
            warning = await asyncio.to_thread(ctx.store.load)
        except OSError as exc:
            raise AgentError(str(exc)) from None
        if warning:
            log.warning("%s", warning)
        self.settler.sanitize()
        try:
            await self.settler.detect()
        except Exception as exc:  # noqa: BLE001 - the daemon still starts: status says what went wrong
            log.error("cannot tell which slot runs: %s", describe(exc))
        log.info("started: version %s, booted slot %s, backend %s", ctx.version, ctx.booted or "unknown",
                 ctx.config.boot.backend)
        if ctx.booted is not None:  # before the owner starts: nothing else touches the bootloader yet
            try:
                if await ctx.boot.refill(ctx.booted):
                    log.info("refilled the boot attempts of the good slot %s", ctx.booted)
            except BootError as exc:
                log.warning("could not refill the boot attempts of slot %s: %s", ctx.booted, exc)
        ctx.status.trust = trust_line(ctx.config)
        if not ctx.config.trust.require_signature:
            log.log(logging.INFO if once else logging.WARNING, "release signatures are not required "
                    "(trust.require_signature: false): an update is installed on the update server's word")
        elif ctx.status.trust.startswith("no trusted key"):
            log.error("%s", ctx.status.trust)
        self.owner.wait_for_boot_complete = wait_for_boot_complete
        self.owner.once = once
        if self.exporter is not None:
            await self.exporter.start()
        self.owner.start()
        settled = await self.owner.submit(Settle())
        await ctx.status.refresh_slots()
        # the HTTP library takes a third of a second to import: in a thread now, not on the loop at the first check
        await asyncio.to_thread(importlib.import_module, "aiohttp")
        if on_ready is not None:
            await on_ready()
        return settled

    async def close(self) -> None:
        await self.owner.close()
        await self.ctx.cancel_background()
        await self.ctx.save()
        if self.exporter is not None:
            await self.exporter.close()
        await self.reporter.close()
        self.ctx.boot.close()

    # -------------------------------------------------------------- --once
    async def run_once(self) -> str:
        try:
            settled = await self.start(once=True)  # (a one-shot run keeps stderr for its verdict)
            if settled.job is not None:  # the health step of a trial boot, or the reboot into a waiting update
                await self.owner.finished(settled.job)
            delivered = await self.reporter.flush()
            reply = await self.owner.submit(Check(interactive=True))
            if reply.job is None:
                if not isinstance(reply.result, NoOp):
                    raise AgentError(reply.message)
                result = reply.message
            else:
                outcome = await self.owner.finished(reply.job)
                if outcome is None:
                    raise AgentError("the check was cancelled")
                if not outcome.ok:
                    raise AgentError(outcome.message)
                result = outcome.message
                if self.owner.job is not None:  # the reboot the policy planned into what was installed
                    await self.owner.finished(self.owner.job)
                if self.owner.rebooter.outcome:
                    result += f"; {self.owner.rebooter.outcome}"
            if not delivered and self.ctx.state.events:
                await self.reporter.flush()
            if self.ctx.state.events:
                raise AgentError(f"{len(self.ctx.state.events)} event(s) could not be delivered; they are kept")
            return result
        finally:
            await self.close()

    # -------------------------------------------------------------- forever
    def _policy(self) -> schedule.Policy:
        s = self.ctx.config.schedule
        return schedule.Policy(interval=s.interval, initial_delay=s.initial_delay, backoff_base=s.backoff_base,
                               backoff_cap=s.backoff_cap)

    def _after_check(self) -> schedule.NextCheck:
        state, now = self.ctx.state, self.ctx.now()
        retry = max(0, int(state.retry_after_until - now)) if state.retry_after_until else None
        return schedule.next_check(now, self.ctx.rng, self._policy(), state.failures, retry)

    async def run_forever(self, stop: asyncio.Event, on_ready=None, wait_for_boot_complete: bool = False) -> None:
        ctx = self.ctx
        try:
            await self.start(on_ready, wait_for_boot_complete)
            await self._unless_stopped(self._flush(), stop)  # a fallback's 3/0 (or anything from before) goes now
            nxt = schedule.after_restart(ctx.state.next_check, ctx.now(), ctx.rng, self._policy(),
                                         interrupted_download=ctx.state.download is not None)
            watcher = asyncio.create_task(self._wake_on(stop))
            try:
                while not stop.is_set():
                    nxt = await self._loop_once(nxt, stop)
            finally:
                watcher.cancel()
        finally:
            await self.close()

    async def _wake_on(self, stop: asyncio.Event) -> None:
        """A stop, or the end of any job (an interactive check too), wakes the loop to re-plan. A stop that came
        before this task's first step wakes it too (the loop may already sleep: it would sleep on, up to 30 s)."""
        while True:
            stop_wait = asyncio.ensure_future(stop.wait())
            job_wait = asyncio.ensure_future(self.owner.job_ended.wait())
            await asyncio.wait({stop_wait, job_wait}, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            job_wait.cancel()
            if not self.owner.job_ended.is_set() and not stop.is_set():
                continue  # the loop took that end itself (its own check): no second plan
            self.owner.job_ended.clear()
            self.wakeup.set()
            if stop.is_set():
                return

    async def _loop_once(self, nxt: schedule.NextCheck, stop: asyncio.Event) -> schedule.NextCheck:
        ctx = self.ctx
        ctx.state.next_check = nxt.at
        ctx.status.notify()
        log.info("next check in %d s (%s)", max(0, nxt.at - ctx.now()), nxt.reason)
        woke = await self._sleep_until(nxt, stop)
        if stop.is_set():
            return nxt
        if woke is not None:
            return woke
        if not schedule.background_allowed(ctx.now(), ctx.state.retry_after_until):
            return schedule.NextCheck(ctx.state.retry_after_until, "server asked to wait (X-Retry-After)")
        await self._unless_stopped(self._flush(), stop)
        if stop.is_set():
            return nxt
        reply = await self.owner.submit(Check(interactive=False))
        if reply.job is not None:  # a stop does not wait for the job: close() cancels it, keeping its checkpoint
            stopping, ended = asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.owner.finished(reply.job))
            await asyncio.wait({ended, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if ended.done():  # the owner applied its end: this loop plans after it, the watcher need not wake it
                self.owner.job_ended.clear()
            else:
                ended.cancel()
        self.wakeup.clear()
        return self._after_check()

    @staticmethod
    async def _unless_stopped(coro, stop: asyncio.Event) -> None:
        """Runs ``coro`` until it ends or ``stop`` is set (then it is cancelled: a stop never waits on the network;
        undelivered events stay queued)."""
        work, stopping = asyncio.ensure_future(coro), asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not work.done():
                work.cancel()
            await asyncio.wait({work})

    async def _flush(self) -> None:
        try:
            await self.reporter.flush()
        except Exception as exc:  # contained: the events stay queued
            log.error("sending the queued events failed: %s", describe(exc))

    async def _sleep_until(self, nxt: schedule.NextCheck, stop: asyncio.Event) -> schedule.NextCheck | None:
        """Sleeps in short steps until ``nxt`` is due (None), or returns a new plan: after a job ended (an
        interactive check), when the wall clock moved back, or when the check was missed while the device slept
        (then it runs within ``schedule.RECOVERY_SPREAD``, spread)."""
        ctx, when = self.ctx, nxt.at
        limit = schedule.horizon(self._policy())
        while not stop.is_set():
            if self.wakeup.is_set():
                self.wakeup.clear()
                return self._after_check()
            now = ctx.now()
            if now >= when:
                if now - when > LATE:
                    return schedule.after_wakeup(when, now, ctx.rng)
                return None
            if when - now > limit:  # the wall clock moved back while sleeping
                log.warning("the next check lay %d s ahead, longer than any schedule waits (did the clock move "
                            "back?): it runs in %d s", when - now, limit)
                return schedule.NextCheck(now + limit, "re-planned: the clock moved back")
            await ctx.clock.sleep(min(when - now, 30), self.wakeup)
        return None


async def read_slots(config: Config) -> dict:
    """The slots as the daemon sees them, without a daemon (``omaha-agent slots``, the demo): ``{"booted",
    "version", "slots"}``; raises ``BootError`` or ``OSError``."""
    from .status import slot_view
    agent = Agent(config)
    try:
        await asyncio.to_thread(agent.ctx.store.load)
        await agent.settler.detect()
        status = await agent.ctx.boot.status()
        return {"booted": agent.ctx.booted, "version": agent.ctx.version,
                "slots": slot_view(status, agent.ctx.booted, agent.ctx.version, agent.ctx.state.trial,
                                   agent.ctx.state.fallback)}
    finally:
        agent.ctx.boot.close()
