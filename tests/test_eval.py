"""`braid eval` end to end on a tiny BEIR-layout collection the test writes itself (no shared data needed)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from braid.service.cli import main
from braid.service.evaluate import PLANS, evaluate

from .conftest import Running, start_in_process, stop_in_process

CORPUS = {
    "bread": ("Sourdough bread", "Flour, water, salt and a starter, baked in a hot oven until the crust is dark."),
    "brakes": ("Brake repair", "Replace worn brake pads on a car and bleed the hydraulic brake lines."),
    "whales": ("Blue whales", "The largest animals ever known feed on krill in cold oceans."),
    "tax": ("Income tax", "Filing your tax return: deductions, credits and the April deadline."),
    "guitar": ("Guitar tuning", "Tune a six-string guitar to standard pitch by ear or with a tuner."),
    "python": ("Python lists", "List comprehensions build a new list from an iterable in one expression."),
}
# q1-q3 share words with their document (BM25 finds them); q4-q6 are paraphrases with no word in common.
QUERIES = {
    "q1": ("sourdough bread oven", "bread"),
    "q2": ("hydraulic brake pads", "brakes"),
    "q3": ("guitar tuner", "guitar"),
    "q4": ("biggest sea creature", "whales"),
    "q5": ("IRS paperwork due", "tax"),
    "q6": ("compact syntax making collections programmatically", "python"),
}


def write_beir(directory: Path) -> Path:
    (directory / "qrels").mkdir(parents=True)
    with (directory / "corpus.jsonl").open("w") as out:
        for doc_id, (title, text) in CORPUS.items():
            out.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with (directory / "queries.jsonl").open("w") as out:
        for qid, (text, _) in QUERIES.items():
            out.write(json.dumps({"_id": qid, "text": text}) + "\n")
        out.write(json.dumps({"_id": "unjudged", "text": "not in the qrels"}) + "\n")
    with (directory / "qrels" / "test.tsv").open("w") as out:
        out.write("query-id\tcorpus-id\tscore\n")
        for qid, (_, doc_id) in QUERIES.items():
            out.write(f"{qid}\t{doc_id}\t1\n")
    return directory


@pytest.fixture
def server(tmp_path: Path, models_dir: Path) -> Iterator[Running]:
    srv, running = start_in_process(tmp_path / "data", models_dir=models_dir)
    yield running
    stop_in_process(srv, running)


def test_eval_scores_every_plan_and_writes_runs(server: Running, tmp_path: Path) -> None:
    beir = write_beir(tmp_path / "tiny")
    summary = evaluate(
        server.client, beir, list(PLANS), tmp_path / "out", sparse_model="minilm-tied-splade", progress=False
    )
    assert (summary["collection"], summary["documents"], summary["queries"]) == ("eval-tiny", 6, 6)
    metrics = {p["plan"]: p["metrics"] for p in summary["plans"]}
    assert metrics["dense"]["RR@10"] == 1.0  # every query, paraphrases included, finds its document first
    assert metrics["bm25"]["RR@10"] == pytest.approx(0.5)  # the 3 paraphrases share no word with their document
    assert metrics["rrf"]["nDCG@10"] > metrics["bm25"]["nDCG@10"]
    # The default plan (no fusion given) keeps dense's perfect ranking and BM25's hits.
    assert metrics["hybrid"]["nDCG@10"] == 1.0
    # The sparse field's documents carry their own words (and expansions): it finds at least what BM25 finds.
    assert metrics["sparse"]["R@100"] >= metrics["bm25"]["R@100"]
    assert all(0.0 <= v <= 1.0 for m in metrics.values() for v in m.values())
    for plan in summary["plans"]:
        assert set(plan["latency_ms"]) == {"p50", "p95", "p99", "mean"} and plan["latency_ms"]["p50"] > 0
        lines = Path(plan["run_file"]).read_text().splitlines()
        assert lines, plan["plan"]
        for line in lines:
            _, q0, doc_id, rank, score, tag = line.split()
            assert q0 == "Q0" and doc_id in CORPUS and int(rank) >= 1 and tag == f"braid-{plan['plan']}"
            float(score)
    dense_run = Path(next(p["run_file"] for p in summary["plans"] if p["plan"] == "dense")).read_text()
    firsts = {line.split()[0]: line.split()[2] for line in dense_run.splitlines() if line.split()[3] == "1"}
    assert firsts == {qid: doc for qid, (_, doc) in QUERIES.items()}
    saved = json.loads((tmp_path / "out" / "eval-tiny.summary.json").read_text())
    assert saved == summary


def test_eval_command_line(server: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    beir = write_beir(tmp_path / "tiny")
    address = ["--address", f"127.0.0.1:{server.port}"]
    out = ["--out", str(tmp_path / "out")]
    assert main(["eval", str(beir), *address, *out, "--plans", "bm25,dense", "--name", "cli"]) == 0
    printed = capsys.readouterr().out
    assert "nDCG@10" in printed and "dense" in printed and "cli.summary.json" in printed
    # A second run reuses the collection instead of ingesting again.
    assert main(["eval", str(beir), *address, *out, "--plans", "rrf", "--name", "cli", "--reuse"]) == 0
    assert main(["eval", str(beir), *address, *out, "--plans", "nope"]) == 2
    assert "unknown plan" in capsys.readouterr().err
    assert main(["eval", str(beir), *address, *out, "--plans", "sparse", "--name", "nosparse"]) == 2
    assert "needs --sparse-model" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), *address]) == 2
    assert "is not a BEIR collection" in capsys.readouterr().err
