"""BM25 search speed through Braid's gRPC API against tantivy used directly and a bare gRPC echo, in one run.

    python bench/bm25_speed.py [--docs 50000] [--queries 2000] [--shards 1,2] [--rounds 40]
                               [--beir scifact] [--data ../shared/data] [--baseline REV]

Single client, top 10, interleaved: the queries are cut into ``--rounds`` blocks, and each
block runs against every reference and every Braid server in turn, so a machine others load
slows them alike; a system's QPS is the median of its blocks' rates (robust to a burst of
load landing on one block). It prints the QPS of

  tantivy   tantivy in this process, one thread, on the same text with the same analyzer
            Braid uses (index/analyzers.py): analyze the query, one boosted term query per
            distinct term (Braid's bag of words, index/text.py), search the top 10, read the
            hits' ids from a fast field: what any BM25 server must do, and nothing more. The
            index is built in one commit; a second one, committed every 500 documents as
            Braid commits each BulkUpsert batch, shows what tantivy's segments cost (tantivy-py
            offers no merge call, and its merge policy leaves up to 7 segments under 10,000
            documents unmerged); it is printed, not part of the ideal;
  echo      a bare gRPC service in another process that answers the same SearchRequest bytes
            with the SearchResponse bytes Braid gives, doing no work. Two kinds: bench/dense.py's
            (grpcio's thread-pool server) and a grpc.aio one like Braid's; the faster is the
            reference;
  braid     ``braid serve`` (another process, defaults), one text field, Search with one BM25
            sub-query and limit 10, for each shard count given;

and ideal = 1 / (1/tantivy + 1/echo): a server that added nothing to tantivy and gRPC; and
  bare      the echo server, but decoding each request and running the tantivy search above
            on it (as bench/dense.py's bare reference does with hnswlib): the floor for any
            Python gRPC server around tantivy, where the two costs share two cores.
With ``--baseline REV`` a second ``braid serve`` runs the code of that git revision (its
tree exported, its protos compiled) on the same data, interleaved too: before and after a
change, in one run. The first server then runs HEAD exported the same way (commit first):
a server run from the editable checkout measured some 10% faster than the same commit
exported, so both sides of a comparison are exported.
Target (issue 21): braid on one shard >= 0.8 x ideal. On several shards Braid also runs its
DFS phase (collection-wide IDF), so those rows show what it costs.

Corpus: seeded synthetic text (Zipf-distributed words over a fixed vocabulary, 2-4 word
queries drawn from the same law), so it runs anywhere; with ``--beir NAME`` also a BEIR
collection from ``--data`` (its queries), skipped when absent.

``measure(n_docs, n_queries)`` returns the same numbers as a dict for other bench scripts
(bench/realload.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import grpc_tools
import numpy as np
import tantivy

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from dense import serve_search, start_process  # noqa: E402  # bench/dense.py: its echo server and process starter
from ir_data import DATA, BraidProcess, collections  # noqa: E402
from settle import settle  # noqa: E402

from braid.index import analyzers  # noqa: E402
from braid.index.schema import Analyzer  # noqa: E402
from braid.service.client import BraidClient  # noqa: E402
from braid.v1 import braid_pb2 as pb  # noqa: E402

ROOT = BENCH.parent
DENSE_SCRIPT = BENCH / "dense.py"
LIMIT = 10
BATCH = 500  # documents per BulkUpsert message: Braid commits tantivy once per batch
ANALYZER = Analyzer.DEFAULT
VOCABULARY = 30_000
ZIPF_S = 1.1  # word frequency ~ 1 / rank^s, as in natural text


# -------------------------------------------------------------------- data


def synthetic(n_docs: int, n_queries: int, seed: int = 21) -> tuple[list[str], list[str]]:
    """Documents of 20-200 words and queries of 2-4 words, Zipf-distributed over a fixed vocabulary."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = np.array(["".join(rng.choice(letters, size=rng.integers(3, 10))) for _ in range(VOCABULARY)])
    weights = 1.0 / np.arange(1, VOCABULARY + 1) ** ZIPF_S
    weights /= weights.sum()
    lengths = rng.integers(20, 201, size=n_docs)
    drawn = words[rng.choice(VOCABULARY, size=int(lengths.sum()), p=weights)]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    docs = [" ".join(drawn[bounds[i] : bounds[i + 1]]) for i in range(n_docs)]
    q_lengths = rng.integers(2, 5, size=n_queries)
    q_drawn = words[rng.choice(VOCABULARY, size=int(q_lengths.sum()), p=weights)]
    q_bounds = np.concatenate([[0], np.cumsum(q_lengths)])
    queries = [" ".join(q_drawn[q_bounds[i] : q_bounds[i + 1]]) for i in range(n_queries)]
    return docs, queries


# ----------------------------------------------------------------- tantivy


class DirectTantivy:
    """The floor: the corpus in a tantivy index in this process, searched as Braid searches one shard."""

    def __init__(self, docs: list[str], analyzer: Analyzer = ANALYZER, commit_every: int = 0) -> None:
        self.analyzer = analyzers.build(analyzer)
        builder = tantivy.SchemaBuilder()
        builder.add_integer_field("label", stored=False, indexed=True, fast=True)
        builder.add_text_field("body", stored=True, tokenizer_name=analyzer.value)
        self.schema = builder.build()
        index = tantivy.Index(self.schema)
        if analyzer in analyzers.CUSTOM:
            index.register_tokenizer(analyzer.value, analyzers.build(analyzer))
        writer = index.writer(128_000_000, 1)
        for label, text in enumerate(docs):
            writer.add_document(tantivy.Document(label=label, body=text))
            if commit_every and (label + 1) % commit_every == 0:
                writer.commit()  # a segment per commit, as Braid's per-batch commits make
        writer.commit()
        writer.wait_merging_threads()
        index.reload()
        self.searcher = index.searcher()

    def search(self, text: str) -> list[tuple[float, int]]:
        terms = Counter(self.analyzer.analyze(text))
        if not terms:
            return []
        query = tantivy.Query.boolean_query(
            [
                (tantivy.Occur.Should, tantivy.Query.boost_query(tantivy.Query.term_query(self.schema, "body", t), n))
                for t, n in terms.items()
            ]
        )
        hits = self.searcher.search(query, LIMIT, count=False).hits
        labels = self.searcher.fast_field_values("label", [h[1] for h in hits])
        return [(h[0], label) for h, label in zip(hits, labels, strict=True)]


# -------------------------------------------------------------------- echo


def aio_echo_main(port_file: str, response_hex: str) -> None:
    """A bare grpc.aio service (Braid's kind of server) answering every Search with fixed bytes."""
    response = bytes.fromhex(response_hex)

    async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return response

    async def serve() -> None:
        handler = grpc.method_handlers_generic_handler(
            "braid.v1.Braid",
            {"Search": grpc.unary_unary_rpc_method_handler(handle, lambda b: b, lambda b: b)},
        )
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        Path(port_file).write_text(str(port))
        await server.wait_for_termination()

    asyncio.run(serve())


def bare_server_main(port_file: str, response_hex: str, docs_path: str) -> None:
    """The "bare" reference: bench/dense.py's kind of gRPC server (grpcio's thread pool) that
    decodes each Search and runs ``DirectTantivy`` on its text, answering fixed bytes: what any
    Python gRPC server around tantivy must do, and nothing more."""
    response = bytes.fromhex(response_hex)
    direct = DirectTantivy(json.loads(Path(docs_path).read_text()))

    def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
        direct.search(pb.SearchRequest.FromString(request).queries[0].bm25.text)
        return response

    serve_search(handle, port_file)


# ---------------------------------------------------------------- baseline


def export_revision(rev: str, into: Path) -> Path:
    """The ``braid`` package of git revision ``rev`` under ``into`` (laid out as pyproject.toml's
    package-dir says, protos compiled); the directory to put on PYTHONPATH."""
    tree = into / "tree"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    protos = sorted(str(p.relative_to(tree / "proto")) for p in (tree / "proto" / "braid").rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    command = [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"-I{include}", "--python_out=proto"]
    subprocess.run([*command, "--grpc_python_out=proto", *protos], cwd=tree, check=True)
    package = into / "path" / "braid"
    shutil.copytree(tree / "proto" / "braid", package)
    for name in ("service", "index", "encoders"):
        (package / name).symlink_to(tree / name)
    return into / "path"


@contextlib.contextmanager
def python_path(path: Path | None) -> Iterator[None]:
    """Child processes started inside import ``braid`` from ``path`` (None: this checkout's)."""
    before = os.environ.get("PYTHONPATH")
    if path is not None:
        os.environ["PYTHONPATH"] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


# -------------------------------------------------------------------- runs


def _bm25_request(collection: str, text: str) -> pb.SearchRequest:
    return pb.SearchRequest(collection=collection, limit=LIMIT, queries=[pb.SubQuery(bm25=pb.Bm25Query(text=text))])


def _timed(call: Callable[[object], object], items: list) -> float:
    """Seconds to make every call in turn."""
    started = time.perf_counter()
    for item in items:
        call(item)
    return time.perf_counter() - started


def _load(client: BraidClient, docs: list[str], shards: list[int]) -> dict[int, float]:
    """A collection ``bm25-<n>`` per shard count holding ``docs``; ingest docs/s of each."""
    ingest = {}
    for count in shards:
        name = f"bm25-{count}"
        schema = pb.Schema(text_fields=[pb.TextField(name="body", analyzer=ANALYZER.value)])
        client.create_collection(name, schema, shards=count)
        started = time.perf_counter()
        client.bulk_upsert(name, ({"id": str(i), "text": {"body": t}} for i, t in enumerate(docs)), batch_size=BATCH)
        ingest[count] = len(docs) / (time.perf_counter() - started)
    return ingest


def run(docs: list[str], queries: list[str], shards: list[int], rounds: int = 40, baseline: str = "") -> dict:
    """Index ``docs`` in tantivy and in one Braid server (a collection per shard count; with
    ``baseline``, a git revision, in a second server running that code too), then time ``queries``
    against every system, interleaved over ``rounds`` rounds; QPS and ratios."""
    out: dict = {"docs": len(docs), "queries": len(queries), "shards": shards, "baseline": baseline}
    direct = DirectTantivy(docs)
    segmented = DirectTantivy(docs, commit_every=BATCH)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        old = None
        if baseline:
            with python_path(export_revision("HEAD", tmp_path / "head")):
                braid = BraidProcess(tmp_path / "data")
            with python_path(export_revision(baseline, tmp_path / "baseline")):
                old = BraidProcess(tmp_path / "baseline-data")
        else:
            braid = BraidProcess(tmp_path / "data")
        processes = []
        channels = []
        try:
            client = BraidClient(f"127.0.0.1:{braid.port}", timeout=600)
            channels.append(client)
            out["ingest_docs_per_s"] = _load(client, docs, shards)
            if old is not None:
                old_client = BraidClient(f"127.0.0.1:{old.port}", timeout=600)
                channels.append(old_client)
                _load(old_client, docs, shards)
            settle([braid.proc.pid] + ([old.proc.pid] if old is not None else []))
            # The echo answers with the response Braid gives to a typical query.
            response_hex = client.stub.Search(_bm25_request(f"bm25-{shards[0]}", queries[0])).SerializeToString().hex()
            echoes = {}
            (tmp_path / "docs.json").write_text(json.dumps(docs))
            for kind, args, extra in (
                ("echo-sync", [str(DENSE_SCRIPT), "--echo-server"], []),
                ("echo-aio", [str(Path(__file__).resolve()), "--aio-echo-server"], []),
                ("bare", [str(Path(__file__).resolve()), "--bare-server"], [str(tmp_path / "docs.json")]),
            ):
                port_file = tmp_path / kind
                proc, port = start_process([*args, str(port_file), response_hex, *extra], port_file)
                processes.append(proc)
                channel = grpc.insecure_channel(f"127.0.0.1:{port}")
                channels.append(channel)
                echoes[kind] = channel.unary_unary(
                    "/braid.v1.Braid/Search",
                    request_serializer=pb.SearchRequest.SerializeToString,
                    response_deserializer=pb.SearchResponse.FromString,
                )
            requests = {count: [_bm25_request(f"bm25-{count}", q) for q in queries] for count in shards}
            systems: dict[str, tuple[Callable, list]] = {"tantivy": (direct.search, queries)}
            systems["tantivy-segmented"] = (segmented.search, queries)
            systems |= {kind: (call, requests[shards[0]]) for kind, call in echoes.items()}
            systems |= {f"braid-{count}": (client.stub.Search, requests[count]) for count in shards}
            if old is not None:
                systems |= {f"baseline-{count}": (old_client.stub.Search, requests[count]) for count in shards}
            for call, items in systems.values():  # warm up every path
                for item in items[:200]:
                    call(item)
            rates: dict[str, list[float]] = {name: [] for name in systems}
            names = list(systems)
            for n, block in enumerate(np.array_split(np.arange(len(queries)), rounds)):
                for name in names if n % 2 == 0 else reversed(names):  # no system always follows the same one
                    call, items = systems[name]
                    rates[name].append(len(block) / _timed(call, [items[i] for i in block.tolist()]))
            qps = {name: float(np.median(r)) for name, r in rates.items()}
            out["qps"] = qps
            out["same_hits"] = _same_hits(direct, client, queries[:200], shards)
        finally:
            for channel in channels:
                channel.close()
            for proc in processes:
                proc.kill()
                proc.wait()
            braid.stop()
            if old is not None:
                old.stop()
    echo = max(qps["echo-sync"], qps["echo-aio"])
    ideal = 1 / (1 / qps["tantivy"] + 1 / echo)
    out["echo_qps"], out["ideal_qps"] = echo, ideal
    out["braid_vs_ideal"] = {count: qps[f"braid-{count}"] / ideal for count in shards}
    out["braid_vs_bare"] = {count: qps[f"braid-{count}"] / qps["bare"] for count in shards}
    if baseline:
        out["baseline_vs_ideal"] = {count: qps[f"baseline-{count}"] / ideal for count in shards}
    return out


def _same_hits(direct: DirectTantivy, client: BraidClient, queries: list[str], shards: list[int]) -> dict[int, float]:
    """Per shard count: the share of queries whose Braid top 10 (ids and scores to 1e-4) equals tantivy's."""
    out = {}
    for count in shards:
        same = 0
        for text in queries:
            expected = [(str(label), score) for score, label in direct.search(text)]
            got = [(h.id, h.score) for h in client.search(f"bm25-{count}", bm25=text, limit=LIMIT)]
            same += len(expected) == len(got) and all(
                abs(a[1] - b[1]) <= 1e-4 * max(1.0, abs(a[1])) for a, b in zip(expected, got, strict=True)
            )
        out[count] = same / len(queries)
    return out


def measure(
    n_docs: int = 50_000, n_queries: int = 2_000, shards: tuple[int, ...] = (1,), rounds: int = 40, baseline: str = ""
) -> dict:
    """The synthetic run, for other bench scripts: QPS per system (``qps``), ``ideal_qps`` and
    ``braid_vs_ideal`` per shard count."""
    docs, queries = synthetic(n_docs, n_queries)
    return run(docs, queries, list(shards), rounds, baseline)


def print_table(label: str, result: dict) -> None:
    qps = result["qps"]
    print(
        f"\n{label}: {result['docs']:,} docs, {result['queries']:,} queries, top {LIMIT}, one client; "
        f"Braid ingest {', '.join(f'{v:,.0f} docs/s ({k} shards)' for k, v in result['ingest_docs_per_s'].items())}"
    )
    print(
        "| system | QPS | vs ideal | same top 10 as tantivy |\n|---|---|---|---|\n"
        f"| tantivy direct | {qps['tantivy']:,.0f} | | |\n"
        f"| tantivy direct, a commit per {BATCH} docs (not in the ideal) | {qps['tantivy-segmented']:,.0f} | | |\n"
        f"| echo, grpcio thread pool | {qps['echo-sync']:,.0f} | | |\n"
        f"| echo, grpc.aio | {qps['echo-aio']:,.0f} | | |\n"
        f"| ideal = 1/(1/tantivy + 1/faster echo) | {result['ideal_qps']:,.0f} | 1.00 | |\n"
        f"| bare gRPC + tantivy (decode, search, fixed answer) | {qps['bare']:,.0f} "
        f"| {qps['bare'] / result['ideal_qps']:.2f} | |"
    )
    current = "braid HEAD" if result["baseline"] else "braid"
    for count in result["shards"]:
        print(
            f"| {current}, {count} shard{'s' if count > 1 else ''} | {qps[f'braid-{count}']:,.0f} "
            f"| {result['braid_vs_ideal'][count]:.2f} (vs bare {result['braid_vs_bare'][count]:.2f}) "
            f"| {result['same_hits'][count]:.3f} |"
        )
    for count in result["shards"] if result["baseline"] else ():
        print(
            f"| baseline {result['baseline']}, {count} shard{'s' if count > 1 else ''} "
            f"| {qps[f'baseline-{count}']:,.0f} | {result['baseline_vs_ideal'][count]:.2f} | |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--shards", default="1,2")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--beir", default="", help="comma-separated BEIR collections under --data to run as well")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--baseline", default="", help="a git revision to run as a second server, for before/after")
    args = parser.parse_args()
    shards = tuple(int(s) for s in args.shards.split(","))
    print_table("synthetic (Zipf words)", measure(args.docs, args.queries, shards, args.rounds, args.baseline))
    if args.beir:
        for name, corpus, queries, _ in collections(args.data, args.beir):
            texts = list(queries.values())
            texts = (texts * (args.queries // len(texts) + 1))[: args.queries]
            print_table(name, run(list(corpus.values()), texts, list(shards), args.rounds, args.baseline))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--aio-echo-server":
        aio_echo_main(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--bare-server":
        bare_server_main(*sys.argv[2:])
    else:
        main()
