"""Braid's load tests: open-loop load with honest percentiles, capacity search and soak.

    python -m loadtest run dense --rate 200 --duration 30s
    python -m loadtest find-max dense --p99-ms 50 --max-errors 0.001
    python -m loadtest soak dense --from-find-max loadtest/results/...-find-max-dense-standalone.json --duration 2m

Modules, from the bottom up:
  schedule   arrival times of an open-loop schedule (fixed rate or linear ramp; uniform or Poisson)
  stats      HdrHistogram helpers (µs, 1 µs .. 10 min, 3 significant digits)
  worker     one client process: an asyncio loop sending pre-serialized calls when they are due
  generator  the parent: starts the workers, merges their histograms into a LoadResult
  scenario   TOML scenario files (scenarios/*.toml) into frozen dataclasses
  workload   a scenario's data, collection and serialized requests
  target     a braid serve child, a LocalCluster, or a running server; process RSS/fd sampling
  findmax    the capacity search (pure, with the step runner injected)
  soak       the soak's drift and RSS verdict (pure)
  report     JSON summaries and PNG plots
  runner     the run / find-max / soak commands over one Session
  vectors    the seeded vector set for loadtest/ and bench/ (the shared script's, or the same arrays
             from the project's copy of its generator when ../shared is absent)

The names below are imported on first use, so ``import loadtest.vectors`` (bench scripts, the
spann worker whose RSS is measured) costs numpy alone, not grpc, hdrh and psutil.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "FindMaxResult": "findmax",
    "find_max": "findmax",
    "LoadResult": "generator",
    "run_load": "generator",
    "Scenario": "scenario",
    "load_scenario": "scenario",
    "SoakSample": "soak",
    "SoakVerdict": "soak",
    "check_soak": "soak",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)


__all__ = [
    "FindMaxResult",
    "LoadResult",
    "Scenario",
    "SoakSample",
    "SoakVerdict",
    "check_soak",
    "find_max",
    "load_scenario",
    "run_load",
]
