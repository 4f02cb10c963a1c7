"""The seeded benchmark vector set: one loader for loadtest/ and bench/, and the project's copy of its generator.

    vector_set(n, dim, queries) -> VectorSet     (files on disk: base.npy, queries.npy, gt.npy)
    load_vectors(n, dim, queries) -> (base, queries, gt)
    generate(n, dim, queries) -> (base, queries, gt)          (in memory, nothing cached)
    python -m loadtest.vectors OUT [--n N] [--dim D] [--queries Q] [--clusters C] [--noise S]

The set is ../shared/bench/make_vectors.py's: seeded clustered unit vectors (1,000 clusters,
noise 2.0) and the exact cosine top-100 of every query. It is cached under
bench/results/vectors-NxDIM-qQ/. When the shared script exists it makes the set (ANN
benchmarks must use the shared set itself); when it is absent (a clone on its own),
``generate`` makes the same arrays: it repeats the script's random draws in the same order
and its chunked exact search step by step (the chunking decides how ties between equal
scores fall, so it is kept, not simplified). tests/test_vectors.py compares the two.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = ROOT.parent / "shared"
CACHE_DIR = ROOT / "bench" / "results"
SCRIPT = Path("bench") / "make_vectors.py"  # inside the shared folder
FILES = ("base.npy", "queries.npy", "gt.npy")  # written in this order: gt.npy marks a complete set
CLUSTERS, NOISE = 1000, 2.0  # the shared script's defaults, which every cached set uses
BASE_CHUNK, GT_CHUNK, QUERY_CHUNK = 100_000, 200_000, 100  # the shared script's chunks
TOP = 100  # neighbours in gt
CACHED, BY_SCRIPT, BY_PROJECT = "cached", "made by the shared script", "made by the project generator"


@dataclass(frozen=True)
class VectorSet:
    path: Path  # the folder holding FILES
    origin: str  # CACHED, BY_SCRIPT or BY_PROJECT: how this call got it, for reports

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        base, queries, gt = (np.load(self.path / name) for name in FILES)
        return base, queries, gt


def set_dir(n: int, dim: int, queries: int, cache: Path = CACHE_DIR) -> Path:
    return cache / f"vectors-{n}x{dim}-q{queries}"


def check_size(n: int, dim: int, queries: int) -> None:
    """The sizes the shared script can make: its exact top-100 needs at least 100 base vectors."""
    if n < TOP:
        raise ValueError(f"n must be >= {TOP} (the set's ground truth is each query's exact top {TOP}), got {n}")
    if dim < 1 or queries < 1:
        raise ValueError(f"dim and queries must be >= 1, got dim={dim}, queries={queries}")


def generate(
    n: int, dim: int, queries: int, clusters: int = CLUSTERS, noise: float = NOISE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base, queries, gt) exactly as ../shared/bench/make_vectors.py makes them."""
    check_size(n, dim, queries)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        c = rng.integers(0, clusters, m)
        x = centers[c] + rng.normal(scale=noise, size=(m, dim)).astype(np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    base = np.concatenate([draw(min(BASE_CHUNK, n - i)) for i in range(0, n, BASE_CHUNK)])
    query = draw(queries)
    gt = np.empty((queries, TOP), dtype=np.int64)
    for i in range(0, queries, QUERY_CHUNK):
        rows = min(QUERY_CHUNK, queries - i)
        # float64 scores after the first concatenation, as in the script (its empty start is float64)
        best = np.full((rows, 0), 0.0), np.empty((rows, 0), dtype=np.int64)
        for j in range(0, n, GT_CHUNK):
            s = query[i : i + QUERY_CHUNK] @ base[j : j + GT_CHUNK].T
            k = min(TOP, s.shape[1])
            idx = np.argpartition(-s, k - 1, axis=1)[:, :k]
            sc = np.concatenate([best[0], np.take_along_axis(s, idx, 1)], 1)
            ids = np.concatenate([best[1], idx + j], 1)
            keep = np.argsort(-sc, axis=1)[:, :TOP]
            best = np.take_along_axis(sc, keep, 1), np.take_along_axis(ids, keep, 1)
        gt[i : i + QUERY_CHUNK] = best[1]
    return base, query, gt


def write(out: Path, arrays: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, array in zip(FILES, arrays, strict=True):
        np.save(out / name, array)


def vector_set(
    n: int,
    dim: int,
    queries: int,
    cache: Path = CACHE_DIR,
    shared: Path = SHARED_DIR,
    log: Callable[[str], object] | None = None,
) -> VectorSet:
    """The set of (n, dim, queries) on disk: cached, else made by the shared script, else by ``generate``
    (``log`` hears which, when it is made)."""
    check_size(n, dim, queries)
    out = set_dir(n, dim, queries, cache)
    if (out / FILES[-1]).exists():
        return VectorSet(out, CACHED)
    cache.mkdir(parents=True, exist_ok=True)
    script = shared / SCRIPT
    # Made in a private folder, then moved in with gt.npy last, so a run stopped half way (or
    # another process making the same set) never leaves a set that looks complete and is not.
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{out.name}-") as tmp:
        if script.exists():
            command = [sys.executable, str(script), tmp, "--n", str(n), "--dim", str(dim), "--queries", str(queries)]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=3600)
            origin = BY_SCRIPT
        else:
            write(Path(tmp), generate(n, dim, queries))
            origin = BY_PROJECT
        out.mkdir(exist_ok=True)
        for name in FILES:
            os.replace(Path(tmp) / name, out / name)
    if log is not None:
        log(f"vector set {n} x {dim}, {queries} queries: {origin} into {out}")
    return VectorSet(out, origin)


def load_vectors(
    n: int,
    dim: int,
    queries: int,
    cache: Path = CACHE_DIR,
    shared: Path = SHARED_DIR,
    log: Callable[[str], object] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base, queries, gt) of the set, made first if need be (see ``vector_set``)."""
    return vector_set(n, dim, queries, cache, shared, log).load()


def main(argv: list[str] | None = None) -> int:
    """The shared script's command line, for a machine without it."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.vectors", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=CLUSTERS)
    parser.add_argument("--noise", type=float, default=NOISE)
    a = parser.parse_args(argv)
    try:
        arrays = generate(a.n, a.dim, a.queries, a.clusters, a.noise)
    except ValueError as err:
        parser.error(str(err))
    write(a.out, arrays)
    print(f"wrote {a.n}x{a.dim} base, {a.queries} queries, exact top-100 to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
