"""SPANN (issue 6) against raw hnswlib on the same shared vector set, in one run.

    python bench/spann.py [--n 100000] [--dim 384] [--queries 1000] [--efs 16,32,64,128]
                          [--probes 2:0.1,4:0.5,16:0.5] [--cold-queries 1000]
                          [--target 64] [--replicas 8] [--eps-build 0.15]

Uses the shared vector set (../shared/bench/make_vectors.py, cached under bench/results/; without
../shared the project's identical generator, loadtest/vectors.py).
Builds (or reuses, cached next to the vectors) a raw hnswlib index (M=16,
ef_construction=200, cosine) and a SPANN segment (index/spann.py) with the given build
parameters, then serves each from a fresh subprocess so resident memory is the index's
own: RSS after loading and running every query, minus the RSS of the same interpreter
with numpy, hnswlib and braid.index.spann imported but nothing loaded. Each subprocess
answers every query one per call (k=10, one thread, OPENBLAS_NUM_THREADS=1) and reports
recall@10 against the exact top-10, p50 / p99 latency and QPS:
  hnswlib        one row per ef,
  spann warm     one row per max_lists:eps probe setting, after a pass that warms the page cache,
  spann cold     the same settings in another fresh process that evicts the posting file
                 from the page cache (posix_fadvise DONTNEED) before every query (untimed).
Then the ratios at recall@10 >= 0.90: SPANN's fastest qualifying setting against
hnswlib's fastest (p50), and SPANN's RSS against hnswlib's.
Targets (issue 6): RSS <= 0.20 x hnswlib's and p50 <= 2 x hnswlib's at recall@10 >= 0.90.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
M, EF_CONSTRUCTION = 16, 200
TARGET_RECALL = 0.90
sys.path.insert(0, str(ROOT))

from loadtest.vectors import vector_set  # noqa: E402  (numpy only: the worker's RSS baseline stays)


def ensure_vectors(n: int, dim: int, queries: int) -> Path:
    """The shared set's folder (loadtest/vectors.py, as dense.shared_vectors), where the builds are cached too."""
    return vector_set(n, dim, queries, log=print).path


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


# -------------------------------------------------------------------- builds (cached)


def build_hnsw(data: Path) -> tuple[Path, float]:
    import hnswlib

    path = data / f"hnsw-M{M}-efc{EF_CONSTRUCTION}.bin"
    info = data / f"hnsw-M{M}-efc{EF_CONSTRUCTION}.json"
    if not path.exists():
        base = np.load(data / "base.npy")
        started = time.perf_counter()
        index = hnswlib.Index(space="cosine", dim=base.shape[1])
        index.init_index(max_elements=len(base), M=M, ef_construction=EF_CONSTRUCTION)
        index.add_items(base, np.arange(len(base)), num_threads=-1)
        seconds = time.perf_counter() - started
        index.save_index(str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
        info.write_text(json.dumps({"build_s": seconds}))
    return path, float(json.loads(info.read_text())["build_s"])


def build_spann(data: Path, params: dict) -> tuple[Path, float]:
    sys.path.insert(0, str(ROOT))
    from braid.index.spann import SpannParams, SpannSegment

    full = SpannParams(**params).to_json()
    digest = hashlib.sha1(json.dumps(full, sort_keys=True).encode()).hexdigest()[:10]
    directory = data / f"spann-{digest}"
    if not (directory / "spann.json").exists():
        base = np.load(data / "base.npy")
        SpannSegment.build(directory, base, np.arange(len(base)), params=SpannParams(**params)).close()
    meta = json.loads((directory / "spann.json").read_text())
    return directory, float(meta["build_seconds"])


# -------------------------------------------------------------------- serving worker


def worker(kind: str, index_path: str, data: str, settings: str, cold: bool, limit: int) -> None:
    """Load one index in this fresh process, answer the first ``limit`` queries per setting, print JSON."""
    import hnswlib

    sys.path.insert(0, str(ROOT))
    from braid.index.spann import SpannSegment

    queries = np.load(Path(data) / "queries.npy")[:limit]
    gt = np.load(Path(data) / "gt.npy")[:limit, :10]
    baseline = rss_kib()
    started = time.perf_counter()
    if kind == "hnsw":
        index = hnswlib.Index(space="cosine", dim=queries.shape[1])
        index.load_index(index_path)

        def search(query: np.ndarray, setting: list) -> np.ndarray:
            index.set_ef(int(setting[0]))  # one query at a time, so the global ef is safe here
            return index.knn_query(query, k=10, num_threads=1)[0][0]

        def evict() -> None:
            pass  # hnswlib holds everything in memory

    else:
        segment = SpannSegment.open(Path(index_path))

        def search(query: np.ndarray, setting: list) -> np.ndarray:
            return segment.search(query, 10, max_lists=int(setting[0]), eps=float(setting[1]))[0][0]

        evict = segment.drop_cache

    load_s = time.perf_counter() - started
    rows = []
    for setting in json.loads(settings):
        if not cold:
            for query in queries:  # warm the page cache (and the CPU caches) first
                search(query, setting)
        latencies, found = [], []
        for query in queries:
            if cold:
                evict()  # every query starts with the posting file out of the page cache
            t = time.perf_counter()
            found.append(search(query, setting))
            latencies.append(time.perf_counter() - t)
        recall = float(np.mean([len(set(f.tolist()) & set(g.tolist())) / 10 for f, g in zip(found, gt, strict=True)]))
        ms = np.array(latencies) * 1000
        rows.append(
            {
                "setting": setting,
                "recall": recall,
                "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)),
                "qps": len(queries) / float(np.sum(latencies)),
            }
        )
    print(json.dumps({"rss_mib": (rss_kib() - baseline) / 1024, "load_s": load_s, "rows": rows}))


def serve(kind: str, index_path: Path, data: Path, settings: list, limit: int, cold: bool = False) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    command = [sys.executable, __file__, "--worker", kind, str(index_path), str(data), json.dumps(settings)]
    command += ["--cold" if cold else "--warm", str(limit)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------- report


def best(rows: list[dict]) -> dict | None:
    good = [r for r in rows if r["recall"] >= TARGET_RECALL]
    return min(good, key=lambda r: r["p50_ms"]) if good else None


def table(title: str, label: str, result: dict) -> list[str]:
    lines = [
        f"{title}: RSS {result['rss_mib']:.1f} MiB over baseline, load {result['load_s']:.2f} s",
        f"| {label} | recall@10 | p50 ms | p99 ms | QPS |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        setting = ":".join(str(x) for x in r["setting"])
        lines.append(f"| {setting} | {r['recall']:.3f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['qps']:,.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--efs", default="16,32,64,128")
    parser.add_argument("--probes", default="1:0.5,2:0.1,2:0.5,4:0.1,4:0.5,8:0.5,16:0.5")
    parser.add_argument("--cold-queries", type=int, default=0, help="queries in the cold run (default: all)")
    parser.add_argument("--target", type=int, default=None, help="SpannParams.target_list_size (default: its default)")
    parser.add_argument("--replicas", type=int, default=None)
    parser.add_argument("--eps-build", type=float, default=None)
    args = parser.parse_args()
    data = ensure_vectors(args.n, args.dim, args.queries)
    params = {
        key: value
        for key, value in (
            ("target_list_size", args.target),
            ("replicas", args.replicas),
            ("eps_build", args.eps_build),
        )
        if value is not None
    }
    print(f"shared set: {args.n} x {args.dim}, {args.queries} queries; hnswlib M={M} ef_construction={EF_CONSTRUCTION}")
    hnsw_path, hnsw_build = build_hnsw(data)
    spann_dir, spann_build = build_spann(data, params)
    spann_meta = json.loads((spann_dir / "spann.json").read_text())
    hnsw_disk = hnsw_path.stat().st_size
    spann_disk = sum(p.stat().st_size for p in spann_dir.iterdir() if p.is_file())
    efs = [[int(x)] for x in args.efs.split(",")]
    probes = [[int(p.split(":")[0]), float(p.split(":")[1])] for p in args.probes.split(",")]
    hnsw = serve("hnsw", hnsw_path, data, efs, args.queries)
    warm = serve("spann", spann_dir, data, probes, args.queries)
    cold = serve("spann", spann_dir, data, probes, args.cold_queries or args.queries, cold=True)

    lines = [
        f"build: hnswlib {hnsw_build:.1f} s, SPANN {spann_build:.1f} s "
        f"({spann_meta['lists']} lists, {spann_meta['rows'] / spann_meta['count']:.2f} copies a vector, "
        f"params {json.dumps(spann_meta['params'], sort_keys=True)})",
        f"on disk: hnswlib {hnsw_disk / 2**20:.1f} MiB, SPANN {spann_disk / 2**20:.1f} MiB",
        "",
        *table("hnswlib", "ef", hnsw),
        "",
        *table("SPANN warm page cache", "max_lists:eps", warm),
        "",
        *table(
            f"SPANN cold page cache (posting file evicted before each of {args.cold_queries or args.queries} queries)",
            "max_lists:eps",
            cold,
        ),
        "",
    ]
    ratios: dict = {"rss": warm["rss_mib"] / hnsw["rss_mib"], "rss_cold": cold["rss_mib"] / hnsw["rss_mib"]}
    reference = best(hnsw["rows"])
    for name, result in (("warm", warm), ("cold", cold)):
        mine = best(result["rows"])
        if mine and reference:
            ratios[f"p50_{name}"] = mine["p50_ms"] / reference["p50_ms"]
            lines.append(
                f"at recall@10 >= {TARGET_RECALL}: SPANN {name} {':'.join(map(str, mine['setting']))} "
                f"p50 {mine['p50_ms']:.3f} ms vs hnswlib ef={reference['setting'][0]} {reference['p50_ms']:.3f} ms "
                f"-> p50 ratio {ratios[f'p50_{name}']:.2f} (target <= 2)"
            )
        else:
            lines.append(f"at recall@10 >= {TARGET_RECALL}: no {name} SPANN setting (or no hnswlib ef) qualifies")
    lines.append(
        f"resident memory: SPANN {warm['rss_mib']:.1f} MiB (cold run {cold['rss_mib']:.1f}) vs hnswlib "
        f"{hnsw['rss_mib']:.1f} MiB -> ratio {ratios['rss']:.3f} (target <= 0.20)"
    )
    print("\n".join(lines))
    out = RESULTS / f"spann-{args.n}x{args.dim}"
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    summary = {
        "n": args.n,
        "dim": args.dim,
        "hnsw": hnsw,
        "warm": warm,
        "cold": cold,
        "ratios": ratios,
        "hnsw_build_s": hnsw_build,
        "spann_build_s": spann_build,
        "hnsw_disk_bytes": hnsw_disk,
        "spann_disk_bytes": spann_disk,
        "spann_meta": spann_meta,
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6] == "--cold", int(sys.argv[7]))
    else:
        main()
