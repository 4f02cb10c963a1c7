"""TLS, mutual TLS and API keys against a real server on loopback (docs/security.md).

A throwaway CA signs the server's certificate (SAN 127.0.0.1, localhost, braid.test)
and a client certificate; a second, unrelated CA signs a rogue client certificate.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from braid.service.auth import generate_key, hash_key, write_keys_file
from braid.service.cli import main
from braid.service.client import BraidClient
from braid.service.tls import channel_credentials, server_credentials
from braid.v1 import braid_pb2 as pb

from .certs import make_ca, make_leaf, write_cert, write_key
from .conftest import random_vectors, schema, start_in_process, stop_in_process

READ_KEY, WRITE_KEY, ADMIN_KEY, SCOPED_KEY = (generate_key() for _ in range(4))
ALL_KEYS = (READ_KEY, WRITE_KEY, ADMIN_KEY, SCOPED_KEY)


# ----------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    folder = tmp_path_factory.mktemp("tls")
    ca_key, ca_cert = make_ca("braid test CA")
    server_key, server_cert = make_leaf(ca_key, ca_cert, "braid server", server=True)
    client_key, client_cert = make_leaf(ca_key, ca_cert, "braid client", server=False)
    rogue_ca_key, rogue_ca_cert = make_ca("someone else's CA")
    rogue_key, rogue_cert = make_leaf(rogue_ca_key, rogue_ca_cert, "rogue client", server=False)
    return Certs(
        ca=write_cert(folder / "ca.pem", ca_cert),
        server_cert=write_cert(folder / "server.pem", server_cert),
        server_key=write_key(folder / "server.key", server_key),
        client_cert=write_cert(folder / "client.pem", client_cert),
        client_key=write_key(folder / "client.key", client_key),
        rogue_cert=write_cert(folder / "rogue.pem", rogue_cert),
        rogue_key=write_key(folder / "rogue.key", rogue_key),
    )


# ---------------------------------------------------------------------- server


@dataclass
class Secure:
    address: str
    certs: Certs
    keys_file: Path
    connect: Callable[..., BraidClient]


def _key_entries() -> list[dict[str, Any]]:
    return [
        {"name": "reader", "hash": hash_key(READ_KEY), "role": "read"},
        {"name": "ingest", "hash": hash_key(WRITE_KEY), "role": "write"},
        {"name": "ops", "hash": hash_key(ADMIN_KEY), "role": "admin"},
        {"name": "articles-only", "hash": hash_key(SCOPED_KEY), "role": "write", "collections": ["articles"]},
    ]


def _start(tmp_path: Path, certs: Certs, mutual: bool) -> Iterator[Secure]:
    keys_file = tmp_path / "keys.json"
    write_keys_file(keys_file, _key_entries())
    server, running = start_in_process(
        tmp_path / "data",
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        tls_client_ca=certs.ca if mutual else None,
        api_keys=keys_file,
    )
    opened: list[BraidClient] = []

    def connect(api_key: str | None = None, *, client_cert: bool = True, **options: Any) -> BraidClient:
        options.setdefault("tls_ca", certs.ca)
        if client_cert:
            options.setdefault("tls_cert", certs.client_cert)
            options.setdefault("tls_key", certs.client_key)
        options.setdefault("timeout", 10.0)
        client = BraidClient(options.pop("address", f"127.0.0.1:{running.port}"), api_key=api_key, **options)
        opened.append(client)
        return client

    yield Secure(f"127.0.0.1:{running.port}", certs, keys_file, connect)
    for client in opened:
        client.close()
    stop_in_process(server, running)


@pytest.fixture
def secure(tmp_path: Path, certs: Certs) -> Iterator[Secure]:
    """A server with mutual TLS (client certificates from the test CA) and API keys."""
    yield from _start(tmp_path, certs, mutual=True)


@pytest.fixture
def tls_only(tmp_path: Path, certs: Certs) -> Iterator[Secure]:
    """A server with TLS (no client certificates) and API keys."""
    yield from _start(tmp_path, certs, mutual=False)


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def details_of(call: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.details() or ""


def _docs(n: int = 5) -> list[dict[str, Any]]:
    vectors = random_vectors(n, 8)
    return [{"id": f"d{i}", "text": {"body": f"word{i} common"}, "dense": {"emb": vectors[i]}} for i in range(n)]


def _collections(secure: Secure, *names: str) -> None:
    admin = secure.connect(ADMIN_KEY)
    for name in names:
        admin.create_collection(name, schema())
        admin.upsert(name, _docs())


# ------------------------------------------------------------------------- TLS


def test_tls_handshake_and_a_real_search(secure: Secure):
    _collections(secure, "articles")
    client = secure.connect(READ_KEY)
    assert [h.id for h in client.search("articles", bm25="word3")] == ["d3"]
    assert client.count("articles") == 5


def test_tls_without_client_certificates_and_server_name_override(tls_only: Secure):
    _collections(tls_only, "articles")
    plain_tls = tls_only.connect(READ_KEY, client_cert=False)
    assert plain_tls.count("articles") == 5
    by_name = tls_only.connect(READ_KEY, client_cert=False, server_name="braid.test")
    assert by_name.count("articles") == 5
    by_host = tls_only.connect(READ_KEY, client_cert=False, address=tls_only.address.replace("127.0.0.1", "localhost"))
    assert by_host.count("articles") == 5
    wrong_name = tls_only.connect(READ_KEY, client_cert=False, server_name="elsewhere.test", timeout=5.0)
    assert code_of(lambda: wrong_name.count("articles")) is grpc.StatusCode.UNAVAILABLE


def test_a_plaintext_client_fails_fast_against_tls(secure: Secure):
    plaintext = BraidClient(secure.address, timeout=5.0, api_key=ADMIN_KEY)
    try:
        started = time.monotonic()
        assert code_of(plaintext.list_collections) is grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 4.0  # refused, not left to run into the deadline
    finally:
        plaintext.close()


def test_a_client_that_does_not_trust_the_server_ca_is_refused(secure: Secure, certs: Certs):
    wrong_ca = secure.connect(ADMIN_KEY, tls_ca=certs.rogue_cert, timeout=5.0)
    assert code_of(wrong_ca.list_collections) is grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_clients_without_a_valid_certificate(secure: Secure, certs: Certs):
    no_cert = secure.connect(ADMIN_KEY, client_cert=False, timeout=5.0)
    assert code_of(no_cert.list_collections) is grpc.StatusCode.UNAVAILABLE
    rogue = secure.connect(ADMIN_KEY, tls_cert=certs.rogue_cert, tls_key=certs.rogue_key, timeout=5.0)
    assert code_of(rogue.list_collections) is grpc.StatusCode.UNAVAILABLE
    assert secure.connect(ADMIN_KEY).list_collections() == []


def test_bad_tls_files_are_named(tmp_path: Path, certs: Certs):
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match=r"TLS certificate .*missing\.pem: cannot read"):
        server_credentials(missing, certs.server_key)
    not_pem = tmp_path / "junk.pem"
    not_pem.write_text("hello")
    with pytest.raises(ValueError, match=r"TLS key .*junk\.pem: not a PEM file"):
        server_credentials(certs.server_cert, not_pem)
    with pytest.raises(ValueError, match=r"does not fit certificate"):
        server_credentials(certs.server_cert, certs.client_key)
    with pytest.raises(ValueError, match=r"TLS client CA .*junk\.pem"):
        server_credentials(certs.server_cert, certs.server_key, not_pem)
    with pytest.raises(ValueError, match=r"TLS CA .*missing\.pem"):
        channel_credentials(missing)
    with pytest.raises(ValueError, match="together"):
        channel_credentials(certs.ca, certs.client_cert, None)
    with pytest.raises(ValueError, match=r"TLS client key .*junk\.pem"):
        BraidClient("127.0.0.1:1", tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=not_pem)


# -------------------------------------------------------------------- API keys


def test_missing_and_unknown_keys_are_unauthenticated(secure: Secure):
    no_key = secure.connect()
    assert code_of(no_key.list_collections) is grpc.StatusCode.UNAUTHENTICATED
    assert "missing API key" in details_of(no_key.list_collections)
    stranger = generate_key()
    unknown = secure.connect(stranger)
    assert code_of(lambda: unknown.search("articles", bm25="x")) is grpc.StatusCode.UNAUTHENTICATED
    message = details_of(unknown.list_collections)
    assert "unknown API key" in message and stranger not in message


def test_read_keys_cannot_write(secure: Secure):
    _collections(secure, "articles")
    reader = secure.connect(READ_KEY)
    assert code_of(lambda: reader.upsert("articles", _docs(1))) is grpc.StatusCode.PERMISSION_DENIED
    message = details_of(lambda: reader.upsert("articles", _docs(1)))
    assert "'reader'" in message and "Upsert" in message and "write" in message
    assert code_of(lambda: reader.bulk_upsert("articles", _docs(3))) is grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: reader.delete("articles", ["d1"])) is grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: reader.flush("articles")) is grpc.StatusCode.PERMISSION_DENIED
    assert [h.id for h in reader.search("articles", bm25="word1")] == ["d1"]
    assert [d.id for d in reader.get("articles", ["d2"])] == ["d2"]


def test_write_keys_cannot_manage_collections(secure: Secure):
    _collections(secure, "articles")
    writer = secure.connect(WRITE_KEY)
    assert code_of(lambda: writer.create_collection("mine", schema())) is grpc.StatusCode.PERMISSION_DENIED
    assert "needs role admin" in details_of(lambda: writer.create_collection("mine", schema()))
    assert code_of(lambda: writer.delete_collection("articles")) is grpc.StatusCode.PERMISSION_DENIED
    assert writer.bulk_upsert("articles", _docs(7), batch_size=3).upserted == 7
    assert writer.delete("articles", ["d0"]) == 1
    writer.flush("articles")


def test_scoped_keys_see_and_touch_only_their_collections(secure: Secure):
    _collections(secure, "articles", "secrets")
    scoped = secure.connect(SCOPED_KEY)
    assert [c.name for c in scoped.list_collections()] == ["articles"]
    assert scoped.upsert("articles", _docs(2)) == 2
    for call in (
        lambda: scoped.search("secrets", bm25="word1"),
        lambda: scoped.get_collection("secrets"),
        lambda: scoped.upsert("secrets", _docs(1)),
        lambda: scoped.bulk_upsert("secrets", _docs(1)),
        lambda: scoped.batch_search([pb.SearchRequest(collection="articles"), pb.SearchRequest(collection="secrets")]),
    ):
        assert code_of(call) is grpc.StatusCode.PERMISSION_DENIED
    assert "'secrets'" in details_of(lambda: scoped.count("secrets"))
    assert [c.name for c in secure.connect(READ_KEY).list_collections()] == ["articles", "secrets"]


def test_admin_keys_can_do_everything(secure: Secure):
    admin = secure.connect(ADMIN_KEY)
    admin.create_collection("articles", schema())
    assert admin.bulk_upsert("articles", _docs(4)).upserted == 4
    assert admin.upsert("articles", _docs(5)) == 5
    results = admin.batch_search(
        [pb.SearchRequest(collection="articles", queries=[pb.SubQuery(bm25=pb.Bm25Query(text="word2"))])]
    )
    assert [h.id for h in results[0].hits] == ["d2"]
    assert admin.delete("articles", ["d4"]) == 1
    admin.flush("articles")
    assert admin.get_collection("articles").documents == 4
    admin.delete_collection("articles")
    assert admin.list_collections() == []


def test_keys_work_on_a_plaintext_server(tmp_path: Path):
    keys_file = tmp_path / "keys.json"
    write_keys_file(keys_file, _key_entries())
    server, running = start_in_process(tmp_path / "data", api_keys=keys_file)
    reader = BraidClient(f"127.0.0.1:{running.port}", timeout=10.0, api_key=READ_KEY)
    try:
        assert reader.list_collections() == []
        assert code_of(running.client.list_collections) is grpc.StatusCode.UNAUTHENTICATED  # no key
        assert code_of(lambda: reader.create_collection("x", schema())) is grpc.StatusCode.PERMISSION_DENIED
    finally:
        reader.close()
        stop_in_process(server, running)


def test_raw_stub_calls_carry_the_key(secure: Secure):
    client = secure.connect(ADMIN_KEY)
    assert list(client.stub.ListCollections(pb.ListCollectionsRequest(), timeout=5).collections) == []


def _eventually(check: Callable[[], object], within: float = 4.0) -> object:
    """The key file is re-read at most once a second, so a change shows within about a second."""
    deadline = time.monotonic() + within
    while True:
        try:
            return check()
        except (grpc.RpcError, AssertionError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def test_keys_added_and_removed_while_running(secure: Secure, capsys: pytest.CaptureFixture[str]):
    _collections(secure, "articles")
    assert main(["keys", "add", "--file", str(secure.keys_file), "--name", "late", "--role", "read"]) == 0
    late_key = capsys.readouterr().out.strip()
    late = secure.connect(late_key)
    started = time.monotonic()
    assert _eventually(lambda: late.count("articles")) == 5
    assert time.monotonic() - started < 3.0

    assert main(["keys", "remove", "--file", str(secure.keys_file), "--name", "late"]) == 0

    def refused() -> grpc.StatusCode:
        try:
            late.count("articles")
        except grpc.RpcError as err:
            return err.code()
        raise AssertionError("the removed key still works")

    assert _eventually(refused) is grpc.StatusCode.UNAUTHENTICATED
    assert secure.connect(READ_KEY).count("articles") == 5


def test_a_broken_key_file_keeps_the_old_keys(secure: Secure, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.ERROR, logger="braid.auth")
    secure.keys_file.write_text(json.dumps({"keys": [{"name": "x", "hash": ADMIN_KEY, "role": "admin"}]}))
    reader = secure.connect(READ_KEY)

    def logged() -> None:
        assert reader.list_collections() == []  # the old keys still work...
        assert "keys[0] ('x')" in caplog.text  # ...once the server has seen the broken file

    _eventually(logged)
    assert reader.list_collections() == []
    assert len([r for r in caplog.records if r.name == "braid.auth"]) == 1  # once per change
    assert ADMIN_KEY not in caplog.text


def test_health_needs_no_key(secure: Secure):
    channel = secure.connect().channel  # TLS and a client certificate, but no API key
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_keys_never_reach_the_server_logs(secure: Secure, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    _collections(secure, "articles")
    stranger = generate_key()
    secure.connect(READ_KEY).search("articles", bm25="word1")
    for key in (stranger, READ_KEY, SCOPED_KEY, WRITE_KEY):
        client = secure.connect(key)
        for call in (
            lambda c=client: c.upsert("articles", _docs(1)),
            lambda c=client: c.create_collection("x", schema()),
            lambda c=client: c.search("nope", bm25="x"),
            lambda c=client: c.bulk_upsert("nope", _docs(2)),
        ):
            with contextlib.suppress(grpc.RpcError):
                call()
    for key in (stranger, *ALL_KEYS):
        assert key not in caplog.text
        assert hash_key(key) not in caplog.text


# ------------------------------------------------------------------------- CLI


def test_cli_client_options(secure: Secure, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps({"textFields": [{"name": "body"}]}))
    docs_file = tmp_path / "docs.jsonl"
    docs_file.write_text("".join(json.dumps({"id": f"c{i}", "text": {"body": f"term{i}"}}) + "\n" for i in range(3)))
    certs = secure.certs
    tls = ["--address", secure.address, "--tls-ca", str(certs.ca)]
    tls += ["--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key)]

    assert main(["collection", "create", "cli", "--schema", str(schema_file), *tls, "--api-key", ADMIN_KEY]) == 0
    assert main(["ingest", "cli", str(docs_file), *tls, "--api-key", WRITE_KEY]) == 0
    assert "upserted 3 documents" in capsys.readouterr().out
    assert main(["search", "cli", "--text", "term2", *tls, "--api-key", READ_KEY]) == 0
    assert "c2" in capsys.readouterr().out

    assert main(["collection", "list", *tls]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["collection", "delete", "cli", *tls, "--api-key", READ_KEY]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err


def test_cli_client_options_from_the_environment(
    secure: Secure, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    _collections(secure, "articles")
    monkeypatch.setenv("BRAID_ADDRESS", secure.address)
    monkeypatch.setenv("BRAID_TLS_CA", str(secure.certs.ca))
    monkeypatch.setenv("BRAID_TLS_CLIENT_CERT", str(secure.certs.client_cert))
    monkeypatch.setenv("BRAID_TLS_CLIENT_KEY", str(secure.certs.client_key))
    monkeypatch.setenv("BRAID_API_KEY", READ_KEY)
    assert main(["collection", "list"]) == 0
    assert "articles" in capsys.readouterr().out


# ---------------------------------------------------------- the Python client


class RecordingStub:
    """Stands in for the generated stub: records (method, request, timeout) and answers empty responses."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, float | None]] = []

    def __getattr__(self, method: str) -> Callable[..., Any]:
        output = pb.DESCRIPTOR.services_by_name["Braid"].methods_by_name[method].output_type

        def call(request: Any, timeout: float | None = None, **_: Any) -> Any:
            if method in ("BulkUpsert", "UpsertStream", "ImportSnapshot"):
                request = list(request)
            self.calls.append((method, request, timeout))
            if method == "UpsertStream":
                return _Acks([pb.UpsertStreamAck(batch=i, upserted=len(r.documents)) for i, r in enumerate(request)])
            if method == "ExportSnapshot":
                return _Acks([pb.SnapshotChunk(data=b"tar")])
            return getattr(pb, output.name)()

        return call


class _Acks(list):
    """A stream call's responses, as the generated stub's iterator (with cancel)."""

    def cancel(self) -> None:
        pass


@pytest.fixture
def recorded() -> Iterator[tuple[BraidClient, RecordingStub]]:
    client = BraidClient("127.0.0.1:1", timeout=7.0)  # never connects: the stub is replaced
    client.stub = RecordingStub()  # type: ignore[assignment]
    yield client, client.stub  # type: ignore[misc]
    client.close()


def test_every_client_call_has_a_deadline(recorded: tuple[BraidClient, RecordingStub], tmp_path: Path):
    from braid.service.client import STREAM_TIMEOUT_S

    client, stub = recorded
    client.create_collection("c", schema())
    client.get_collection("c")
    client.list_collections()
    client.upsert("c", _docs(1))
    client.delete("c", ["d0"])
    client.get("c", ["d0"])
    client.count("c")
    client.flush("c")
    client.search("c", bm25="x")
    client.search_request(pb.SearchRequest(collection="c"))
    client.batch_search([pb.SearchRequest(collection="c")])
    client.create_alias("a", "c")
    client.update_alias("a", "c")
    client.list_aliases()
    client.delete_alias("a")
    client.create_snapshot("c")
    client.list_snapshots()
    client.restore_snapshot("s", "c2")
    client.delete_snapshot("s")
    client.delete_collection("c")
    assert {method for method, _, _ in stub.calls} == set(pb.DESCRIPTOR.services_by_name["Braid"].methods_by_name) - {
        "BulkUpsert",
        "UpsertStream",
        "ExportSnapshot",
        "ImportSnapshot",
    }
    assert all(timeout == 7.0 for _, _, timeout in stub.calls)
    stub.calls.clear()
    client.bulk_upsert("c", _docs(5), batch_size=2)
    client.bulk_upsert("c", _docs(1), timeout=3.0)
    client.search("c", bm25="x", timeout=1.5)
    batches = [pb.UpsertRequest(collection="c", documents=[pb.Document(id="d0")])] * 2
    assert len(list(client.upsert_stream(iter(batches)))) == 2
    assert len(list(client.upsert_stream(iter(batches), timeout=4.0))) == 2
    archive = client.export_snapshot("s", tmp_path / "s.tar")
    client.import_snapshot(archive, timeout=5.0)
    client.create_snapshot("c", timeout=120.0)
    assert [(m, t) for m, _, t in stub.calls] == [
        ("BulkUpsert", STREAM_TIMEOUT_S),
        ("BulkUpsert", 3.0),
        ("Search", 1.5),
        ("UpsertStream", STREAM_TIMEOUT_S),
        ("UpsertStream", 4.0),
        ("ExportSnapshot", STREAM_TIMEOUT_S),
        ("ImportSnapshot", 5.0),
        ("CreateSnapshot", 120.0),
    ]
    assert [len(batch.documents) for batch in stub.calls[0][1]] == [2, 2, 1]
    with pytest.raises(ValueError, match="timeout"):
        BraidClient("127.0.0.1:1", timeout=None)  # type: ignore[arg-type]


def test_search_covers_the_whole_request(recorded: tuple[BraidClient, RecordingStub]):
    client, stub = recorded
    flt = pb.Filter(must=[pb.Condition(exists=pb.Exists(field="lang"))])
    extra = pb.SubQuery(name="title", bm25=pb.Bm25Query(text="t", fields=["title"]), weight=0.1)
    client.search(
        "c",
        dense=("emb", [1.0, 0.0]),
        bm25=pb.Bm25Query(text="hello", boosts={"title": 2.0}),
        sparse=("splade", {"hello": 1.0}),
        queries=[extra],
        filter=flt,
        fusion="rrf",
        weights={"bm25": 0.3, "sparse": 0.5},
        depth={"dense": 200},
        limit=5,
        offset=10,
        score_threshold=0.25,
        payload_fields=["lang"],
        include_payload=False,
        text_fields=["body"],
        explain=True,
    )
    request = stub.calls[-1][1]
    assert [q.WhichOneof("query") for q in request.queries] == ["dense", "bm25", "sparse", "bm25"]
    assert [q.weight for q in request.queries] == [0.0, pytest.approx(0.3), 0.5, pytest.approx(0.1)]
    assert [q.depth for q in request.queries] == [200, 0, 0, 0]
    assert request.queries[1].bm25.boosts["title"] == 2.0
    assert request.queries[3].name == "title"
    assert request.filter == flt
    assert request.fusion == pb.Fusion(rrf=pb.ReciprocalRankFusion(k=60))
    assert (request.limit, request.offset, request.explain) == (5, 10, True)
    assert request.HasField("score_threshold") and request.score_threshold == 0.25
    assert list(request.payload_fields) == ["lang"] and list(request.text_fields) == ["body"]

    client.search("c", dense=pb.DenseQuery(field="emb", text="q", ef=99), depth=50, fusion=pb.Fusion())
    request = stub.calls[-1][1]
    assert request.queries[0].dense.ef == 99 and request.queries[0].depth == 50
    assert not request.HasField("score_threshold") and request.HasField("fusion")
    for name, normalization in (("minmax", pb.MIN_MAX), ("zscore", pb.Z_SCORE), ("dbsf", pb.DBSF), ("sum", pb.NONE)):
        client.search("c", bm25="x", fusion=name)
        assert stub.calls[-1][1].fusion.weighted.normalization == normalization
    with pytest.raises(ValueError, match=r"unknown value 'borda'; valid: dbsf, minmax, rrf, sum, zscore"):
        client.search("c", bm25="x", fusion="borda")
    with pytest.raises(ValueError, match=r"unknown strand\(s\) \['bm24'\]"):
        client.search("c", bm25="x", weights={"bm24": 1.0})


def test_bad_api_keys_are_refused_without_echoing_them():
    for bad in ("", "two words", "line\nbreak", "caf\u00e9"):
        with pytest.raises(ValueError) as info:
            BraidClient("127.0.0.1:1", api_key=bad)
        assert "api_key" in str(info.value)
        if bad:
            assert bad not in str(info.value)


def test_search_options_over_tls(secure: Secure):
    admin = secure.connect(ADMIN_KEY)
    admin.create_collection("articles", schema(payload={"lang": pb.KEYWORD}))
    vectors = random_vectors(6, 8)
    admin.upsert(
        "articles",
        [
            {
                "id": f"d{i}",
                "text": {"body": f"common word{i}"},
                "dense": {"emb": vectors[i]},
                "payload": {"lang": "en"},
            }
            for i in range(6)
        ],
    )
    reader = secure.connect(READ_KEY)
    everything = reader.search("articles", bm25="common", dense=("emb", vectors[0]), limit=6)
    page = reader.search("articles", bm25="common", dense=("emb", vectors[0]), limit=2, offset=2)
    assert [h.id for h in page] == [h.id for h in everything[2:4]]
    explained = reader.search(
        "articles",
        bm25="common",
        dense=("emb", vectors[0]),
        weights={"bm25": 0.5},
        depth=6,
        fusion="rrf",
        payload_fields=["lang"],
        text_fields=["body"],
        explain=True,
        limit=3,
    )
    assert explained[0].payload["lang"].keyword == "en" and explained[0].text["body"].startswith("common")
    assert {s.query for s in explained[0].explain} == {"dense:emb", "bm25"}
    cut = reader.search("articles", dense=("emb", vectors[0]), score_threshold=0.99, limit=6)
    assert [h.id for h in cut] == ["d0"]
    batch = reader.batch_search(
        [pb.SearchRequest(collection="articles", queries=[pb.SubQuery(bm25=pb.Bm25Query(text="word4"))])] * 2
    )
    assert [[h.id for h in r.hits] for r in batch] == [["d4"], ["d4"]]


def test_a_write_key_may_create_the_jobs_system_collection_and_nothing_else(secure: Secure):
    """A bulk job's least-privilege key (write) runs the first job on a fresh server: it may create
    ``_braid_jobs`` (and use it), but no other collection, and it may not delete that one."""
    from braid.service.jobs.checkpoint import SYSTEM_COLLECTION, CheckpointStore

    writer = secure.connect(WRITE_KEY)
    with pytest.raises(grpc.RpcError) as info:
        writer.create_collection("other", schema(dim=4))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as info:  # scoped to other collections: not this one either
        CheckpointStore(secure.connect(SCOPED_KEY)).ensure()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and SYSTEM_COLLECTION in info.value.details()
    CheckpointStore(writer).ensure()
    CheckpointStore(writer).ensure()  # a second pod finds it there
    assert writer.get_collection(SYSTEM_COLLECTION).name == SYSTEM_COLLECTION
    with pytest.raises(grpc.RpcError) as info:
        writer.delete_collection(SYSTEM_COLLECTION)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
