"""Text -> vectors for encoder-backed fields, between the RPC layer and the index.

Data flows service -> encoders -> index: this module takes the documents and
search plans the service decoded, runs the fields' models (braid.encoders) and
hands the index plain vectors. It

- resolves a new collection's encoder fields against the models directory
  (the model must exist and be exported; a dense field's dim defaults to the model's);
- fills each document's encoder-backed vectors from its source text fields, one
  model call per field per batch (the encoder sorts texts by length);
- encodes text sub-queries through one ``MicroBatcher`` per (model, precision), so
  concurrent searches share model calls; inference-free sparse fields only
  tokenize and weight the terms by the collection's IDF.

Encoder errors are re-raised with the request field they concern prefixed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from braid.encoders.batcher import MicroBatcher
from braid.encoders.dense import DenseEncoder
from braid.encoders.errors import EncoderError, TextTooLong
from braid.encoders.registry import ModelStore
from braid.encoders.sparse import SpladeEncoder, top_terms
from braid.encoders.stats import EncoderStats
from braid.index.collection import Collection
from braid.index.errors import FailedPrecondition, InvalidArgument
from braid.index.query import Bm25Query, DenseQuery, SearchPlan, SparseQuery
from braid.index.records import DocumentWrite, SparseValue
from braid.index.schema import DenseFieldSpec, EncoderSpec, Schema, SparseFieldSpec, SparseQueryMode
from braid.index.stats import timed_stage
from braid.index.validate import MAX_TEXT_BYTES, check_query_text, unknown_field

FieldSpec = DenseFieldSpec | SparseFieldSpec
_KINDS = {Bm25Query: "bm25", DenseQuery: "dense", SparseQuery: "sparse"}


def _in_context(where: str, err: EncoderError) -> EncoderError:
    return type(err)(f"{where}: {err}")


class Encoding:
    def __init__(self, models_dir: Path, threads: int | None, max_batch: int, max_wait_s: float) -> None:
        self.store = ModelStore(models_dir, threads=threads)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._batchers: dict[tuple[str, str], MicroBatcher] = {}
        self._lock = threading.Lock()
        # (model, precision, "query" | "document") -> its calls, for /metrics (service/metrics.py)
        self.stats: dict[tuple[str, str, str], EncoderStats] = {}

    def _stats(self, model: str, precision: str, source: str) -> EncoderStats:
        key = (model, precision, source)
        stats = self.stats.get(key)
        if stats is None:
            with self._lock:
                stats = self.stats.setdefault(key, EncoderStats())
        return stats

    def close(self) -> None:
        with self._lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:
            batcher.close()

    # ------------------------------------------------------------------ schema

    def resolve_schema(self, schema: Schema) -> Schema:
        """Check every encoder against the models directory; fill a dense field's dim 0 with the model's."""
        dense = []
        for i, spec in enumerate(schema.dense_fields):
            if spec.encoder is not None:
                dim = self._check_model(spec.encoder, "dense", f"schema.dense_fields[{i}].encoder")
                if spec.dim == 0:
                    spec = replace(spec, dim=dim)
                elif spec.dim != dim:
                    raise InvalidArgument.dimension(f"schema.dense_fields[{i}].dim", dim, spec.dim)
            dense.append(spec)
        for i, spec in enumerate(schema.sparse_fields):
            if spec.encoder is not None:
                self._check_model(spec.encoder, "sparse", f"schema.sparse_fields[{i}].encoder")
        return replace(schema, dense_fields=tuple(dense))

    def _check_model(self, encoder: EncoderSpec, kind: str, where: str) -> int:
        try:
            manifest = self.store.manifest(encoder.model)
        except EncoderError as err:
            raise _in_context(f"{where}.model", err) from None
        if manifest.kind != kind:
            raise InvalidArgument.field(f"{where}.model", f"{encoder.model!r} is a {manifest.kind} model, not {kind}")
        if encoder.precision.value not in manifest.files:
            raise InvalidArgument.choice(f"{where}.precision", encoder.precision.value, list(manifest.files))
        return manifest.dim

    def stamp_fingerprints(self, schema: Any) -> None:
        """Set each encoder's ``fingerprint`` in a braid.v1 Schema message to the model this
        server encodes with (left empty when the model is missing here: the field says why)."""
        for field in (*schema.dense_fields, *schema.sparse_fields):
            if field.HasField("encoder"):
                encoder = field.encoder
                try:
                    encoder.fingerprint = self.store.fingerprint(encoder.model, encoder.precision or "fp32")
                except (EncoderError, OSError):
                    encoder.fingerprint = ""

    def check_fingerprints(self, schema: Any) -> None:
        """A CreateCollection that names an encoder's ``fingerprint`` (a schema copied from
        another server's CollectionInfo) asks for exactly that model: refuse another one."""
        for kind, fields in (("dense_fields", schema.dense_fields), ("sparse_fields", schema.sparse_fields)):
            for i, field in enumerate(fields):
                wanted = field.encoder.fingerprint if field.HasField("encoder") else ""
                if not wanted:
                    continue
                mine = self.store.fingerprint(field.encoder.model, field.encoder.precision or "fp32")
                if mine != wanted:
                    raise FailedPrecondition(
                        f"schema.{kind}[{i}].encoder.fingerprint: model {field.encoder.model!r} here is {mine}, "
                        f"not the {wanted} asked for: export the same model version on this server"
                    )

    # --------------------------------------------------------------- documents

    def fill_documents(self, schema: Schema, docs: list[DocumentWrite], where: str = "documents") -> None:
        """Set each encoder-backed vector a document lacks, from its source text fields."""
        for spec in (*schema.dense_fields, *schema.sparse_fields):
            if spec.encoder is None:
                continue
            dense = isinstance(spec, DenseFieldSpec)
            positions, texts = [], []
            for i, doc in enumerate(docs):
                if spec.name in (doc.dense if dense else doc.sparse):
                    continue  # the client sent the vector itself
                parts = [doc.text[name] for name in spec.encoder.source_fields if name in doc.text]
                if not parts:
                    continue
                text = " ".join(parts)
                self._check_length(text, f"{where}[{i}].text ({'+'.join(spec.encoder.source_fields)} for {spec.name})")
                positions.append(i)
                texts.append(text)
            if not texts:
                continue
            encoder = self._encoder(spec, f"{where}[{positions[0]}]")
            stats = self._stats(spec.encoder.model, spec.encoder.precision.value, "document")
            stats.batch_size.observe(len(texts))
            started = time.monotonic()
            if isinstance(encoder, DenseEncoder):
                vectors = encoder.encode(texts)
                stats.inference_seconds.observe(time.monotonic() - started)
                for i, vector in zip(positions, vectors, strict=True):
                    docs[i].dense[spec.name] = vector
            else:
                encoded = encoder.encode(texts, spec.encoder.top_k)
                stats.inference_seconds.observe(time.monotonic() - started)
                for i, (ids, weights) in zip(positions, encoded, strict=True):
                    docs[i].sparse[spec.name] = SparseValue(values=weights, indices=ids)

    # ----------------------------------------------------------------- queries

    def fill_plans(self, jobs: list[tuple[Collection, SearchPlan, str]]) -> None:
        """Encode every text sub-query of several plans; concurrent texts of one model share a call."""
        with timed_stage("encode"):  # the slow-query log's stage, when a trace is on
            self._fill_plans(jobs)

    def _fill_plans(self, jobs: list[tuple[Collection, SearchPlan, str]]) -> None:
        for collection, plan, where in jobs:  # every size first: one oversized text refuses the batch before any work
            for i, sub in enumerate(plan.queries):
                text = sub.query.text
                if text:
                    at = f"{where}queries[{i}].{_KINDS[type(sub.query)]}.text"
                    check_query_text(text, at, collection.limits.max_query_bytes)
        pending = []
        for collection, plan, where in jobs:
            for i, sub in enumerate(plan.queries):
                query = sub.query
                if isinstance(query, DenseQuery | SparseQuery) and query.vector is None and query.text:
                    at = f"{where}queries[{i}].{'dense' if isinstance(query, DenseQuery) else 'sparse'}"
                    pending.append(self._submit(collection, query, at))
        for finish in pending:
            finish()

    def dense_texts(self, collection: Collection, field: str, texts: list[str], wheres: list[str]) -> np.ndarray:
        """Query vectors [len(texts), dim] of a dense field's encoder (one micro-batched call).

        ``wheres[i]`` names text i's sub-query in errors (e.g. ``searches[3].queries[0].dense``).
        """
        for text, where in zip(texts, wheres, strict=True):
            check_query_text(text, f"{where}.text", collection.limits.max_query_bytes)
        spec = self._spec(collection.schema, field, "dense", wheres[0])
        for text, where in zip(texts, wheres, strict=True):
            self._check_query(text, f"{where}.text")
        with timed_stage("encode"):
            return np.asarray(self._batcher(spec, wheres[0]).encode(texts), np.float32)

    def _submit(self, collection: Collection, query: DenseQuery | SparseQuery, where: str) -> Callable[[], None]:
        kind = "dense" if isinstance(query, DenseQuery) else "sparse"
        spec = self._spec(collection.schema, query.field, kind, where)
        self._check_query(query.text, f"{where}.text")
        assert spec.encoder is not None
        encoder_spec = spec.encoder
        if isinstance(query, SparseQuery) and encoder_spec.query_mode is SparseQueryMode.IDF:
            encoder = self._encoder(spec, where)
            ids = encoder.tokenizer.term_ids(query.text)
            weights = collection.sparse_idf(query.field, ids)
            keep = weights > 0
            query.vector = SparseValue(values=weights[keep], indices=np.asarray(ids, np.uint32)[keep])
            return lambda: None
        future = self._batcher(spec, where).submit([query.text])

        def finish() -> None:
            try:
                (row,) = future.result()
            except EncoderError as err:
                raise _in_context(where, err) from None
            if isinstance(query, DenseQuery):
                query.vector = np.asarray(row, np.float32)
            else:
                encoder = self._encoder(spec, where)
                assert isinstance(encoder, SpladeEncoder)
                ids, weights = top_terms(row, encoder_spec.top_k, encoder.special_ids)
                query.vector = SparseValue(values=weights, indices=ids)

        return finish

    # ---------------------------------------------------------------- internals

    @staticmethod
    def _spec(schema: Schema, field: str, kind: str, where: str) -> FieldSpec:
        spec = schema.dense(field) if kind == "dense" else schema.sparse(field)
        if spec is None:
            declared = [f.name for f in (schema.dense_fields if kind == "dense" else schema.sparse_fields)]
            raise unknown_field(f"{where}.field", kind, declared, field)
        if spec.encoder is None:
            raise InvalidArgument.field(f"{where}.text", f"{kind} field {field!r} has no encoder; send a vector")
        return spec

    @staticmethod
    def _check_length(text: str, where: str) -> None:
        if len(text.encode()) > MAX_TEXT_BYTES:
            raise TextTooLong(f"{where}: text to encode is longer than {MAX_TEXT_BYTES} bytes")

    def _check_query(self, text: str, where: str) -> None:
        if not text.strip():
            raise InvalidArgument.field(where, "query text is empty")
        self._check_length(text, where)

    def _encoder(self, spec: FieldSpec, where: str) -> DenseEncoder | SpladeEncoder:
        assert spec.encoder is not None
        try:
            return self.store.encoder(spec.encoder.model, spec.encoder.precision.value)
        except EncoderError as err:
            raise _in_context(f"{where}: field {spec.name!r}", err) from None

    def _batcher(self, spec: FieldSpec, where: str) -> MicroBatcher:
        assert spec.encoder is not None
        key = (spec.encoder.model, spec.encoder.precision.value)
        batcher = self._batchers.get(key)
        if batcher is None:
            encoder = self._encoder(spec, where)
            run = encoder.encode if isinstance(encoder, DenseEncoder) else encoder.weights
            with self._lock:
                batcher = self._batchers.get(key)
                if batcher is None:
                    stats = self.stats.setdefault((*key, "query"), EncoderStats())
                    batcher = self._batchers[key] = MicroBatcher(run, self.max_batch, self.max_wait_s, key[0], stats)
        return batcher
