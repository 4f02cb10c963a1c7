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
import threading
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


class BraidProcess:
    """``braid serve`` in a child process on ``data_dir`` and a free port."""

    def __init__(self, data_dir: str | Path, *extra_args: str) -> None:
        command = [sys.executable, "-m", "braid.service.cli", "serve", "--data-dir", str(data_dir), "--port", "0"]
        self.proc = subprocess.Popen(
            [*command, *extra_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = next(
            int(m.group(1)) for line in self.proc.stdout if (m := re.search(r"serving .* on [\d.]+:(\d+)", line))
        )
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # a full log pipe would block it

    def rss_mib(self) -> float:
        """The server's resident memory (VmRSS), MiB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]

    def stop(self, timeout: float = 60) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=timeout)


@contextlib.contextmanager
def braid_server(*extra_args: str) -> Iterator[int]:
    """``braid serve`` on a fresh temporary data directory and a free port; yields the port."""
    with tempfile.TemporaryDirectory() as tmp:
        server = BraidProcess(tmp, *extra_args)
        try:
            yield server.port
        finally:
            server.stop()
