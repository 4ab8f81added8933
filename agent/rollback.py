"""An operator's rollback: the other slot's older system, still good, is armed for a trial boot.

Nothing is downloaded or written but the bootloader's state: the trial record first (``rollback``: it queues no
3/1, since nothing was installed), then ``set_trial`` on the other slot, then the record armed. The running slot
stays good throughout, so a trial that never comes up falls back to it. After the reboot the trial is settled
like an installed update's (``settle.py``): the health step, then good and a 3/2 of the older version whose
``previousversion`` is the version left, or bad and a 3/0 (code 45 or 44) and the way back.

Which version the other slot holds: the sim bootloader records it; the others do not, so the agent keeps it
(``state.Fallback``, recorded when an update over that slot's version was confirmed). A slot of unknown version
is never booted blind.
"""
from __future__ import annotations

import logging
from dataclasses import replace

from .boot import BootError, other
from .errors import CommandFailed, Refused
from .machine import Refuse, rollback_target
from .state import Trial

log = logging.getLogger("omaha-agent")


async def arm(ctx) -> Trial:
    """Arms the rollback and returns its (armed) trial record. Raises ``Refused`` with the reason when there is
    nothing to roll back to, ``CommandFailed`` when its record cannot be saved and ``BootError`` when the
    bootloader cannot be written (the slot is put back as it was when the bootloader lets it)."""
    state = ctx.state
    status = await ctx.boot.status()
    booted = ctx.booted
    target = other(booted) if booted in status else None
    known = status[target].version if target else None
    if not known and target and state.fallback is not None and state.fallback.slot == target:
        known = state.fallback.version
    decision = rollback_target(booted if target else None, status[booted].state.value if target else "",
                               status[target].state.value if target else "", known, ctx.version,
                               state.trial.version if state.trial is not None else None)
    if isinstance(decision, Refuse):
        raise Refused(decision)
    trial = Trial(decision.slot, decision.version, ctx.version, armed=False, rollback=True)
    state.trial = trial
    if not await ctx.save("the rollback's trial record"):  # never armed without its record
        state.trial = None
        raise CommandFailed(f"{ctx.save_error.partition('; ')[0]}: slot {trial.slot} is not armed without it")
    try:
        async with ctx.shutdown_delay(f"arming the rollback to {trial.version} on slot {trial.slot}"):
            await ctx.boot.set_trial(trial.slot, ctx.config.boot.tries, trial.version)
    except BootError:
        try:  # both were good: so they stay, the running slot first in the boot order again (a set_trial that
            # timed out may still land: these queue after it in the bootloader's one thread)
            await ctx.boot.mark_good(trial.slot)
            await ctx.boot.mark_good(booted)
            state.trial = None
        except BootError as exc:  # the record stays unarmed: the next start reads which happened
            log.error("could not put slot %s back as it was: %s", trial.slot, exc)
        await ctx.save()
        raise
    state.trial = replace(trial, armed=True)
    await ctx.save("the armed rollback")
    log.info("rollback %s -> %s armed on slot %s", trial.previous_version, trial.version, trial.slot)
    return state.trial
