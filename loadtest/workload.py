"""A scenario's data, collection and requests: what is loaded before the run, and what is sent during it.

    build_workload(scenario, paths) -> Workload      (no server needed; ScenarioSkipped if data is missing)
    prepare_collection(client, scenario, workload, mode)

Data kinds:
  vectors  the seeded vector set (loadtest/vectors.py: ../shared/bench/make_vectors.py's output,
           or the same arrays from the project's copy of its generator when ../shared is
           absent; cached under bench/results/vectors-NxDIM-qQ/, shared with bench/). Documents
           "0".."n-1" with dense field ``emb`` (cosine, HNSW); searches use the query vectors.
  beir     a BEIR-layout collection under ../shared/data (corpus.jsonl, queries.jsonl,
           qrels/test.tsv; read by braid eval's loader). Text field ``body`` = title + text;
           with ``collection.encoder`` also dense field ``dense`` that the server encodes from
           ``body`` (hybrid). Searches are the judged queries, as text.
With ``collection.tags`` > 0 every document carries a KEYWORD payload ``tag`` = t{ordinal % tags}
and ``search.filter = "tag"`` makes search i filter on ``tag == t{i % tags}``.

Requests are serialized once here, so the client processes only send bytes:
  search   one SearchRequest per query (the strands given, limit, ef, filter);
  upsert   ``mix.upsert_pool`` UpsertRequests of ``mix.upsert_batch`` new documents (ids
           ``lt-u{j}``: repeated, so later upserts replace earlier ones);
  bulk     ``bulk.pool`` UpsertRequests of ``bulk.batch`` documents (ids ``lt-b{j}``), the
           messages of the BulkUpsert streams.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from braid.service.client import BraidClient, dense_vector
from braid.v1 import braid_pb2 as pb

from .scenario import Scenario
from .vectors import CACHE_DIR, SHARED_DIR, vector_set
from .worker import BulkPlan

LOAD_BATCH = 500  # documents per BulkUpsert message while loading
LOAD_TIMEOUT_S = 3600.0
METHODS = {"search": "/braid.v1.Braid/Search", "upsert": "/braid.v1.Braid/Upsert"}
DENSE_FIELD = "emb"  # vectors data
TEXT_FIELD = "body"  # beir data
ENCODED_FIELD = "dense"  # beir data with an encoder


class CollectionExists(RuntimeError):
    """The scenario's collection exists on a server we did not start (neither --reuse nor --recreate)."""


class ScenarioSkipped(RuntimeError):
    """The scenario cannot run here: its data or model is missing. The message says what and how to get it."""


@dataclass(frozen=True)
class Paths:
    shared: Path = SHARED_DIR  # holds bench/make_vectors.py and data/
    cache: Path = CACHE_DIR  # the vector set's cache


@dataclass
class Workload:
    schema: pb.Schema
    documents: list[pb.Document]  # loaded before the run
    ops: dict[str, tuple[str, list[bytes]]]  # op -> (method path, serialized requests)
    weights: dict[str, float]
    bulk: BulkPlan | None
    source: str  # where the data came from, for the report


# ------------------------------------------------------------------------ data


def shared_vectors(n: int, dim: int, queries: int, paths: Paths = Paths()) -> tuple[np.ndarray, np.ndarray]:
    """(base, queries) of the seeded vector set (loadtest/vectors.py: the shared script's, else the same
    arrays from the project's generator), cached under ``paths.cache``."""
    base, query, _ = vector_set(n, dim, queries, cache=paths.cache, shared=paths.shared).load()
    return base, query


def _beir(scenario: Scenario, paths: Paths) -> tuple[list[tuple[str, str]], list[str], Path]:
    from braid.service.evaluate import BeirCollection

    directory = paths.shared / "data" / scenario.data.collection
    if not (directory / "corpus.jsonl").exists():
        name = scenario.data.collection
        raise ScenarioSkipped(f"BEIR collection {name!r} not found: {directory} has no corpus.jsonl")
    data = BeirCollection.load(directory)
    docs = list(data.corpus.items())
    if scenario.data.max_docs:
        docs = docs[: scenario.data.max_docs]
    queries = list(data.queries.values())
    if scenario.data.max_queries:
        queries = queries[: scenario.data.max_queries]
    if not queries:
        raise ScenarioSkipped(f"{directory} has no judged queries")
    return docs, queries, directory


# ---------------------------------------------------------------------- schema


def schema(scenario: Scenario) -> pb.Schema:
    c = scenario.collection
    out = pb.Schema()
    if scenario.data.kind == "vectors":
        out.dense_fields.add(
            name=DENSE_FIELD,
            dim=scenario.data.dim,
            metric=pb.COSINE,
            hnsw=pb.HnswParams(m=c.m, ef_construction=c.ef_construction),
        )
    else:
        out.text_fields.add(name=TEXT_FIELD, analyzer=c.analyzer)
        if c.encoder:
            out.dense_fields.add(
                name=ENCODED_FIELD, metric=pb.COSINE, encoder=pb.Encoder(model=c.encoder, source_fields=[TEXT_FIELD])
            )
    if c.tags:
        out.payload_fields.add(name="tag", type=pb.KEYWORD)
    return out


def _tag_filter(i: int, tags: int) -> pb.Filter:
    value = pb.Value(keyword=f"t{i % tags}")
    return pb.Filter(must=[pb.Condition(match=pb.Match(field="tag", value=value))])


class _Docs:
    """Documents by ordinal: from the vector set or the corpus, with the tag payload when asked."""

    def __init__(self, scenario: Scenario, base: np.ndarray | None, corpus: list[tuple[str, str]] | None) -> None:
        self.tags = scenario.collection.tags
        self.base = base
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.base) if self.base is not None else len(self.corpus or [])

    def make(self, ordinal: int, doc_id: str | None = None) -> pb.Document:
        source = ordinal % len(self)
        if self.base is not None:
            doc = pb.Document(id=doc_id or str(source))
            doc.dense[DENSE_FIELD].CopyFrom(dense_vector(self.base[source]))
        else:
            assert self.corpus is not None
            corpus_id, body = self.corpus[source]
            doc = pb.Document(id=doc_id or corpus_id, text={TEXT_FIELD: body})
        if self.tags:
            doc.payload["tag"].keyword = f"t{ordinal % self.tags}"
        return doc


# -------------------------------------------------------------------- requests


def _searches(scenario: Scenario, vectors: np.ndarray | None, texts: list[str] | None) -> list[bytes]:
    s = scenario.search
    out = []
    count = len(vectors) if vectors is not None else len(texts or [])
    for i in range(count):
        request = pb.SearchRequest(collection=scenario.collection_name, limit=s.limit)
        for strand in s.strands:
            if strand == "dense":
                assert vectors is not None
                request.queries.add(dense=pb.DenseQuery(field=DENSE_FIELD, vector=dense_vector(vectors[i]), ef=s.ef))
            elif strand == "bm25":
                request.queries.add(bm25=pb.Bm25Query(text=texts[i]))  # type: ignore[index]
            elif strand == "dense_text":
                request.queries.add(dense=pb.DenseQuery(field=ENCODED_FIELD, text=texts[i], ef=s.ef))  # type: ignore[index]
        if s.filter == "tag":
            request.filter.CopyFrom(_tag_filter(i, scenario.collection.tags))
        out.append(request.SerializeToString())
    return out


def _upserts(scenario: Scenario, docs: _Docs, prefix: str, requests: int, size: int) -> list[bytes]:
    """``requests`` UpsertRequests of ``size`` documents with ids ``{prefix}{j}``, drawn across the data."""
    out = []
    stride = max(len(docs) // max(requests * size, 1), 1)
    for r in range(requests):
        batch = [docs.make((r * size + d) * stride + 7, f"{prefix}{r * size + d}") for d in range(size)]
        out.append(pb.UpsertRequest(collection=scenario.collection_name, documents=batch).SerializeToString())
    return out


def build_workload(scenario: Scenario, paths: Paths = Paths()) -> Workload:
    """The collection's schema and documents and every request of ``scenario``; no server needed."""
    if scenario.data.kind == "vectors":
        d = scenario.data
        made = vector_set(d.n, d.dim, d.queries, cache=paths.cache, shared=paths.shared)
        base, queries, _ = made.load()
        docs = _Docs(scenario, base, None)
        searches = _searches(scenario, queries, None)
        source = f"vector set {d.n}x{d.dim}, {d.queries} queries ({made.origin})"
    else:
        corpus, texts, directory = _beir(scenario, paths)
        docs = _Docs(scenario, None, corpus)
        searches = _searches(scenario, None, texts)
        source = f"{directory}: {len(corpus)} documents, {len(texts)} queries"
    ops: dict[str, tuple[str, list[bytes]]] = {"search": (METHODS["search"], searches)}
    weights = {"search": scenario.mix.search}
    if scenario.mix.upsert > 0:
        m = scenario.mix
        ops["upsert"] = (METHODS["upsert"], _upserts(scenario, docs, "lt-u", m.upsert_pool, m.upsert_batch))
        weights["upsert"] = m.upsert
    bulk = None
    if scenario.bulk.streams:
        b = scenario.bulk
        bulk = BulkPlan(
            streams=b.streams,
            batches=_upserts(scenario, docs, "lt-b", b.pool, b.batch),
            batch_docs=b.batch,
            batches_per_s=b.batches_per_s,
            batches_per_stream=b.batches_per_stream,
            timeout_s=b.timeout_s,
        )
    return Workload(
        schema=schema(scenario),
        documents=[docs.make(i) for i in range(len(docs))],
        ops=ops,
        weights=weights,
        bulk=bulk,
        source=source,
    )


# ------------------------------------------------------------------ collection

MODES = ("fresh", "reuse", "recreate")


def prepare_collection(client: BraidClient, scenario: Scenario, workload: Workload, mode: str = "fresh") -> dict:
    """Create the scenario's collection and load its documents; returns what was done.

    ``mode``: ``fresh`` refuses a collection that already exists (it is not ours to drop),
    ``reuse`` takes an existing one as it is, ``recreate`` drops and reloads it.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; valid: {', '.join(MODES)}")
    name = scenario.collection_name
    exists = any(info.name == name for info in client.list_collections())
    if exists and mode == "reuse":
        return {"collection": name, "loaded": 0, "reused": True}
    if exists and mode == "fresh":
        raise CollectionExists(
            f"collection {name!r} already exists on the server: pass --reuse to run against it as it is, "
            "or --recreate to drop and load it again"
        )
    if exists:
        client.delete_collection(name)
    c = scenario.collection
    client.create_collection(name, workload.schema, shards=c.shards, replication_factor=c.replication_factor)
    began = time.monotonic()

    def batches() -> Iterator[pb.UpsertRequest]:
        for i in range(0, len(workload.documents), LOAD_BATCH):
            yield pb.UpsertRequest(collection=name, documents=workload.documents[i : i + LOAD_BATCH])

    client.stub.BulkUpsert(batches(), timeout=LOAD_TIMEOUT_S)
    seconds = time.monotonic() - began
    return {"collection": name, "loaded": len(workload.documents), "load_s": round(seconds, 2), "reused": False}
