"""Bandwidth caps (agent/ratelimit.py, install.max_rate / max_rate_interactive): the token bucket's arithmetic on a
virtual clock, then a capped download from the development server on 127.0.0.1 through the installer's ring (the
bytes as they land on the slot, sampled every 64 KiB): over every window of 4 s or more the rate stays within
10 % over the cap. Load on the machine can only make it slower, so the upper bound is what is asserted; the
figures are printed."""
import asyncio
import hashlib
import os
import time

import aiohttp
import pytest

from agent.boot.sim import SimBoot
from agent.boot.worker import BootWorker
from agent.install import Installer
from agent.omaha.outcome import PackageOffer
from agent.ratelimit import MIN_QUANTUM, TokenBucket, bucket, quantum_for
from agent.tools.devserver import DevServer, Image

from .conftest import record_count
from .simdevice import Device, image


class VirtualTime:
    def __init__(self):
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_the_bucket_never_lets_more_than_one_quantum_ahead_of_the_rate():
    t = VirtualTime()
    bucket = TokenBucket(2 << 20, clock=t.clock, sleep=t.sleep)
    assert bucket.quantum == int((2 << 20) * 0.1)  # 100 ms of the rate per read: smooth, not 1-s bursts
    spent = 0
    for size in [bucket.quantum] * 200 + [7000] * 300:
        await bucket.spend(size)
        spent += size
        t.now += 0.0001  # the read itself
        assert spent <= (2 << 20) * t.now + bucket.quantum
    assert spent / t.now == pytest.approx(2 << 20, rel=0.05)
    assert max(t.slept) <= 0.101  # no pause longer than one quantum's worth


def test_the_read_size_tiles_the_ring_chunk_within_250_ms_of_the_rate():
    """Below 10 MiB/s (100 ms of the rate under the 1 MiB chunk) a read is a half, quarter, ... of the chunk, so
    each chunk fills in equal reads with one wait after each; never more than 250 ms of the rate at once."""
    chunk = 1 << 20
    assert quantum_for(8 << 20, chunk) == chunk  # one read per chunk (it was 0.8 MiB + 0.2 MiB, two waits)
    assert quantum_for(2 << 20, chunk) == chunk // 2
    assert quantum_for(64 << 20, chunk) == int((64 << 20) * 0.1)  # reads stop at the chunk's end anyway
    assert quantum_for(1 << 20, chunk - 1) == int((1 << 20) * 0.1)  # an odd chunk does not halve: 100 ms reads
    assert quantum_for(100_000, 1_000_000) == MIN_QUANTUM  # (31 250 would be 312 ms of the rate)
    for rate in [MIN_QUANTUM * 2] + [k << 16 for k in range(1, 400)]:
        q = quantum_for(rate, chunk)
        assert bucket(rate, chunk).quantum == q
        if q < chunk:
            assert chunk % q == 0 and q >= MIN_QUANTUM, (rate, q)
            assert q <= max(MIN_QUANTUM, rate * 0.25), (rate, q)
            assert q == MIN_QUANTUM or q > rate * 0.125, (rate, q)  # halving stops at the first size within 250 ms


async def test_a_slow_reader_is_not_paid_back_with_a_burst():
    t = VirtualTime()
    bucket = TokenBucket(1 << 20, clock=t.clock, sleep=t.sleep)
    t.now = 30.0  # a long stall: the tokens it did not use are not saved up past one quantum
    await bucket.spend(bucket.quantum)
    await bucket.spend(bucket.quantum)
    assert t.slept == [pytest.approx(bucket.quantum / (1 << 20))]


def windows(samples, span):
    """(seconds, bytes/s) of every window between two samples at least ``span`` seconds apart."""
    out = []
    for i, (t0, b0) in enumerate(samples):
        for t1, b1 in samples[i + 1:]:
            if t1 - t0 >= span:
                out.append((t1 - t0, (b1 - b0) / (t1 - t0)))
                break
    return out


async def capped_download(tmp_path, cap: int, size: int):
    data = os.urandom(size)
    (tmp_path / "big.img").write_bytes(data)
    srv = DevServer([Image(str(tmp_path / "big.img"), "2.0.0", "{0a0b0c0d-1111-4222-8333-444455556666}")])
    await srv.start()
    slots = {s: str(tmp_path / f"slot-{s}.img") for s in "ab"}
    for path in slots.values():
        with open(path, "wb") as f:
            f.truncate(size + (1 << 20))
    boot = SimBoot(str(tmp_path / "bootenv.json"), slots)
    boot.initialize("a", "1.0.0")
    samples = []
    url = f"{srv.url.rsplit('/', 3)[0]}/packages/big.img"
    pkg = PackageOffer("big.img", (url,), size, hashlib.sha256(data).digest(), None)
    try:
        async with aiohttp.ClientSession() as session:
            inst = Installer(session, chunk=64 << 10, max_rate=cap,
                             on_progress=lambda p: samples.append((time.monotonic(), p.done)))
            started = time.monotonic()
            samples.append((started, 0))
            await inst.install(BootWorker(boot), "b", slots["b"], size + (1 << 20), pkg, "2.0.0", 3)
    finally:
        await srv.stop()
    return samples, time.monotonic() - started


async def test_a_capped_download_stays_within_ten_percent_of_the_cap_over_every_window(tmp_path):
    cap, size = 2 << 20, 16 << 20  # about 8 s
    samples, took = await capped_download(tmp_path, cap, size)
    rates = [rate for _, rate in windows(samples, 4.0)]
    overall = size / took
    figures = (f"cap {cap >> 20} MiB/s: overall {overall / cap:.3f} of the cap in {took:.1f} s; 4-s windows "
               f"{min(rates) / cap:.3f}..{max(rates) / cap:.3f} of the cap ({len(rates)} windows)")
    print(figures)
    record_count("capped download", figures)
    assert rates and max(rates) <= cap * 1.10
    assert overall >= cap * 0.5  # not far below it (a loaded machine only slows it down)


async def test_interactive_downloads_use_max_rate_interactive(tmp_path, server):
    dev = Device(tmp_path, server.url, extra="install: {max_rate_interactive: 1M}\n")
    rc, out, err = await dev.cli("daemon", "--once", "--verbose")  # --once is an interactive check
    assert rc == 0 and "installed 2.0.0 on slot b" in out, err
    line = next(x for x in err.splitlines() if "verified 2.0.0: 3145728 bytes in" in x)
    took = float(line.split(" bytes in ")[1].split(" s")[0])
    print(line)
    assert took >= (3 << 20) / (1 << 20) * 0.9  # 3 MiB at 1 MiB/s: never faster than the cap allows


def test_rates_read_with_their_suffixes_and_bad_ones_are_refused_in_one_line(tmp_path):
    from agent import config
    dev = Device(tmp_path, "http://127.0.0.1:9/", extra="install: {max_rate: 2M, max_rate_interactive: 512K}\n")
    c = config.load(dev.config)
    assert (c.install.max_rate, c.install.max_rate_interactive, c.install.on_metered) == (2 << 20, 512 << 10, "wait")
    for bad, says in (("2X", "must be bytes per second, e.g. 2M, 512K or 1000000"),
                      ("100", "must be between 4K and 1024G bytes per second")):
        dev = Device(tmp_path, "http://127.0.0.1:9/", extra=f"install: {{max_rate: {bad}}}\n")
        with pytest.raises(config.ConfigError) as info:
            config.load(dev.config)
        assert f"install.max_rate: {says}" in str(info.value) and "\n" not in str(info.value)


async def test_background_downloads_use_max_rate(tmp_path, server, caplog):
    import logging

    from agent.machine import Check

    from .test_metered import Job
    caplog.set_level(logging.INFO, logger="omaha-agent")
    async with Job(tmp_path, server.url, extra="install: {max_rate: 1M, on_metered: allow}\n") as job:
        outcome = await asyncio.wait_for((await job.agent.submit(Check(interactive=False))).job, 60)
    assert outcome.ok and "installed 2.0.0 on slot b" in outcome.message, outcome.message
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("verified 2.0.0: 3145728 bytes"))
    print(line)
    assert float(line.split(" bytes in ")[1].split(" s")[0]) >= 3 * 0.9  # 3 MiB at 1 MiB/s at the most
