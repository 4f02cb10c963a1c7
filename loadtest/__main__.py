"""``python -m loadtest``: open-loop load against Braid, capacity search and soak.

    python -m loadtest list
    python -m loadtest run SCENARIO [--rate R] [--to-rate R2] [--duration 30s]
    python -m loadtest find-max SCENARIO [--p99-ms 50] [--max-errors 0.001] [--start R] [--factor 1.5]
    python -m loadtest soak SCENARIO [--rate R | --from-find-max REPORT.json] [--duration 2m]

SCENARIO is a bundled name (``list``) or a TOML file. ``--target standalone`` (default) starts
a ``braid serve`` child, ``--target cluster`` a local cluster (NATS, 2 shard servers, a
router); ``--address HOST:PORT`` uses a running server instead. Exit status: 0 fine, 1 a
check failed, 2 a bad scenario or flag, 3 the scenario cannot run here (data or model missing).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .findmax import ramp
from .scenario import ScenarioError, bundled_scenarios, load_scenario, parse_duration
from .settle import SETTLE_QUIET_S
from .target import TARGETS
from .workload import MODES, CollectionExists, Paths, ScenarioSkipped

if TYPE_CHECKING:
    from .runner import Options

EXIT_FAILED, EXIT_USAGE, EXIT_SKIPPED = 1, 2, 3


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ScenarioError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected rates like 50,100,200, got {text!r}") from err
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be > 0, got {text!r}")
    return sorted(rates)


def parser() -> argparse.ArgumentParser:
    from .runner import DEFAULT_MODELS, DEFAULT_OUT
    from .workload import CACHE_DIR, SHARED_DIR

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("scenario", help="a bundled scenario name (see `list`) or a .toml file")
    where = common.add_argument_group("target")
    where.add_argument("--target", choices=TARGETS, default="standalone", help="what to start (default standalone)")
    where.add_argument("--address", help="use the server running at HOST:PORT instead of starting one")
    where.add_argument(
        "--server-pid",
        type=int,
        action="append",
        default=[],
        help="with --address: a pid to watch (RSS, fds); repeat for several",
    )
    where.add_argument(
        "--settle",
        type=_duration,
        default=SETTLE_QUIET_S,
        help="after loading, wait until the server processes stay idle this long (background graph builds) "
        f"before measuring; 0: measure at once (default {SETTLE_QUIET_S:g}s)",
    )
    where.add_argument("--shard-servers", type=int, default=2, help="--target cluster: shard servers (default 2)")
    where.add_argument("--routers", type=int, default=1, help="--target cluster: routers (default 1)")
    existing = where.add_mutually_exclusive_group()
    existing.add_argument("--reuse", action="store_true", help="with --address: use an existing collection as it is")
    existing.add_argument("--recreate", action="store_true", help="with --address: drop and reload the collection")
    where.add_argument("--api-key", default=os.environ.get("BRAID_API_KEY"), help="API key (default $BRAID_API_KEY)")
    gen = common.add_argument_group("generator")
    gen.add_argument("--procs", type=int, default=2, help="client processes (default 2)")
    gen.add_argument("--channels", type=int, default=2, help="gRPC channels (connections) per process (default 2)")
    gen.add_argument("--poisson", action="store_true", default=None, help="Poisson arrivals (default: the scenario's)")
    gen.add_argument("--warmup", type=_duration, help="warm-up at the start rate, not counted (default: scenario)")
    gen.add_argument("--timeout", type=_duration, help="deadline of each call (default: the scenario's)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--max-lag-ms",
        type=float,
        default=10.0,
        help="send lag p99 above which the generator counts as the bottleneck (default 10)",
    )
    files = common.add_argument_group("files")
    files.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a scenario key, e.g. --set data.n=5000 (repeatable)",
    )
    files.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})")
    files.add_argument(
        "--models-dir",
        type=Path,
        default=Path(os.environ.get("BRAID_MODELS_DIR", DEFAULT_MODELS)),
        help=f"models of a server started here; exported on demand (default $BRAID_MODELS_DIR or {DEFAULT_MODELS})",
    )
    files.add_argument("--workdir", type=Path, help="data of a server started here (default: a temporary folder)")
    files.add_argument("--shared", type=Path, default=SHARED_DIR, help=f"the shared folder (default {SHARED_DIR})")
    files.add_argument("--cache", type=Path, default=CACHE_DIR, help=f"vector set cache (default {CACHE_DIR})")
    common.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    top = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the bundled scenarios")

    run = commands.add_parser("run", parents=[common], help="one open-loop run at a fixed rate (or a ramp)")
    run.add_argument("--rate", type=_positive, help="calls per second (default: the scenario's load.rate)")
    run.add_argument("--to-rate", type=_positive, help="ramp linearly from --rate to this over the duration")
    run.add_argument("--duration", type=_duration, help="measured seconds or 30s/2m (default: the scenario's)")
    run.add_argument("--max-errors", type=float, help="exit 1 when the error share is above this")

    fm = commands.add_parser("find-max", parents=[common], help="the highest rate within a p99 and error budget")
    fm.add_argument("--p99-ms", type=_positive, default=50.0, help="p99 target in ms (default 50)")
    fm.add_argument("--max-errors", type=float, default=0.001, help="largest error share (default 0.001)")
    fm.add_argument("--start", type=_positive, help="first rate (default: scenario find_max.start)")
    fm.add_argument("--factor", type=float, help="each next rate is this times the last (default: scenario's)")
    fm.add_argument("--max-rate", type=_positive, help="stop the ramp here (default: scenario's)")
    fm.add_argument("--rates", type=_rates, help="explicit comma-separated rates instead of the geometric ramp")
    fm.add_argument("--step", type=_duration, help="measured seconds per step (default: scenario's)")
    fm.add_argument("--refine", type=int, help="bisection steps after the first failure (default: scenario's)")
    fm.add_argument(
        "--min-achieved",
        type=float,
        default=0.9,
        help="a step passes only if it achieved this share of its rate (default 0.9)",
    )

    soak = commands.add_parser("soak", parents=[common], help="a long run at one rate; fails on p99 or RSS drift")
    soak.add_argument("--rate", type=_positive, help="calls/s (default: 70%% of --from-find-max, or load.rate)")
    soak.add_argument("--from-find-max", type=Path, help="a find-max JSON report: rate = --fraction x its best rate")
    soak.add_argument("--fraction", type=float, default=0.7, help="of the find-max rate (default 0.7)")
    soak.add_argument("--duration", type=_duration, help="total, warm-up included (default: soak.duration_s, 2m)")
    soak.add_argument("--sample", type=_duration, help="sampling interval (default: soak.sample_s, 10 s)")
    soak.add_argument("--max-p99-drift", type=float, default=0.20, help="largest p99 growth (default 0.20)")
    soak.add_argument("--max-rss-growth", type=float, default=0.05, help="largest RSS growth (default 0.05)")
    soak.add_argument("--p99-floor-ms", type=float, default=1.0, help="p99 growth below this is not drift (1 ms)")
    soak.add_argument("--max-errors", type=float, default=0.001, help="largest error share (default 0.001)")
    return top


def _options(args: argparse.Namespace) -> Options:
    from .runner import Options

    mode = "reuse" if args.reuse else "recreate" if args.recreate else "fresh"
    assert mode in MODES
    return Options(
        target=args.target,
        address=args.address,
        server_pids=args.server_pid,
        shard_servers=args.shard_servers,
        routers=args.routers,
        processes=args.procs,
        channels=args.channels,
        out=args.out,
        models_dir=args.models_dir,
        workdir=args.workdir,
        paths=Paths(shared=args.shared, cache=args.cache),
        collection_mode=mode,
        seed=args.seed,
        poisson=args.poisson,
        warmup_s=args.warmup,
        timeout_s=args.timeout,
        api_key=args.api_key,
        max_lag_ms=args.max_lag_ms,
        quiet=args.quiet,
        settle_s=args.settle,
    )


def _dispatch(args: argparse.Namespace) -> int:
    from . import runner

    scenario = load_scenario(args.scenario, args.overrides)
    if args.procs < 1 or args.channels < 1:
        raise ScenarioError("--procs and --channels must be >= 1")
    rate = None
    if args.command == "soak":  # the rate first: a bad report should fail before any server starts
        fraction_rate = runner.rate_from_find_max(args.from_find_max, args.fraction) if args.from_find_max else None
        rate = args.rate or fraction_rate or scenario.load.rate
    with runner.Session(scenario, _options(args)) as session:
        if args.command == "run":
            code, _ = runner.command_run(
                session,
                args.rate or scenario.load.rate,
                args.to_rate,
                args.duration or scenario.load.duration_s,
                args.max_errors,
            )
        elif args.command == "find-max":
            f = scenario.find_max
            rates = args.rates or ramp(args.start or f.start, args.factor or f.factor, args.max_rate or f.max_rate)
            refine = f.refine if args.refine is None else args.refine
            code, _ = runner.command_find_max(
                session, rates, args.step or f.step_s, args.p99_ms, args.max_errors, refine, args.min_achieved
            )
        else:
            s = scenario.soak
            assert rate is not None
            code, _ = runner.command_soak(
                session,
                rate,
                args.duration or s.duration_s,
                s.warmup_s if args.warmup is None else args.warmup,
                args.sample or s.sample_s,
                args.max_p99_drift,
                args.max_rss_growth,
                args.p99_floor_ms,
                args.max_errors,
            )
    return code


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "list":
        for name in bundled_scenarios():
            scenario = load_scenario(name)
            print(f"{name:<10} {scenario.description}")
        return 0
    try:
        return _dispatch(args)
    except ScenarioSkipped as err:
        print(f"loadtest: skipped: {err}", file=sys.stderr)
        return EXIT_SKIPPED
    except (ScenarioError, CollectionExists, FileNotFoundError) as err:
        print(f"loadtest: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
