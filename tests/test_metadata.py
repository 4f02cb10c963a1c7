"""Schemaless metadata (Document.metadata): exact round trips, validation, filters, durability, cluster.

Every test runs the real server (in process, or ``braid serve`` in a child process that is
SIGKILLed) and sends the JSON text as a client built from the .proto would.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from braid.service.client import BraidClient
from braid.service.cluster.local import LocalCluster
from braid.v1 import braid_pb2 as pb
from tests.clusterkit import local_cluster  # noqa: F401

from .conftest import Running, rpc_error, schema

DIM = 8
T = 30.0
PAYLOAD = {"price": pb.FLOAT, "tag": pb.KEYWORD}


def doc(i: int | str, metadata: str = "", **payload: Any) -> pb.Document:
    rng = np.random.default_rng(abs(hash(str(i))) % 1000)
    out = pb.Document(id=str(i), metadata=metadata, text={"body": f"word{i} common"})
    out.dense["emb"].values.extend(rng.standard_normal(DIM).tolist())
    for name, value in payload.items():
        out.payload[name].CopyFrom(pb.Value(float=value) if name == "price" else pb.Value(keyword=value))
    return out


def upsert(stub: Any, collection: str, docs: list[pb.Document]) -> int:
    return stub.Upsert(pb.UpsertRequest(collection=collection, documents=docs), timeout=T).upserted


def got(client: BraidClient, collection: str, ids: list[str]) -> dict[str, str]:
    return {d.id: d.metadata for d in client.get(collection, ids)}


# ------------------------------------------------------------------ filters


def value(v: object) -> pb.Value:
    if isinstance(v, bool):
        return pb.Value(bool=v)
    if isinstance(v, int):
        return pb.Value(int=v)
    if isinstance(v, float):
        return pb.Value(float=v)
    return pb.Value(keyword=str(v))


def cond(kind: str, field: str, *args: Any, **bounds: Any) -> pb.Condition:
    if kind == "match":
        return pb.Condition(match=pb.Match(field=field, value=value(args[0])))
    if kind == "any":
        return pb.Condition(any=pb.MatchAny(field=field, values=[value(v) for v in args[0]]))
    if kind == "range":
        return pb.Condition(range=pb.Range(field=field, **{k: value(v) for k, v in bounds.items()}))
    return pb.Condition(exists=pb.Exists(field=field))


def _elements(meta: dict, path: str) -> list | None:
    """What the reference compares: None when the path has no value (or null), else its scalars."""
    node: Any = meta
    for key in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    if node is None:
        return None
    return node if isinstance(node, list) else [node]


def _equal(a: object, b: object) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == b


def holds(c: pb.Condition, meta: dict, payload: dict) -> bool:
    """Brute-force reference of one condition on one document."""
    kind = c.WhichOneof("kind")
    if kind == "filter":
        return passes(c.filter, meta, payload)
    inner = getattr(c, kind)
    if inner.field in PAYLOAD:
        present = inner.field in payload
        if kind == "exists":
            return present
        assert kind == "match"
        return present and payload[inner.field] == getattr(inner.value, inner.value.WhichOneof("kind"))
    found = _elements(meta, inner.field)
    if found is None:
        return False
    if kind == "exists":
        return True
    if kind == "range":
        numbers = [e for e in found if isinstance(e, (int, float)) and not isinstance(e, bool)]
        checks = {"gt": float.__gt__, "gte": float.__ge__, "lt": float.__lt__, "lte": float.__le__}
        bounds = [(op, inner_value(getattr(inner, name))) for name, op in checks.items() if inner.HasField(name)]
        return any(all(op(float(e), float(b)) for op, b in bounds) for e in numbers)
    wanted = [inner_value(inner.value)] if kind == "match" else [inner_value(v) for v in inner.values]
    return any(_equal(e, w) for e in found for w in wanted)


def inner_value(v: pb.Value) -> object:
    return getattr(v, v.WhichOneof("kind"))


def passes(f: pb.Filter, meta: dict, payload: dict) -> bool:
    return (
        all(holds(c, meta, payload) for c in f.must)
        and (not f.should or any(holds(c, meta, payload) for c in f.should))
        and not any(holds(c, meta, payload) for c in f.must_not)
    )


WORDS = ["red", "green", "blue", "ünï", "日本"]


def random_meta(rng: random.Random) -> dict:
    meta: dict[str, Any] = {}
    if rng.random() < 0.8:
        meta["cat"] = rng.choice(WORDS)
    if rng.random() < 0.8:
        meta["n"] = rng.choice([rng.randint(-5, 5), rng.randint(-5, 5) + 0.5, float(rng.randint(-5, 5)), None])
    if rng.random() < 0.7:
        meta["tags"] = rng.sample(WORDS, rng.randint(0, 3)) + ([rng.randint(0, 3)] if rng.random() < 0.3 else [])
    if rng.random() < 0.7:
        meta["loc"] = {"lines": {"from": rng.randint(0, 20)}} if rng.random() < 0.8 else {"lines": 3}
    if rng.random() < 0.5:
        meta["flag"] = rng.random() < 0.5
    if rng.random() < 0.1:
        meta["cat"] = [rng.choice(WORDS), {"deep": 1}]
    return meta


def random_filters(rng: random.Random, count: int) -> list[pb.Filter]:
    def one() -> pb.Condition:
        kind = rng.choice(["match", "any", "range", "exists", "declared"])
        if kind == "declared":
            return cond("match", "tag", rng.choice(["a", "b"]))
        path = rng.choice(["cat", "n", "tags", "loc.lines.from", "flag", "loc", "missing.key"])
        domain = {
            "cat": WORDS,
            "tags": [*WORDS, 0, 1, 2],
            "n": [0, 1, 2, 3, -2, 0.5, 2.0, 1.5],
            "loc.lines.from": list(range(0, 20, 2)),
            "flag": [True, False],
        }.get(path, [])
        # Mostly values of the path's own kind; now and then any kind (which must match nothing odd).
        pick = lambda: rng.choice(domain if domain and rng.random() < 0.8 else [*WORDS, 0, 2.0, True])  # noqa: E731
        if kind == "match":
            return cond("match", path, pick())
        if kind == "any":
            return cond("any", path, [pick() for _ in range(rng.randint(1, 3))])
        if kind == "range":
            names = rng.sample(["gt", "gte", "lt", "lte"], rng.randint(1, 2))
            return cond("range", path, **{n: rng.choice([-3, 0, 2, 1.5, 10]) for n in names})
        return cond("exists", path)

    out = []
    for _ in range(count):
        f = pb.Filter()
        for clause, counts in (("must", [0, 1, 1]), ("should", [0, 0, 1, 2]), ("must_not", [0, 0, 1])):
            for _ in range(rng.choice(counts)):
                getattr(f, clause).append(one())
        if rng.random() < 0.2:
            f.must.append(pb.Condition(filter=pb.Filter(should=[one(), one()])))
        out.append(f)
    return out


# -------------------------------------------------------------------- tests


def test_metadata_round_trips_exactly(braid: Running) -> None:
    client = braid.client
    client.create_collection("m", schema(dim=DIM, payload=PAYLOAD))
    cases = {
        "ints-floats": '{"page": 3, "score": 3.0, "big": 9007199254740993, "neg": -0.0, "e": 1e-7}',
        "nested": '{"loc": {"lines": {"from": 1, "to": [2, 3]}}, "tags": ["a", "b", null, true]}',
        "unicode": '{"källa": "日本語 😀", "esc": "tab\\tquote\\"", "z": 1, "a": 2}',
        "empty": "{}",
        "absent": "",
        "spaced": '{ "b" : [ 1 , 2.5 ] ,\n "a" : { } }',
    }
    docs = [doc(name, text, price=1.5, tag="x") for name, text in cases.items()]
    assert upsert(braid.stub, "m", docs) == len(docs)
    back = got(client, "m", list(cases))
    for name, text in cases.items():
        if not text:
            assert back[name] == ""
            continue
        # Exact: the same JSON value, ints still ints, floats still floats, key order kept, compact.
        assert json.loads(back[name]) == json.loads(text)
        assert back[name] == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
    numbers = json.loads(back["ints-floats"])
    assert type(numbers["page"]) is int and type(numbers["score"]) is float and numbers["big"] == 9007199254740993
    assert list(json.loads(back["unicode"])) == ["källa", "esc", "z", "a"]
    assert back["empty"] == "{}" and back["absent"] == ""
    # Declared payload is unchanged beside it.
    assert {d.id: d.payload["price"].float for d in client.get("m", ["nested"])} == {"nested": 1.5}

    vector = np.ones(DIM)
    with_payload = client.search("m", dense=("emb", vector), limit=10, include_payload=True)
    assert {h.id: h.metadata for h in with_payload} == back
    assert all(h.metadata == "" for h in client.search("m", dense=("emb", vector), limit=10))
    # BM25 never sees metadata: a word only in it finds nothing.
    assert list(client.search("m", bm25="källa", limit=10)) == []

    # Replacing a document replaces its metadata; a replacement without any has none.
    upsert(braid.stub, "m", [doc("nested", '{"v": 2}'), doc("unicode")])
    assert got(client, "m", ["nested", "unicode"]) == {"nested": '{"v":2}', "unicode": ""}


BAD = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object, received an array"),
    ('"text"', "must be a JSON object, received a string"),
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('{"a": -Infinity}', "-Infinity is not a JSON number"),
    ('{"a": 1e999}', "out of the float64 range"),
    ('{"a": 1, "a": 2}', "'a' appears twice"),
    ('{"a": 99999999999999999999}', "outside the int64 range"),
    ('{"a":' * 17 + "1" + "}" * 17, "nests deeper than 16 levels"),
    ("[" * 5000 + "]" * 5000, "nests deeper than 16 levels"),
    ('{"price": 3}', "'price' is a declared payload field"),
    ('{"a": "' + "x" * 70_000 + '"}', "more than the maximum of 65536"),
    ('{"a": "\\ud800"}', "lone surrogate"),
]


def test_bad_metadata_is_invalid_argument_naming_the_field(braid: Running) -> None:
    client = braid.client
    client.create_collection("m", schema(dim=DIM, payload=PAYLOAD))
    assert upsert(braid.stub, "m", [doc("ok", '{"a":' * 16 + "1" + "}" * 16)]) == 1  # 16 deep: the limit
    for text, problem in BAD:
        err = rpc_error(lambda text=text: upsert(braid.stub, "m", [doc("fine", '{"x": 1}'), doc("bad", text)]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (text[:40], err.details())
        assert "documents[1].metadata" in err.details() and problem in err.details(), (text[:40], err.details())
    assert client.count("m") == 1  # nothing of a refused batch was applied
    bad_filters = [
        (cond("match", "a..b", 1), "empty key"),
        (cond("range", "n"), "at least one of gt"),
        (cond("range", "n", gt="x"), "range bounds must be int, float"),
        (pb.Condition(any=pb.MatchAny(field="tags")), "at least one value"),
    ]
    for condition, problem in bad_filters:
        err = rpc_error(lambda c=condition: client.count("m", pb.Filter(must=[c])))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and problem in err.details(), err.details()
        assert "filter.must[0]" in err.details()


def _check_filters(client: BraidClient, name: str, docs: dict[str, tuple[dict, dict]], filters: list) -> None:
    for f in filters:
        want = {i for i, (meta, payload) in docs.items() if passes(f, meta, payload)}
        assert client.count(name, f) == len(want), f
    for f in filters[:6]:  # the same masks narrow every strand's candidates
        want = {i for i, (meta, payload) in docs.items() if passes(f, meta, payload)}
        hits = client.search(name, dense=("emb", np.ones(DIM)), filter=f, limit=len(docs))
        assert {h.id for h in hits} == want, f


def test_filters_on_metadata_equal_a_brute_force_reference(braid: Running) -> None:
    client = braid.client
    client.create_collection("f", schema(dim=DIM, payload=PAYLOAD), shards=2)
    rng = random.Random(7)
    docs: dict[str, tuple[dict, dict]] = {}

    def put(ids: range) -> None:
        batch = []
        for i in ids:
            meta, payload = random_meta(rng), {"tag": rng.choice(["a", "b"])}
            docs[str(i)] = (meta, payload)
            batch.append(doc(i, json.dumps(meta), **payload))
        upsert(braid.stub, "f", batch)

    put(range(300))
    filters = random_filters(rng, 60)
    fixed = [
        pb.Filter(must=[cond("match", "tags", "red")]),  # list membership
        pb.Filter(must=[cond("match", "n", 2)]),  # 2 matches 2 and 2.0
        pb.Filter(must=[cond("match", "n", 2.0)]),
        pb.Filter(must=[cond("range", "loc.lines.from", gte=5, lt=10)]),  # a dotted path
        pb.Filter(must=[cond("exists", "loc.lines")], must_not=[cond("match", "tag", "a")]),  # with a declared field
        pb.Filter(must=[cond("any", "cat", ["red", "日本"])], should=[cond("match", "flag", True)]),
        pb.Filter(must=[cond("match", "flag", 1)]),  # an int never equals a bool
    ]
    _check_filters(client, "f", docs, fixed + filters)
    # Writes after the columns exist: new documents, replacements, deletions.
    put(range(250, 400))
    removed = [str(i) for i in range(0, 60, 3)]
    client.delete("f", ids=removed)
    for i in removed:
        docs.pop(i)
    _check_filters(client, "f", docs, fixed + filters[:20])
    # Delete by a filter on metadata.
    by = pb.Filter(must=[cond("match", "tags", "blue")], must_not=[cond("range", "n", lt=0)])
    gone = {i for i, (meta, payload) in docs.items() if passes(by, meta, payload)}
    assert gone and client.delete("f", filter=by) == len(gone)
    assert client.count("f") == len(docs) - len(gone)
    assert got(client, "f", sorted(gone)) == {}


def test_metadata_survives_kill_and_checkpoint(child_server) -> None:  # type: ignore[no-untyped-def]
    server = child_server()
    server.client.create_collection("d", schema(dim=DIM, payload=PAYLOAD))
    metas = {str(i): {"i": i, "half": i / 2, "tags": [f"t{i % 3}"], "deep": {"x": {"y": i % 4}}} for i in range(40)}
    texts = {i: json.dumps(m, ensure_ascii=False) for i, m in metas.items()}
    flt = pb.Filter(must=[cond("match", "tags", "t1"), cond("range", "deep.x.y", gte=1)])

    def check(client: BraidClient, ids: list[str]) -> None:
        back = got(client, "d", ids)
        assert {i: json.loads(t) for i, t in back.items()} == {i: metas[i] for i in ids}
        assert client.count("d", flt) == sum(
            1 for i in ids if metas[i]["tags"] == ["t1"] and metas[i]["deep"]["x"]["y"] >= 1
        )

    upsert(server.client.stub, "d", [doc(i, texts[i]) for i in list(texts)[:20]])
    assert server.client.count("d", flt) > 0  # a column exists before the kill
    server.kill()
    server = child_server(server.data_dir)
    check(server.client, list(texts)[:20])
    server.client.flush("d")  # a checkpoint holds them now; then more in the log only
    upsert(server.client.stub, "d", [doc(i, texts[i]) for i in list(texts)[20:]])
    upsert(server.client.stub, "d", [doc("3")])  # replaced without metadata
    metas.pop("3")
    server.kill()
    server = child_server(server.data_dir)
    check(server.client, sorted(metas))
    assert got(server.client, "d", ["3"]) == {"3": ""}
    server.client.flush("d")
    server.kill()
    server = child_server(server.data_dir)
    check(server.client, sorted(metas))


def test_cluster_path_carries_metadata(local_cluster: Callable[..., LocalCluster]) -> None:  # noqa: F811
    built = local_cluster(shard_servers=2, routers=1)
    with BraidClient(built.router_address, timeout=T) as client:
        client.create_collection("c", schema(dim=DIM, payload=PAYLOAD), shards=2)
        metas = {str(i): {"n": i, "tags": ["even" if i % 2 == 0 else "odd"], "loc": {"p": i % 5}} for i in range(30)}
        docs = [doc(i, json.dumps(m), tag="a") for i, m in metas.items()]
        docs.append(doc("clash", '{"tag": 1}'))
        err = rpc_error(lambda: upsert(client.stub, "c", docs))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "documents[30].metadata.tag" in err.details()
        assert upsert(client.stub, "c", docs[:-1]) == 30
        assert {i: json.loads(t) for i, t in got(client, "c", list(metas)).items()} == metas
        # Hits fetched from the shards carry it (several shards: the router fetches the final hits).
        hits = client.search("c", dense=("emb", np.ones(DIM)), limit=30, include_payload=True)
        assert len(hits) == 30 and all(json.loads(h.metadata) == metas[h.id] for h in hits)
        hits = client.search("c", bm25="common", limit=5, include_payload=True, payload_fields=["tag"])
        assert all(json.loads(h.metadata) == metas[h.id] and h.payload["tag"].keyword == "a" for h in hits)
        flt = pb.Filter(must=[cond("match", "tags", "even"), cond("range", "loc.p", lt=2)])
        want = {i for i, m in metas.items() if m["n"] % 2 == 0 and m["loc"]["p"] < 2}
        assert client.count("c", flt) == len(want)
        assert {h.id for h in client.search("c", dense=("emb", np.ones(DIM)), filter=flt, limit=30)} == want
        assert client.delete("c", filter=flt) == len(want)
        assert client.count("c") == 30 - len(want)
        # One replica a shard, on different servers: no server holds every shard, so the router
        # ranks across servers and fetches the final hits' payload and metadata (Fetch).
        client.create_collection("spread", schema(dim=DIM, payload=PAYLOAD), shards=2, replication_factor=1)
        assert upsert(client.stub, "spread", docs[:-1]) == 30
        hits = client.search("spread", dense=("emb", np.ones(DIM)), limit=30, include_payload=True)
        assert len(hits) == 30 and all(json.loads(h.metadata) == metas[h.id] for h in hits)
        assert all(h.metadata == "" for h in client.search("spread", dense=("emb", np.ones(DIM)), limit=5))


def test_reference_semantics_spot_checks() -> None:
    """The reference itself, on the cases the docs promise (so a wrong reference cannot hide a bug)."""
    meta = {"tags": ["a", 2, True], "n": 3.0, "loc": {"x": None}}
    assert holds(cond("match", "tags", 2.0), meta, {}) and holds(cond("match", "n", 3), meta, {})
    assert not holds(cond("match", "tags", 1), meta, {})  # True is not 1
    assert not holds(cond("exists", "loc.x"), meta, {}) and holds(cond("exists", "loc"), meta, {})
    assert holds(cond("range", "tags", gt=1.5), meta, {}) and not math.isnan(3.0)


def test_python_client_takes_and_gives_dicts(braid: Running) -> None:
    from braid.service.client import as_dict, metadata_of

    client = braid.client
    client.create_collection("py", schema(dim=DIM, payload=PAYLOAD))
    meta = {"source": "a.pdf", "page": 3, "score": 0.5, "tags": ["x", "y"], "loc": {"lines": {"from": 1}}}
    vector = [1.0] * DIM
    client.upsert(
        "py",
        [
            {"id": "a", "dense": {"emb": vector}, "payload": {"tag": "t"}, "metadata": meta},
            {"id": "b", "dense": {"emb": vector}, "metadata": '{"raw": true}'},  # JSON text passes as is
            {"id": "c", "dense": {"emb": vector}},
        ],
    )
    summary = client.bulk_upsert("py", [{"id": "d", "dense": {"emb": vector}, "metadata": {"page": 4}}])
    assert summary.upserted == 1
    docs = {d.id: as_dict(d) for d in client.get("py", ["a", "b", "c", "d"])}
    assert docs["a"]["metadata"] == meta and docs["a"]["payload"] == {"tag": "t"}
    assert type(docs["a"]["metadata"]["page"]) is int
    assert [docs[i]["metadata"] for i in "bcd"] == [{"raw": True}, {}, {"page": 4}]
    hits = client.search("py", dense=("emb", vector), limit=4, include_payload=True)
    assert {h.id: metadata_of(h) for h in hits} == {i: d["metadata"] for i, d in docs.items()}
    flt = pb.Filter(must=[cond("match", "page", 3), cond("match", "loc.lines.from", 1)])
    assert [h.id for h in client.search("py", dense=("emb", vector), filter=flt)] == ["a"]
    for bad in ({"x": math.nan}, ["not", "a", "dict"]):
        try:
            client.upsert("py", [{"id": "e", "metadata": bad}])
        except (ValueError, TypeError):
            pass
        else:
            raise AssertionError(f"{bad!r} was sent")


def test_metadata_file_is_checked_when_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """metadata.bin whose CHECKSUMS entry matches but whose structure is wrong (a writer's bug, not a
    flipped byte): loading it is DataLoss naming the file, and the scrub reports it."""
    import struct

    from braid.index.checksums import write_checksums
    from braid.index.errors import DataLoss
    from braid.index.metadata import FILE, MAGIC, MetadataStore
    from braid.index.verify import _check_metadata

    store = MetadataStore()
    for label, text in ((0, '{"a":1}'), (5, '{"b":"ü"}'), (9, "{}")):
        store.set(label, text)
    store.save(tmp_path, size=8)  # label 9 is past the checkpoint's size: left out
    loaded = MetadataStore.load(tmp_path)
    assert [loaded.get(label) for label in (0, 5, 9)] == ['{"a":1}', '{"b":"ü"}', ""]
    good = (tmp_path / FILE).read_bytes()
    head = len(MAGIC) + 8
    bad = {
        "bad magic": b"XXXXXXXX" + good[8:],
        "labels not ascending": good[:head] + struct.pack("<qq", 5, 0) + good[head + 16 :],  # were 0, 5
        "offsets past the text": good[:-1],
        "not UTF-8": good[: -len("ü".encode()) - 2] + b"\xff\xfe" + good[-2:],
        "count too large": MAGIC + struct.pack("<Q", 1 << 40) + good[head:],
    }
    for case, data in bad.items():
        (tmp_path / FILE).write_bytes(data)
        write_checksums(tmp_path)
        try:
            MetadataStore.load(tmp_path)
        except DataLoss as err:
            assert FILE in str(err), case
        else:
            raise AssertionError(f"{case}: loaded")
        problems = _check_metadata(tmp_path)
        assert len(problems) == 1 and FILE in problems[0].file, (case, problems)
