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
"""

from .findmax import FindMaxResult, find_max
from .generator import LoadResult, run_load
from .scenario import Scenario, load_scenario
from .soak import SoakSample, SoakVerdict, check_soak

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
