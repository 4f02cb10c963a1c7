"""Search through the gRPC API: each strand against a reference, fusion by hand, filters, bad input."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
import tantivy

from braid.service.client import dense_vector, sparse_vector
from braid.v1 import braid_pb2 as pb

from .conftest import random_vectors, rpc_error, schema

CORPUS = {
    "cat": "the cat sat on the mat",
    "dog": "the dog chased the cat around the yard",
    "fish": "a fish swims in the sea",
    "bird": "the bird sings a song about the sea and the sky",
    "mat": "mat mat mat a very dusty mat",
}


def dense_query(vec, field="emb", **kw) -> pb.SubQuery:  # type: ignore[no-untyped-def]
    return pb.SubQuery(dense=pb.DenseQuery(field=field, vector=dense_vector(vec)), **kw)


def sparse_query(weights, **kw) -> pb.SubQuery:  # type: ignore[no-untyped-def]
    return pb.SubQuery(sparse=pb.SparseQuery(field="splade", vector=sparse_vector(weights)), **kw)


def bm25_query(text, **kw) -> pb.SubQuery:  # type: ignore[no-untyped-def]
    return pb.SubQuery(bm25=pb.Bm25Query(text=text), **kw)


def search(braid, collection="docs", **kw) -> list[pb.Hit]:  # type: ignore[no-untyped-def]
    return list(braid.stub.Search(pb.SearchRequest(collection=collection, **kw)).hits)


# ------------------------------------------------------------------- strands


@pytest.mark.parametrize("metric", [pb.COSINE, pb.DOT, pb.L2])
def test_dense_matches_brute_force(braid, metric):
    n, dim = 2000, 16
    vectors = random_vectors(n, dim, seed=1)
    braid.client.create_collection("docs", schema(dim=dim, metric=metric, text=False, sparse=False, ef_search=200))
    braid.client.bulk_upsert("docs", ({"id": str(i), "dense": {"emb": vectors[i]}} for i in range(n)))
    queries = random_vectors(20, dim, seed=2)
    if metric == pb.COSINE:
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
    elif metric == pb.DOT:
        scores = queries @ vectors.T
    else:
        scores = -np.linalg.norm(queries[:, None, :] - vectors[None, :, :], axis=2)
    found = 0
    for q, row in zip(queries, scores, strict=True):
        hits = search(braid, queries=[dense_query(q)], limit=10)
        truth = np.argsort(-row)[:10]
        found += len({h.id for h in hits} & {str(i) for i in truth})
        for hit in hits:
            assert hit.score == pytest.approx(float(row[int(hit.id)]), abs=1e-3)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert found / 200 >= 0.98


def test_bm25_matches_tantivy_directly(braid, tmp_path):
    braid.client.create_collection("docs", pb.Schema(text_fields=[pb.TextField(name="body")]))
    braid.client.upsert("docs", [{"id": k, "text": {"body": v}} for k, v in CORPUS.items()])
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("body", stored=True)
    builder.add_text_field("id", stored=True, tokenizer_name="raw")
    reference = tantivy.Index(builder.build())
    writer = reference.writer(15_000_000, 1)
    for k, v in CORPUS.items():
        writer.add_document(tantivy.Document(body=v, id=k))
    writer.commit()
    reference.reload()
    searcher = reference.searcher()
    for text in ["cat", "the sea", "dusty mat", "song sky bird"]:
        expected = [
            (searcher.doc(addr)["id"][0], score)
            for score, addr in searcher.search(reference.parse_query(text, ["body"]), 10).hits
        ]
        hits = search(braid, queries=[bm25_query(text)], limit=10)
        assert [h.id for h in hits] == [doc_id for doc_id, _ in expected]
        assert [h.score for h in hits] == pytest.approx([score for _, score in expected], rel=1e-5)


def test_bm25_boosts_fields_and_syntax_characters(braid):
    braid.client.create_collection("docs", schema(dim=2, sparse=False))
    braid.client.upsert(
        "docs",
        [
            {"id": "t", "text": {"title": "apple", "body": "banana"}},
            {"id": "b", "text": {"title": "banana", "body": "apple"}},
        ],
    )
    title_heavy = pb.SubQuery(bm25=pb.Bm25Query(text="apple", boosts={"title": 5.0}))
    assert next(h.id for h in search(braid, queries=[title_heavy])) == "t"
    body_only = pb.SubQuery(bm25=pb.Bm25Query(text="apple", fields=["body"]))
    assert [h.id for h in search(braid, queries=[body_only])] == ["b"]
    # Query-language characters are plain text, never a parse error.
    assert {h.id for h in search(braid, queries=[bm25_query('apple AND (banana OR "x) title:')])} == {"t", "b"}
    assert search(braid, queries=[bm25_query("!!! ???")]) == []


def test_sparse_is_an_exact_dot_product(braid):
    braid.client.create_collection("docs", schema(dim=2, text=False))
    rng = np.random.default_rng(3)
    docs = {}
    for i in range(300):
        terms = rng.choice(50, size=8, replace=False)
        docs[f"s{i}"] = {int(t): float(w) for t, w in zip(terms, rng.random(8), strict=True)}
    braid.client.upsert("docs", [{"id": k, "sparse": {"splade": v}} for k, v in docs.items()])
    query = {3: 1.0, 7: 0.5, 11: 2.0}
    expected = sorted(
        ((sum(w * v.get(t, 0.0) for t, w in query.items()), k) for k, v in docs.items()),
        key=lambda item: -item[0],
    )
    expected = [(s, k) for s, k in expected if s > 0][:20]
    hits = search(braid, queries=[sparse_query(query)], limit=20)
    assert [h.score for h in hits] == pytest.approx([s for s, _ in expected], rel=1e-5)
    assert {h.id for h in hits[:5]} == {k for _, k in expected[:5]}


# -------------------------------------------------------------------- fusion


@pytest.fixture
def fused(braid):
    """Three documents whose strand ranks are known: sparse A > B > C, dense B > C > A."""
    braid.client.create_collection("docs", schema(dim=2, text=False))
    braid.client.upsert(
        "docs",
        [
            {"id": "A", "sparse": {"splade": {"x": 3.0}}, "dense": {"emb": [0.0, 1.0]}},
            {"id": "B", "sparse": {"splade": {"x": 2.0}}, "dense": {"emb": [1.0, 0.0]}},
            {"id": "C", "sparse": {"splade": {"x": 1.0}}, "dense": {"emb": [1.0, 0.2]}},
        ],
    )
    return braid


def test_rrf_by_hand(fused):
    # depth 2: sparse keeps A(1), B(2); dense keeps B(1), C(2).
    # A = 1/61, B = 1/62 + 1/61, C = 1/62  ->  B, A, C
    queries = [sparse_query({"x": 1.0}, depth=2), dense_query([1.0, 0.0], depth=2)]
    hits = search(fused, queries=queries, fusion=pb.Fusion(rrf=pb.ReciprocalRankFusion(k=60)), explain=True)
    assert [h.id for h in hits] == ["B", "A", "C"]
    assert [h.score for h in hits] == pytest.approx([1 / 62 + 1 / 61, 1 / 61, 1 / 62], rel=1e-6)
    a = hits[1]
    assert [(e.query, e.rank) for e in a.explain] == [("sparse:splade", 1), ("dense:emb", 0)]
    assert a.explain[0].score == pytest.approx(3.0)
    assert math.isnan(a.explain[1].score)


def test_default_fusion_is_weighted_z_score(fused):
    # Unset fusion with two sub-queries: the default plan, sum of z-scored strands.
    # sparse A=3, B=2 -> z A=+1, B=-1; dense B=1, C=0.981 -> z B=+1, C=-1.  A=1, B=0, C=-1.
    queries = [sparse_query({"x": 1.0}, depth=2), dense_query([1.0, 0.0], depth=2)]
    hits = search(fused, queries=queries)
    assert [h.id for h in hits] == ["A", "B", "C"]
    assert [h.score for h in hits] == pytest.approx([1.0, 0.0, -1.0], abs=1e-6)
    explicit = search(fused, queries=queries, fusion=pb.Fusion(weighted=pb.WeightedSumFusion(normalization=pb.Z_SCORE)))
    assert [(h.id, h.score) for h in explicit] == [(h.id, h.score) for h in hits]


def test_weighted_rrf(fused):
    # weights 3 and 1: A = 3/61, B = 3/62 + 1/61, C = 1/62 -> B (0.0648), A (0.0492), C
    queries = [sparse_query({"x": 1.0}, depth=2, weight=3.0), dense_query([1.0, 0.0], depth=2)]
    hits = search(fused, queries=queries, fusion=pb.Fusion(rrf=pb.ReciprocalRankFusion()))
    assert [h.score for h in hits] == pytest.approx([3 / 62 + 1 / 61, 3 / 61, 1 / 62], rel=1e-6)


def cos(a, b) -> float:  # type: ignore[no-untyped-def]
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_weighted_min_max_by_hand(fused):
    q = [1.0, 0.0]
    dense = {"A": cos([0, 1], q), "B": 1.0, "C": cos([1, 0.2], q)}  # 0, 1, 0.9806
    sparse = {"A": 3.0, "B": 2.0, "C": 1.0}
    # min-max: sparse A=1, B=0.5, C=0; dense A=0, B=1, C=(0.9806-0)/(1-0)
    expected = {k: (sparse[k] - 1) / 2 * 1.0 + (dense[k] - 0) / 1 * 2.0 for k in "ABC"}
    queries = [sparse_query({"x": 1.0}), dense_query(q, weight=2.0)]
    hits = search(fused, queries=queries, fusion=pb.Fusion(weighted=pb.WeightedSumFusion(normalization=pb.MIN_MAX)))
    assert {h.id: h.score for h in hits} == pytest.approx(expected, rel=1e-5)
    assert [h.id for h in hits] == sorted(expected, key=lambda k: -expected[k])


def test_weighted_z_score_and_dbsf_by_hand(fused):
    q = [1.0, 0.0]
    dense = np.array([cos([0, 1], q), 1.0, cos([1, 0.2], q)])
    sparse = np.array([3.0, 2.0, 1.0])
    z = (sparse - sparse.mean()) / sparse.std() + (dense - dense.mean()) / dense.std()

    def dbsf(s):  # type: ignore[no-untyped-def]
        lo, hi = s.mean() - 3 * s.std(), s.mean() + 3 * s.std()
        return np.clip((s - lo) / (hi - lo), 0, 1)

    d = dbsf(sparse) + dbsf(dense)
    queries = [sparse_query({"x": 1.0}), dense_query(q)]
    for norm, expected in ((pb.Z_SCORE, z), (pb.DBSF, d)):
        hits = search(fused, queries=queries, fusion=pb.Fusion(weighted=pb.WeightedSumFusion(normalization=norm)))
        assert {h.id: h.score for h in hits} == pytest.approx(dict(zip("ABC", expected, strict=True)), rel=1e-5)


def test_threshold_offset_limit(fused):
    queries = [sparse_query({"x": 1.0})]
    assert [h.id for h in search(fused, queries=queries)] == ["A", "B", "C"]
    assert [h.id for h in search(fused, queries=queries, limit=1, offset=1)] == ["B"]
    assert [h.id for h in search(fused, queries=queries, score_threshold=1.5)] == ["A", "B"]
    assert [h.id for h in search(fused, queries=queries, score_threshold=1.5, offset=1)] == ["B"]


# ------------------------------------------------------------ payload, text


def test_payload_and_text_fields_come_back_on_request(braid):
    braid.client.create_collection("docs", schema(dim=2, payload={"lang": pb.KEYWORD, "n": pb.INT}))
    braid.client.upsert(
        "docs", [{"id": "a", "text": {"title": "hello", "body": "world"}, "payload": {"lang": "en", "n": 3}}]
    )
    bare = search(braid, queries=[bm25_query("hello")])[0]
    assert (bare.id, dict(bare.payload), dict(bare.text)) == ("a", {}, {})
    some = search(braid, queries=[bm25_query("hello")], payload_fields=["n"], text_fields=["body"])[0]
    assert {k: v.int for k, v in some.payload.items()} == {"n": 3}
    assert dict(some.text) == {"body": "world"}
    full = search(braid, queries=[bm25_query("hello")], include_payload=True)[0]
    assert full.payload["lang"].keyword == "en" and full.payload["n"].int == 3


# --------------------------------------------------------------- filters


def test_filter_applies_inside_every_strand_before_ranking(braid):
    braid.client.create_collection("docs", schema(dim=2, payload={"lang": pb.KEYWORD}))
    docs = [
        {
            "id": f"d{i}",
            "text": {"body": "apple " * (20 - i)},
            "sparse": {"splade": {"apple": 20.0 - i}},
            "dense": {"emb": [1.0, i / 20]},
            "payload": {"lang": "de" if i == 17 else "en"},
        }
        for i in range(20)
    ]
    braid.client.upsert("docs", docs)
    de = pb.Filter(must=[pb.Condition(match=pb.Match(field="lang", value=pb.Value(keyword="de")))])
    for query in (bm25_query("apple"), sparse_query({"apple": 1.0}), dense_query([1.0, 0.0])):
        # The only German document ranks 18th unfiltered; a post-filter of the top 10 would lose it.
        assert [h.id for h in search(braid, queries=[query], filter=de, limit=10)] == ["d17"]


def test_filtered_dense_recall_matches_brute_force(braid):
    n, dim = 20_000, 24
    vectors = random_vectors(n, dim, seed=5)
    braid.client.create_collection(
        "docs", schema(dim=dim, payload={"bucket": pb.INT}, text=False, sparse=False, m=16, ef_construction=64)
    )
    rng = np.random.default_rng(6)
    buckets = rng.integers(0, 1000, size=n)  # 0..999: "bucket < t" keeps t/1000 of the points
    braid.client.bulk_upsert(
        "docs",
        ({"id": str(i), "dense": {"emb": vectors[i]}, "payload": {"bucket": int(buckets[i])}} for i in range(n)),
        batch_size=2000,
    )
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = random_vectors(50, dim, seed=7)
    for keep in (500, 50, 5):  # 50%, 5%, 0.5%
        flt = pb.Filter(must=[pb.Condition(range=pb.Range(field="bucket", lt=pb.Value(int=keep)))])
        allowed = np.flatnonzero(buckets < keep)
        found = 0
        for q in queries:
            truth = allowed[np.argsort(-(unit[allowed] @ (q / np.linalg.norm(q))))[:10]]
            hits = search(braid, queries=[dense_query(q)], filter=flt, limit=10)
            assert all(buckets[int(h.id)] < keep for h in hits)
            found += len({int(h.id) for h in hits} & set(truth.tolist()))
        recall = found / (10 * len(queries))
        assert recall >= 0.99, f"recall@10 {recall:.3f} with a filter keeping {keep / 10:.1f}%"


# ------------------------------------------------------------ batch, shards


def test_batch_search_equals_single_searches(braid):
    n, dim = 500, 8
    vectors = random_vectors(n, dim, seed=8)
    braid.client.create_collection("docs", schema(dim=dim, payload={"k": pb.INT}), shards=2)
    braid.client.upsert(
        "docs",
        [
            {"id": str(i), "dense": {"emb": vectors[i]}, "text": {"body": f"w{i % 7}"}, "payload": {"k": i % 3}}
            for i in range(n)
        ],
    )
    plain = [pb.SearchRequest(collection="docs", queries=[dense_query(v)], limit=5) for v in vectors[:20]]
    mixed = [
        *plain[:3],
        pb.SearchRequest(
            collection="docs",
            queries=[bm25_query("w3"), dense_query(vectors[0])],
            filter=pb.Filter(must=[pb.Condition(match=pb.Match(field="k", value=pb.Value(int=1)))]),
        ),
    ]
    for requests in (plain, mixed):
        batch = braid.stub.BatchSearch(pb.BatchSearchRequest(searches=requests)).results
        singles = [braid.stub.Search(r) for r in requests]
        assert [[(h.id, round(h.score, 5)) for h in r.hits] for r in batch] == [
            [(h.id, round(h.score, 5)) for h in r.hits] for r in singles
        ]
    assert plain[0].queries[0].dense.field == "emb"
    assert next(h.id for h in braid.stub.BatchSearch(pb.BatchSearchRequest(searches=plain)).results[0].hits) == "0"


def test_results_do_not_depend_on_the_shard_count(braid):
    n, dim = 3000, 12
    vectors = random_vectors(n, dim, seed=9)
    rng = np.random.default_rng(10)
    docs = [
        {
            "id": f"x{i}",
            "dense": {"emb": vectors[i]},
            "sparse": {
                "splade": {
                    int(t): float(w) for t, w in zip(rng.choice(40, 4, replace=False), rng.random(4), strict=True)
                }
            },
        }
        for i in range(n)
    ]
    for name, shards in (("one", 1), ("four", 4)):
        braid.client.create_collection(name, schema(dim=dim, text=False, ef_search=400), shards=shards)
        braid.client.bulk_upsert(name, docs, batch_size=1000)
    for q in random_vectors(10, dim, seed=11):
        queries = [dense_query(q), sparse_query({1: 1.0, 2: 0.5})]
        one = search(braid, "one", queries=queries, limit=20)
        four = search(braid, "four", queries=queries, limit=20)
        assert [(h.id, round(h.score, 6)) for h in one] == [(h.id, round(h.score, 6)) for h in four]


def test_bm25_scores_with_the_collections_statistics_on_any_shard_count(braid):
    """The DFS phase: every shard scores BM25 with IDF summed over all shards, so a 4-shard
    collection ranks and scores as one shard does. Documents of equal length (tantivy's average
    field length stays per shard), replaced and deleted ones included (tantivy counts those too)."""
    rng = np.random.default_rng(5)
    vocab = [f"w{i}" for i in range(60)]
    docs = [{"id": str(i), "text": {"body": " ".join(rng.choice(vocab, 6))}} for i in range(600)]
    replaced = [{"id": str(i), "text": {"body": " ".join(rng.choice(vocab, 6))}} for i in range(0, 600, 7)]
    for name, shards in (("one", 1), ("four", 4)):
        braid.client.create_collection(name, schema(text=True, sparse=False), shards=shards)
        braid.client.bulk_upsert(name, docs, batch_size=200)
        braid.client.bulk_upsert(name, replaced, batch_size=200)
        braid.client.delete(name, ids=[str(i) for i in range(1, 600, 11)])
    local_differs = False
    for _ in range(15):
        text = " ".join(rng.choice(vocab, 3))
        one = search(braid, "one", queries=[bm25_query(text)], limit=30)
        four = search(braid, "four", queries=[bm25_query(text)], limit=30)
        scores_one = {h.id: h.score for h in one}
        scores_four = {h.id: h.score for h in four}
        assert np.allclose(sorted(scores_one.values()), sorted(scores_four.values()), rtol=1e-5)
        # equal scores may come in another order (ties break by shard-local keys); each id scores the same
        common = scores_one.keys() & scores_four.keys()
        assert all(math.isclose(scores_one[d], scores_four[d], rel_tol=1e-5) for d in common)
        lowest = min(scores_one.values())
        assert {d for d, v in scores_one.items() if v > lowest * 1.00001} <= scores_four.keys()
        local_differs |= len(set(scores_one.values())) > 1
    assert local_differs  # the queries do rank documents apart


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("request_kw", "code", "needle"),
    [
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "queries"),
        ({"queries": [pb.SubQuery()]}, grpc.StatusCode.INVALID_ARGUMENT, "queries[0]"),
        ({"queries": [bm25_query("   ")]}, grpc.StatusCode.INVALID_ARGUMENT, "queries[0].bm25.text"),
        ({"queries": [dense_query([1.0, 2.0, 3.0])]}, grpc.StatusCode.INVALID_ARGUMENT, "expected dim 2, got 3"),
        ({"queries": [dense_query([1.0, float("nan")])]}, grpc.StatusCode.INVALID_ARGUMENT, "queries[0].dense.vector"),
        ({"queries": [dense_query([1.0, 2.0], field="nope")]}, grpc.StatusCode.INVALID_ARGUMENT, "nope"),
        ({"queries": [sparse_query({})]}, grpc.StatusCode.INVALID_ARGUMENT, "queries[0].sparse.vector"),
        ({"queries": [bm25_query("x")], "limit": 1_000_000}, grpc.StatusCode.RESOURCE_EXHAUSTED, "limit"),
        ({"queries": [bm25_query("x", depth=1_000_000)]}, grpc.StatusCode.RESOURCE_EXHAUSTED, "depth"),
        ({"queries": [bm25_query("x", weight=-1.0)]}, grpc.StatusCode.INVALID_ARGUMENT, "queries[0].weight"),
        (
            {"queries": [pb.SubQuery(bm25=pb.Bm25Query(text="x", fields=["zz"]))]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "zz",
        ),
        ({"queries": [bm25_query("x")], "payload_fields": ["zz"]}, grpc.StatusCode.INVALID_ARGUMENT, "zz"),
        (
            {
                "queries": [bm25_query("x")],
                # an undeclared field is a metadata path: this one has an empty key
                "filter": pb.Filter(must=[pb.Condition(match=pb.Match(field="z..z", value=pb.Value(int=1)))]),
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "filter.must[0].match.z..z",
        ),
        (
            {
                "queries": [bm25_query("x")],
                "filter": pb.Filter(should=[pb.Condition(match=pb.Match(field="lang", value=pb.Value(int=1)))]),
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "lang",
        ),
        (
            {"queries": [bm25_query("x")], "filter": pb.Filter(must=[pb.Condition(range=pb.Range(field="n"))])},
            grpc.StatusCode.INVALID_ARGUMENT,
            "n",
        ),
        (
            {
                "queries": [bm25_query("x")],
                "filter": pb.Filter(must=[pb.Condition(range=pb.Range(field="n", gt=pb.Value(keyword="a")))]),
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "range.gt",
        ),
        (
            {
                "queries": [bm25_query("x"), dense_query([1.0, 0.0])],
                "fusion": pb.Fusion(weighted=pb.WeightedSumFusion(normalization=99)),
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "normalization",
        ),
    ],
)
def test_bad_search_requests(braid, request_kw, code, needle):
    braid.client.create_collection("docs", schema(dim=2, payload={"lang": pb.KEYWORD, "n": pb.INT}))
    err = rpc_error(lambda: braid.stub.Search(pb.SearchRequest(collection="docs", **request_kw)))
    assert err.code() == code, err.details()
    assert needle in err.details()
    batch_err = rpc_error(
        lambda: braid.stub.BatchSearch(
            pb.BatchSearchRequest(searches=[pb.SearchRequest(collection="docs", **request_kw)])
        )
    )
    assert batch_err.code() == code


def test_plain_dense_path_equals_the_general_path(braid):
    n, dim = 1000, 8
    vectors = random_vectors(n, dim, seed=12)
    braid.client.create_collection("docs", schema(dim=dim, text=False, sparse=False), shards=3)
    braid.client.upsert("docs", [{"id": str(i), "dense": {"emb": vectors[i]}} for i in range(n)])
    braid.client.delete("docs", ids=[str(i) for i in range(0, n, 10)])
    for q in random_vectors(10, dim, seed=13):
        plain = search(braid, queries=[dense_query(q)], limit=15)
        # A threshold below every cosine score sends the same query through plan building and fusion.
        general = search(braid, queries=[dense_query(q)], limit=15, score_threshold=-2.0)
        assert [(h.id, h.score) for h in plain] == [(h.id, h.score) for h in general]
        assert len(plain) == 15 and all(int(h.id) % 10 for h in plain)
    err = rpc_error(lambda: search(braid, queries=[dense_query([1.0] * (dim + 1))]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "expected dim 8, got 9" in err.details()
    err = rpc_error(lambda: search(braid, queries=[dense_query([1.0] * dim)], limit=100_000))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_filtered_dense_skips_documents_without_that_vector(braid):
    braid.client.create_collection("docs", schema(dim=4, payload={"k": pb.INT}, sparse=False))
    rng = np.random.default_rng(14)
    docs = []
    for i in range(9000):  # a third carry no vector: 6,000 vectors
        doc = {"id": str(i), "payload": {"k": i % 10}, "text": {"body": "word"}}
        if i % 3:
            doc["dense"] = {"emb": rng.standard_normal(4).astype(np.float32)}
        docs.append(doc)
    braid.client.bulk_upsert("docs", docs, batch_size=3000)
    # k = 0 keeps 900 documents (exact scan); every k keeps all 9,000 (filtered HNSW walk)
    for keep in ([0], list(range(10))):
        flt = pb.Filter(must=[pb.Condition(any=pb.MatchAny(field="k", values=[pb.Value(int=v) for v in keep]))])
        hits = search(braid, queries=[dense_query([1.0, 0.0, 0.0, 0.0])], filter=flt, limit=50)
        assert len(hits) == 50
        assert all(int(h.id) % 3 for h in hits)
        assert all(int(h.id) % 10 in keep for h in hits)


def test_text_field_analyzers(braid):
    braid.client.create_collection(
        "docs",
        pb.Schema(
            text_fields=[
                pb.TextField(name="plain"),
                pb.TextField(name="stemmed", analyzer="en_stem"),
                pb.TextField(name="code", analyzer="raw"),
                pb.TextField(name="spaced", analyzer="whitespace"),
                pb.TextField(name="prose", analyzer="english"),
            ]
        ),
    )
    braid.client.upsert(
        "docs",
        [
            {
                "id": "a",
                "text": {
                    "plain": "running dogs",
                    "stemmed": "running dogs",
                    "code": "AB-12",
                    "spaced": "Hello-World",
                    "prose": "The Runners of a Marathon",
                },
            }
        ],
    )

    def ids(text: str, field: str) -> list[str]:
        return [h.id for h in search(braid, queries=[pb.SubQuery(bm25=pb.Bm25Query(text=text, fields=[field]))])]

    assert ids("runs dog", "stemmed") == ["a"]  # stemming: runs/running -> run, dog/dogs -> dog
    assert ids("runs dog", "plain") == []
    assert ids("running", "plain") == ["a"]
    assert ids("AB", "code") == []  # raw: only the whole value is a token
    assert ids("AB-12", "code") == ["a"]  # the query is not parsed: "-" is text, not an operator
    assert ids("Hello", "spaced") == []  # whitespace: "Hello-World" is one token
    assert ids("Hello-World", "spaced") == ["a"]
    assert ids("runner marathons", "prose") == ["a"]  # english: stemmed
    assert ids("the of a", "prose") == []  # english: stop words and one-letter words are not terms


def test_bm25_counts_repeated_query_words(braid):
    """A word the query repeats weighs as often as it appears (Anserini's bag of words, bm25s)."""
    braid.client.create_collection("docs", pb.Schema(text_fields=[pb.TextField(name="body")]))
    braid.client.upsert("docs", [{"id": "a", "text": {"body": "alpha one"}}, {"id": "b", "text": {"body": "beta two"}}])

    def ranked(text: str) -> list[tuple[str, float]]:
        return [(h.id, h.score) for h in search(braid, queries=[pb.SubQuery(bm25=pb.Bm25Query(text=text))])]

    (first, high), (second, low) = ranked("alpha beta beta")
    assert (first, second) == ("b", "a")
    assert high == pytest.approx(2 * low, rel=1e-5)
    assert [doc for doc, _ in ranked("ALPHA alpha, beta")] == ["a", "b"]
