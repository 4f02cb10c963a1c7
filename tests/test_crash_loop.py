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
from collections import Counter
from pathlib import Path

import grpc

from braid.v1 import braid_pb2 as pb

from .conftest import random_vectors, schema, wait_for

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
        self.round_acks: Counter[str] = Counter()  # documents acknowledged this round, by writer

    def new_round(self) -> Counter[str]:
        """The last round's acknowledgements by writer; counting starts again at zero."""
        with self.lock:
            last, self.round_acks = self.round_acks, Counter()
            return last

    def send(self, ids: list[str], version: int) -> None:
        with self.lock:
            for doc_id in ids:
                self.in_flight.setdefault(doc_id, set()).add(version)

    def ack(self, ids: list[str], version: int, writer: str) -> None:
        with self.lock:
            for doc_id in ids:
                self.in_flight[doc_id].discard(version)
                self.acked[doc_id] = version
            self.round_acks[writer] += len(ids)

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
                    ledger.ack(batch, 0, "streams")
                return
            for batch in batches:
                ledger.ack(batch, 0, "streams")

    def replacer() -> None:
        version = 1 + round_ * 1000
        while not stop.is_set():
            ids = [f"r{k}" for k in rng.sample(range(50), 5)]
            ledger.send(ids, version)
            try:
                stub.Upsert(pb.UpsertRequest(collection="c", documents=[_doc(i, version) for i in ids]), timeout=10)
            except grpc.RpcError:
                return
            ledger.ack(ids, version, "replacer")
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
            ledger.ack(ids, -1, "deleter")

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
    assert client.count("c") == len(found), "Count disagrees with the documents Get returns"
    with ledger.lock:  # settle: what the restart shows is now the truth for the next round
        for doc_id in ids:
            ledger.acked[doc_id] = found.get(doc_id, -1)
        ledger.in_flight.clear()


# What every round's writers must have acknowledged before the kill (documents): one whole
# stream, one replacing upsert and one delete, so every round tests all three kinds of write.
ROUND_MINIMUM = {"streams": 60, "replacer": 5, "deleter": 5}


def test_acknowledged_writes_survive_rounds_of_sigkill(child_server, tmp_path: Path) -> None:
    rng = random.Random(1234)
    ledger = Ledger()
    data = tmp_path / "data"
    server = child_server(data)
    server.client.create_collection("c", schema(dim=DIM, payload={"v": pb.INT}, sparse=False), shards=2)
    per_round: list[Counter[str]] = []
    for round_ in range(ROUNDS):
        stop = threading.Event()
        threads = _writers(server.client, ledger, stop, rng, round_)
        for thread in threads:
            thread.start()

        def progressed(threads: list[threading.Thread] = threads) -> bool:
            if not all(thread.is_alive() for thread in threads):
                return True  # a writer gave up before the kill: the minimum below names what is missing
            with ledger.lock:
                return all(ledger.round_acks[w] >= n for w, n in ROUND_MINIMUM.items())

        # Wait for this round's minimum (a loaded machine takes longer), then kill at a random moment after it.
        wait_for(progressed, timeout=90, what=f"round {round_}'s writes {ROUND_MINIMUM}")
        time.sleep(rng.uniform(0, 0.6))
        server.kill()
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in threads), f"round {round_}: a writer did not stop"
        acks = ledger.new_round()
        per_round.append(acks)
        short = {w: acks[w] for w, n in ROUND_MINIMUM.items() if acks[w] < n}
        assert not short, f"round {round_} acknowledged too few writes to test anything: {dict(acks)}"
        server = child_server(data)
        _check(server.client, ledger)
    assert len(per_round) == ROUNDS
    assert server.stop() == 0
