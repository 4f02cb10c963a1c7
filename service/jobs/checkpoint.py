"""Bulk job checkpoints, kept in the target Braid itself.

A job pod may be rescheduled onto another node, so its progress cannot live on local
disk: it is one document per (job, partition) in the system collection ``_braid_jobs``
(created on first use, the same on a standalone server and through a cluster router),
written with an ordinary Upsert after every acknowledged batch. Its payload:

    job         keyword  the job's name (--job)
    collection  keyword  the collection it writes
    corpus      keyword  the corpus fingerprint (corpus.fingerprint)
    partition   int      this partition, of
    partitions  int      this many
    position    int      rows of the partition whose batch is acknowledged: resume after them
    written     int      documents acknowledged so far (all runs)
    rejected    int      rows rejected so far (all runs)
    done        bool     the partition finished
    updated     datetime when the checkpoint was written

The data write and the checkpoint write are two calls: a kill between them replays one
batch on resume, and an upsert replayed is the same document, so nothing is lost or
doubled. An API key for a job needs the write role on ``_braid_jobs`` as well (enough to
create it: service/auth.py ``WRITER_CREATES``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

import grpc

from braid.v1 import braid_pb2 as pb

from ..client import BraidClient

SYSTEM_COLLECTION = "_braid_jobs"


@dataclass
class Checkpoint:
    job: str
    collection: str
    corpus: str
    partition: int
    partitions: int
    position: int = 0
    written: int = 0
    rejected: int = 0
    done: bool = False

    @property
    def key(self) -> str:
        return checkpoint_id(self.job, self.partition, self.partitions)


def checkpoint_id(job: str, partition: int, partitions: int) -> str:
    return f"{job}/{partition}-of-{partitions}"


def _schema() -> pb.Schema:
    keyword, integer = pb.PayloadType.KEYWORD, pb.PayloadType.INT
    fields = {"job": keyword, "collection": keyword, "corpus": keyword, "partition": integer}
    fields.update({"partitions": integer, "position": integer, "written": integer, "rejected": integer})
    fields.update({"done": pb.PayloadType.BOOL, "updated": pb.PayloadType.DATETIME})
    return pb.Schema(
        text_fields=[pb.TextField(name="note")],  # a schema needs one searchable field; unused
        payload_fields=[pb.PayloadField(name=name, type=kind) for name, kind in fields.items()],
    )


class CheckpointStore:
    """Read and write one partition's checkpoint in ``_braid_jobs`` through a client."""

    def __init__(self, client: BraidClient) -> None:
        self.client = client

    def ensure(self) -> None:
        """Create the system collection if it does not exist yet (racing pods: first one wins)."""
        try:
            self.client.get_collection(SYSTEM_COLLECTION)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            try:
                self.client.create_collection(SYSTEM_COLLECTION, _schema())
            except grpc.RpcError as created:
                if created.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise

    def load(self, job: str, partition: int, partitions: int) -> Checkpoint | None:
        docs = self.client.get(SYSTEM_COLLECTION, [checkpoint_id(job, partition, partitions)])
        if not docs:
            return None
        payload = {name: _plain(value) for name, value in docs[0].payload.items()}
        known = Checkpoint.__dataclass_fields__
        return Checkpoint(**{name: payload[name] for name in known if name in payload})

    def save(self, checkpoint: Checkpoint) -> None:
        payload = {name: value for name, value in asdict(checkpoint).items()}
        payload["updated"] = dt.datetime.now(dt.UTC)
        self.client.upsert(SYSTEM_COLLECTION, [{"id": checkpoint.key, "payload": payload}])

    def clear(self, job: str, partition: int, partitions: int) -> None:
        self.client.delete(SYSTEM_COLLECTION, [checkpoint_id(job, partition, partitions)])


def _plain(value: pb.Value) -> Any:
    kind = value.WhichOneof("kind")
    return None if kind is None or kind == "datetime" else getattr(value, kind)
