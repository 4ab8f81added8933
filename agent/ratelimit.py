"""A token bucket for a download's bytes per second: smooth (each read takes at most ``quantum`` bytes, 100 to 250 ms
of the rate, and waits for what it took beyond the tokens at hand), never bursts of a second. The clock and the
sleep are injected, so the arithmetic runs on a virtual clock in tests."""
from __future__ import annotations

import asyncio
import time

MIN_QUANTUM = 16 << 10  # bytes: a read smaller than this costs more system calls than it saves in smoothness


class TokenBucket:
    def __init__(self, rate: int, *, burst: float = 0.1, capacity: int | None = None, clock=time.monotonic,
                 sleep=asyncio.sleep):
        if rate <= 0:
            raise ValueError("a rate is a positive number of bytes per second")
        self.rate = rate
        self.capacity = capacity or max(MIN_QUANTUM, int(rate * burst))  # the most that may go at once
        self.clock, self.sleep = clock, sleep
        self.tokens = float(self.capacity)
        self.stamp = clock()

    @property
    def quantum(self) -> int:
        """The most one read should ask for."""
        return self.capacity

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(float(self.capacity), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    async def spend(self, n: int) -> None:
        """``n`` bytes were taken: waits until the rate allows them (cancellable)."""
        self._refill()
        self.tokens -= n
        if self.tokens < 0:
            await self.sleep(-self.tokens / self.rate)


def quantum_for(rate: int, piece: int | None = None) -> int:
    """The read size for ``rate``: 100 ms of it; when that is less than ``piece`` (the reader's ring chunk), the
    largest half, quarter, ... of ``piece`` not over 250 ms of the rate (nor under ``MIN_QUANTUM``), so that the
    reads tile each chunk exactly (at 8 MiB/s: one 1 MiB read per chunk, not 0.8 + 0.2 MiB with a wait after
    each)."""
    plain = max(MIN_QUANTUM, int(rate * 0.1))
    if piece is None or plain >= piece:
        return plain
    q = piece
    while q > rate * 0.25 and q % 2 == 0 and q // 2 >= MIN_QUANTUM:
        q //= 2
    if q > rate * 0.25 and q > MIN_QUANTUM:  # a chunk with an odd factor does not halve that far: no tiling
        return plain
    return q


def bucket(rate: int | None, piece: int | None = None) -> TokenBucket | None:
    """A bucket for ``rate`` bytes per second (reads of ``quantum_for(rate, piece)``), or ``None`` for no limit
    (the caller skips it entirely)."""
    return TokenBucket(rate, capacity=quantum_for(rate, piece)) if rate else None
