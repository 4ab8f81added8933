"""When to check next (pure: time and randomness are arguments).

Following "Timing & Backoff" of the Omaha 3.1 text: the first check after a random initial delay; a
period coprime with a day (default 5 h); a 20 % chance to postpone a check by 0-20 % of the period; random
sub-minute and sub-second offsets so no fleet hits the server on the same second; exponential backoff after
failures (x8 per failure, equal jitter: half the ceiling fixed, half random), capped at the period; ``X-Retry-After``
honoured for background checks (capped at a day); a check missed while offline or suspended runs soon after
recovery, spread over a few minutes, not at once.

Why this backoff: after a long server outage every device of a fleet is due at once, and the load when the
server comes back is the rate at which the fleet retries. With full jitter and a doubling ceiling (60 s up to
4 h) devices were still at short ceilings six hours in and retried three times as often as they check normally
(tests/bench.py's fleet simulation: a 3.4x peak minute after a 6-hour outage). Growing eightfold reaches the cap
within about an hour, and equal jitter at a cap of one period keeps the mean retry gap at 3/4 of a period: the
recovery peak stays under 2x the normal mean (1.7x in the same simulation). A short blip still retries within
a minute, then within 4-8 minutes.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

RETRY_AFTER_CAP = 86400
RECOVERY_SPREAD = 300
RESUME_SPREAD = 30
BACKOFF_GROWTH = 8


@dataclass(frozen=True)
class Policy:
    interval: int = 5 * 3600
    initial_delay: int = 600
    backoff_base: int = 60
    backoff_cap: int = 5 * 3600
    postpone_chance: float = 0.2
    postpone_fraction: float = 0.2


@dataclass(frozen=True)
class NextCheck:
    at: float
    reason: str  # what a user sees in status and the log


def _offsets(rng: random.Random) -> float:
    return rng.uniform(0, 60)  # a random second within the minute and millisecond within the second


def first_check(now: float, rng: random.Random, policy: Policy) -> NextCheck:
    spread = rng.uniform(0, policy.initial_delay) + rng.uniform(0, min(60, policy.initial_delay))
    return NextCheck(now + spread, "first check after start-up")


def next_check(now: float, rng: random.Random, policy: Policy, failures: int = 0,
               retry_after: int | None = None) -> NextCheck:
    if failures > 0:
        ceiling = min(policy.backoff_cap, policy.backoff_base * BACKOFF_GROWTH ** min(failures - 1, 12))
        delay = ceiling / 2 + rng.uniform(0, ceiling / 2) + rng.uniform(0, 1)
        reason = f"backoff after {failures} failed check(s), {ceiling // 2}-{ceiling} s"
    else:
        delay = policy.interval
        reason = "regular interval"
        if rng.random() < policy.postpone_chance:
            delay += rng.uniform(0, policy.postpone_fraction * policy.interval)
            reason = "regular interval, postponed to desynchronise the fleet"
        delay += _offsets(rng)
    if retry_after:
        wait = min(retry_after, RETRY_AFTER_CAP)
        if wait > delay:
            delay, reason = wait + rng.uniform(0, 1), f"server asked to wait {wait} s (X-Retry-After)"
    return NextCheck(now + delay, reason)


def after_wakeup(scheduled: float, now: float, rng: random.Random) -> NextCheck:
    """A check whose time passed while the device slept or was offline: soon, but spread out."""
    if now <= scheduled:
        return NextCheck(scheduled, "as scheduled")
    return NextCheck(now + rng.uniform(0, RECOVERY_SPREAD), "missed while offline or asleep; catching up")


def after_restart(scheduled: float | None, now: float, rng: random.Random, policy: Policy,
                  interrupted_download: bool) -> NextCheck:
    """The first check after the daemon starts. A download that a restart or a power cut interrupted resumes
    within half a minute (spread, for a fleet that lost power together) instead of waiting for a catch-up
    slot of up to five minutes; otherwise the planned check stands, or the initial delay applies."""
    if interrupted_download:
        return NextCheck(now + rng.uniform(0, RESUME_SPREAD), "resuming the download a restart interrupted")
    if scheduled and scheduled - now > horizon(policy):
        check = first_check(now, rng, policy)
        return NextCheck(check.at, "the planned check lay too far ahead (did the clock move back?); planned afresh")
    if scheduled:
        return after_wakeup(scheduled, now, rng)
    return first_check(now, rng, policy)


def horizon(policy: Policy) -> float:
    """The furthest ahead any planned check can lie: a later one means the wall clock moved back (a device
    without a battery-backed clock that booted in 1970, or a clock set by hand) or the state is damaged."""
    regular = policy.interval * (1 + policy.postpone_fraction) + 61
    return max(regular, policy.backoff_cap + 1, RETRY_AFTER_CAP + 1, policy.initial_delay + 60)


def within(at: float | None, now: float, limit: float) -> float | None:
    """``at``, brought back to at most ``limit`` seconds after ``now``."""
    return None if at is None else min(at, now + limit)


def background_allowed(now: float, retry_after_until: float | None) -> bool:
    """X-Retry-After binds background checks only; a user's request always goes through."""
    return retry_after_until is None or now >= retry_after_until
