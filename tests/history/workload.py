"""The workload of a history run: documents that carry their key and version, and the threads.

A document's id is its key; its payload holds ``key`` (keyword, the id again, so a document
filed under the wrong id is caught) and ``v`` (int, the version); its text names both, so
tantivy is written too, and its vector is derived from both. Each key belongs to one
writer thread, which upserts new versions of its keys and deletes them, one call at a time,
through the real gRPC API (in a cluster, with a random ack mode per write). Reader threads
read a few random keys at a time (standalone: Get, always strong; cluster: a STRONG search
filtered on the keys) and record what each key held. Every call gets a deadline.

``Endpoints`` gives the threads the servers to call (a standalone server, or the routers of
a cluster): a process that restarts on another port is followed, and one that is down is
skipped while another is up.
"""

from __future__ import annotations

import random
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np

from braid.v1 import braid_pb2 as pb
from braid.v1 import braid_pb2_grpc

from .model import ABSENT, DELETE, INFO, OK, READ, UPSERT, Op, Recorder, code_name, details, outcome_of

COLLECTION = "history"
DIM = 8
PHANTOM = 10**15  # what a read records for a document that is not the key's own (wrong id, no version)
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


def schema() -> pb.Schema:
    return pb.Schema(
        dense_fields=[
            pb.DenseVectorField(
                name="emb", dim=DIM, metric=pb.COSINE, hnsw=pb.HnswParams(m=8, ef_construction=32, ef_search=32)
            )
        ],
        text_fields=[pb.TextField(name="body")],
        payload_fields=[pb.PayloadField(name="key", type=pb.KEYWORD), pb.PayloadField(name="v", type=pb.INT)],
    )


def document(key: str, version: int) -> pb.Document:
    vector = np.random.default_rng(zlib.crc32(f"{key}@{version}".encode())).standard_normal(DIM).astype("<f4")
    return pb.Document(
        id=key,
        text={"body": f"{key} version{version}"},
        dense={"emb": pb.DenseVector(packed=vector.tobytes())},
        payload={"key": pb.Value(keyword=key), "v": pb.Value(int=version)},
    )


def version_of(doc_id: str, payload: object) -> int:
    """The version a document or hit carries; PHANTOM when it is not its key's own."""
    fields = payload  # a protobuf map of Value
    try:
        if fields["key"].keyword != doc_id:  # type: ignore[index]
            return PHANTOM
        return int(fields["v"].int)  # type: ignore[index]
    except (KeyError, ValueError):
        return PHANTOM


def keys_of(count: int) -> list[str]:
    return [f"k{i:03d}" for i in range(count)]


@dataclass
class Endpoint:
    """One server clients call (name, and a function giving its address, None while down)."""

    name: str
    address: Callable[[], str | None]


class Endpoints:
    """The servers to call, each with a cached channel per address (a restart may change it)."""

    def __init__(self, endpoints: list[Endpoint]) -> None:
        self.endpoints = endpoints
        self._channels: dict[str, tuple[grpc.Channel, braid_pb2_grpc.BraidStub]] = {}
        self._lock = threading.Lock()

    def stub(self, rng: random.Random) -> tuple[str, braid_pb2_grpc.BraidStub] | None:
        """A random endpoint that has an address: (its name, a stub); None when none has."""
        live = [(e.name, a) for e in self.endpoints if (a := e.address()) is not None]
        if not live:
            return None
        name, address = rng.choice(live)
        with self._lock:
            if address not in self._channels:
                channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
                self._channels[address] = (channel, braid_pb2_grpc.BraidStub(channel))
            return name, self._channels[address][1]

    def close(self) -> None:
        with self._lock:
            for channel, _ in self._channels.values():
                channel.close()
            self._channels.clear()


@dataclass
class Workload:
    """Writers and readers over ``keys``; ``cluster`` picks the ack modes and the STRONG reads."""

    endpoints: Endpoints
    recorder: Recorder
    keys: list[str]
    seed: int
    cluster: bool
    writers: int = 3
    readers: int = 2
    delete_share: float = 0.15
    timeout_s: float = 5.0
    pace_s: float = 0.005  # between two writes of one thread: leaves CPU to the servers on a small machine
    read_pace_s: float = 0.02

    def __post_init__(self) -> None:
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.crashes: list[str] = []  # a thread that died of anything but an RPC error: the run is void
        self._versions = dict.fromkeys(self.keys, 0)

    def start(self) -> None:
        owned = [self.keys[w :: self.writers] for w in range(self.writers)]
        for w in range(self.writers):
            self._spawn(f"writer-{w}", self._writer, owned[w], random.Random(f"{self.seed}/w{w}"))
        for r in range(self.readers):
            self._spawn(f"reader-{r}", self._reader, random.Random(f"{self.seed}/r{r}"))

    def finish(self, join_s: float = 60.0) -> None:
        self.stop.set()
        deadline = time.monotonic() + join_s
        for thread in self.threads:
            thread.join(max(deadline - time.monotonic(), 0.1))
        alive = [thread.name for thread in self.threads if thread.is_alive()]
        if alive:
            self.crashes.append(f"threads still running {join_s:.0f} s after the stop: {alive}")

    def _spawn(self, name: str, target: Callable[..., None], *args: object) -> None:
        def run() -> None:
            try:
                target(name, *args)
            except BaseException as err:  # recorded, so the test fails on it rather than a pytest warning
                self.crashes.append(f"{name}: {err!r}")
                raise

        thread = threading.Thread(target=run, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _pause(self, rng: random.Random, failed: bool, pace: float | None = None) -> None:
        self.stop.wait(rng.uniform(0.05, 0.2) if failed else self.pace_s if pace is None else pace)

    def _writer(self, name: str, keys: list[str], rng: random.Random) -> None:
        while not self.stop.is_set():
            key = rng.choice(keys)
            ack = rng.choice((pb.WRITE_ACK_APPLIED, pb.WRITE_ACK_LOGGED)) if self.cluster else pb.WRITE_ACK_APPLIED
            target = self.endpoints.stub(rng)
            if target is None:
                self.stop.wait(0.1)
                continue
            where, stub = target
            if rng.random() < self.delete_share:
                kind, value = DELETE, ABSENT
                request: object = pb.DeleteRequest(collection=COLLECTION, ids=[key], ack=ack)
                call = stub.Delete
            else:
                self._versions[key] += 1
                kind, value = UPSERT, self._versions[key]
                request = pb.UpsertRequest(collection=COLLECTION, documents=[document(key, value)], ack=ack)
                call = stub.Upsert
            mode = ("logged" if ack == pb.WRITE_ACK_LOGGED else "applied") if self.cluster else ""
            began = time.monotonic()
            try:
                call(request, timeout=self.timeout_s)
                status, detail = OK, mode
            except grpc.RpcError as err:
                status = outcome_of(err)
                detail = f"{mode} {code_name(err)} {details(err)}".strip()
                self.recorder.note_error(kind, status, err)
            self.recorder.add(Op(kind, key, value, began, time.monotonic(), status, f"{name}@{where}", detail))
            self._pause(rng, status != OK)

    def _reader(self, name: str, rng: random.Random) -> None:
        while not self.stop.is_set():
            keys = rng.sample(self.keys, rng.randint(1, 4))
            target = self.endpoints.stub(rng)
            if target is None:
                self.stop.wait(0.1)
                continue
            where, stub = target
            began = time.monotonic()
            try:
                found = read_strong(stub, keys, self.timeout_s, self.cluster)
            except grpc.RpcError as err:
                self.recorder.note_error(READ, INFO, err)
                self._pause(rng, True)
                continue
            ended = time.monotonic()
            for key in keys:
                self.recorder.add(Op(READ, key, found.get(key, ABSENT), began, ended, OK, f"{name}@{where}"))
            self._pause(rng, False, self.read_pace_s)


def read_strong(stub: braid_pb2_grpc.BraidStub, keys: list[str], timeout: float, cluster: bool) -> dict[str, int]:
    """Key -> version for the keys present (a strong read): Get on a standalone server (always
    strong), a CONSISTENCY_STRONG search filtered on the keys through a router (Get has no
    consistency level; a filter this selective is scanned exactly, so every match is a hit)."""
    if not cluster:
        response = stub.Get(pb.GetRequest(collection=COLLECTION, ids=keys), timeout=timeout)
        return {doc.id: version_of(doc.id, doc.payload) for doc in response.documents}
    request = pb.SearchRequest(
        collection=COLLECTION,
        queries=[pb.SubQuery(dense=pb.DenseQuery(field="emb", vector=pb.DenseVector(values=[1.0] * DIM)))],
        filter=pb.Filter(
            must=[pb.Condition(any=pb.MatchAny(field="key", values=[pb.Value(keyword=key) for key in keys]))]
        ),
        limit=len(keys),
        payload_fields=["key", "v"],
        consistency=pb.CONSISTENCY_STRONG,
    )
    hits = stub.Search(request, timeout=timeout).hits
    return {hit.id: version_of(hit.id, hit.payload) for hit in hits if hit.id in keys}
