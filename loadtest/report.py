"""Reports: a run's numbers as JSON, and its pictures as PNG (matplotlib, Agg backend).

:func:`summarize` turns a :class:`~loadtest.generator.LoadResult` into plain data:

  asked        the rate profile; ``rate`` is the mean asked rate over the measured part
  achieved_qps calls due after the warm-up that completed (any status), per second of
               ``span_s`` = from the end of the warm-up to max(planned end, last completion);
               ``ok_qps`` counts OK calls only
  latency_ms   OK calls, from their due time (what a user would have seen), all request ops
               together; ``service_ms`` from the moment the call was actually sent; ``ops``
               the same per op (search, upsert) and ``bulk`` for BulkUpsert streams
  errors       by gRPC status code (LOADTEST_IN_FLIGHT_CAP: never sent, too many outstanding)
  generator    per worker CPU share and send lag; ``limited`` with the reasons when the
               generator, not the server, may have set the pace
  series       one row per window (1 s) by completion time: qps, errors, p50/p90/p99/max,
               the worst send lag and the workers' CPU

The generator counts as limited when its send lag p99 exceeds ``max_lag_ms`` (10 ms: it was
late issuing calls, so their latency includes its own delay) or a worker process used more
than ``max_worker_cpu`` (85%) of a core. The machine's CPU use is reported beside it: on a
small machine the server and the generator share the cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from . import stats
from .generator import LoadResult, OpResult
from .worker import BULK_OP

MAX_LAG_MS = 10.0
MAX_WORKER_CPU = 0.85


def _merge(results: list[OpResult]) -> OpResult:
    out = OpResult()
    for r in results:
        out.hist.add(r.hist)
        out.sent_hist.add(r.sent_hist)
        out.ok += r.ok
        out.errors.update(r.errors)
    return out


def _op_summary(result: OpResult) -> dict[str, Any]:
    completed = result.completed
    return {
        "completed": completed,
        "ok": result.ok,
        "errors": dict(sorted(result.errors.items())),
        "error_share": round(sum(result.errors.values()) / completed, 6) if completed else 0.0,
        "latency_ms": stats.summary_ms(result.hist),
        "service_ms": stats.summary_ms(result.sent_hist),
    }


def generator_check(
    result: LoadResult, max_lag_ms: float = MAX_LAG_MS, max_worker_cpu: float = MAX_WORKER_CPU
) -> dict[str, Any]:
    lag = stats.summary_ms(result.lag)
    cpu = [round(w["cpu_s"] / w["wall_s"], 3) if w["wall_s"] else 0.0 for w in result.workers]
    reasons = []
    if lag["p99"] > max_lag_ms:
        why = "the generator fell behind its schedule"
        if all(share <= max_worker_cpu for share in cpu) and result.machine_cpu_percent >= 90:
            why += f" (its workers were starved: the machine's CPUs were {result.machine_cpu_percent:.0f}% busy)"
        reasons.append(f"send lag p99 {lag['p99']:.1f} ms > {max_lag_ms:g} ms: {why}")
    for k, share in enumerate(cpu):
        if share > max_worker_cpu:
            reasons.append(f"worker {k} used {share:.0%} of a core (> {max_worker_cpu:.0%})")
    return {
        "processes": result.processes,
        "channels_per_process": result.plan.channels,
        "worker_cpu": cpu,
        "lag_ms": lag,
        "max_in_flight": max((w["max_in_flight"] for w in result.workers), default=0),
        "limited": bool(reasons),
        "reasons": reasons,
    }


def summarize(result: LoadResult, max_lag_ms: float = MAX_LAG_MS, max_worker_cpu: float = MAX_WORKER_CPU) -> dict:
    """The run as plain data (see the module docstring)."""
    plan, profile = result.plan, result.plan.profile
    requests = _merge([result.totals[op] for op in result.request_ops])
    last_done = max((w["last_done"] or 0.0 for w in result.workers), default=0.0)
    span = max(profile.end_s, last_done) - profile.warmup_s
    asked_mean = (profile.total - profile.expected(profile.warmup_s)) / profile.duration_s
    out: dict[str, Any] = {
        "asked": {
            "rate": round(asked_mean, 3),
            "rate_start": profile.rate,
            "rate_end": profile.rate_to,
            "duration_s": profile.duration_s,
            "warmup_s": profile.warmup_s,
            "arrivals": "poisson" if plan.poisson else "uniform",
            "mix": plan.weights,
            "timeout_s": plan.timeout_s,
        },
        "span_s": round(span, 3),
        "achieved_qps": round(requests.completed / span, 2) if span > 0 else 0.0,
        "ok_qps": round(requests.ok / span, 2) if span > 0 else 0.0,
        **_op_summary(requests),
        "ops": {op: _op_summary(result.totals[op]) for op in result.request_ops},
        "generator": generator_check(result, max_lag_ms, max_worker_cpu),
        "machine": {
            "cpu_percent": result.machine_cpu_percent,
            "loadavg_before": [round(x, 2) for x in result.loadavg_before],
            "loadavg_after": [round(x, 2) for x in result.loadavg_after],
        },
        "series": series(result),
    }
    if BULK_OP in result.totals:
        docs = sum(w["bulk_docs"] for w in result.workers)
        out["bulk"] = {
            "streams": plan.bulk.streams if plan.bulk else 0,
            "docs_acknowledged": docs,
            "docs_per_s": round(docs / (span + profile.warmup_s), 1) if span > 0 else 0.0,
            **_op_summary(result.totals[BULK_OP]),
        }
    return out


def series(result: LoadResult) -> list[dict[str, Any]]:
    """One row per window, by completion time (the warm-up included: ``warmup`` marks it)."""
    window_s = result.plan.window_s
    rows = []
    for index, window in result.windows.items():
        requests = _merge([r for op, r in window.ops.items() if op != BULK_OP])
        lat = stats.summary_ms(requests.hist)
        end = (index + 1) * window_s
        rows.append(
            {
                "t": round(end, 3),
                "warmup": end <= result.plan.profile.warmup_s + 1e-9,
                "drain": end > result.plan.profile.end_s + 1e-9,  # stragglers after the planned end
                "qps": round(requests.completed / window_s, 2),
                "ok": requests.ok,
                "errors": sum(requests.errors.values()),
                **{k: lat[k] for k in ("p50", "p90", "p99", "max")},
                "lag_max_ms": round(window.lag_max_s * 1000, 3),
                "worker_cpu": round(window.cpu_s / window_s, 3),
                "bulk_streams": window.ops[BULK_OP].completed if BULK_OP in window.ops else 0,
            }
        )
    return rows


def text(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lat, asked = summary["latency_ms"], summary["asked"]
    lines = [
        f"asked {asked['rate']:g}/s for {asked['duration_s']:g} s (+{asked['warmup_s']:g} s warm-up): "
        f"achieved {summary['achieved_qps']:g}/s ({summary['ok_qps']:g}/s OK), {summary['completed']} calls",
        f"latency ms (from due time): p50 {lat['p50']:g}  p90 {lat['p90']:g}  p99 {lat['p99']:g}  "
        f"p99.9 {lat['p99.9']:g}  max {lat['max']:g}",
        f"errors: {summary['errors'] or 'none'}",
    ]
    for op, one in summary["ops"].items():
        if len(summary["ops"]) > 1:
            lines.append(
                f"  {op}: {one['completed']} calls, p50 {one['latency_ms']['p50']:g} ms, "
                f"p99 {one['latency_ms']['p99']:g} ms, errors {one['errors'] or 'none'}"
            )
    if "bulk" in summary:
        b = summary["bulk"]
        lines.append(
            f"bulk: {b['streams']} stream(s) open at a time, {b['completed']} completed, "
            f"{b['docs_acknowledged']} docs acknowledged "
            f"({b['docs_per_s']:g}/s), errors {b['errors'] or 'none'}"
        )
    gen = summary["generator"]
    cpu = ", ".join(f"{c:.0%}" for c in gen["worker_cpu"])
    lines.append(
        f"generator: {gen['processes']} processes (CPU {cpu}), send lag p99 {gen['lag_ms']['p99']:g} ms"
        f" - {'LIMITED: ' + '; '.join(gen['reasons']) if gen['limited'] else 'kept its schedule'}"
    )
    lines.append(
        f"machine: CPU {summary['machine']['cpu_percent']:.0f}% busy, load average "
        f"{summary['machine']['loadavg_before'][0]:g} -> {summary['machine']['loadavg_after'][0]:g}"
    )
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def _log_y(ax: Any) -> None:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def _latency_axes(
    ax: Any, rows: list[dict[str, Any]], warmup_s: float, samples: list[dict[str, Any]] | None = None
) -> None:
    t = [r["t"] for r in rows]
    for key, style in (("p50", "-"), ("p90", "-"), ("p99", "-"), ("max", ":")):
        values = [r[key] if r[key] > 0 else math.nan for r in rows]
        ax.plot(t, values, style, label=key, linewidth=1.2)
    if samples:  # the soak's intervals: the p99 its verdict reads
        ax.plot(
            [s["t"] for s in samples],
            [s["p99_ms"] or math.nan for s in samples],
            "D",
            color="black",
            markersize=4,
            label="p99 per sample",
        )
    if warmup_s > 0:
        ax.axvspan(0, warmup_s, color="0.9", label="warm-up")
    _log_y(ax)
    ax.set_ylabel("latency ms (from due time)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=7, ncol=6, framealpha=0.5)


def _qps_axes(ax: Any, rows: list[dict[str, Any]], report: dict[str, Any]) -> None:
    rows = [r for r in rows if not r.get("drain")]  # a partial last window is not a rate
    t = [r["t"] for r in rows]
    ax.plot(t, [r["qps"] for r in rows], label="completed/s", linewidth=1.2)
    asked = report["asked"]
    warm, end = asked["warmup_s"], asked["warmup_s"] + asked["duration_s"]
    ax.plot([0, warm, end], [asked["rate_start"], asked["rate_start"], asked["rate_end"]], "--", label="asked/s")
    errors = [r["errors"] for r in rows]
    if any(errors):
        ax.bar(t, errors, width=0.8 * (t[1] - t[0] if len(t) > 1 else 1), color="tab:red", label="errors", align="edge")
    ax.set_ylabel("calls per second")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def _rss_axes(ax: Any, samples: list[dict[str, Any]]) -> None:
    t = [s["t"] for s in samples]
    rss = [s["rss_bytes"] / 2**20 for s in samples]
    ax.plot(t, rss, label="server RSS MiB", color="tab:purple")
    middle = sorted(rss)[len(rss) // 2]  # at least +-5% around the median: the soak's limit looks its size
    ax.set_ylim(min(*rss, middle * 0.95), max(*rss, middle * 1.05))
    ax.set_ylabel("RSS MiB")
    twin = ax.twinx()
    twin.plot(t, [s["fds"] for s in samples], ":", color="tab:gray", label="open fds")
    twin.set_ylabel("open fds")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)


def plot_run(report: dict[str, Any], path: Path, title: str, rss: bool = False) -> Path:
    """Latency percentiles and QPS per window; RSS and fds too when ``rss`` and samples exist."""
    plt = _pyplot()
    samples = report.get("server", {}).get("samples", [])
    panels = 3 if rss and samples else 2
    fig, axes = plt.subplots(panels, 1, figsize=(9, 2.6 * panels + 0.6), sharex=True)
    rows = report["series"]
    _latency_axes(axes[0], rows, report["asked"]["warmup_s"], report.get("samples"))
    _qps_axes(axes[1], rows, report)
    if panels == 3:
        _rss_axes(axes[2], samples)
    axes[-1].set_xlabel("seconds since start")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_find_max(report: dict[str, Any], path: Path, title: str) -> Path:
    """p50/p99 and achieved rate against the asked rate of each step; the target and the answer marked."""
    plt = _pyplot()
    steps = sorted(report["steps"], key=lambda s: s["rate"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    rates = [s["rate"] for s in steps]
    top.plot(rates, [s["p99_ms"] for s in steps], "o-", label="p99")
    top.plot(rates, [s.get("p50_ms", math.nan) for s in steps], "o-", label="p50")
    for s in steps:
        if not s["passed"]:
            top.plot([s["rate"]], [s["p99_ms"]], "x", color="tab:red", markersize=10)
    target = report["p99_target_ms"]
    top.axhline(target, color="tab:red", linestyle="--", label=f"p99 target {target:g} ms")
    _log_y(top)
    top.set_ylabel("latency ms")
    top.grid(True, which="both", alpha=0.3)
    top.legend(fontsize=8)
    bottom.plot(rates, [s["achieved"] for s in steps], "o-", label="achieved/s")
    bottom.plot(rates, rates, "--", color="0.5", label="asked/s")
    if report.get("best_rate"):
        for ax in (top, bottom):
            ax.axvline(report["best_rate"], color="tab:green", linestyle=":", label="highest sustainable")
    bottom.set_xlabel("asked rate (calls/s)")
    bottom.set_ylabel("calls per second")
    bottom.grid(True, alpha=0.3)
    bottom.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
