"""The encoding side of a bulk job, run in worker processes: rows -> pre-encoded documents.

Each worker loads the collection's models from the job's models directory and encodes
exactly as the server would: the same ``Encoding.fill_documents`` over the same
``DocumentWrite`` conversion, so the vectors are bit-identical to server-side encoding
(tests/test_jobs.py checks it) and the server never runs a model for the job's documents.

A row that cannot become a document (bad JSON, a field of the wrong type, text over the
encoder's limit) is returned as a reject with its file, line, id and reason; the rest of
its batch goes on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from braid.encoders.errors import TextTooLong
from braid.index.errors import BraidError, InvalidArgument
from braid.index.schema import Schema
from braid.v1 import braid_pb2 as pb

from .. import convert
from ..client import document
from ..encoding import Encoding
from .corpus import Row

_INDEX = re.compile(r"documents\[(\d+)\]")


@dataclass(frozen=True)
class Reject:
    """A document the job did not write, and why."""

    file: str
    line: int
    id: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "id": self.id, "reason": self.reason}


@dataclass
class Batch:
    """Rows of one partition to encode, and the partition position after them."""

    seq: int
    rows: list[Row]
    end_position: int


@dataclass
class Encoded:
    """A batch ready to send: its UpsertRequest (serialized) and the rows behind its documents."""

    seq: int
    request: bytes
    rows: list[Row]  # one per document of the request, in order
    rejects: list[Reject] = field(default_factory=list)
    end_position: int = 0
    read: int = 0  # rows of the batch, documents and rejects


def document_index(message: str) -> int | None:
    """The ``documents[i]`` a server or encoder error names, if it names one."""
    found = _INDEX.search(message)
    return int(found.group(1)) if found else None


class BatchEncoder:
    """Rows -> one pre-encoded UpsertRequest for a collection (one per worker process)."""

    def __init__(self, collection: str, schema: bytes, models_dir: Path, threads: int, text_field: str = "") -> None:
        self.collection = collection
        self.schema_proto = pb.Schema.FromString(schema)
        self.schema: Schema = convert.schema_from_proto(self.schema_proto)
        self.encoding = Encoding(models_dir, threads=threads, max_batch=32, max_wait_s=0.0)
        self.text_names = [f.name for f in self.schema.text_fields]
        self.text_field = text_field

    def encode(self, batch: Batch) -> Encoded:
        docs: list[pb.Document] = []
        kept: list[Row] = []
        rejects: list[Reject] = []
        for row in batch.rows:
            if row.problem:
                rejects.append(Reject(row.file, row.line, row.id, row.problem))
                continue
            try:
                doc = self.to_document(row)
                convert.documents_from_proto([doc])  # per-document checks, so one bad row spoils nothing else
            except (BraidError, json_format.ParseError, ValueError, TypeError) as err:
                rejects.append(Reject(row.file, row.line, row.id, str(err)))
                continue
            docs.append(doc)
            kept.append(row)
        while docs:
            try:
                self._fill(docs)
                break
            except (InvalidArgument, TextTooLong) as err:  # a document's fault; a missing model is the job's
                at = document_index(str(err))
                if at is None or at >= len(docs):
                    raise
                rejects.append(Reject(kept[at].file, kept[at].line, kept[at].id, str(err)))
                del docs[at], kept[at]
        request = pb.UpsertRequest(collection=self.collection, documents=docs)
        return Encoded(batch.seq, request.SerializeToString(), kept, rejects, batch.end_position, len(batch.rows))

    def _fill(self, docs: list[pb.Document]) -> None:
        """Encode every encoder-backed vector the documents lack, into the messages themselves."""
        writes = convert.documents_from_proto(docs)
        self.encoding.fill_documents(self.schema, writes)
        for msg, write in zip(docs, writes, strict=True):
            for spec in self.schema.dense_fields:
                if spec.encoder is not None and spec.name in write.dense and spec.name not in msg.dense:
                    msg.dense[spec.name].packed = write.dense[spec.name].astype("<f4").tobytes()
            for spec in self.schema.sparse_fields:
                if spec.encoder is not None and spec.name in write.sparse and spec.name not in msg.sparse:
                    value = write.sparse[spec.name]
                    assert value.indices is not None  # an encoder's output is by term id
                    target = msg.sparse[spec.name]
                    target.indices.extend(value.indices.tolist())
                    target.values.extend(value.values.tolist())

    def to_document(self, row: Row) -> pb.Document:
        """A corpus row as a braid.v1 Document (see corpus.py for the formats)."""
        fields = dict(row.fields)
        kind = fields.pop("format")
        if kind == "braid":
            return json_format.ParseDict(fields, pb.Document())
        if kind == "beir":
            title, text = str(fields.get("title") or ""), str(fields.get("text") or "")
            texts = self._beir_text(title, text)
            payload = {k: v for k, v in (fields.get("metadata") or {}).items() if self._is_payload(k)}
            return document({"id": row.id, "text": texts, "payload": payload})
        # parquet: columns named like the collection's fields
        out: dict[str, Any] = {"id": row.id, "text": {}, "payload": {}, "dense": {}}
        for name, value in fields.items():
            if value is None or name == "id":
                continue
            if name in self.text_names:
                out["text"][name] = str(value)
            elif self._is_payload(name):
                out["payload"][name] = value
            elif self.schema.dense(name) is not None:
                out["dense"][name] = value
        return document(out)

    def _beir_text(self, title: str, text: str) -> dict[str, str]:
        if self.text_field:
            return {self.text_field: f"{title} {text}".strip()}
        if "title" in self.text_names or "text" in self.text_names:
            pairs = {"title": title, "text": text}
            return {name: pairs[name] for name in ("title", "text") if name in self.text_names and pairs[name]}
        if len(self.text_names) == 1:
            return {self.text_names[0]: f"{title} {text}".strip()}
        raise ValueError(f"text: the collection has text fields {self.text_names}; choose one with --text-field")

    def _is_payload(self, name: str) -> bool:
        return any(f.name == name for f in self.schema.payload_fields)


# ------------------------------------------------------------ worker process

_WORKER: BatchEncoder | None = None


def start_worker(collection: str, schema: bytes, models_dir: str, threads: int, text_field: str) -> None:
    """ProcessPoolExecutor initializer: load the models once per worker process."""
    import os

    # A process group of its own: SIGTERM or Ctrl-C to the job's group (systemd, `timeout`, a
    # terminal) is the parent's to handle, as it finishes the batches in flight with its
    # workers. The pool can still terminate a worker, and a worker leaves with its parent.
    os.setpgrp()
    _exit_with_parent(os.getppid())
    global _WORKER
    _WORKER = BatchEncoder(collection, schema, Path(models_dir), threads, text_field)


def _exit_with_parent(parent: int) -> None:
    """A job killed with kill -9 leaves its workers behind; each notices within a second and exits."""
    import os
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="braid-job-parent-watch", daemon=True).start()


def encode_in_worker(batch: Batch) -> Encoded:
    assert _WORKER is not None, "start_worker has not run in this process"
    return _WORKER.encode(batch)
