"""Shared by the relevance benchmarks: the collections in ../shared/data, a Braid server in a child process.

Loading and scoring are braid eval's own (braid.service.evaluate: ``BeirCollection``,
``measure``), so the benchmarks and the command read and score data the same way.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from braid.service.evaluate import BeirCollection

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
# Published nDCG@10 of BEIR collections (from ../shared/data/SOURCES.md and the BEIR /
# Sentence-Transformers model cards): BM25 is Anserini's "flat" index (title + text in one
# field; BEIR's paper reports 0.665 multifield), dense is all-MiniLM-L6-v2.
PUBLISHED: dict[str, dict[str, float]] = {"scifact": {"bm25": 0.679, "dense": 0.645}}


def collections(data: str, names: str) -> Iterator[tuple[str, dict[str, str], dict[str, str], dict]]:
    """(name, corpus, judged queries, qrels) of each comma-separated collection present under ``data``."""
    for name in names.split(","):
        directory = Path(data) / name
        if not (directory / "corpus.jsonl").exists():
            print(f"skip {name}: {directory} not found")
            continue
        beir = BeirCollection.load(directory)
        yield name, beir.corpus, beir.queries, beir.qrels


@contextlib.contextmanager
def braid_server(*extra_args: str) -> Iterator[int]:
    """``braid serve`` on a fresh temporary data directory and a free port; yields the port."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [sys.executable, "-m", "braid.service.cli", "serve", "--data-dir", tmp, "--port", "0", *extra_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        port = next(int(m.group(1)) for line in proc.stdout if (m := re.search(r"serving .* on [\d.]+:(\d+)", line)))
        try:
            yield port
        finally:
            proc.terminate()
            proc.wait(timeout=60)
