"""Filters on schemaless metadata against the same filters on declared payload columns, one shard.

    python bench/metadata_filters.py [--docs 100000] [--repeat 30]

Documents carry LangChain-like metadata ({"source", "page", "tags": [..], "loc": {"lines":
{"from", "to"}}, "score"}); "source" and "page" are also declared payload fields of a
PayloadStore (index/payload.py), the reference: typed columns filled at write time. Printed:

  write     MetadataStore.set per document, with no column and with four columns kept
            (each write then parses its JSON once and extends them);
  first use the first filter on a path: one pass over every stored text (json.loads) to build
            that path's column (index/metadata.py), beside json.loads of every text alone;
  steady    a filter on a path whose column exists (median of --repeat), beside the same
            condition on the declared column, and the ratio.

Index-level (no gRPC): what a Count, a Delete by filter or a filtered search adds for the mask.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from braid.index.filters import Exists, Filter, Match, MatchAny, Range
from braid.index.metadata import MetadataStore
from braid.index.payload import PayloadStore
from braid.index.schema import PayloadFieldSpec, PayloadType

WORDS = [f"w{i}" for i in range(20)]


def documents(n: int) -> list[dict]:
    rng = random.Random(1)
    return [
        {
            "source": f"doc{i % 500}.pdf",
            "page": i % 300,
            "tags": rng.sample(WORDS, 2),
            "loc": {"lines": {"from": i % 1000, "to": i % 1000 + 20}},
            "score": rng.random(),
        }
        for i in range(n)
    ]


def timed(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    """Median milliseconds of ``repeat`` calls."""
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - started) * 1e3)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    n = args.docs
    docs = documents(n)
    texts = [json.dumps(d, separators=(",", ":")) for d in docs]

    store = MetadataStore()
    started = time.perf_counter()
    for label, text in enumerate(texts):
        store.set(label, text)
    write_bare = (time.perf_counter() - started) / n * 1e6

    payload = PayloadStore([PayloadFieldSpec("source", PayloadType.KEYWORD), PayloadFieldSpec("page", PayloadType.INT)])
    for label, d in enumerate(docs):
        payload.set(label, {"source": d["source"], "page": d["page"]})

    conditions = {
        "match keyword": (Match("source", "doc7.pdf"), Match("source", "doc7.pdf")),
        "range int": (Range("page", gte=10, lt=50), Range("page", gte=10, lt=50)),
        "match list member": (Match("tags", "w3"), None),
        "any keyword (3)": (MatchAny("source", ("doc1.pdf", "doc2.pdf", "doc3.pdf")), None),
        "range dotted path": (Range("loc.lines.from", lt=100), None),
        "exists": (Exists("score"), Exists("page")),
    }
    started = time.perf_counter()
    for text in texts:
        json.loads(text)
    parse_all = (time.perf_counter() - started) * 1e3  # the floor of any one pass over the texts
    first_use = {}
    for cond, _ in conditions.values():
        if cond.field in first_use:
            continue
        started = time.perf_counter()
        store.mask(cond, n)
        first_use[cond.field] = (time.perf_counter() - started) * 1e3

    rows = []
    for name, (cond, declared) in conditions.items():
        ours = timed(lambda c=cond: store.mask(c, n), args.repeat)
        ref = timed(lambda c=declared: payload.evaluate(Filter(must=(c,)), n), args.repeat) if declared else None
        rows.append((name, ours, ref))

    fresh = MetadataStore()  # writes while columns exist: each text parsed once more
    for label, text in enumerate(texts[:1000]):
        fresh.set(label, text)
    for path in ("source", "page", "tags", "loc.lines.from"):
        fresh.mask(Exists(path), 1000)
    started = time.perf_counter()
    for label, text in enumerate(texts[1000:], start=1000):
        fresh.set(label, text)
    write_columns = (time.perf_counter() - started) / (n - 1000) * 1e6

    print(f"{n:,} documents, {sum(len(t) for t in texts) / n:.0f} bytes of metadata each")
    print(f"write: {write_bare:.1f} us a document without columns, {write_columns:.1f} us with 4 columns")
    print("first use (column build), ms: " + ", ".join(f"{path} {ms:.0f}" for path, ms in first_use.items()))
    print(f"  (json.loads of every text, the floor of one pass: {parse_all:.0f} ms)")
    print(f"\n{'steady filter':<22}{'metadata ms':>12}{'declared ms':>12}{'ratio':>8}")
    for name, ours, ref in rows:
        ref_text = f"{ref:12.2f}{ours / ref:8.1f}" if ref else f"{'-':>12}{'-':>8}"
        print(f"{name:<22}{ours:12.2f}{ref_text}")


if __name__ == "__main__":
    main()
