"""Shared by the relevance benchmarks: BEIR-layout loading, ir-measures scoring, a Braid server in a child process.

BEIR layout (../shared/data/<name>/): corpus.jsonl ({"_id", "title", "text"}),
queries.jsonl ({"_id", "text"}), qrels/test.tsv (header, then query-id, corpus-id, grade).
Only judged queries are kept.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import ir_measures
from ir_measures import R, nDCG

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MEASURES = [nDCG @ 10, R @ 100]


def load(directory: Path) -> tuple[dict[str, str], dict[str, str], list]:
    """(corpus id -> title + " " + text, judged query id -> text, qrels)."""
    corpus = {}
    for line in (directory / "corpus.jsonl").open(encoding="utf-8"):
        row = json.loads(line)
        corpus[str(row["_id"])] = f"{row.get('title', '')} {row.get('text', '')}".strip()
    queries = {}
    for line in (directory / "queries.jsonl").open(encoding="utf-8"):
        row = json.loads(line)
        queries[str(row["_id"])] = row["text"]
    qrels = []
    with (directory / "qrels" / "test.tsv").open(encoding="utf-8") as fh:
        next(fh)
        for line in fh:
            qid, doc_id, grade = line.rstrip("\n").split("\t")
            qrels.append(ir_measures.Qrel(qid, doc_id, int(grade)))
    judged = {q.query_id for q in qrels}
    return corpus, {k: v for k, v in queries.items() if k in judged}, qrels


def collections(data: str, names: str) -> Iterator[tuple[str, dict[str, str], dict[str, str], list]]:
    """(name, corpus, queries, qrels) of each comma-separated collection present under ``data``."""
    for name in names.split(","):
        directory = Path(data) / name
        if not (directory / "corpus.jsonl").exists():
            print(f"skip {name}: {directory} not found")
            continue
        yield (name, *load(directory))


def score(run: dict[str, dict[str, float]], qrels: list) -> dict[str, float]:
    result = ir_measures.calc_aggregate(MEASURES, qrels, run)
    return {str(m): float(result[m]) for m in MEASURES}


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
