"""SIGKILL loop: rounds of writes (streams, unary upserts that replace, deletes, flushes) cut by kill -9.

After every kill the server restarts on the same data directory and every acknowledged
write must be there with its last acknowledged content, and no acknowledged delete may
come back. Writes in flight at the kill may land or not. 20 rounds run in ``make test``;
the documented long run is ``BRAID_KILL_ROUNDS=200 .venv/bin/python -m pytest -q
tests/test_crash_loop.py``.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import grpc

from braid.v1 import braid_pb2 as pb

from .conftest import random_vectors, schema

ROUNDS = int(os.environ.get("BRAID_KILL_ROUNDS", "20"))
DIM = 8


def _doc(doc_id: str, version: int) -> pb.Document:
    vector = random_vectors(1, DIM, seed=hash((doc_id, version)) % 2**32)[0]
    return pb.Document(
        id=doc_id,
        text={"body": f"{doc_id} version {version}"},
        dense={"emb": pb.DenseVector(packed=vector.tobytes())},
        payload={"v": pb.Value(int=version)},
    )


class Ledger:
    """What the clients were told: acknowledged versions and deletes, and what was in flight."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: dict[str, int] = {}  # id -> last acknowledged version (-1: acknowledged delete)
        self.in_flight: dict[str, set[int]] = {}  # id -> versions sent but not acknowledged (-1: a delete)

    def send(self, ids: list[str], version: int) -> None:
        with self.lock:
            for doc_id in ids:
                self.in_flight.setdefault(doc_id, set()).add(version)

    def ack(self, ids: list[str], version: int) -> None:
        with self.lock:
            for doc_id in ids:
                self.in_flight[doc_id].discard(version)
                self.acked[doc_id] = version

    def allowed(self, doc_id: str) -> set[int]:
        """Versions a restart may show: the acknowledged one, or one in flight after it (-1: absent)."""
        return {self.acked.get(doc_id, -1)} | self.in_flight.get(doc_id, set())


def _writers(client, ledger: Ledger, stop: threading.Event, rng: random.Random, round_: int) -> list[threading.Thread]:  # type: ignore[no-untyped-def]
    stub = client.stub

    def streams() -> None:
        n = 0
        while not stop.is_set():
            batches = [[f"s{round_}-{n}-{b}-{i}" for i in range(20)] for b in range(3)]
            n += 1
            for batch in batches:
                ledger.send(batch, 0)

            requests = (pb.UpsertRequest(collection="c", documents=[_doc(i, 0) for i in b]) for b in batches)
            try:
                stub.BulkUpsert(requests, timeout=10)
            except grpc.RpcError as err:
                applied = int(dict(err.trailing_metadata() or ()).get("braid-batches-applied", 0))
                for batch in batches[:applied]:
                    ledger.ack(batch, 0)
                return
            for batch in batches:
                ledger.ack(batch, 0)

    def replacer() -> None:
        version = 1 + round_ * 1000
        while not stop.is_set():
            ids = [f"r{k}" for k in rng.sample(range(50), 5)]
            ledger.send(ids, version)
            try:
                stub.Upsert(pb.UpsertRequest(collection="c", documents=[_doc(i, version) for i in ids]), timeout=10)
            except grpc.RpcError:
                return
            ledger.ack(ids, version)
            version += 1

    def deleter() -> None:
        while not stop.is_set():
            with ledger.lock:
                candidates = [i for i, v in ledger.acked.items() if v == 0 and i.startswith("s")]
            if not candidates:
                time.sleep(0.01)
                continue
            ids = rng.sample(candidates, min(5, len(candidates)))
            ledger.send(ids, -1)
            try:
                stub.Delete(pb.DeleteRequest(collection="c", ids=ids), timeout=10)
            except grpc.RpcError:
                return
            ledger.ack(ids, -1)

    def flusher() -> None:
        while not stop.wait(rng.uniform(0.05, 0.3)):
            try:
                stub.Flush(pb.FlushRequest(collection="c"), timeout=10)
            except grpc.RpcError:
                return

    return [threading.Thread(target=f, daemon=True) for f in (streams, replacer, deleter, flusher)]


def _check(client, ledger: Ledger) -> None:  # type: ignore[no-untyped-def]
    ids = sorted(set(ledger.acked) | set(ledger.in_flight))
    found: dict[str, int] = {}
    for start in range(0, len(ids), 1000):
        for doc in client.get("c", ids[start : start + 1000]):
            found[doc.id] = doc.payload["v"].int
            assert doc.text["body"] == f"{doc.id} version {found[doc.id]}", doc.id
    wrong = {i: (found.get(i, -1), ledger.allowed(i)) for i in ids if found.get(i, -1) not in ledger.allowed(i)}
    assert not wrong, f"{len(wrong)} documents differ from what was acknowledged, e.g. {list(wrong.items())[:5]}"
    with ledger.lock:  # settle: what the restart shows is now the truth for the next round
        for doc_id in ids:
            ledger.acked[doc_id] = found.get(doc_id, -1)
        ledger.in_flight.clear()


def test_acknowledged_writes_survive_rounds_of_sigkill(child_server, tmp_path: Path) -> None:
    rng = random.Random(1234)
    ledger = Ledger()
    data = tmp_path / "data"
    server = child_server(data)
    server.client.create_collection("c", schema(dim=DIM, payload={"v": pb.INT}, sparse=False), shards=2)
    acknowledged = 0
    for round_ in range(ROUNDS):
        stop = threading.Event()
        threads = _writers(server.client, ledger, stop, rng, round_)
        for thread in threads:
            thread.start()
        time.sleep(rng.uniform(0.2, 0.8))
        server.kill()
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        acknowledged += sum(1 for v in ledger.acked.values() if v != -1)
        server = child_server(data)
        _check(server.client, ledger)
    assert acknowledged > ROUNDS * 20, "the writers made too little progress to test anything"
    assert server.stop() == 0
