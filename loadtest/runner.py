"""The three commands, over one :class:`Session` (a target with the scenario's collection loaded).

    run       one open-loop run at a fixed rate (or a linear ramp): JSON report + PNG plot
    find-max  a ramp of fixed-rate steps on the same server (findmax.py): JSON + PNG
    soak      a long run at one rate, the server's RSS and fds sampled every ``sample_s``;
              the verdict of soak.py decides the exit status: JSON + PNG (RSS included)

Every command returns ``(exit status, report path)``: 0 fine, 1 a check failed (soak drift,
errors over ``--max-errors``, find-max with no passing rate). The reports are named
``{time}-{command}-{scenario}-{target}.json|.png`` in the output folder.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from braid.service.client import BraidClient

from . import findmax, report, soak, stats
from .generator import LoadResult, Window, run_load
from .scenario import Scenario, ScenarioError
from .schedule import Profile
from .settle import SETTLE_QUIET_S, SETTLE_TIMEOUT_S, settle
from .target import ProcessWatch, Target, ensure_model, open_target
from .worker import BULK_OP, Plan
from .workload import Paths, Workload, build_workload, prepare_collection

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "loadtest" / "results"
DEFAULT_MODELS = ROOT / "bench" / "results" / "models"  # shared with bench/encoders.py


@dataclass
class Options:
    """What every command shares (the CLI's common flags)."""

    target: str = "standalone"
    address: str | None = None
    server_pids: list[int] = field(default_factory=list)
    shard_servers: int = 2
    routers: int = 1
    processes: int = 2
    channels: int = 2
    out: Path = DEFAULT_OUT
    models_dir: Path = DEFAULT_MODELS
    workdir: Path | None = None
    paths: Paths = field(default_factory=Paths)
    collection_mode: str = "fresh"  # with --address: fresh | reuse | recreate
    seed: int = 0
    poisson: bool | None = None  # None: the scenario's load.arrivals
    warmup_s: float | None = None
    timeout_s: float | None = None
    api_key: str | None = None
    max_lag_ms: float = report.MAX_LAG_MS
    quiet: bool = False
    settle_s: float = SETTLE_QUIET_S  # 0: measure right after loading

    def log(self, message: str) -> None:
        if not self.quiet:
            print(f"loadtest: {message}", file=sys.stderr, flush=True)


class Session:
    """A target (started here, or at ``--address``) with the scenario's collection ready; a context manager."""

    def __init__(self, scenario: Scenario, options: Options) -> None:
        self.scenario = scenario
        self.options = options
        self.started = dt.datetime.now(dt.UTC)
        self._stack = ExitStack()
        self.workload: Workload = build_workload(scenario, options.paths)  # ScenarioSkipped before any server
        options.log(f"scenario {scenario.name}: {self.workload.source}")
        try:
            self.target: Target = self._open_target()
            self.client = self._stack.enter_context(BraidClient(self.target.address, api_key=options.api_key))
            mode = options.collection_mode if options.address else "recreate"
            self.loaded = prepare_collection(self.client, scenario, self.workload, mode)
            self.loaded["settle_s"] = self._settle()
            options.log(f"collection {self.loaded['collection']}: {self.loaded}")
        except BaseException:
            self._stack.close()
            raise

    def _settle(self) -> float | None:
        """Wait for the background work the load left (graph builds, merges): the seconds waited,
        None when not waiting (``settle_s`` 0, or no server process this host can see)."""
        pids = list(self.target.pids().values())
        if self.options.settle_s <= 0:
            return None
        if not pids:
            self.options.log("the server's processes are not visible here: measuring without waiting for them to idle")
            return None
        self.options.log(f"waiting for the server to idle for {self.options.settle_s:g} s (background builds)")
        return round(settle(pids, quiet_s=self.options.settle_s, timeout_s=SETTLE_TIMEOUT_S), 1)

    def _open_target(self) -> Target:
        o = self.options
        if not o.address:
            if self.scenario.collection.encoder:
                ensure_model(o.models_dir, self.scenario.collection.encoder)
            if o.workdir is None:
                o.workdir = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="braid-loadtest-")))
            o.log(f"starting a {o.target} target in {o.workdir}")
        target = open_target(
            o.target, o.workdir or Path("."), o.models_dir, o.address, o.server_pids, o.shard_servers, o.routers
        )
        self._stack.callback(target.stop)
        o.log(f"target {target.kind} at {target.address}, processes {target.pids() or 'unknown'}")
        return target

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def plan(self, rate: float, rate_to: float, duration_s: float, warmup_s: float) -> Plan:
        s, o = self.scenario, self.options
        poisson = s.load.arrivals == "poisson" if o.poisson is None else o.poisson
        return Plan(
            address=self.target.address,
            profile=Profile(rate, rate_to, warmup_s, duration_s),
            timeout_s=o.timeout_s or s.load.timeout_s,
            ops=self.workload.ops,
            weights=self.workload.weights,
            bulk=self.workload.bulk,
            poisson=poisson,
            seed=o.seed,
            channels=o.channels,
            metadata=(("authorization", f"Bearer {o.api_key}"),) if o.api_key else (),
        )

    def run(
        self, rate: float, rate_to: float, duration_s: float, warmup_s: float, sample_s: float = 1.0, live: bool = False
    ) -> tuple[dict[str, Any], LoadResult]:
        """One open-loop run; the summary (server samples included) and the raw result."""
        plan = self.plan(rate, rate_to, duration_s, warmup_s)
        watch = ProcessWatch(self.target.pids())
        samples: list[dict[str, Any]] = []
        printed: set[int] = set()

        def on_tick(t: float, windows: dict[int, Window]) -> None:
            sample = {"t": round(t, 2), **watch.sample()} if watch else {"t": round(t, 2)}
            samples.append(sample)
            if live:
                self._live(t, sample, windows, sample_s, printed)

        ramp = f" to {rate_to:g}/s" if rate_to != rate else ""
        self.options.log(
            f"load: {rate:g}/s{ramp} for {duration_s:g} s after a {warmup_s:g} s warm-up, "
            f"{self.options.processes} client processes"
        )
        result = run_load(plan, self.options.processes, on_tick, tick_s=sample_s)
        summary = report.summarize(result, max_lag_ms=self.options.max_lag_ms)
        summary["server"] = {"samples": samples if watch else [], "watched": sorted(watch.processes)}
        return summary, result

    def _live(self, t: float, sample: dict[str, Any], windows: dict[int, Window], sample_s: float, done: set) -> None:
        """One progress line: the windows that arrived since the last line, and the server's memory."""
        new = [i for i in list(windows) if i not in done]
        done.update(new)
        cells = [r for i in new for op, r in windows[i].ops.items() if op != BULK_OP]
        ok = sum(r.ok for r in cells)
        errors = sum(sum(r.errors.values()) for r in cells)
        p99 = stats.summary_ms(stats.merged([r.hist for r in cells]))["p99"]
        rss = ""
        if "rss_bytes" in sample:
            rss = f", server RSS {sample['rss_bytes'] / 2**20:.1f} MiB, {sample['fds']} fds"
        self.options.log(f"t={t:5.0f} s: {ok / sample_s:.0f} OK/s, {errors} errors, p99 {p99:g} ms{rss}")

    # ---------------------------------------------------------------- reports

    def envelope(self, command: str) -> dict[str, Any]:
        return {
            "command": command,
            "scenario": {
                "name": self.scenario.name,
                "description": self.scenario.description,
                "file": self.scenario.path,
                "data": self.workload.source,
                "collection": self.loaded,
            },
            "target": self.target.describe(),
            "started": self.started.isoformat(timespec="seconds"),
        }

    def stem(self, command: str) -> Path:
        stamp = self.started.astimezone().strftime("%Y%m%d-%H%M%S")
        return self.options.out / f"{stamp}-{command}-{self.scenario.name}-{self.target.kind}"

    def title(self, command: str, extra: str) -> str:
        return f"loadtest {command} {self.scenario.name} on {self.target.kind}: {extra}"


def _write(path: Path, data: dict[str, Any]) -> Path:
    return report.write_json(data, path.with_suffix(".json"))


# ------------------------------------------------------------------- commands


def command_run(
    session: Session, rate: float, rate_to: float | None, duration_s: float, max_errors: float | None
) -> tuple[int, Path]:
    warmup = session.options.warmup_s if session.options.warmup_s is not None else session.scenario.load.warmup_s
    summary, _ = session.run(rate, rate_to if rate_to is not None else rate, duration_s, warmup)
    data = {**session.envelope("run"), **summary}
    stem = session.stem("run")
    path = _write(stem, data)
    lat = summary["latency_ms"]
    title = f"{summary['asked']['rate']:g}/s asked, {summary['achieved_qps']:g}/s achieved, p99 {lat['p99']:g} ms"
    report.plot_run(data, stem.with_suffix(".png"), session.title("run", title), rss=True)
    print(report.text(summary))
    print(f"report: {path} and {stem.with_suffix('.png')}")
    if max_errors is not None and summary["error_share"] > max_errors:
        print(f"FAILED: error share {summary['error_share']:.2%} > {max_errors:.2%}")
        return 1, path
    return 0, path


def command_find_max(
    session: Session,
    rates: list[float],
    step_s: float,
    p99_ms: float,
    max_errors: float,
    refine: int,
    min_achieved: float = 0.9,
    pause_s: float = 1.0,
) -> tuple[int, Path]:
    warmup = session.options.warmup_s if session.options.warmup_s is not None else session.scenario.load.warmup_s
    summaries: dict[float, dict[str, Any]] = {}

    def run_step(rate: float) -> findmax.Step:
        if summaries:
            time.sleep(pause_s)  # let the last step's stragglers drain
        summary, _ = session.run(rate, rate, step_s, warmup)
        summaries[rate] = summary
        lat = summary["latency_ms"]
        session.options.log(
            f"step {rate:g}/s: achieved {summary['achieved_qps']:g}/s, p50 {lat['p50']:g} ms, "
            f"p99 {lat['p99']:g} ms, errors {summary['errors'] or 'none'}"
        )
        return findmax.Step(
            rate=rate,
            achieved=summary["achieved_qps"],
            p99_ms=lat["p99"],
            error_share=summary["error_share"],
            generator_limited=summary["generator"]["limited"],
        )

    result = findmax.find_max(run_step, rates, p99_ms, max_errors, refine, min_achieved)
    steps = []
    for step in result.steps:
        s = summaries[step.rate]
        steps.append(
            {
                **step.__dict__,
                "p50_ms": s["latency_ms"]["p50"],
                "latency_ms": s["latency_ms"],
                "errors": s["errors"],
                "generator": s["generator"],
                "machine": s["machine"],
                "series": s["series"],
            }
        )
    data = {
        **session.envelope("find-max"),
        **result.to_dict(),
        "min_achieved": min_achieved,
        "steps": steps,
        "step_s": step_s,
        "warmup_s": warmup,
    }
    stem = session.stem("find-max")
    path = _write(stem, data)
    best = f"{result.best_rate:g}/s" if result.best_rate is not None else "none"
    report.plot_find_max(data, stem.with_suffix(".png"), session.title("find-max", f"highest sustainable {best}"))
    for step in result.steps:
        flag = " (generator-limited)" if step.generator_limited else ""
        print(
            f"{step.rate:>9g}/s  achieved {step.achieved:>9g}/s  p99 {step.p99_ms:>8g} ms  "
            f"errors {step.error_share:.2%}  {'pass' if step.passed else 'FAIL: ' + step.reason}{flag}"
        )
    print(f"highest sustainable rate: {best} (p99 <= {p99_ms:g} ms, errors <= {max_errors:.2%}); {result.stopped}")
    if result.generator_limited:
        print("note: the generator was limited at some step: the result may be the client's limit, not the server's")
    print(f"report: {path} and {stem.with_suffix('.png')}")
    return (0 if result.best_rate is not None else 1), path


def rate_from_find_max(path: Path, fraction: float) -> float:
    """``fraction`` of the highest sustainable rate in a find-max report."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not data.get("best_rate"):
        raise ScenarioError(f"{path} has no sustainable rate (best_rate is {data.get('best_rate')!r})")
    return round(float(data["best_rate"]) * fraction, 3)


def command_soak(
    session: Session,
    rate: float,
    duration_s: float,
    warmup_s: float,
    sample_s: float,
    max_p99_drift: float,
    max_rss_growth: float,
    p99_floor_ms: float,
    max_errors: float,
) -> tuple[int, Path]:
    if duration_s <= warmup_s:
        raise ScenarioError(f"soak duration {duration_s:g} s must be longer than its warm-up {warmup_s:g} s")
    summary, result = session.run(rate, rate, duration_s - warmup_s, warmup_s, sample_s=sample_s, live=True)
    server = summary["server"]["samples"]
    samples = soak.soak_samples(result.windows, result.plan.window_s, sample_s, server, duration_s)
    watched = bool(summary["server"]["watched"])
    verdict = soak.check_soak(samples, warmup_s, max_p99_drift, max_rss_growth, p99_floor_ms, max_errors, watched)
    if not watched:
        verdict.failures.append("the server's processes could not be watched (give --server-pid): RSS unchecked")
        verdict.ok = False
    data = {
        **session.envelope("soak"),
        "verdict": verdict.to_dict(),
        "limits": {
            "max_p99_drift": max_p99_drift,
            "max_rss_growth": max_rss_growth,
            "p99_floor_ms": p99_floor_ms,
            "max_error_share": max_errors,
            "sample_s": sample_s,
            "warmup_s": warmup_s,
        },
        "samples": [s.__dict__ for s in samples],
        **summary,
    }
    stem = session.stem("soak")
    path = _write(stem, data)
    title = f"{rate:g}/s for {duration_s:g} s: {'PASS' if verdict.ok else 'FAIL'}"
    report.plot_run(data, stem.with_suffix(".png"), session.title("soak", title), rss=True)
    print(report.text(summary))
    print(
        f"p99 after warm-up {verdict.p99_baseline_ms:g} ms -> end {verdict.p99_final_ms:g} ms "
        f"({verdict.p99_drift:+.1%}); RSS {verdict.rss_baseline_bytes / 2**20:.1f} -> "
        f"{verdict.rss_final_bytes / 2**20:.1f} MiB ({verdict.rss_growth:+.1%})"
    )
    print(f"report: {path} and {stem.with_suffix('.png')}")
    if not verdict.ok:
        for failure in verdict.failures:
            print(f"SOAK FAILED: {failure}")
        return 1, path
    print("soak passed")
    return 0, path
