"""Soak verdict: does latency or memory drift while a steady load runs for a long time?

Samples are taken every ``sample_s`` (10 s by default): p99 of the calls completed in that
interval, QPS, errors, and the server's total RSS and open fds. Samples that end within the
warm-up are ignored. Of the rest, with k = min(6, max(1, n // 3)) (3 in a 2-minute soak, 6 in an hour):

    baseline = median of the first k samples,   final = median of the last k samples
    p99 drift  = final_p99 / baseline_p99 - 1     fails when > max_p99_drift (0.20)
                                                  and final - baseline > p99_floor_ms (1 ms)
    RSS growth = final_rss / baseline_rss - 1     fails when > max_rss_growth (0.05)
    error share over the samples after warm-up    fails when > max_error_share (0.001)

Medians of a few samples keep one noisy interval (a garbage collection, a neighbour's burst
on a shared machine) from deciding the verdict alone; the p99 floor keeps sub-millisecond
jitter from counting as drift. Fewer than two samples after the warm-up is a failure too:
such a soak shows nothing.

Each sample also carries diagnostics that the verdict reports but does not judge: the
server's CPU milliseconds per call, and the machine's busy and hypervisor-stolen share of
all its cores over the interval. A p99 that grows while the CPU per call stays flat and the
machine gets busier is the machine's (a neighbour, scheduling, steal); a growing CPU per
call is the server's own.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from . import stats
from .generator import Window
from .worker import BULK_OP


@dataclass(frozen=True)
class SoakSample:
    t: float  # seconds since the start, at the end of the interval
    requests: int  # calls completed in the interval (OK or not)
    errors: int
    qps: float
    p50_ms: float
    p99_ms: float
    rss_bytes: int  # all of the target's processes together
    fds: int
    # Diagnostics, not judged: the target's CPU per call in the interval, and how busy the
    # whole machine was (all cores, every process) and how much the hypervisor stole.
    server_cpu_ms_per_call: float = 0.0
    machine_busy_percent: float = 0.0
    steal_percent: float = 0.0


@dataclass
class SoakVerdict:
    ok: bool
    failures: list[str] = field(default_factory=list)
    samples_used: int = 0
    p99_baseline_ms: float = 0.0
    p99_final_ms: float = 0.0
    p99_drift: float = 0.0
    rss_baseline_bytes: float = 0.0
    rss_final_bytes: float = 0.0
    rss_growth: float = 0.0
    error_share: float = 0.0
    # Same windows as the p99 (diagnostics): flat CPU per call while p99 grows points at the
    # machine (scheduling, neighbours, steal); growing CPU per call points at the server.
    cpu_ms_per_call_baseline: float = 0.0
    cpu_ms_per_call_final: float = 0.0
    machine_busy_baseline_percent: float = 0.0
    machine_busy_final_percent: float = 0.0
    steal_final_percent: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_soak(
    samples: list[SoakSample],
    warmup_s: float,
    max_p99_drift: float = 0.20,
    max_rss_growth: float = 0.05,
    p99_floor_ms: float = 1.0,
    max_error_share: float = 0.001,
    watch_rss: bool = True,
) -> SoakVerdict:
    """The verdict on ``samples`` (see the module docstring); ``watch_rss=False`` when no RSS was sampled."""
    after = [s for s in samples if s.t > warmup_s + 1e-9]
    if len(after) < 2:
        return SoakVerdict(
            ok=False,
            failures=[
                f"only {len(after)} sample(s) after the {warmup_s:.0f} s warm-up: run longer or shorten the warm-up"
            ],
            samples_used=len(after),
        )
    k = min(6, max(1, len(after) // 3))
    first, last = after[:k], after[-k:]
    verdict = SoakVerdict(ok=True, samples_used=len(after))
    verdict.p99_baseline_ms = statistics.median(s.p99_ms for s in first)
    verdict.p99_final_ms = statistics.median(s.p99_ms for s in last)
    if verdict.p99_baseline_ms > 0:
        verdict.p99_drift = verdict.p99_final_ms / verdict.p99_baseline_ms - 1
    verdict.cpu_ms_per_call_baseline = statistics.median(s.server_cpu_ms_per_call for s in first)
    verdict.cpu_ms_per_call_final = statistics.median(s.server_cpu_ms_per_call for s in last)
    verdict.machine_busy_baseline_percent = statistics.median(s.machine_busy_percent for s in first)
    verdict.machine_busy_final_percent = statistics.median(s.machine_busy_percent for s in last)
    verdict.steal_final_percent = statistics.median(s.steal_percent for s in last)
    grew_ms = verdict.p99_final_ms - verdict.p99_baseline_ms
    if grew_ms > p99_floor_ms and (verdict.p99_drift > max_p99_drift or verdict.p99_baseline_ms == 0):
        verdict.failures.append(
            f"p99 drifted {verdict.p99_drift:+.0%} (from {verdict.p99_baseline_ms:.2f} ms after warm-up to "
            f"{verdict.p99_final_ms:.2f} ms at the end; limit {max_p99_drift:+.0%}; meanwhile server CPU per call "
            f"{verdict.cpu_ms_per_call_baseline:.3f} -> {verdict.cpu_ms_per_call_final:.3f} ms, machine busy "
            f"{verdict.machine_busy_baseline_percent:.0f}% -> {verdict.machine_busy_final_percent:.0f}%, "
            f"steal {verdict.steal_final_percent:.1f}%)"
        )
    if watch_rss:
        verdict.rss_baseline_bytes = statistics.median(s.rss_bytes for s in first)
        verdict.rss_final_bytes = statistics.median(s.rss_bytes for s in last)
        if verdict.rss_baseline_bytes > 0:
            verdict.rss_growth = verdict.rss_final_bytes / verdict.rss_baseline_bytes - 1
        if verdict.rss_growth > max_rss_growth:
            verdict.failures.append(
                f"server RSS grew {verdict.rss_growth:+.1%} (from {verdict.rss_baseline_bytes / 2**20:.1f} MiB after "
                f"warm-up to {verdict.rss_final_bytes / 2**20:.1f} MiB; limit {max_rss_growth:+.0%})"
            )
    requests = sum(s.requests for s in after)
    errors = sum(s.errors for s in after)
    verdict.error_share = errors / requests if requests else 0.0
    if requests == 0:
        verdict.failures.append("no call completed after the warm-up")
    elif verdict.error_share > max_error_share:
        verdict.failures.append(
            f"{errors} of {requests} calls failed after warm-up "
            f"({verdict.error_share:.2%}; limit {max_error_share:.2%})"
        )
    verdict.ok = not verdict.failures
    return verdict


def soak_samples(
    windows: dict[int, Window],
    window_s: float,
    sample_s: float,
    server: list[dict[str, Any]],
    end_s: float,
) -> list[SoakSample]:
    """Merge the generator's windows into ``sample_s`` intervals (percentiles from the merged
    histograms, not averaged) and pair each with the server sample taken nearest its end.
    Intervals ending after ``end_s`` (the drain's stragglers) are left out."""
    per = max(1, round(sample_s / window_s))
    buckets: dict[int, list[Window]] = {}
    for index, window in windows.items():
        buckets.setdefault(index // per, []).append(window)
    out = []
    for bucket in sorted(buckets):
        t = (bucket + 1) * per * window_s
        if t > end_s + 1e-9:
            break
        hist = stats.histogram()
        ok = errors = 0
        for window in buckets[bucket]:
            for op, result in window.ops.items():
                if op == BULK_OP:
                    continue
                hist.add(result.hist)
                ok += result.ok
                errors += sum(result.errors.values())
        lat = stats.summary_ms(hist)
        nearest = min(server, key=lambda s: abs(s["t"] - t)) if server else {"rss_bytes": 0, "fds": 0}
        diagnostics = _interval_use(server, t - per * window_s, t, ok + errors)
        out.append(
            SoakSample(
                t=round(t, 3),
                requests=ok + errors,
                errors=errors,
                qps=round((ok + errors) / (per * window_s), 2),
                p50_ms=lat["p50"],
                p99_ms=lat["p99"],
                rss_bytes=int(nearest["rss_bytes"]),
                fds=int(nearest["fds"]),
                **diagnostics,
            )
        )
    return out


def _interval_use(server: list[dict[str, Any]], start: float, end: float, calls: int) -> dict[str, float]:
    """CPU use between the server samples nearest ``start`` and ``end``: the target's ms per
    call, and the machine's busy and stolen share of all its cores."""
    timed = [s for s in server if "cpu_s" in s]
    if len(timed) < 2:
        return {}
    ia = min(range(len(timed)), key=lambda i: abs(timed[i]["t"] - start))
    ib = min(range(len(timed)), key=lambda i: abs(timed[i]["t"] - end))
    if ia == ib:  # an interval at the edge of the sampling: the nearest full interval stands in
        ia, ib = (ia - 1, ia) if ia > 0 else (ia, ia + 1)
    a, b = timed[ia], timed[ib]
    wall = b["t"] - a["t"]
    if wall <= 0:
        return {}
    capacity = wall * (psutil.cpu_count() or 1)
    if "machine_total_s" in a and "machine_total_s" in b and b["machine_total_s"] > a["machine_total_s"]:
        # The CPU time all cores accounted between the two readings: on a loaded machine the
        # sample's timestamp and its CPU reading drift apart, and busy/wall came out above 100%.
        capacity = b["machine_total_s"] - a["machine_total_s"]
    return {
        "server_cpu_ms_per_call": round((b["cpu_s"] - a["cpu_s"]) * 1000 / calls, 4) if calls else 0.0,
        "machine_busy_percent": round(100 * (b["machine_busy_s"] - a["machine_busy_s"]) / capacity, 1),
        "steal_percent": round(100 * (b["machine_steal_s"] - a["machine_steal_s"]) / capacity, 2),
    }
