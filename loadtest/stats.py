"""HdrHistogram helpers: one value range for every histogram, so any two can be merged.

Latencies are recorded in integer microseconds from 1 µs to 10 minutes with 3 significant
digits (a recorded value is within 0.1% of the true one); longer values are clamped to the top.
Histograms cross process boundaries in HdrHistogram's compressed, base64 encoding.
"""

from __future__ import annotations

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 600_000_000
DIGITS = 3
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}


def histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


def record_s(hist: HdrHistogram, seconds: float) -> None:
    """Record a duration given in seconds (as microseconds, clamped into the range)."""
    hist.record_value(min(max(int(seconds * 1e6), LOWEST_US), HIGHEST_US))


def encode(hist: HdrHistogram) -> bytes:
    return hist.encode()


def decode(encoded: bytes) -> HdrHistogram:
    return HdrHistogram.decode(encoded)


def merged(hists: list[HdrHistogram]) -> HdrHistogram:
    out = histogram()
    for hist in hists:
        out.add(hist)
    return out


def summary_ms(hist: HdrHistogram) -> dict[str, float]:
    """count, p50/p90/p99/p99.9, max and mean in milliseconds (zeros for an empty histogram)."""
    count = hist.get_total_count()
    out: dict[str, float] = {"count": count}
    for name, q in PERCENTILES.items():
        out[name] = round(hist.get_value_at_percentile(q) / 1000, 3) if count else 0.0
    out["max"] = round(hist.get_max_value() / 1000, 3) if count else 0.0
    out["mean"] = round(hist.get_mean_value() / 1000, 3) if count else 0.0
    return out
