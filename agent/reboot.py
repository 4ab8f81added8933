"""Reboots: when (the policy, maintenance windows, the notice, postponements), whether now (shutdown inhibitors,
the fleet's lock) and how (logind, or the simulated bootloader).

A planned reboot is the owner's reboot job (operation ``reboot-pending``): ``Rebooter.run`` publishes the plan
(version, time, what it waits for), waits for its time and, under the windows policy, for a window; then, unless
an operator forced it, for every ``block`` inhibitor on shutdown to go (at most ``reboot.max_inhibit_delay``,
after which it waits for the next window, never forcing); then takes the fleet's lock (FleetLock) when one is
configured, retrying with backoff and never rebooting without it; then reboots. The lock is given back
(``steady-state``) once the device runs a good slot again: after the new slot is confirmed, or after a fallback.

Every wait re-reads the wall clock in steps of at most ``STEP`` seconds, so a suspend, a clock step or a
postponement is seen within a step.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

from . import windows
from .errors import Refused, describe
from .machine import Refuse
from .state import Postponed

log = logging.getLogger("omaha-agent")

STEP = 300.0  # seconds: the longest sleep before the clock is read again
INHIBIT_POLL = 15.0  # seconds between two reads of logind's inhibitors while one holds a reboot back
BACKOFF_BASE, BACKOFF_CAP = 30.0, 1800.0  # a refused or unreachable fleet lock, a failed reboot request


@dataclass
class Plan:
    version: str
    at: float  # when the reboot is due (epoch seconds), as announced
    first: float  # the first announced time: postponements are bounded from it
    forced: bool = False  # an operator asked: no window, notice or inhibitor wait
    waiting_for: str = ""  # what the reboot waits for now, in words


__all__ = ["Plan", "Rebooter", "Refused", "backoff", "postponed", "reboot"]


def postponed(plan: Plan, now: float, seconds: int, max_postpone: int) -> tuple[float, bool] | Refuse:
    """Where ``PostponeReboot(seconds)`` moves ``plan``: (new time, whether the bound cut it short), or a refusal."""
    if seconds <= 0:
        return Refuse("postpone by at least one second", "InvalidArgs")
    bound = plan.first + max_postpone
    if max_postpone == 0:
        return Refuse("postponing is turned off on this device (reboot.max_postpone is 0)", "PostponeLimit")
    if plan.at >= bound:
        return Refuse(f"the reboot was already postponed as far as this device allows ({max_postpone} s past its "
                      "first planned time)", "PostponeLimit")
    wanted = max(plan.at, now) + seconds
    return (min(wanted, bound), wanted > bound)


def backoff(failures: int, rng) -> float:
    """Equal jitter: half the doubling delay, plus up to the other half at random."""
    delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(max(failures, 1) - 1, 16))
    return delay / 2 + rng.uniform(0, delay / 2)


async def reboot(ctx, why: str, force: bool = False) -> None:
    """Reboots at once when the policy is not ``manual`` or ``force``; otherwise logs that one is due. (The
    fallback after a failed trial: running a version that failed is worse than any wait.)"""
    if ctx.config.reboot.policy == "manual" and not force:
        log.info("reboot needed (%s); policy is manual", why)
        return
    log.info("rebooting: %s", why)
    if ctx.config.boot.backend == "sim":
        log.info("simulated reboot: slot %s came up", await ctx.boot.reboot())
        return
    from .logind import reboot as logind_reboot
    await logind_reboot()


class Rebooter:
    def __init__(self, ctx, http, inhibitors=None):
        self.ctx = ctx
        self.http = http  # async () -> the aiohttp session (the reporter's: the same TLS settings)
        self.plan: Plan | None = None
        self._wake = asyncio.Event()
        self._release: asyncio.Task | None = None
        self.outcome = ""  # how the last reboot job ended, in a line
        self.asked = False  # the reboot is being asked of logind (or the sim): too late to postpone or drop it
        self.before_reboot = None  # async (): the last step before the reboot (the owner's: arms a staged update)
        # async () -> list[logind.Inhibitor]: logind's, except on the simulated bootloader (no logind there)
        self.inhibitors = inhibitors
        if inhibitors is None and ctx.config.boot.backend != "sim":
            from .logind import inhibitors as logind_inhibitors
            self.inhibitors = logind_inhibitors

    @property
    def config(self):
        return self.ctx.config.reboot

    # -------------------------------------------------------------- the plan
    def schedule(self, version: str, forced: bool = False) -> Plan:
        """Plans the reboot into ``version``: after the notice (and in a window), or now when ``forced``."""
        now = self.ctx.now()
        kept_plan = self.plan
        if kept_plan is not None and not forced:  # a check ran while it waited: the plan keeps its time
            self.plan = Plan(version, kept_plan.at, kept_plan.first, kept_plan.forced)
            if self.ctx.state.postponed is not None:
                self.ctx.state.postponed = replace(self.ctx.state.postponed, version=version)
            self._publish(self.plan, kept_plan.waiting_for or "its time")
            self._wake.set()
            return self.plan
        at = now if forced else now + self.config.notice
        if not forced and self.config.policy == "windows":
            at = windows.allowed_at(self.config.windows, at)
        first, kept = at, self.ctx.state.postponed
        if kept is not None and kept.version == version and not forced and self.config.max_postpone > 0:
            # postponed before a restart: still postponed, and still bounded from the first announced time (by
            # today's reboot.max_postpone: a record never takes the reboot further than the configuration allows)
            first = min(kept.first, at)
            at = max(at, min(kept.at, first + self.config.max_postpone))
            log.info("the reboot into %s stays postponed (to %s)", version, windows.describe(at))
        elif kept is not None:  # another version's, postponing turned off, or an operator asked for it now
            self.ctx.state.postponed = None
            self.ctx.spawn(self.ctx.save("the dropped postponement"), "saving the dropped postponement")
        self.plan = Plan(version, at, first, forced)
        self._publish(self.plan, "the maintenance window" if not forced and self.config.policy == "windows"
                      else "its time")
        self._wake.set()
        log.info("reboot into %s planned for %s%s", version, windows.describe(at),
                 " (asked for now)" if forced else "")
        return self.plan

    def postpone(self, seconds: int) -> str:
        plan = self.plan
        if plan is None:
            raise Refused(Refuse("no reboot is planned", "NothingToPostpone"))
        self.refuse_once_asked()
        answer = postponed(plan, self.ctx.now(), seconds, self.config.max_postpone)
        if isinstance(answer, Refuse):
            raise Refused(answer)
        plan.at, cut = answer
        plan.forced = False  # a postponed reboot waits again for what a planned one waits for
        self.ctx.state.postponed = Postponed(plan.version, plan.at, plan.first)  # the owner saves it
        self._publish(plan, "its time")
        self._wake.set()
        log.info("reboot into %s postponed to %s", plan.version, windows.describe(plan.at))
        return (f"reboot into {plan.version} postponed to {windows.describe(plan.at)}"
                + (" (the most reboot.max_postpone allows)" if cut else ""))

    def refuse_once_asked(self) -> None:
        """Raises ``Refused`` while the reboot is being asked for: the plan can no longer change."""
        if self.asked:
            raise Refused(Refuse(f"the reboot into {self.plan.version if self.plan else 'the update'} is being asked "
                                 "for now; it can no longer be moved or dropped", "Busy"))

    def drop(self) -> bool:
        """Drops the plan and its postponement; True when the state changed (the owner saves it)."""
        self.plan, self.asked = None, False
        changed, self.ctx.state.postponed = self.ctx.state.postponed is not None, None
        self.ctx.status.reboot = None
        self.ctx.status.notify()
        return changed

    def _publish(self, plan: Plan, waiting_for: str) -> None:
        plan.waiting_for = waiting_for
        self.ctx.status.reboot = {"version": plan.version, "time": plan.at, "waiting_for": waiting_for}
        self.ctx.status.notify()

    async def _nap(self, seconds: float) -> None:
        """Sleeps, unless the plan changed since the loop last read it (``_wake`` is cleared only there)."""
        await self.ctx.clock.sleep(max(1.0, min(seconds, STEP)), self._wake)

    # -------------------------------------------------------------- the job
    async def run(self, once: bool = False) -> str:
        """The reboot job: returns once the reboot was asked for (or, with ``once``, at the first wait)."""
        self.outcome = await self._run(once)
        return self.outcome

    async def _run(self, once: bool) -> str:
        ctx, cfg = self.ctx, self.config
        held_since: float | None = None
        failures = 0
        while True:
            self._wake.clear()  # here only: a new plan made while the loop awaits anything wakes its next nap
            plan, now = self.plan, ctx.now()
            if plan is None:
                return "no reboot planned"
            due = plan.at
            if not plan.forced and cfg.policy == "windows":
                # the window must be open now, not only at the planned time (a suspend may have slept through it)
                due = windows.allowed_at(cfg.windows, max(plan.at, now))
                if due > max(plan.at, now):  # its window closed meanwhile (a suspend, a postponement, an inhibitor)
                    plan.at = due
                    log.info("reboot into %s moved to the next maintenance window, %s", plan.version,
                             windows.describe(due))
            if due > now:
                self._publish(plan, "the maintenance window" if cfg.policy == "windows" and not plan.forced
                              else "its time")
                if once:
                    return f"reboot into {plan.version} planned for {windows.describe(due)}"
                await self._nap(due - now)
                continue
            if not plan.forced:
                blockers = await self._blockers()
                if self.plan is not plan:  # re-planned while logind answered (an operator's Reboot, a Reset)
                    continue
                if blockers:
                    held_since = now if held_since is None else held_since
                    if cfg.policy == "windows" and now - held_since >= cfg.max_inhibit_delay:
                        plan.at = windows.after_current(cfg.windows, now)
                        held_since = None
                        log.warning("reboot into %s held back by %s for %d s: waiting for the next window, %s",
                                    plan.version, blockers[0], cfg.max_inhibit_delay, windows.describe(plan.at))
                        continue
                    self._publish(plan, f"a shutdown inhibitor held by {blockers[0]}")
                    if once:
                        return f"reboot into {plan.version} held back by {blockers[0]}"
                    await self._nap(INHIBIT_POLL)
                    continue
                held_since = None
            if cfg.fleetlock is not None:
                why = await self._take_lock()
                if self.plan is not plan:
                    continue
                if why is not None:
                    failures += 1
                    await self._waits(plan, f"the fleet lock ({why})")
                    if once:
                        return f"reboot into {plan.version} waits for the fleet lock: {why}"
                    await self._nap(backoff(failures, ctx.rng))
                    continue
            self._publish(plan, "")
            self.asked = True  # from here the plan can no longer be moved or dropped
            if self.before_reboot is not None:
                try:
                    await self.before_reboot()  # install.arm in-window: the staged update is armed now
                except BaseException:
                    self.asked = False
                    raise
            try:
                await reboot(ctx, f"update to {plan.version} installed", force=True)
            except Exception as exc:  # logind refused or is unreachable: the update stays armed, retried
                self.asked = False
                failures += 1
                await self._waits(plan, f"logind (could not reboot: {describe(exc)})")
                if once:
                    raise
                await self._nap(backoff(failures, ctx.rng))
                continue
            return f"rebooting into {plan.version}"

    async def _waits(self, plan: Plan, what: str) -> None:
        self._publish(plan, what)
        line = f"reboot into {plan.version} waits for {what}"
        log.warning("%s", line)
        self.ctx.state.last_error = line
        await self.ctx.save()

    async def _blockers(self) -> list:
        if self.inhibitors is None:
            return []
        from .logind import LogindError, blocking_shutdown
        try:
            locks = await self.inhibitors()
        except LogindError as exc:  # the reboot itself goes through logind and says what is wrong
            log.warning("could not read logind's inhibitors: %s", exc)
            return []
        blockers = blocking_shutdown(locks)
        if not blockers:
            log.info("no shutdown inhibitor holds the reboot back (%d lock(s) in logind)", len(locks))
        return blockers

    # -------------------------------------------------------------- the fleet's lock
    def _client(self) -> str:
        from . import fleetlock
        return fleetlock.client_id(self.config.fleetlock.machine_id)

    async def _take_lock(self) -> str | None:
        """Takes the lock (None), or says why not. The state notes a lock may be held before the request goes out."""
        from . import fleetlock
        if self._release is not None:
            self._release.cancel()  # a lock is being given back while a new reboot wants one: keep it instead
            self._release = None
        lock, state = self.config.fleetlock, self.ctx.state
        try:
            client = self._client()
        except (OSError, ValueError) as exc:
            return f"no device ID: {exc}"
        if state.fleet_lock != lock.group:
            state.fleet_lock = lock.group
        if not await self.ctx.save("the fleet lock record"):  # durable before the lock is asked for
            return "the state could not be saved, and a lock is asked for only once it says so"
        answer = await self._lock_call(lock.url, "pre-reboot", client, lock.group)
        if isinstance(answer, fleetlock.Granted):
            log.info("fleet lock taken (group %s)", lock.group)
            return None
        return str(answer)

    async def _lock_call(self, url: str, endpoint: str, client: str, group: str):
        """One FleetLock request through the agent's session (its TLS settings and proxy)."""
        from . import fleetlock
        from .http import OmahaHttpError
        try:
            session = await self.http()
        except OmahaHttpError as exc:  # a proxy setting that cannot be used: like a server out of reach
            return fleetlock.Unreachable(f"FleetLock server {url}: {exc}")
        return await fleetlock.call(session, url, endpoint, client, group)

    def release_when_steady(self) -> None:
        """Gives the fleet's lock back in the background (retried until the server says 200), when the state says
        one may be held and the running slot is good."""
        if not self.ctx.state.fleet_lock or (self._release is not None and not self._release.done()):
            return
        self._release = self.ctx.spawn(self._give_back(), "giving back the fleet lock")

    async def _give_back(self) -> None:
        from . import fleetlock
        from .boot import BootError, SlotState
        ctx, lock, group = self.ctx, self.config.fleetlock, self.ctx.state.fleet_lock
        try:
            if (await ctx.boot.status())[ctx.booted].state is not SlotState.GOOD:
                return  # a trial, or a slot that failed and reboots back: not steady yet
        except (BootError, KeyError):
            return
        if lock is None:
            log.warning("a fleet lock of group %s may still be held, but reboot.fleetlock is no longer configured",
                        group)
            ctx.state.fleet_lock = ""
            await ctx.save()
            return
        client = self._client()
        failures = 0
        while True:
            answer = await self._lock_call(lock.url, "steady-state", client, group)
            if isinstance(answer, fleetlock.Granted):
                log.info("fleet lock given back (group %s)", group)
                ctx.state.fleet_lock = ""
                await ctx.save()
                return
            failures += 1
            ctx.state.last_error = f"could not give back the fleet lock: {answer}"
            log.warning("%s", ctx.state.last_error)
            ctx.status.notify()
            await ctx.clock.sleep(backoff(failures, ctx.rng))
