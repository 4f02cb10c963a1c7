"""BM25 text index of one shard, backed by tantivy.

Each tantivy document is one document version: the shard's integer label in
``_label`` (i64, indexed and fast) plus every text field (indexed with the
field's analyzer and stored). Adding a label first deletes any document with
that label, so replaying the write-ahead log over an index that already holds
some of the replayed writes is idempotent.

tantivy makes writes searchable only at commit; the shard commits (group
commit) before it acknowledges a write. Scores are tantivy's BM25
(k1 = 1.2, b = 0.75), summed over fields and query terms, a term counted as
often as the query repeats it; per-field boosts multiply a field's contribution.
Analyzers (the same for documents and queries): index/analyzers.py.

Filters arrive as a bool mask over labels. Few matching labels: the text
query is intersected with a term-set query on ``_label`` (scored 0, so scores
stay pure BM25). Many: the index is searched ever deeper and hits outside the
mask are dropped until ``k`` remain or the matches run out; both plans return
exactly tantivy's top k among the allowed documents.

On disk: tantivy's own directory layout (meta.json, per-segment files).
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import tantivy

from . import analyzers
from .errors import InvalidArgument
from .schema import TextFieldSpec
from .validate import MAX_QUERY_TERMS

LABEL = "_label"
# Up to this many allowed labels, the filter is pushed into tantivy as a term set.
TERM_SET_MAX = 4096
WRITER_HEAP_BYTES = 32 * 1024 * 1024


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.empty(0, np.int64), np.empty(0, np.float32)


class TextIndex:
    """A tantivy index plus the writer and the current searcher."""

    def __init__(self, directory: Path, fields: tuple[TextFieldSpec, ...]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        builder = tantivy.SchemaBuilder()
        # i64, not u64: tantivy-py builds i64 terms from Python ints, so u64 label terms never match a delete.
        builder.add_integer_field(LABEL, stored=False, indexed=True, fast=True)
        for spec in fields:
            builder.add_text_field(spec.name, stored=True, tokenizer_name=spec.analyzer.value)
        self.schema = builder.build()
        self.fields = fields
        self.field_names = [f.name for f in fields]
        self._index = tantivy.Index(self.schema, path=str(directory), reuse=True)
        for kind in {spec.analyzer for spec in fields} & set(analyzers.CUSTOM):
            self._index.register_tokenizer(kind.value, analyzers.build(kind))
        self._analyzers = {spec.name: analyzers.build(spec.analyzer) for spec in fields}
        self._writer = self._index.writer(WRITER_HEAP_BYTES, 1)
        self._writer_lock = threading.Lock()
        self._closed = False
        self._searcher = self._index.searcher()

    # ------------------------------------------------------------------ writes

    def add(self, label: int, texts: dict[str, str]) -> None:
        doc = tantivy.Document()
        doc.add_integer(LABEL, label)
        for name, value in texts.items():
            doc.add_text(name, value)
        with self._writer_lock:
            self._writer.delete_documents_by_term(LABEL, label)
            self._writer.add_document(doc)

    def remove(self, label: int) -> None:
        with self._writer_lock:
            self._writer.delete_documents_by_term(LABEL, label)

    def commit(self) -> None:
        """Publish pending writes (durable in tantivy's files) and refresh the searcher."""
        with self._writer_lock:
            self._writer.commit()
        self._index.reload()
        self._searcher = self._index.searcher()

    def close(self) -> None:
        """Commit and wait for tantivy's merges. The writer is consumed by it: a second close does
        nothing, and a write after it is a bug in the caller (the shard refuses writes first)."""
        with self._writer_lock:
            if self._closed:
                return
            self._closed = True
            self._writer.commit()
            self._writer.wait_merging_threads()

    # ----------------------------------------------------------------- queries

    def parse(
        self, text: str, fields: list[str], boosts: dict[str, float], where: str = "bm25.text"
    ) -> tantivy.Query | None:
        """Plain query text as a bag of terms; None when no term remains after analysis.

        Each field's analyzer turns the text into terms, and each distinct term is one
        SHOULD clause boosted by how often the query repeats it (times the field's
        boost): the score is sum over fields and query words of BM25, as in Anserini's
        bag-of-words queries and bm25s. No query syntax: every character is text.
        More than MAX_QUERY_TERMS distinct terms in one field is InvalidArgument naming ``where``.
        """
        clauses = []
        for name in fields:
            boost = boosts.get(name, 1.0)
            terms = Counter(self._analyzers[name].analyze(text))
            if len(terms) > MAX_QUERY_TERMS:
                raise InvalidArgument.field(
                    where,
                    f"{len(terms)} distinct terms in field {name!r}, more than the maximum of {MAX_QUERY_TERMS}",
                )
            for term, count in terms.items():
                query = tantivy.Query.term_query(self.schema, name, term)
                clauses.append((tantivy.Occur.Should, tantivy.Query.boost_query(query, boost * count)))
        return tantivy.Query.boolean_query(clauses) if clauses else None

    def search(
        self, query: tantivy.Query, k: int, allowed: np.ndarray, allowed_count: int, filtered: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (labels, BM25 scores) among labels set in ``allowed``, best first.

        Unfiltered, ``allowed`` only hides versions replaced since the last commit, so
        the search starts at depth k and deepens only if some hits were hidden.
        """
        searcher = self._searcher
        if k <= 0 or allowed_count == 0:
            return _empty()
        if not filtered:
            depth = k
        elif allowed_count <= TERM_SET_MAX:
            labels = np.flatnonzero(allowed).tolist()
            only_allowed = tantivy.Query.const_score_query(
                tantivy.Query.term_set_query(self.schema, LABEL, labels), 0.0
            )
            query = tantivy.Query.boolean_query([(tantivy.Occur.Must, query), (tantivy.Occur.Must, only_allowed)])
            depth = k
        else:
            selectivity = allowed_count / max(len(allowed), 1)
            depth = math.ceil(k / selectivity * 1.2) + 8
        while True:
            result = searcher.search(query, depth, count=False)
            hits = result.hits
            if not hits:
                return _empty()
            scores = np.fromiter((h[0] for h in hits), np.float32, len(hits))
            labels = np.asarray(searcher.fast_field_values(LABEL, [h[1] for h in hits]), np.int64)
            inside = labels < len(allowed)
            keep = inside & allowed[np.where(inside, labels, 0)]
            if keep.sum() >= k or len(hits) < depth:
                labels, scores = labels[keep][:k], scores[keep][:k]
                order = np.lexsort((labels, -scores))  # ties by label: deterministic
                return labels[order], scores[order]
            depth *= 4

    def stored(self, labels: list[int], fields: list[str] | None = None) -> dict[int, dict[str, str]]:
        """Stored text of the given labels (fields limited to ``fields`` when given)."""
        if not labels or not self.field_names:
            return {}
        searcher = self._searcher
        query = tantivy.Query.term_set_query(self.schema, LABEL, labels)
        hits = searcher.search(query, len(labels), count=False).hits
        addresses = [h[1] for h in hits]
        found = searcher.fast_field_values(LABEL, addresses)
        wanted = set(fields) if fields is not None else None
        out: dict[int, dict[str, str]] = {}
        for label, address in zip(found, addresses, strict=True):
            doc = searcher.doc(address).to_dict()
            out[int(label)] = {
                name: values[0]
                for name, values in doc.items()
                if name != LABEL and values and (wanted is None or name in wanted)
            }
        return out
