"""The HNSW strand's filter planner (index/hnsw_plan.py) in process: filtered against unfiltered search.

    .venv/bin/python bench/filter_planner.py                 # shared set 100,000 x 384, ef 64
    .venv/bin/python bench/filter_planner.py --n 20000 --queries 100

One HnswStrand filled with the shared set (bench/dense.py's loader) as recovery fills it, then
served (one graph after the idle merge, plus the growing block), one query a call on this thread,
OPENBLAS_NUM_THREADS=1 as ``braid serve`` sets it. Per selectivity, a random mask keeping that
share (as bench/realload.py's keyword fields): the unfiltered p50, the filtered p50 of a filter
seen before ("repeated": planned BUILD_AFTER times first and its filter graph, when the planner
asks for one, built: its view, when the planner keeps one, is warm) and of a filter never seen
before ("first": the strand's filter views and graphs dropped before each search, so every
search pays the gather or the walk), both against unfiltered, recall@10 inside the filter, the numpy
floor (one query against a pre-gathered contiguous matrix of the matching rows) and the plan.
No gRPC: bench/realload.py measures the same through the server.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads, as service/cli.py does

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from dense import shared_vectors  # noqa: E402

from braid.index import hnsw_filter_graphs as filter_graphs  # noqa: E402
from braid.index import hnsw_plan  # noqa: E402
from braid.index.hnsw_filter_graphs import FilterGraphs  # noqa: E402
from braid.index.hnsw_strand import HnswStrand  # noqa: E402
from braid.index.hnsw_views import Views  # noqa: E402
from braid.index.locks import ReadWriteLock  # noqa: E402
from braid.index.schema import DenseFieldSpec, Metric  # noqa: E402

SELECTIVITIES = (0.001, 0.01, 0.05, 0.10, 0.20, 0.30, 0.50, 0.90)


def p50_ms(call, count: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for i in range(count):
        started = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - started)
    return float(np.percentile(times, 50) * 1e3)


def plan_of(strand: HnswStrand, mask: np.ndarray, k: int, ef: int) -> str:
    """The plan the planner picks now for the largest graph (the one that costs)."""
    graph = max(strand._graphs, key=lambda g: g.live)
    plan = hnsw_plan.graph_plan(graph, mask[graph.first : graph.top + 1], k, ef, remember=False)
    if plan is None:
        return "none"
    if plan.kind == "scan":
        return "view" if plan.view_key is not None and graph.views.get(plan.view_key) is not None else "scan"
    return f"{plan.kind} {plan.want}"


def forget_views(strand: HnswStrand) -> None:
    """Drop every filter view and filter graph (and what the strand counted of its filters)."""
    for graph in strand._graphs:
        graph.views = Views(graph.views.budget)
        graph.fgraphs = FilterGraphs(graph.fgraphs.budget)


def wait_built(strand: HnswStrand, deadline_s: float = 600.0) -> float:
    """Until the strand's filter graph builds asked so far are done; the seconds waited."""
    started = time.perf_counter()
    while strand._filter_graphs.busy():
        if time.perf_counter() - started > deadline_s:
            raise TimeoutError("filter graph builds still running")
        time.sleep(0.05)
    return time.perf_counter() - started


def measure(
    strand: HnswStrand,
    lock: ReadWriteLock,
    stored: np.ndarray,
    queries: np.ndarray,
    mask: np.ndarray,
    sel: float,
    k: int,
    ef: int,
) -> tuple:
    """One selectivity's row: unfiltered, repeated-filter and first-seen-filter p50s, recall, floor, plan."""
    count = len(queries)
    unit = strand.stored_form(queries)
    match = np.flatnonzero(mask)
    gathered = np.ascontiguousarray(stored[match])

    def search(i: int, allowed: np.ndarray | None = None) -> np.ndarray:
        with lock.read():
            return strand.search(queries[i : i + 1], k, ef, allowed)[0][0]

    for i in range(filter_graphs.BUILD_AFTER):  # as a repeated filter: its view made, its graph asked for
        search(i, mask)
    built_s = wait_built(strand)
    plan = plan_of(strand, mask, k, ef)

    def first(i: int) -> None:
        forget_views(strand)
        search(i, mask)

    unf = p50_ms(search, count)
    found: list[np.ndarray] = []
    repeated = p50_ms(lambda i: found.append(search(i, mask)), count)
    cold = p50_ms(first, max(20, count // 5))
    floor = p50_ms(lambda i: np.argpartition(-(gathered @ unit[i]), min(k, len(match) - 1))[:k], count)
    exact = [match[np.argsort(-(gathered @ unit[i]))[:k]] for i in range(count)]
    recall = float(
        np.mean([len(set(f.tolist()) & set(e.tolist())) / len(e) for f, e in zip(found, exact, strict=True)])
    )
    print(
        f"  {sel:.1%}: repeated {repeated:.3f} ms, first {cold:.3f} ms, unfiltered {unf:.3f} ms "
        f"(plan {plan}; waited {built_s:.1f} s for filter graphs)",
        flush=True,
    )
    return sel, len(match), unf, repeated, cold, recall, floor, plan, built_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--ef", type=int, default=64)
    args = parser.parse_args()
    base, queries, _ = shared_vectors(args.n, args.dim, 1000)
    queries = queries[: args.queries].astype(np.float32)
    k, ef, n = 10, args.ef, len(base)

    strand = HnswStrand(DenseFieldSpec(name="emb", dim=args.dim, metric=Metric.COSINE))
    started = time.perf_counter()
    for start in range(0, n, 10_000):  # before start(): recovery's in-place seals, on every core
        strand.add(np.arange(start, min(start + 10_000, n), dtype=np.int64), base[start : start + 10_000])
    lock = ReadWriteLock()
    strand.start(lock)
    strand.wait_merged(3600, settled=True)
    print(f"{n:,} x {args.dim}: built in {time.perf_counter() - started:.1f} s, parts {strand.segments()}", flush=True)
    stored = strand.stored_form(base)
    rows = []
    rng = np.random.default_rng(7)
    for sel in SELECTIVITIES:
        mask = np.zeros(n, bool)
        mask[rng.choice(n, round(sel * n), replace=False)] = True
        rows.append(measure(strand, lock, stored, queries, mask, sel, k, ef))
        forget_views(strand)
    print()
    print(
        "| keeps | docs | unfiltered p50 ms | repeated filter p50 ms | ratio | first-seen filter p50 ms | ratio "
        "| recall@10 | numpy floor p50 ms | plan (largest graph), repeated | filter graph build s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for sel, docs, unf, repeated, cold, recall, floor, plan, built_s in rows:
        print(
            f"| {sel:.1%} | {docs:,} | {unf:.3f} | {repeated:.3f} | {repeated / unf:.2f}x | {cold:.3f} | "
            f"{cold / unf:.2f}x | {recall:.3f} | {floor:.3f} | {plan} | {built_s:.1f} |"
        )
    strand.close()


if __name__ == "__main__":
    main()
