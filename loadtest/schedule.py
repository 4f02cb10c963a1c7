"""Open-loop arrival times: when each request is due, whatever happened to the earlier ones.

The rate profile r(t) is ``warmup_s`` at ``rate``, then ``duration_s`` going linearly from
``rate`` to ``rate_to`` (equal for a fixed rate). The expected number of arrivals by time t is

    N(t) = rate * t                                               for t <= W
    N(t) = rate * W + rate * u + (rate_to - rate) * u^2 / (2 D)     u = t - W, for W < t <= W + D

Uniform arrivals put arrival j at N^-1(j), j = 0, 1, ...; client process k of P takes
j = k, k + P, k + 2P, ..., so the processes interleave into one evenly spaced stream. Poisson
arrivals put each process's arrivals at N^-1(s) where s grows by P * Exp(1) per arrival: a
Poisson process of rate r(t) / P per process, r(t) in all (a time-rescaled Poisson process).

Latency is then measured from these due times, not from when a request was actually sent,
so a server that stalls is charged for every request that waited (no coordinated omission).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """``warmup_s`` at ``rate`` arrivals/s, then ``duration_s`` from ``rate`` to ``rate_to``."""

    rate: float
    rate_to: float
    warmup_s: float
    duration_s: float

    @property
    def end_s(self) -> float:
        return self.warmup_s + self.duration_s

    def expected(self, t: float) -> float:
        """N(t): expected arrivals in [0, t)."""
        t = min(max(t, 0.0), self.end_s)
        if t <= self.warmup_s:
            return self.rate * t
        u = t - self.warmup_s
        return self.rate * self.warmup_s + self.rate * u + (self.rate_to - self.rate) * u * u / (2 * self.duration_s)

    @property
    def total(self) -> float:
        return self.expected(self.end_s)

    def time_of(self, n: float) -> float:
        """N^-1(n): when the n-th arrival (counted from 0, may be fractional) is due; n < total."""
        if self.rate > 0 and n <= self.rate * self.warmup_s:
            return n / self.rate
        m = n - self.rate * self.warmup_s
        slope = (self.rate_to - self.rate) / self.duration_s
        if abs(slope) < 1e-12:
            u = m / self.rate
        else:  # rate * u + slope * u^2 / 2 = m, the root in [0, D]
            u = (-self.rate + math.sqrt(max(self.rate * self.rate + 2 * slope * m, 0.0))) / slope
        return self.warmup_s + min(max(u, 0.0), self.duration_s)


def arrivals(profile: Profile, process: int, processes: int, poisson: bool = False, seed: int = 0) -> Iterator[float]:
    """Due times (seconds from the start) of process ``process`` of ``processes``, in order."""
    total = profile.total
    if poisson:
        rng = random.Random(seed * 1_000_003 + process)
        n = processes * rng.expovariate(1.0)
        while n < total:
            yield profile.time_of(n)
            n += processes * rng.expovariate(1.0)
    else:
        n = float(process)
        while n < total:
            yield profile.time_of(n)
            n += processes
