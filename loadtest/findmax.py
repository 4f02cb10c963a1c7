"""Capacity search: the highest arrival rate the target sustains within a latency and error budget.

A step runs the scenario at one fixed rate R (open loop, ``step_s`` long after its warm-up)
and passes when

    p99 <= p99_ms   and   error share <= max_errors   and   achieved >= min_achieved * R  (0.9)

The ramp is start, start * factor, start * factor^2, ... (or an explicit list of rates) until a
step fails or max_rate is passed; then ``refine`` bisection steps between the last passing
and the first failing rate. The answer is the highest passing rate (None when even the first
step failed). A step whose generator could not keep its schedule is flagged: above that rate
the figure says more about the client machine than about the server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Step:
    rate: float
    achieved: float
    p99_ms: float
    error_share: float
    generator_limited: bool
    passed: bool = False
    reason: str = ""


@dataclass
class FindMaxResult:
    best_rate: float | None
    p99_target_ms: float
    max_errors: float
    steps: list[Step] = field(default_factory=list)
    stopped: str = ""  # why the ramp ended
    generator_limited: bool = False  # a step at or below the first failing rate was generator-limited

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def judge(step: Step, p99_ms: float, max_errors: float, min_achieved: float = 0.9) -> Step:
    """Set ``step.passed`` and ``step.reason``."""
    reasons = []
    if step.p99_ms > p99_ms:
        reasons.append(f"p99 {step.p99_ms:.1f} ms > {p99_ms:g} ms")
    if step.error_share > max_errors:
        reasons.append(f"errors {step.error_share:.2%} > {max_errors:.2%}")
    if step.achieved < min_achieved * step.rate:
        reasons.append(f"achieved {step.achieved:.0f}/s < {min_achieved:.0%} of {step.rate:g}/s")
    step.passed = not reasons
    step.reason = "; ".join(reasons) or "ok"
    return step


def _tidy(rate: float) -> float:
    """Whole calls/s from 20/s up, two decimals below: rates a reader can repeat."""
    return float(round(rate)) if rate >= 20 else round(rate, 2)


def ramp(start: float, factor: float, max_rate: float) -> list[float]:
    """start, start * factor, ... up to max_rate (which ends the list if not reached exactly)."""
    if start <= 0 or factor <= 1:
        raise ValueError(f"need start > 0 and factor > 1, got {start}, {factor}")
    rates, rate = [], start
    while rate < max_rate * (1 + 1e-9):
        rates.append(_tidy(rate))
        rate *= factor
    if not rates or rates[-1] < max_rate * (1 - 1e-9):
        rates.append(max_rate)
    return rates


def find_max(
    run_step: Callable[[float], Step],
    rates: Sequence[float],
    p99_ms: float,
    max_errors: float,
    refine: int = 2,
    min_achieved: float = 0.9,
) -> FindMaxResult:
    """Ramp through ``rates`` with ``run_step(rate) -> Step`` until a step fails, then bisect ``refine`` times."""
    result = FindMaxResult(best_rate=None, p99_target_ms=p99_ms, max_errors=max_errors)

    def attempt(rate: float) -> Step:
        step = judge(run_step(rate), p99_ms, max_errors, min_achieved)
        result.steps.append(step)
        return step

    failed: float | None = None
    for rate in rates:
        step = attempt(rate)
        if not step.passed:
            failed = rate
            break
        result.best_rate = rate
    if failed is None:
        result.stopped = f"every rate passed, up to {rates[-1]:g}/s: the maximum is higher"
    elif result.best_rate is None:
        result.stopped = f"the first rate {failed:g}/s already failed"
    else:
        low, high = result.best_rate, failed
        for _ in range(refine):
            middle = _tidy((low + high) / 2)
            if middle in (low, high):
                break
            if attempt(middle).passed:
                low = result.best_rate = middle
            else:
                high = middle
        result.stopped = f"{high:g}/s failed"
    limit = failed if failed is not None else float("inf")
    result.generator_limited = any(s.generator_limited for s in result.steps if s.rate <= limit)
    return result
