"""Fuzz suite: hostile requests to every RPC of a real in-process server (issue "Hostile clients", item 5).

Requests come from tests/fuzzing.py, built from the proto descriptors: structured ones for
every RPC (a client stream gets 0-5 messages), raw wire bytes (truncated, bit-flipped,
invalid UTF-8, wrong wire types, ...), and batches of 2-8 structured requests to random RPCs
sent at once from 8 threads (close races: a DeleteCollection under an Upsert). For every call:

- the status is never INTERNAL or UNKNOWN (a server bug), nor DEADLINE_EXCEEDED (a hang past 10 s);
- an error carries a non-empty message;
- every 50 calls and after each test, health Check answers SERVING within 1 s;
- after each test the canary collection, whose name no strategy produces, is unchanged
  (its documents with vectors, its count, a dense and a BM25 search, byte for byte).

The fuzz may write to, delete from and even drop its target collections; they are put
back (recreated and reseeded) whenever they are gone or thinned out.

    .venv/bin/python -m pytest -q tests/test_fuzz.py                              # ~2,800 requests, derandomized
    BRAID_FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest -q tests/test_fuzz.py   # the long run, random seeds
    BRAID_FUZZ_REPORT=fuzz.json .venv/bin/python -m pytest -q tests/test_fuzz.py  # + per-RPC / status counts

BRAID_FUZZ_EXAMPLES is the number of generated requests, split over the tests (a structured
test 4 shares, a raw-bytes test 1, the concurrent batches 12); shrinking a failure adds more.
The report holds the requests sent per RPC ("[raw]" and "[concurrent]" apart) and per status
code, the slowest call of each, and the most common error messages.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from braid.v1 import braid_pb2 as pb

from .conftest import Running, random_vectors, schema, start_in_process, stop_in_process
from .fuzzing import SERVICE, Fuzzer, Known

DEADLINE_S = 10.0
HEALTH_EVERY = 50
BAD_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED)
METHODS = list(SERVICE.methods)

_LONG_RUN = os.environ.get("BRAID_FUZZ_EXAMPLES")
TOTAL_EXAMPLES = int(_LONG_RUN or 3000)
# Shares of the total: a structured test 4, a raw-bytes test 1, the concurrent test (5 requests a batch) 12.
_SHARES = 4 * len(METHODS) + len(METHODS) + 12
STRUCTURED_EXAMPLES = max(10, TOTAL_EXAMPLES * 4 // _SHARES)
RAW_EXAMPLES = max(5, TOTAL_EXAMPLES // _SHARES)
CONCURRENT_BATCHES = max(5, TOTAL_EXAMPLES * 12 // _SHARES // 5)
FUZZ_SETTINGS = settings(
    deadline=None,
    derandomize=not _LONG_RUN,  # make test: the same cases every run; the long run: new ones each time
    database=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)

# ------------------------------------------------------------------ the collections

WORDS = ("alpha", "beta", "gamma", "delta", "search", "vector", "braid", "the", "quick", "brown", "fox", "running")
PAYLOAD = {"kw": pb.KEYWORD, "n": pb.INT, "x": pb.FLOAT, "flag": pb.BOOL, "ts": pb.DATETIME}
CANARY = "canary-7d3c"  # never produced by the strategies (Known.forbidden)
TARGETS: dict[str, tuple[pb.Schema, int]] = {
    "fuzz": (schema(dim=8, payload=PAYLOAD), 2),
    "fuzz-spann": (
        pb.Schema(
            text_fields=[pb.TextField(name="title", analyzer="english")],
            dense_fields=[
                pb.DenseVectorField(
                    name="vec", dim=4, metric=pb.L2, index="spann", spann=pb.SpannParams(merge_threshold=64)
                )
            ],
            payload_fields=[pb.PayloadField(name="kw", type=pb.KEYWORD)],
        ),
        1,
    ),
}
SEED_DOCS = 40


def seed_documents(collection: pb.Schema, n: int, prefix: str = "d", seed: int = 0) -> list[pb.Document]:
    """n documents filling every field of the schema, deterministic."""
    rng = np.random.default_rng(seed)
    vectors = {f.name: random_vectors(n, f.dim, seed) for f in collection.dense_fields}
    docs = []
    for i in range(n):
        doc = pb.Document(id=f"{prefix}{i}")
        for f in collection.text_fields:
            doc.text[f.name] = " ".join(rng.choice(WORDS, size=5))
        for name, rows in vectors.items():
            doc.dense[name].packed = rows[i].astype("<f4").tobytes()
        for f in collection.sparse_fields:
            doc.sparse[f.name].indices.extend([i % 7, 10 + i % 5])
            doc.sparse[f.name].values.extend([0.5, 1.0])
        values = {
            pb.KEYWORD: pb.Value(keyword=f"k{i % 4}"),
            pb.INT: pb.Value(int=i),
            pb.FLOAT: pb.Value(float=i / 3),
            pb.BOOL: pb.Value(bool=i % 2 == 0),
            pb.DATETIME: pb.Value(datetime=Timestamp(seconds=1_700_000_000 + 3600 * i)),
        }
        for f in collection.payload_fields:
            doc.payload[f.name].CopyFrom(values[f.type])
        docs.append(doc)
    return docs


def templates() -> list[Any]:
    """Valid requests for every RPC; half of the fuzz starts from one of these and changes 0-3 fields."""
    fuzz, spann = TARGETS["fuzz"][0], TARGETS["fuzz-spann"][0]
    vector = random_vectors(1, 8, seed=5)[0]
    dense = pb.SubQuery(dense=pb.DenseQuery(field="emb", vector=pb.DenseVector(values=vector.tolist())))
    packed = pb.DenseVector(packed=vector.astype("<f4").tobytes())
    dense_ef = pb.SubQuery(dense=pb.DenseQuery(field="emb", vector=packed, ef=32), depth=20, name="d")
    bm25 = pb.SubQuery(bm25=pb.Bm25Query(text="quick brown fox", fields=["title"], boosts={"title": 2.0}), weight=0.5)
    sparse_vector = pb.SparseVector(indices=[1, 10], values=[0.5, 1.0])
    sparse = pb.SubQuery(sparse=pb.SparseQuery(field="splade", vector=sparse_vector))
    on_spann = pb.DenseQuery(field="vec", vector=pb.DenseVector(values=[0.1, 0.2, 0.3, 0.4]), max_lists=4, eps=0.5)
    flt = pb.Filter(
        must=[pb.Condition(match=pb.Match(field="kw", value=pb.Value(keyword="k1")))],
        should=[
            pb.Condition(range=pb.Range(field="n", gte=pb.Value(int=3), lt=pb.Value(int=30))),
            pb.Condition(range=pb.Range(field="ts", gt=pb.Value(datetime=Timestamp(seconds=1_700_000_000)))),
            pb.Condition(any=pb.MatchAny(field="kw", values=[pb.Value(keyword="k2"), pb.Value(keyword="k3")])),
        ],
        must_not=[
            pb.Condition(exists=pb.Exists(field="x")),
            pb.Condition(
                filter=pb.Filter(must=[pb.Condition(match=pb.Match(field="flag", value=pb.Value(bool=True)))])
            ),
        ],
    )
    searches = [
        pb.SearchRequest(collection="fuzz", queries=[dense]),
        pb.SearchRequest(
            collection="fuzz",
            queries=[bm25, dense_ef, sparse],
            filter=flt,
            fusion=pb.Fusion(rrf=pb.ReciprocalRankFusion(k=10)),
            limit=5,
            offset=1,
            include_payload=True,
            text_fields=["title"],
            explain=True,
        ),
        pb.SearchRequest(
            collection="fuzz",
            queries=[bm25, sparse],
            fusion=pb.Fusion(weighted=pb.WeightedSumFusion(normalization=pb.Z_SCORE)),
            payload_fields=["kw", "ts"],
            score_threshold=-1.0,
        ),
        pb.SearchRequest(collection="fuzz-spann", queries=[pb.SubQuery(dense=on_spann)], limit=3),
        pb.SearchRequest(
            collection="fuzz-spann",
            queries=[pb.SubQuery(dense=on_spann), pb.SubQuery(bm25=pb.Bm25Query(text="running foxes"))],
            filter=pb.Filter(must=[pb.Condition(match=pb.Match(field="kw", value=pb.Value(keyword="k0")))]),
        ),
    ]
    return [
        pb.CreateCollectionRequest(name="fuzz-new", schema=schema(dim=4, payload={"kw": pb.KEYWORD}), shards=2),
        pb.CreateCollectionRequest(name="fuzz-tmp", schema=spann),
        pb.GetCollectionRequest(name="fuzz"),
        pb.DeleteCollectionRequest(name="fuzz-new"),
        pb.FlushRequest(collection="fuzz"),
        pb.UpsertRequest(collection="fuzz", documents=seed_documents(fuzz, 3, prefix="u")),
        pb.UpsertRequest(collection="fuzz-spann", documents=seed_documents(spann, 3, prefix="u")),
        pb.DeleteRequest(collection="fuzz", ids=["d1", "u0"]),
        pb.DeleteRequest(collection="fuzz", filter=pb.Filter(must=[flt.must[0]])),
        pb.GetRequest(collection="fuzz", ids=["d0", "d5", "missing"], include_vectors=True),
        pb.CountRequest(collection="fuzz", filter=flt),
        pb.CountRequest(collection="fuzz-spann"),
        *searches,
        pb.BatchSearchRequest(searches=searches[:3]),
        pb.BatchSearchRequest(searches=[searches[0]] * 3),  # the batched dense path
    ]


KNOWN = Known.from_schemas(
    {name: s for name, (s, _) in TARGETS.items()},
    ids=[f"d{i}" for i in range(SEED_DOCS)] + ["missing"],
    words=WORDS,
    new_collections=("fuzz-new", "fuzz-tmp"),
    forbidden=(CANARY,),
    templates=templates(),
)
FUZZER = Fuzzer(KNOWN)


# ------------------------------------------------------------------ the server under fuzz


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


class FuzzTarget:
    """A running server, a generic channel with one callable per RPC, and the bookkeeping of the fuzz."""

    def __init__(self, running: Running) -> None:
        self.running = running
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{running.port}", options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.structured = {m.name: self._callable(m, raw=False) for m in METHODS}
        self.raw = {m.name: self._callable(m, raw=True) for m in METHODS}
        self.lock = threading.Lock()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.slowest: dict[str, float] = {}
        self.messages: Counter[tuple[str, str, str]] = Counter()  # (rpc, code, details with digits as N)
        self.calls = itertools.count(1)
        self.schemas: dict[str, pb.Schema] = {}
        self.canary_snapshot = b""

    def _callable(self, method: Any, raw: bool) -> Callable[[Any], Any]:
        """A generic multicallable for ``method``; raw ones send bytes as they are (identity serializers)."""
        path = f"/{SERVICE.full_name}/{method.name}"
        serializer = None if raw else _serialize
        deserializer = None if raw else message_factory.GetMessageClass(method.output_type).FromString
        kind = (method.client_streaming, method.server_streaming)
        if kind == (False, False):
            call = self.channel.unary_unary(path, request_serializer=serializer, response_deserializer=deserializer)
            return lambda request: call(request, timeout=DEADLINE_S)
        if kind == (True, False):
            stream = self.channel.stream_unary(path, request_serializer=serializer, response_deserializer=deserializer)
            return lambda requests: stream(iter(requests), timeout=DEADLINE_S)
        if kind == (False, True):
            server_stream = self.channel.unary_stream(
                path, request_serializer=serializer, response_deserializer=deserializer
            )
            return lambda request: list(server_stream(request, timeout=DEADLINE_S))
        both = self.channel.stream_stream(path, request_serializer=serializer, response_deserializer=deserializer)
        return lambda requests: list(both(iter(requests), timeout=DEADLINE_S))

    def call(self, method: str, request: Any, raw: bool, concurrent: bool = False) -> tuple[grpc.StatusCode, str]:
        """Send one request; returns the status code and details (empty on OK).

        Unless ``concurrent`` (sent from a thread of a batch), the targets are restored after a
        successful delete and every 25 calls, and health is checked every HEALTH_EVERY calls.
        """
        started = time.perf_counter()
        try:
            (self.raw if raw else self.structured)[method](request)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
        seconds = time.perf_counter() - started
        rpc = method + ("[raw]" if raw else "[concurrent]" if concurrent else "")
        with self.lock:
            self.counts[(rpc, code.name)] += 1
            self.slowest[rpc] = max(self.slowest.get(rpc, 0.0), seconds)
            if details:
                self.messages[(rpc, code.name, re.sub(r"\d+", "N", details)[:80])] += 1
            n = next(self.calls)
        if concurrent:
            return code, details
        if (code is grpc.StatusCode.OK and method in ("DeleteCollection", "Delete")) or n % 25 == 0:
            self.restore_targets()
        if n % HEALTH_EVERY == 0:
            self.assert_serving()
        return code, details

    # ------------------------------------------------------------- targets and canary

    def restore_targets(self) -> None:
        """Recreate a dropped (or replaced) target collection and reseed a thinned-out one."""
        stub = self.running.stub
        for name, (wanted, shards) in TARGETS.items():
            try:
                info = stub.GetCollection(pb.GetCollectionRequest(name=name), timeout=DEADLINE_S)
            except grpc.RpcError as err:
                if err.code() is not grpc.StatusCode.NOT_FOUND:
                    raise
                info = None
            if info is not None and info.name != name:  # a fuzzed CreateAlias took a dropped target's name
                stub.DeleteAlias(pb.DeleteAliasRequest(name=name), timeout=DEADLINE_S)
                info = None
            if info is not None and name in self.schemas and info.schema != self.schemas[name]:
                stub.DeleteCollection(pb.DeleteCollectionRequest(name=name), timeout=DEADLINE_S)
                info = None
            if info is None:
                request = pb.CreateCollectionRequest(name=name, schema=wanted, shards=shards)
                info = stub.CreateCollection(request, timeout=DEADLINE_S)
                self.schemas[name] = info.schema
            if info.documents < SEED_DOCS // 2:
                docs = seed_documents(wanted, SEED_DOCS)
                stub.Upsert(pb.UpsertRequest(collection=name, documents=docs), timeout=DEADLINE_S)

    def create_canary(self) -> None:
        canary_schema = schema(dim=8, payload=PAYLOAD)
        self.running.client.create_collection(CANARY, canary_schema, shards=2)
        docs = seed_documents(canary_schema, 24, prefix="c", seed=7)
        self.running.stub.Upsert(pb.UpsertRequest(collection=CANARY, documents=docs), timeout=DEADLINE_S)
        self.canary_snapshot = self.canary()

    def canary(self) -> bytes:
        """Everything observable about the canary, serialized deterministically."""
        stub = self.running.stub
        ids = [f"c{i}" for i in range(24)]
        query = random_vectors(1, 8, seed=99)[0].astype("<f4").tobytes()
        dense = pb.SubQuery(dense=pb.DenseQuery(field="emb", vector=pb.DenseVector(packed=query)))
        bm25 = pb.SubQuery(bm25=pb.Bm25Query(text="alpha fox"))
        replies = [
            stub.GetCollection(pb.GetCollectionRequest(name=CANARY), timeout=DEADLINE_S),
            stub.Get(pb.GetRequest(collection=CANARY, ids=ids, include_vectors=True), timeout=DEADLINE_S),
            stub.Count(pb.CountRequest(collection=CANARY), timeout=DEADLINE_S),
            stub.Search(pb.SearchRequest(collection=CANARY, queries=[dense], limit=10), timeout=DEADLINE_S),
            stub.Search(
                pb.SearchRequest(collection=CANARY, queries=[bm25], limit=5, include_payload=True),
                timeout=DEADLINE_S,
            ),
        ]
        return b"".join(r.SerializeToString(deterministic=True) + b"\x1e" for r in replies)

    def assert_serving(self) -> None:
        for service in ("", SERVICE.full_name):
            reply = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    def report(self, path: str, seconds: float) -> None:
        by_rpc: Counter[str] = Counter()
        by_status: Counter[str] = Counter()
        for (rpc, code), n in self.counts.items():
            by_rpc[rpc] += n
            by_status[code] += n
        out = {
            "requests": sum(self.counts.values()),
            "seconds": round(seconds, 1),
            "examples_setting": TOTAL_EXAMPLES,
            "by_rpc": dict(sorted(by_rpc.items())),
            "by_status": dict(by_status.most_common()),
            "by_rpc_and_status": {f"{rpc} {code}": n for (rpc, code), n in sorted(self.counts.items())},
            "slowest_s": {rpc: round(s, 3) for rpc, s in sorted(self.slowest.items())},
            "top_errors": [[*key, n] for key, n in self.messages.most_common(60)],
        }
        Path(path).write_text(json.dumps(out, indent=2) + "\n")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    server, running = start_in_process(tmp_path_factory.mktemp("fuzz") / "data")
    fuzz = FuzzTarget(running)
    started = time.monotonic()
    try:
        fuzz.create_canary()
        fuzz.restore_targets()
        yield fuzz
    finally:
        report = os.environ.get("BRAID_FUZZ_REPORT")
        if report:
            fuzz.report(report, time.monotonic() - started)
        fuzz.channel.close()
        stop_in_process(server, running)


# ------------------------------------------------------------------ the tests


def _check(method: str, code: grpc.StatusCode, details: str) -> None:
    assert code not in BAD_CODES, f"{method} answered {code.name}: {details}"
    assert code is grpc.StatusCode.OK or details.strip(), f"{method} answered {code.name} with no message"


@st.composite
def _batches(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """2-8 requests to RPCs drawn at random (the same target collections, so deletes race the rest)."""
    return [
        (method.name, draw(_REQUESTS[method.name]))
        for method in draw(st.lists(st.sampled_from(METHODS), min_size=2, max_size=8))
    ]


_REQUESTS = {m.name: FUZZER.requests(m) for m in METHODS}


def _fuzz(target: FuzzTarget, method: str, strategy: Any, examples: int, raw: bool) -> None:
    target.restore_targets()

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(strategy)
    def one_request(request: Any) -> None:
        _check(method, *target.call(method, request, raw))

    one_request()
    target.assert_serving()
    assert target.canary() == target.canary_snapshot, "the fuzz changed the canary collection"


@pytest.mark.parametrize("method", [m.name for m in METHODS])
def test_structured_requests(target: FuzzTarget, method: str) -> None:
    _fuzz(target, method, FUZZER.requests(SERVICE.methods_by_name[method]), STRUCTURED_EXAMPLES, raw=False)


@pytest.mark.parametrize("method", [m.name for m in METHODS])
def test_raw_bodies(target: FuzzTarget, method: str) -> None:
    _fuzz(target, method, FUZZER.raw_requests(SERVICE.methods_by_name[method]), RAW_EXAMPLES, raw=True)


def test_concurrent_requests(target: FuzzTarget) -> None:
    """Batches sent at once from 8 threads: close races (DeleteCollection under a Search, Flush under an
    Upsert) must answer NOT_FOUND / UNAVAILABLE, never INTERNAL, and never hang."""
    target.restore_targets()

    def send(item: tuple[str, Any]) -> tuple[str, grpc.StatusCode, str]:
        method, request = item
        return (method, *target.call(method, request, raw=False, concurrent=True))

    with ThreadPoolExecutor(max_workers=8) as pool:

        @settings(FUZZ_SETTINGS, max_examples=CONCURRENT_BATCHES)
        @given(_batches())
        def one_batch(batch: list[tuple[str, Any]]) -> None:
            results = list(pool.map(send, batch))
            target.restore_targets()
            for method, code, details in results:
                _check(method, code, details)

        one_batch()
    target.assert_serving()
    assert target.canary() == target.canary_snapshot, "the fuzz changed the canary collection"


def _reachable_messages(desc: Any, out: dict[str, Any]) -> dict[str, Any]:
    """Every message type reachable from ``desc`` (map entries left out), by full name."""
    if desc.full_name not in out and not desc.GetOptions().map_entry:
        out[desc.full_name] = desc
    for field in desc.fields:
        child = field.message_type
        if child is not None and child.full_name not in out:
            _reachable_messages(child, out)
    return out


def _fields_set(message: Any) -> set[str]:
    """Names of the fields of ``message`` itself that are set (a map's entries count for the map)."""
    return {field.name for field, _ in message.ListFields()}


def test_the_fuzzer_sets_every_field_of_every_request_message() -> None:
    """No server: drawn directly, every message type reachable from an RPC's request gets each of
    its fields set, so a field or RPC added to the proto is fuzzed without touching tests/fuzzing.py."""
    types: dict[str, Any] = {}
    for method in METHODS:
        _reachable_messages(method.input_type, types)
    missing = []
    for desc in types.values():
        seen: set[str] = set()

        @settings(FUZZ_SETTINGS, max_examples=40)
        @given(FUZZER.message(desc))
        def collect(message: Any) -> None:
            seen.update(_fields_set(message))  # noqa: B023 (runs inside this iteration)

        collect()
        missing += [f"{desc.full_name}.{f.name}" for f in desc.fields if f.name not in seen]
    assert missing == []
