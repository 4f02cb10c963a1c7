"""loadtest/vectors.py: the project's copy of ../shared/bench/make_vectors.py makes the same arrays, and the
one loader that loadtest/ and bench/ share falls back to it when the shared script is absent.

The comparison with the shared script runs only where ../shared/bench/make_vectors.py exists (it skips
saying so elsewhere); pinned values taken from that script and an exactness check of the ground truth
keep the generator honest in a clone on its own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtest.scenario import ScenarioError, load_scenario
from loadtest.vectors import BY_PROJECT, BY_SCRIPT, CACHED, FILES, SCRIPT, generate, set_dir, vector_set

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_SCRIPT = SHARED / SCRIPT


def need_shared_script() -> None:
    if not SHARED_SCRIPT.exists():
        pytest.skip(f"{SHARED_SCRIPT} is missing: nothing to compare the project's generator with")


def run_shared_script(out: Path, *args: str) -> tuple[np.ndarray, ...]:
    subprocess.run([sys.executable, str(SHARED_SCRIPT), str(out), *args], check=True, capture_output=True, timeout=600)
    return tuple(np.load(out / name) for name in FILES)


@pytest.mark.parametrize(
    ("n", "dim", "queries", "extra"),
    [
        (3000, 32, 50, {}),
        # Past every chunk boundary of the script: two base draws (100,000), two ground-truth
        # blocks (200,000) and two query blocks (100); few clusters and dimensions for near-ties.
        (200_050, 4, 120, {"clusters": 50, "noise": 1.5}),
    ],
)
def test_the_project_generator_makes_the_shared_scripts_arrays(
    tmp_path: Path, n: int, dim: int, queries: int, extra: dict
) -> None:
    need_shared_script()
    args = ["--n", str(n), "--dim", str(dim), "--queries", str(queries)]
    args += [arg for key, value in extra.items() for arg in (f"--{key}", str(value))]
    theirs = run_shared_script(tmp_path, *args)
    ours = generate(n, dim, queries, **extra)
    for name, a, b in zip(FILES, theirs, ours, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        assert a.tobytes() == b.tobytes(), f"{name} differs from the shared script's"


def test_the_generator_keeps_the_shared_sets_values() -> None:
    """Values the shared script printed for n=3000, dim=32, queries=50 (checked where it is absent too)."""
    base, queries, gt = generate(3000, 32, 50)
    assert base.shape == (3000, 32) and queries.shape == (50, 32) and gt.shape == (50, 100)
    assert base.dtype == queries.dtype == np.float32 and gt.dtype == np.int64
    np.testing.assert_allclose(base[0, :4], [0.29291016, 0.56909859, 0.08921489, -0.07968612], rtol=1e-5)
    np.testing.assert_allclose(queries[-1, :4], [0.25091800, -0.15578140, 0.07756793, -0.25957114], rtol=1e-5)
    assert gt[0, :10].tolist() == [1146, 916, 925, 1849, 71, 2651, 1965, 1813, 578, 2296]
    assert gt[-1, :10].tolist() == [596, 1855, 813, 1295, 2781, 1740, 2335, 631, 2118, 773]
    # Unit vectors, and gt is each query's exact top 100 by cosine, best first.
    np.testing.assert_allclose(np.linalg.norm(base, axis=1), 1.0, rtol=1e-5)
    scores = queries @ base.T
    ranked = np.take_along_axis(scores, gt, 1)
    assert (np.diff(ranked, axis=1) <= 1e-6).all()
    outside = scores.copy()
    np.put_along_axis(outside, gt, -np.inf, 1)
    assert (ranked[:, -1] >= outside.max(axis=1) - 1e-6).all()


def test_without_the_shared_script_the_project_generator_makes_and_caches_the_set(tmp_path: Path) -> None:
    nowhere, cache = tmp_path / "nowhere", tmp_path / "cache"
    made = vector_set(300, 8, 20, cache=cache, shared=nowhere)
    assert made.origin == BY_PROJECT and made.path == set_dir(300, 8, 20, cache)
    for got, want in zip(made.load(), generate(300, 8, 20), strict=True):
        assert got.tobytes() == want.tobytes()
    assert sorted(p.name for p in cache.iterdir()) == [made.path.name]  # no temporary folder left behind
    assert vector_set(300, 8, 20, cache=cache, shared=nowhere).origin == CACHED


def test_a_set_without_its_ground_truth_is_made_again(tmp_path: Path) -> None:
    """gt.npy is moved in last: a folder without it is a set a stopped run left half made."""
    cache = tmp_path / "cache"
    half = set_dir(300, 8, 20, cache)
    half.mkdir(parents=True)
    np.save(half / "base.npy", np.zeros((3, 8), np.float32))
    made = vector_set(300, 8, 20, cache=cache, shared=tmp_path / "nowhere")
    assert made.origin == BY_PROJECT and made.load()[0].shape == (300, 8)


def test_with_the_shared_script_the_set_is_the_scripts(tmp_path: Path) -> None:
    need_shared_script()
    made = vector_set(300, 8, 20, cache=tmp_path, shared=SHARED)
    assert made.origin == BY_SCRIPT
    for got, want in zip(made.load(), generate(300, 8, 20), strict=True):
        assert got.tobytes() == want.tobytes()


def test_sizes_the_set_cannot_have_are_refused_naming_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n must be >= 100"):
        vector_set(99, 8, 20, cache=tmp_path, shared=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dim and queries"):
        generate(300, 8, 0)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ScenarioError, match=r"data\.n must be >= 100"):
        load_scenario("dense", ["data.n=50"])
    assert load_scenario("bm25", ["data.n=50"]).data.n == 50  # BEIR data has no vector set
