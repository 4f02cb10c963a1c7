"""loadtest/: a short smoke run of each scenario against a real server, and the logic that decides verdicts.

Smoke runs go through ``python -m loadtest``'s own ``main`` against one ``braid serve`` child
(each scenario has its own collection), at rates this 2-core machine holds while other work
runs: every run must have no errors, answer every call its schedule offered, hold its asked
rate within 10% in the median measured second (a loaded machine's stall moves a second or
two, not the median) and leave a JSON report and a PNG plot. Against a local cluster:
``dense`` through ``--target cluster`` (the CLI starts and stops its own), ``mixed`` and
``bm25`` on one module-scoped cluster given by ``--address``. The soak's drift and RSS checks
and find-max's ramp are tested on synthetic numbers, where they must fail too, and the CI soak
(``slow``: a real 2-minute soak of ``dense`` on its own ``braid serve``) must pass. A stalling
toy server shows that latency is measured from the due time (no coordinated omission). All
traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import itertools
import json
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from loadtest import findmax, report, soak, stats
from loadtest.__main__ import EXIT_USAGE, main
from loadtest.generator import LoadResult, run_load
from loadtest.scenario import ScenarioError, bundled_scenarios, load_scenario, parse_duration
from loadtest.schedule import Profile, arrivals
from loadtest.soak import SoakSample, check_soak
from loadtest.target import DEFAULT_MODEL, Cluster, Standalone, ensure_model
from loadtest.worker import Plan
from loadtest.workload import ScenarioSkipped

SHARED = Path(__file__).resolve().parents[2] / "shared"
SMALL_VECTORS = ["--set", "data.n=2000", "--set", "data.queries=200"]
CRANFIELD = ["--set", 'data.collection="cranfield"']
# --settle 0: these smoke loads leave the server nothing worth waiting for (test_dense_smoke waits once).
RUN = ["--duration", "6s", "--warmup", "1s", "--quiet", "--procs", "2", "--settle", "0"]


# -------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The default model exported for the server (``braid models export``); the reason when it cannot be."""
    directory = tmp_path_factory.mktemp("loadtest-models")
    try:
        ensure_model(directory, DEFAULT_MODEL)
    except ScenarioSkipped as err:
        return directory, str(err)
    return directory, ""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models: tuple[Path, str]) -> Iterator[Standalone]:
    target = Standalone(tmp_path_factory.mktemp("loadtest-server"), models[0])
    yield target
    target.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, models: tuple[Path, str]) -> Iterator[Cluster]:
    """One local cluster (NATS, 2 shard servers, a router) for the cluster smoke runs that share it."""
    target = Cluster(tmp_path_factory.mktemp("loadtest-cluster"), models[0])
    yield target
    target.stop()


def run_cli(out: Path, *args: str) -> tuple[int, dict[str, Any], Path]:
    """``python -m loadtest ARGS --out OUT``; the exit status, the one JSON report and its path."""
    code = main([*args, "--out", str(out)])
    reports = sorted(out.glob("*.json"))
    assert len(reports) == 1, f"expected one report in {out}, found {reports} (exit {code})"
    return code, json.loads(reports[0].read_text()), reports[0]


def against(server: Standalone | Cluster) -> list[str]:
    pids = [arg for pid in server.pids().values() for arg in ("--server-pid", str(pid))]
    return ["--address", server.address, *pids, "--recreate"]


def assert_watched_all(data: dict[str, Any], cluster: Cluster) -> None:
    """Every process of the cluster (router, shard servers, NATS) was sampled, each with memory."""
    watched = {f"pid-{pid}" for pid in cluster.pids().values()}
    assert len(watched) >= 4 and set(data["server"]["watched"]) == watched
    assert set(data["server"]["samples"][-1]["per_process"]) == watched


def assert_smoke(code: int, data: dict[str, Any], path: Path, rate: float) -> None:
    """What a smoke run must show whatever else the machine runs.

    The rate is judged per measured second, not over the whole span: ``achieved_qps`` divides by
    the time to the last answer, so one stall of a loaded machine near the end (0.4 s on a 4 s
    run) took it out of 10% although every call was offered on time and answered. A generator
    that offers the wrong rate, or a server that cannot keep up, is off in most seconds."""
    assert code == 0
    assert data["errors"] == {}, data["errors"]
    asked = data["asked"]
    assert asked["rate"] == rate and asked["arrivals"] == "uniform"
    # Every call the schedule offered after the warm-up was sent and answered.
    assert abs(data["completed"] - rate * asked["duration_s"]) <= 1, (data["completed"], rate, asked["duration_s"])
    measured = sorted(row["qps"] for row in data["series"] if not row["warmup"] and not row["drain"])
    assert len(measured) >= asked["duration_s"] - 1, data["series"]
    median = statistics.median(measured)
    assert abs(median - rate) <= 0.1 * rate, (median, rate, measured, data["generator"]["lag_ms"], data["machine"])
    # A stall may delay the last answers, never past the calls' deadline.
    assert data["span_s"] <= asked["duration_s"] + asked["timeout_s"], data["span_s"]
    assert data["latency_ms"]["count"] == data["ok"] == data["completed"]
    assert 0 < data["latency_ms"]["p50"] <= data["latency_ms"]["p99"] <= data["latency_ms"]["max"]
    assert path.with_suffix(".png").stat().st_size > 1000
    assert data["series"] and data["server"]["samples"] and data["server"]["samples"][0]["rss_bytes"] > 0


def need_shared(collection: str) -> None:
    if not (SHARED / "data" / collection / "corpus.jsonl").exists():
        pytest.skip(f"{SHARED / 'data' / collection} is missing: the BM25 and hybrid scenarios need it")


# ---------------------------------------------------------- smoke: every scenario


def test_every_scenario_has_a_smoke_run() -> None:
    assert set(bundled_scenarios()) == {"dense", "bm25", "hybrid", "mixed", "bulk"}


def test_dense_smoke(server: Standalone, tmp_path: Path) -> None:
    settle = ["--settle", "1s"]  # the load's background graph builds end before the clock starts
    code, data, path = run_cli(
        tmp_path, "run", "dense", *against(server), *SMALL_VECTORS, *RUN, *settle, "--rate", "80"
    )
    assert_smoke(code, data, path, 80)
    assert data["generator"]["processes"] == 2 and len(data["generator"]["worker_cpu"]) == 2
    assert data["scenario"]["collection"]["loaded"] == 2000
    assert data["scenario"]["collection"]["settle_s"] >= 1.0  # it waited for a whole idle window


def test_dense_smoke_without_the_shared_folder(server: Standalone, tmp_path: Path) -> None:
    """A clone on its own: the vector set comes from the project's copy of the shared generator."""
    alone = ["--shared", str(tmp_path / "nowhere"), "--cache", str(tmp_path / "cache")]
    size = ["--set", "data.n=1000", "--set", "data.queries=100"]
    code, data, path = run_cli(tmp_path / "out", "run", "dense", *against(server), *alone, *size, *RUN, "--rate", "60")
    assert_smoke(code, data, path, 60)
    assert "made by the project generator" in data["scenario"]["data"], data["scenario"]
    assert data["scenario"]["collection"]["loaded"] == 1000
    assert (tmp_path / "cache" / "vectors-1000x384-q100" / "gt.npy").exists()


def test_bm25_smoke(server: Standalone, tmp_path: Path) -> None:
    need_shared("cranfield")
    code, data, path = run_cli(tmp_path, "run", "bm25", *against(server), *CRANFIELD, *RUN, "--rate", "60")
    assert_smoke(code, data, path, 60)


def test_hybrid_smoke(server: Standalone, models: tuple[Path, str], tmp_path: Path) -> None:
    need_shared("cranfield")
    if models[1]:
        pytest.skip(f"the hybrid scenario needs the default model: {models[1]}")
    # The server encodes every document at load time: few documents, a rate query encoding holds.
    small = ["--set", "data.max_docs=60"]
    code, data, path = run_cli(tmp_path, "run", "hybrid", *against(server), *CRANFIELD, *small, *RUN, "--rate", "20")
    assert_smoke(code, data, path, 20)


def test_mixed_smoke(server: Standalone, tmp_path: Path) -> None:
    code, data, path = run_cli(tmp_path, "run", "mixed", *against(server), *SMALL_VECTORS, *RUN, "--rate", "80")
    assert_smoke(code, data, path, 80)
    ops = data["ops"]
    assert ops["search"]["completed"] > ops["upsert"]["completed"] > 0  # 90 / 10
    assert ops["upsert"]["errors"] == {}


def test_bulk_smoke(server: Standalone, tmp_path: Path) -> None:
    gentle = [f"--set=bulk.{key}" for key in ("streams=1", "batch=20", "batches_per_stream=5", "batches_per_s=5")]
    code, data, path = run_cli(tmp_path, "run", "bulk", *against(server), *SMALL_VECTORS, *gentle, *RUN, "--rate", "60")
    assert_smoke(code, data, path, 60)
    assert data["bulk"]["completed"] >= 2 and data["bulk"]["errors"] == {}
    assert data["bulk"]["docs_acknowledged"] >= 2 * 5 * 20


def test_cluster_smoke(tmp_path: Path) -> None:
    code, data, path = run_cli(
        tmp_path / "out", "run", "dense", "--target", "cluster", "--workdir", str(tmp_path / "cluster"),
        *SMALL_VECTORS, *RUN, "--rate", "50",
    )  # fmt: skip
    assert_smoke(code, data, path, 50)
    processes = data["target"]["processes"]
    assert data["target"]["kind"] == "cluster"
    assert {"router-0", "shard-0", "shard-1"} <= set(processes) and any("nats" in p for p in processes)
    assert set(data["server"]["samples"][-1]["per_process"]) == set(processes)


def test_cluster_mixed_smoke(cluster: Cluster, tmp_path: Path) -> None:
    code, data, path = run_cli(tmp_path, "run", "mixed", *against(cluster), *SMALL_VECTORS, *RUN, "--rate", "50")
    assert_smoke(code, data, path, 50)
    assert_watched_all(data, cluster)
    ops = data["ops"]
    assert ops["search"]["completed"] > ops["upsert"]["completed"] > 0 and ops["upsert"]["errors"] == {}


def test_cluster_bm25_smoke(cluster: Cluster, tmp_path: Path) -> None:
    need_shared("cranfield")
    code, data, path = run_cli(tmp_path, "run", "bm25", *against(cluster), *CRANFIELD, *RUN, "--rate", "50")
    assert_smoke(code, data, path, 50)
    assert_watched_all(data, cluster)


def test_cluster_hybrid_smoke(cluster: Cluster, models: tuple[Path, str], tmp_path: Path) -> None:
    need_shared("cranfield")
    if models[1]:
        pytest.skip(f"the hybrid scenario needs the default model: {models[1]}")
    # The router encodes documents at load time and every query: few documents, a modest rate.
    small = ["--set", "data.max_docs=60"]
    code, data, path = run_cli(tmp_path, "run", "hybrid", *against(cluster), *CRANFIELD, *small, *RUN, "--rate", "15")
    assert_smoke(code, data, path, 15)
    assert_watched_all(data, cluster)


def test_cluster_bulk_smoke(cluster: Cluster, tmp_path: Path) -> None:
    gentle = [f"--set=bulk.{key}" for key in ("streams=1", "batch=20", "batches_per_stream=5", "batches_per_s=5")]
    code, data, path = run_cli(
        tmp_path, "run", "bulk", *against(cluster), *SMALL_VECTORS, *gentle, *RUN, "--rate", "40"
    )
    assert_smoke(code, data, path, 40)
    assert_watched_all(data, cluster)
    assert data["bulk"]["completed"] >= 2 and data["bulk"]["errors"] == {}
    assert data["bulk"]["docs_acknowledged"] >= 2 * 5 * 20


# --------------------------------------------------------------------- find-max


def test_find_max_on_a_tiny_ramp_returns_a_rate(server: Standalone, tmp_path: Path) -> None:
    """The ramp end to end (its thresholds are tested on synthetic steps below). A step's achieved
    rate counts to its last answer: on a loaded machine one stall at the end of a short step takes
    it under the default 90%, so this smoke asks for half."""
    args = ["find-max", "dense", *against(server), *SMALL_VECTORS, "--rates", "20,40", "--step", "2s"]
    limits = ["--p99-ms", "5000", "--min-achieved", "0.5", "--refine", "0"]
    code, data, path = run_cli(tmp_path, *args, "--warmup", "0.5s", *limits, "--quiet")
    assert code == 0
    assert data["best_rate"] == 40 and data["min_achieved"] == 0.5
    assert [s["rate"] for s in data["steps"]] == [20, 40] and all(s["passed"] for s in data["steps"])
    assert path.with_suffix(".png").stat().st_size > 1000


def step_at(capacity: float, limited_above: float = float("inf")) -> Any:
    """A synthetic server: p99 5 ms up to ``capacity``/s, then 500 ms and a falling achieved rate."""

    def run(rate: float) -> findmax.Step:
        over = rate > capacity
        achieved = capacity * 0.95 if over else rate
        return findmax.Step(rate, achieved, 500.0 if over else 5.0, 0.0, generator_limited=rate > limited_above)

    return run


def test_find_max_ramps_then_bisects() -> None:
    assert findmax.ramp(100, 2, 1000) == [100, 200, 400, 800, 1000]
    result = findmax.find_max(step_at(500), [100, 200, 400, 800], p99_ms=50, max_errors=0.001, refine=2)
    assert [s.rate for s in result.steps] == [100, 200, 400, 800, 600, 500]
    assert result.best_rate == 500 and not result.generator_limited
    assert "p99 500.0 ms > 50 ms" in result.steps[3].reason and "achieved" in result.steps[3].reason


def test_find_max_can_fail_and_says_when_the_generator_limited() -> None:
    none = findmax.find_max(step_at(10), [100, 200], p99_ms=50, max_errors=0.001)
    assert none.best_rate is None and "first rate" in none.stopped
    errors = findmax.find_max(lambda r: findmax.Step(r, r, 1.0, 0.01, False), [100], p99_ms=50, max_errors=0.001)
    assert errors.best_rate is None and "errors 1.00%" in errors.steps[0].reason
    limited = findmax.find_max(step_at(500, limited_above=300), [100, 200, 400, 800], 50, 0.001, refine=0)
    assert limited.best_rate == 400 and limited.generator_limited


# ------------------------------------------------------------------------- soak


def samples(p99: list[float], rss: list[int], errors: int = 0, every: float = 10.0) -> list[SoakSample]:
    return [
        SoakSample(
            t=(i + 1) * every, requests=1000, errors=errors, qps=100.0, p50_ms=1.0, p99_ms=p, rss_bytes=r, fds=30
        )
        for i, (p, r) in enumerate(zip(p99, rss, strict=True))
    ]


MIB = 2**20


def test_soak_passes_a_steady_run() -> None:
    steady = samples([20, 30, 9, 10, 11, 10, 12, 10, 11, 10], [100 * MIB] * 3 + [104 * MIB] * 7)
    verdict = check_soak(steady, warmup_s=30)
    assert verdict.ok, verdict.failures
    assert verdict.samples_used == 7 and verdict.p99_baseline_ms == 10.5  # the warm-up's 20 and 30 are ignored


def test_soak_fails_when_p99_drifts() -> None:
    drifting = samples([10, 10, 10, 11, 12, 13, 13, 14, 14], [100 * MIB] * 9)
    verdict = check_soak(drifting, warmup_s=0)
    assert not verdict.ok and verdict.p99_drift == pytest.approx(0.4)
    assert "p99 drifted +40%" in verdict.failures[0]
    # The same relative drift below the absolute floor is jitter, not drift.
    assert check_soak(samples([1.0, 1.0, 1.0, 1.4, 1.4, 1.4], [100 * MIB] * 6), warmup_s=0).ok


def test_soak_fails_when_rss_grows() -> None:
    leaking = samples([10] * 9, [(100 + i) * MIB for i in range(9)])  # +1 MiB per sample
    verdict = check_soak(leaking, warmup_s=0)
    assert not verdict.ok and verdict.rss_growth == pytest.approx(107 / 101 - 1)  # medians of the first/last 3
    assert "RSS grew +5.9%" in verdict.failures[0]
    assert check_soak(leaking, warmup_s=0, max_rss_growth=0.1).ok
    # Growth during the warm-up does not count.
    assert check_soak(samples([10] * 6, [50 * MIB] * 3 + [100 * MIB] * 3), warmup_s=30).ok


def test_machine_busy_share_is_of_the_cpu_time_the_cores_accounted() -> None:
    """A sample's timestamp is taken before its CPU reading; on a loaded machine they drift apart
    (a late reading): busy seconds over the wall time between timestamps read 120% here."""
    cores = psutil.cpu_count() or 1
    server = [
        {"t": 0.0, "cpu_s": 0.0, "machine_busy_s": 0.0, "machine_steal_s": 0.0, "machine_total_s": 0.0},
        {"t": 10.0, "cpu_s": 1.0, "machine_busy_s": 12.0 * cores, "machine_steal_s": 0.6 * cores,
         "machine_total_s": 12.0 * cores},
    ]  # fmt: skip
    use = soak._interval_use(server, 0.0, 10.0, calls=500)
    assert use == {"server_cpu_ms_per_call": 2.0, "machine_busy_percent": 100.0, "steal_percent": 5.0}


def test_soak_fails_on_errors_and_on_too_few_samples() -> None:
    assert "calls failed" in check_soak(samples([10] * 4, [MIB] * 4, errors=5), warmup_s=0).failures[0]
    short = check_soak(samples([10, 10], [MIB] * 2), warmup_s=15)
    assert not short.ok and "only 1 sample" in short.failures[0]


def test_soak_command_writes_samples_and_rss(server: Standalone, tmp_path: Path) -> None:
    args = ["soak", "dense", *against(server), *SMALL_VECTORS, "--rate", "50", "--duration", "6s"]
    code, data, path = run_cli(tmp_path, *args, "--warmup", "2s", "--sample", "1s", "--quiet")
    assert code in (0, 1)  # the verdict on a 6 s soak on a busy machine is not the point here
    assert (code == 0) == data["verdict"]["ok"]
    assert len(data["samples"]) >= 5 and all(s["rss_bytes"] > 0 and s["fds"] > 0 for s in data["samples"])
    assert data["errors"] == {} and path.with_suffix(".png").stat().st_size > 1000
    # The diagnostics that tell the server's drift from the machine's: a search costs the
    # server some CPU (well under a second; process CPU time ticks in 10 ms, so a 1 s sample
    # may read 0), and the machine was busy some of the time.
    steady = data["samples"]
    assert all(0 <= s["server_cpu_ms_per_call"] < 1000 for s in steady), steady
    assert sum(s["server_cpu_ms_per_call"] for s in steady) > 0, steady
    assert all(0 < s["machine_busy_percent"] <= 100 and s["steal_percent"] >= 0 for s in steady), steady
    assert data["verdict"]["cpu_ms_per_call_final"] > 0


@pytest.mark.slow
def test_ci_soak_dense_two_minutes(tmp_path: Path) -> None:
    """The CI soak (issue 14: "CI runs 2 minutes"): ``python -m loadtest soak dense`` for 2 minutes
    against its own ``braid serve`` child, 30 s warm-up, 10 s samples (9 after the warm-up,
    medians of the first and last 3 compared); it must pass.

    Kept from flaking on a loaded 2-core box: 2,000 vectors at 60 calls/s (a few % of what
    the server holds here, p99 3-6 ms per sample), and a p99 floor of 5 ms instead of the
    CLI's 1 ms: at a p99 of a few ms a neighbour's burst alone moves the medians by 1-3 ms
    (+20-50%; a quiet run went 3.5 -> 4.4 ms, +25%), which is scheduling noise, not drift;
    a real regression (a leak slowing every search, a growing queue) grows by much more than
    5 ms within two minutes at this rate. RSS growth (5%) and errors (none) are checked as
    the documented soak checks them.

    When the machine itself is saturated (its CPUs >= 90% busy in the last samples compared:
    other work on the box, the generator starved), the p99 is the neighbours' (37 -> 271 ms seen at
    load 13, with the server's CPU per call flat at 1.6 -> 1.5 ms). Then a p99 drift alone is
    accepted only if the server's own CPU per call stayed within 20%: a server that got slower
    per search still fails, RSS and errors are checked as ever."""
    args = ["soak", "dense", "--target", "standalone", "--workdir", str(tmp_path / "server"), *SMALL_VECTORS]
    limits = ["--rate", "60", "--duration", "2m", "--warmup", "30s", "--sample", "10s", "--p99-floor-ms", "5"]
    began = time.monotonic()
    code, data, path = run_cli(tmp_path / "out", *args, *limits, "--procs", "2", "--quiet")
    elapsed = time.monotonic() - began
    verdict = data["verdict"]
    assert (code == 0) == verdict["ok"]
    saturated = verdict["machine_busy_final_percent"] >= 90
    if not saturated or not all(f.startswith("p99 drifted") for f in verdict["failures"]):
        assert code == 0 and verdict["ok"], verdict["failures"]
        assert verdict["p99_drift"] <= 0.20 or verdict["p99_final_ms"] - verdict["p99_baseline_ms"] <= 5
    else:  # the machine's p99, not the server's: the server's CPU per search must not have grown
        cpu = (verdict["cpu_ms_per_call_baseline"], verdict["cpu_ms_per_call_final"])
        assert 0 < cpu[1] <= 1.2 * cpu[0], (cpu, verdict["failures"])
    # The load ran its 2 minutes: not less (the wall clock), and not more than its calls' deadline
    # past them (the run's own clock). Starting the server and loading 2,000 vectors come on top
    # (27 s at load 13) and get no bound but the test's timeout.
    assert elapsed >= 120, elapsed
    asked = data["asked"]
    assert (asked["warmup_s"], asked["duration_s"]) == (30, 90), asked
    assert 90 <= data["span_s"] <= 90 + asked["timeout_s"], data["span_s"]
    assert data["target"]["kind"] == "standalone" and data["scenario"]["collection"]["loaded"] == 2000
    assert verdict["samples_used"] == 9 and len(data["samples"]) == 12
    assert verdict["rss_baseline_bytes"] > 0 and verdict["rss_growth"] <= 0.05
    assert verdict["error_share"] == 0 and data["errors"] == {}
    assert data["achieved_qps"] == pytest.approx(60, rel=0.1)
    assert all(s["rss_bytes"] > 0 and s["fds"] > 0 for s in data["samples"])
    assert data["limits"]["p99_floor_ms"] == 5 and data["limits"]["max_rss_growth"] == 0.05
    png = path.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[20:24]) >= 700  # 3 panels: RSS included


# --------------------------------------------------- the generator's honesty


class _StallingServer:
    """A bare gRPC Search answering b"" with one worker thread; call number ``stall_at`` sleeps ``stall_s``."""

    def __init__(self, stall_at: int, stall_s: float) -> None:
        self.calls = 0
        self.lock = threading.Lock()

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self.lock:
                self.calls += 1
                stall = self.calls == stall_at
            time.sleep(stall_s if stall else 0.001)
            return b""

        handler = grpc.method_handlers_generic_handler(
            "braid.v1.Braid", {"Search": grpc.unary_unary_rpc_method_handler(handle, lambda b: b, lambda b: b)}
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


def test_latency_counts_from_the_due_time_not_the_send() -> None:
    """A 0.5 s stall at 100/s delays ~50 calls queued behind it: an open-loop generator charges each one."""
    toy = _StallingServer(stall_at=150, stall_s=0.5)
    try:
        plan = Plan(
            address=f"127.0.0.1:{toy.port}",
            profile=Profile(100, 100, warmup_s=0.5, duration_s=3.0),
            timeout_s=5.0,
            ops={"search": ("/braid.v1.Braid/Search", [b""])},
            weights={"search": 1.0},
            channels=1,
        )
        result: LoadResult = run_load(plan, processes=1)
    finally:
        toy.server.stop(0)
    search = result.totals["search"]
    assert search.ok == 300 and not search.errors
    # About 40 of the 300 measured calls waited > 100 ms; a closed loop would have recorded one slow call.
    assert search.hist.get_value_at_percentile(90) > 100_000
    assert search.hist.get_max_value() > 400_000
    summary = report.summarize(result)
    assert summary["achieved_qps"] == pytest.approx(100, rel=0.1)


def test_generator_check_flags_a_late_generator() -> None:
    lag = stats.histogram()
    for _ in range(100):
        stats.record_s(lag, 0.050)
    fake = LoadResult(
        plan=Plan("127.0.0.1:1", Profile(10, 10, 0, 1), 1.0, {}, {}),
        processes=1,
        t0_wall=0.0,
        totals={},
        windows={},
        workers=[{"cpu_s": 0.95, "wall_s": 1.0, "max_in_flight": 3}],
        lag=lag,
        machine_cpu_percent=50.0,
        loadavg_before=(0, 0, 0),
        loadavg_after=(0, 0, 0),
    )
    check = report.generator_check(fake)
    assert check["limited"] and len(check["reasons"]) == 2
    assert "send lag p99 50.0 ms" in check["reasons"][0] and "worker 0 used 95%" in check["reasons"][1]


# ------------------------------------------------------- schedule and scenarios


def test_uniform_arrivals_interleave_at_the_asked_rate() -> None:
    profile = Profile(100, 100, warmup_s=1.0, duration_s=2.0)
    per_process = [list(arrivals(profile, k, 3)) for k in range(3)]
    merged = sorted(t for times in per_process for t in times)
    assert len(merged) == 300
    gaps = [b - a for a, b in itertools.pairwise(merged)]
    assert min(gaps) == pytest.approx(0.01) and max(gaps) == pytest.approx(0.01)


def test_a_ramp_and_poisson_arrivals_keep_their_counts() -> None:
    ramp = Profile(100, 300, warmup_s=1.0, duration_s=2.0)  # 100 in the warm-up + 2 s x mean 200
    times = list(arrivals(ramp, 0, 1))
    assert len(times) == 500 and times == sorted(times) and times[-1] < 3.0
    assert sum(1 for t in times if t >= 2.0) > sum(1 for t in times if 1.0 <= t < 2.0)  # rising
    poisson = [len(list(arrivals(Profile(200, 200, 0, 10), k, 2, poisson=True, seed=1))) for k in range(2)]
    assert sum(poisson) == pytest.approx(2000, rel=0.1)


def test_scenarios_load_override_and_explain_mistakes() -> None:
    for name in bundled_scenarios():
        assert load_scenario(name).name == name
    s = load_scenario("mixed", ["data.n=500", 'search.filter="tag"', "load.duration_s=1m30s"])
    assert s.data.n == 500 and s.load.duration_s == 90 and s.mix.upsert == 0.1
    assert parse_duration("250ms") == 0.25 and parse_duration("1h") == 3600
    with pytest.raises(ScenarioError, match=r"unknown key\(s\) \['rat'\]; valid: rate"):
        load_scenario("dense", ["load.rat=5"])
    with pytest.raises(ScenarioError, match=r"needs data\.kind = 'beir'"):
        load_scenario("dense", ['search.strands=["bm25"]'])
    with pytest.raises(ScenarioError, match="not a duration"):
        load_scenario("dense", ['load.duration_s="soon"'])


def test_cli_usage_errors_and_skips(tmp_path: Path) -> None:
    assert main(["run", "no-such-scenario", "--out", str(tmp_path), "--quiet"]) == EXIT_USAGE
    missing = ["--shared", str(tmp_path / "nowhere"), "--quiet", "--out", str(tmp_path)]
    assert main(["run", "bm25", *missing]) == 3  # skipped: the data is not there
    assert not list(tmp_path.glob("*.json"))
