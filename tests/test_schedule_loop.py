"""The forever loop through the time seam: a virtual clock (tests/seams.py) drives backoff, X-Retry-After and a
check missed while the device was suspended, against the real development server on 127.0.0.1."""
import asyncio
import random

from agent.config import load
from agent.daemon import Agent
from agent.tools.devserver import DevServer, Faults

from .seams import FakeClock
from .simdevice import Device, image

SCHEDULE = "schedule: {initial_delay: 0, interval: 18000, backoff_base: 60, backoff_cap: 3600}\ndbus: {enabled: false}\n"


async def run_until(tmp_path, checks: int, faults: Faults, clock: FakeClock, version="1.0.0", seed=5, pki=None):
    """Runs the daemon until it started ``checks`` update checks; returns their (virtual) times. With ``pki``
    (tests/test_tls.py's openssl-made certificates) the server speaks TLS and the device verifies it."""
    context = pki.server_context(require_client=False) if pki else None
    srv = DevServer([image(tmp_path, version)], clock=clock.now, faults=faults, ssl_context=context)
    await srv.start()
    dev = Device(tmp_path, srv.url, extra=SCHEDULE)
    if pki:
        text = open(dev.config).read().replace("insecure_http: true", f"ca_file: {pki.path('ca.pem')}")
        with open(dev.config, "w") as f:
            f.write(text)
    agent = Agent(load(dev.config), clock=clock, rng=random.Random(seed))
    times, last = [], [None]

    def on_status(snapshot):
        if snapshot["operation"] == "checking" and last[0] != "checking":
            times.append(clock.now())
        last[0] = snapshot["operation"]

    agent.listeners.append(on_status)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run_forever(stop))
    try:
        for _ in range(3000):  # bounded: at most 30 s of real time
            if len(times) >= checks and agent.owner.job is None or task.done():
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 30)
    finally:
        await srv.stop()
    assert len(times) >= checks, f"only {len(times)} checks"
    return times[:checks], agent


async def test_failed_checks_back_off_exponentially_then_return_to_the_interval(tmp_path):
    clock = FakeClock()
    start = clock.now()
    times, agent = await run_until(tmp_path, 7, Faults(check_status=503, check_failures=5), clock)
    assert times[0] - start < 1  # initial_delay 0
    gaps = [b - a for a, b in zip(times, times[1:])]
    for n, gap in enumerate(gaps[:5], start=1):  # after the n-th failure: half to all of 60 * 8^(n-1) s, capped
        ceiling = min(3600, 60 * 8 ** (n - 1))
        assert ceiling / 2 <= gap <= ceiling + 31, (n, gaps)
    assert 18000 <= gaps[5] <= 18000 * 1.2 + 61 + 31, gaps  # the sixth check succeeded: the regular interval
    assert agent.ctx.state.failures == 0


async def test_x_retry_after_over_verified_tls_holds_background_checks_back(tmp_path):
    from .test_tls import Pki
    clock = FakeClock()
    # X-Retry-After binds only an answer that came over verified TLS (a CUP proof covers no header)
    times, _ = await run_until(tmp_path, 2, Faults(retry_after="30000"), clock, pki=Pki(tmp_path))
    assert times[1] - times[0] >= 30000, times  # longer than the 18000 s interval


async def test_a_check_missed_while_suspended_runs_within_five_minutes_of_waking_spread_out(tmp_path):
    delays = []
    for seed in range(6):  # six devices of a fleet that slept through their check
        clock = FakeClock()
        start = clock.now()
        clock.suspend(after=start + 3000, seconds=6 * 3600)  # asleep from 3000 s after start for 6 h
        work = tmp_path / str(seed)
        work.mkdir()
        times, _ = await run_until(work, 2, Faults(), clock, seed=seed)
        woke = clock.woke_at[0]
        assert woke > times[0] + 18000 * 1.2 + 61  # the planned check's time passed during the suspend
        assert woke <= times[1] <= woke + 300 + 31, (times[1] - woke)  # caught up within 5 minutes
        delays.append(times[1] - woke)
    assert max(delays) - min(delays) > 60, delays  # spread, not all at the moment of waking


async def test_a_stop_that_comes_while_the_loop_first_sleeps_wakes_it(tmp_path):
    """A SIGTERM right after READY, when the loop already sleeps but its wake-up watcher has not taken its first
    step yet: the watcher saw the stop set, left without waking the sleep, and the daemon stopped only when the
    sleep ran out (up to 30 s; systemd's stop, and a test's, waited that long)."""
    stop = asyncio.Event()

    class StopInFirstSleep(FakeClock):
        woken: list[bool] = []

        async def sleep(self, seconds, wake=None):
            if wake is None or self.woken:
                return await super().sleep(seconds, wake)
            stop.set()  # the signal, before any other task ran
            waiter = asyncio.ensure_future(wake.wait())
            await asyncio.wait({waiter}, timeout=20)  # bounded: the stop must wake it long before
            waiter.cancel()
            self.woken.append(wake.is_set())

    clock = StopInFirstSleep()
    srv = DevServer([image(tmp_path, "1.0.0")], clock=clock.now)
    await srv.start()
    try:
        dev = Device(tmp_path, srv.url, extra=SCHEDULE.replace("initial_delay: 0", "initial_delay: 600"))
        agent = Agent(load(dev.config), clock=clock, rng=random.Random(5))
        await asyncio.wait_for(agent.run_forever(stop), 60)
    finally:
        await srv.stop()
    assert clock.woken == [True], "the first sleep was not woken by the stop"
