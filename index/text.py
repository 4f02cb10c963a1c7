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

Checksums: every file tantivy writes for a segment (``<segment>.idx``, ``.pos``,
``.term``, ``.store``, ``.fast``, ``.fieldnorm``, ``<segment>.<opstamp>.del``) ends
with tantivy's footer, little-endian::

    body | footer JSON {"version": {...}, "crc": <crc32 of body>} | u32 footer JSON length | u32 magic 1337

tantivy never checks it when it opens an index, and tantivy-py 0.27 exposes no
``validate_checksum``, so ``check_files`` does it here, in Python (CRC-32 is
zlib.crc32): for every segment meta.json names, the files it has. The footer JSON is
not covered by the CRC: it must have exactly tantivy's keys, and the version in it must
agree across a segment's six component files (written together). The index is
checked on open, before tantivy reads it (one sequential read of the whole index:
O(its size) at every start), then opened and a searcher made (which opens every
segment's reader); any failure is DataLoss naming the file, or the text/ directory.
Limits: meta.json and .managed.json carry no checksum (tantivy rewrites them at
every commit, so Braid cannot keep one cheaply). .managed.json must parse as a list of
names (a changed name only makes tantivy keep a file it could delete). meta.json is cross-checked
instead: it must parse, each segment entry must have exactly tantivy's keys (tantivy
ignores an unknown one, so a renamed "deletes" would revive deleted documents), each
segment's ``max_doc`` must equal the row count in its fast-field file (tantivy trusts
it: one too low hides documents, one too high panics), and the schema must be the
one Braid asks for (tantivy refuses a different one). What is left unchecked: a flip
that changes ``num_deleted_docs`` or a setting and still parses (not seen to change an
answer). Files of segments meta.json does not name (an interrupted commit or merge)
are not checked.

Leftovers: a commit that a full disk or a kill -9 stopped between writing a segment's
``<segment>.<opstamp>.del`` and publishing meta.json leaves that file behind, unnamed. A
replay of the same log reaches the same opstamp, and tantivy refuses to create a file that
exists (``FileAlreadyExists``), so the commit would fail at every reopen and restart.
tantivy deletes such files only after a successful commit, so ``remove_unreferenced``
deletes them (and unnamed segment files, and its atomic writes' ``.tmp`` files) at every
open, before the writer exists; meta.json must have passed ``check_files`` first.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
import threading
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import tantivy

from . import analyzers
from .checksums import Problem
from .errors import DataLoss, InvalidArgument, Unavailable
from .schema import TextFieldSpec
from .validate import MAX_QUERY_TERMS

log = logging.getLogger("braid.text")

LABEL = "_label"
# Up to this many allowed labels, the filter is pushed into tantivy as a term set.
TERM_SET_MAX = 4096
WRITER_HEAP_BYTES = 32 * 1024 * 1024


def query_terms(
    analyzers_by_field: dict[str, Any], text: str, fields: list[str], where: str = "bm25.text"
) -> dict[tuple[str, str], int]:
    """A BM25 query's distinct (field, term) pairs after each field's analyzer, and how often
    each repeats. More than MAX_QUERY_TERMS distinct terms in one field is InvalidArgument
    naming ``where``."""
    out: dict[tuple[str, str], int] = {}
    for name in fields:
        terms = Counter(analyzers_by_field[name].analyze(text))
        if len(terms) > MAX_QUERY_TERMS:
            raise InvalidArgument.field(
                where, f"{len(terms)} distinct terms in field {name!r}, more than the maximum of {MAX_QUERY_TERMS}"
            )
        for term, count in terms.items():
            out[(name, term)] = count
    return out


def bm25_idf(frequency: int | np.ndarray, documents: int) -> float | np.ndarray:
    """tantivy's BM25 IDF: ln(1 + (N - n + 0.5) / (n + 0.5))."""
    return np.log1p((documents - frequency + 0.5) / (frequency + 0.5))


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.empty(0, np.int64), np.empty(0, np.float32)


def build_schema(fields: tuple[TextFieldSpec, ...]) -> tantivy.Schema:
    """The tantivy schema of a shard's text fields (tantivy refuses to open an index whose schema differs)."""
    builder = tantivy.SchemaBuilder()
    # i64, not u64: tantivy-py builds i64 terms from Python ints, so u64 label terms never match a delete.
    builder.add_integer_field(LABEL, stored=False, indexed=True, fast=True)
    for spec in fields:
        builder.add_text_field(spec.name, stored=True, tokenizer_name=spec.analyzer.value)
    return builder.build()


class TextIndex:
    """A tantivy index plus the writer and the current searcher."""

    def __init__(self, directory: Path, fields: tuple[TextFieldSpec, ...]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        problems = check_files(directory)
        if problems:
            raise problems[0].error()
        remove_unreferenced(directory)
        self.schema = build_schema(fields)
        self.fields = fields
        self.field_names = [f.name for f in fields]
        try:
            self._index = tantivy.Index(self.schema, path=str(directory), reuse=True)
            self._index.searcher()  # opens every segment's reader
        except BaseException as err:  # tantivy's errors arrive as ValueError, its panics as PanicException
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise DataLoss(f"{directory}: tantivy cannot open the text index: {type(err).__name__}: {err}") from err
        for kind in {spec.analyzer for spec in fields} & set(analyzers.CUSTOM):
            self._index.register_tokenizer(kind.value, analyzers.build(kind))
        self._analyzers = {spec.name: analyzers.build(spec.analyzer) for spec in fields}
        self._writer = self._index.writer(WRITER_HEAP_BYTES, 1)
        self._writer_lock = threading.Lock()
        self._closed = False
        self.broken: BaseException | None = None  # the error of a failed commit (see commit)
        self._searcher = self._index.searcher()
        self._total_docs = self._segment_docs()

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

    def remove_from(self, label: int) -> bool:
        """Stage the deletion of every document with a label >= ``label``; False when there is none.

        Recovery calls it with the first label the log did not hand out: tantivy can hold
        documents of writes the log lost (a damaged last record, truncated as a torn write),
        hidden by the alive mask but still counted in BM25's statistics.
        """
        stale = tantivy.Query.range_query(self.schema, LABEL, tantivy.FieldType.Integer, lower_bound=label)
        if not self._searcher.search(stale, 1, count=False).hits:
            return False
        with self._writer_lock:
            self._writer.delete_documents_by_query(stale)
        return True

    def commit(self) -> None:
        """Publish pending writes (durable in tantivy's files) and refresh the searcher.

        A failed commit (a full disk) leaves the index ``broken`` and every later commit
        refuses: tantivy kills an indexing worker that hits an I/O error, and a later
        commit can then succeed without the documents that worker held (seen with
        tantivy-py 0.27 on a full tmpfs). The owner rebuilds from its log instead.
        """
        with self._writer_lock:
            if self.broken is not None:
                raise Unavailable(f"text index: an earlier commit failed ({self.broken}); reopen it") from self.broken
            try:
                self._writer.commit()
                self._index.reload()
            except BaseException as err:  # incl. tantivy's PanicException
                self.broken = err
                raise
            self._searcher, self._total_docs = self._index.searcher(), self._segment_docs()

    def _segment_docs(self) -> int:
        """Documents in the committed segments, deleted ones included: the N of tantivy's BM25 IDF
        (tantivy-py exposes no max_doc; meta.json holds it). Read right after a reload, so it
        describes the searcher's segments unless a background merge lands in between (then
        IDF scaling is off by the few deleted documents that merge dropped)."""
        try:
            meta = json.loads((self.directory / "meta.json").read_text())
            return int(sum(segment["max_doc"] for segment in meta["segments"]))
        except (OSError, ValueError, KeyError, TypeError):
            return int(self._index.searcher().num_docs)

    def close(self, commit: bool = True) -> None:
        """Commit (unless ``commit`` is false or the index is broken: then roll back, which needs
        no disk) and wait for tantivy's merges. The writer is consumed by it even when the
        commit fails: a second close does nothing, and a write after it is a bug in the caller
        (the shard refuses writes first). Searches keep using the last searcher."""
        with self._writer_lock:
            if self._closed:
                return
            self._closed = True
            try:
                if commit and self.broken is None:
                    self._writer.commit()
                else:
                    self._writer.rollback()
            finally:
                self._writer.wait_merging_threads()

    # ----------------------------------------------------------------- queries

    def terms(self, text: str, fields: list[str], where: str = "bm25.text") -> dict[tuple[str, str], int]:
        return query_terms(self._analyzers, text, fields, where)

    def term_stats(self, terms: list[tuple[str, str]]) -> tuple[list[int], int]:
        """What tantivy's BM25 counts: each term's document frequency, and the document count
        (both include deleted documents not yet merged away, as tantivy's scoring does)."""
        searcher, total = self._searcher, self._total_docs
        return [searcher.doc_freq(name, term) for name, term in terms], total

    def parse(
        self,
        text: str,
        fields: list[str],
        boosts: dict[str, float],
        where: str = "bm25.text",
        idf: dict[tuple[str, str], float] | None = None,
    ) -> tantivy.Query | None:
        """Plain query text as a bag of terms; None when no term remains after analysis.

        Each field's analyzer turns the text into terms, and each distinct term is one
        SHOULD clause boosted by how often the query repeats it (times the field's
        boost): the score is sum over fields and query words of BM25, as in Anserini's
        bag-of-words queries and bm25s. No query syntax: every character is text.

        ``idf`` (a collection's statistics over all its shards, see ``bm25_idf``) replaces
        this shard's IDF of each term: the clause's boost is scaled by global / local IDF, so
        a shard scores as if it held every document (the average field length stays the shard's).
        """
        terms = self.terms(text, fields, where)
        if not terms:
            return None
        weights = [boosts.get(name, 1.0) * count for (name, _), count in terms.items()]
        if idf is not None:
            weights = self._rescaled(list(terms), weights, idf)
        clauses = [
            (tantivy.Occur.Should, tantivy.Query.boost_query(tantivy.Query.term_query(self.schema, name, term), weight))
            for (name, term), weight in zip(terms, weights, strict=True)
        ]
        return tantivy.Query.boolean_query(clauses)

    def _rescaled(self, keys: list[tuple[str, str]], weights: list[float], idf: dict[tuple[str, str], float]) -> list:
        """Each term's weight times global / local IDF (the DFS phase's shard side): this shard's
        statistics are read here, under the same read lock as the search, so the scale matches
        the searcher that scores. One numpy call for every local IDF; a term this shard lacks
        (no document to score) or ``idf`` does not name keeps its weight."""
        frequencies, total = self.term_stats(keys)
        # bm25_idf's formula: the ratios in plain floats, one log1p over them all (a handful of
        # terms: numpy's per-call cost outweighs the arithmetic)
        local = np.log1p([(total - n + 0.5) / (n + 0.5) for n in frequencies]).tolist()
        return [
            weight * (idf[key] / own) if frequency > 0 and key in idf else weight
            for key, weight, frequency, own in zip(keys, weights, frequencies, local, strict=True)
        ]

    def postings(self, text: str, fields: list[str]) -> int:
        """The most postings a BM25 query of ``text`` over ``fields`` makes tantivy read: the sum of
        its distinct terms' document frequencies, which bounds the search's work (for the
        service's choice of quick searches; no limit on the number of terms is checked here)."""
        searcher = self._searcher
        return sum(
            searcher.doc_freq(name, term) for name in fields for term in set(self._analyzers[name].analyze(text))
        )

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
            labels = np.array(searcher.fast_field_values(LABEL, [h[1] for h in hits]), np.int64)
            scores = np.array([h[0] for h in hits], np.float32)
            try:
                keep = allowed[labels]  # labels are >= 0
            except IndexError:  # a label past the mask: a document written since the mask was taken
                size = len(allowed)
                keep = (labels < size) & allowed[np.minimum(labels, size - 1)]
            kept = int(np.count_nonzero(keep))
            if kept >= k or len(hits) < depth:
                if kept < len(labels):
                    labels, scores = labels[keep], scores[keep]
                labels, scores = labels[:k], scores[:k]
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


# ---------------------------------------------------------------- checksums

_FOOTER_MAGIC = 1337
_FOOTER_TAIL = struct.Struct("<II")  # footer JSON length, magic
_FOOTER_VERSION_KEYS = {"major", "minor", "patch", "index_format_version"}
_COMPONENTS = ("idx", "pos", "term", "store", "fast", "fieldnorm")
_SEGMENT_KEYS = {"segment_id", "max_doc", "deletes"}
_COLUMNAR_V2_TAIL = struct.pack("<I", 2) + bytes([2, 113, 119, 66])
_CHUNK = 1 << 20


# The names of tantivy's own files: a segment's components and deletes, and an atomic write's temporary file.
_TANTIVY_FILE = re.compile(r"[0-9a-f]{32}\.(?:idx|pos|term|store|fast|fieldnorm|\d+\.del)|\.tmp\w+")


def _segment_names(segment: dict[str, Any]) -> list[str]:
    """The file names of one meta.json segment entry (whether or not they exist)."""
    if segment.keys() != _SEGMENT_KEYS:  # tantivy ignores an unknown key: a renamed "deletes" revives documents
        raise ValueError(f"segment entry has keys {sorted(segment)}, expected {sorted(_SEGMENT_KEYS)}")
    name = str(segment["segment_id"]).replace("-", "")
    names = [f"{name}.{ext}" for ext in _COMPONENTS]
    if segment["deletes"] is not None:
        names.append(f"{name}.{int(segment['deletes']['opstamp'])}.del")
    return names


def remove_unreferenced(directory: Path) -> list[str]:
    """Delete tantivy's files under ``directory`` that meta.json does not name (see the module
    doc, "Leftovers"); the names deleted. Nothing without a meta.json, nor when a file it names
    is missing (then it is damaged, and the open fails naming it). Only while no writer is
    open: a writer's unpublished files are unnamed too. A searcher still reading a deleted file
    keeps it (an unlinked file lives while it is mapped)."""
    try:
        meta = json.loads((directory / "meta.json").read_bytes())
    except FileNotFoundError:
        return []
    keep = {name for segment in meta["segments"] for name in _segment_names(segment)}
    if not all((directory / name).exists() for name in keep):
        return []  # a damaged meta.json (a flipped segment id) must not cost the files it lost: opening fails
    removed = []
    for path in directory.iterdir():
        if path.name not in keep and _TANTIVY_FILE.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        log.info("%s: removed %d tantivy files meta.json does not name: %s", directory, len(removed), removed[:5])
    return removed


def segment_files(directory: Path) -> tuple[list[Path], list[Problem]]:
    """The files of every segment tantivy's meta.json names that exist, and meta.json's problems."""
    meta_path = directory / "meta.json"
    try:
        meta = json.loads(meta_path.read_bytes())
    except FileNotFoundError:
        leftovers = [p.name for p in directory.iterdir() if p.suffix[1:] in _COMPONENTS]
        if leftovers:
            return [], [Problem(str(meta_path), f"missing, while segment files exist ({leftovers[0]}, ...)")]
        return [], []
    except (OSError, ValueError) as err:
        return [], [Problem(str(meta_path), f"unparsable tantivy meta.json: {err}")]
    files: list[Path] = []
    try:
        for segment in meta["segments"]:
            files += [directory / n for n in _segment_names(segment) if (directory / n).exists()]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return files, [Problem(str(meta_path), f"malformed tantivy meta.json: {type(err).__name__}: {err}")]
    return files, []


def _check_max_doc(directory: Path, meta_path: Path) -> list[Problem]:
    """meta.json's ``max_doc`` of each segment against the row count its fast-field file records.

    tantivy trusts meta.json's count: one too low hides documents, one too high panics.
    The fast-field file (tantivy's columnar format, version 2) ends with
    ``u32 num_rows | u32 version | magic 02 71 77 42`` before tantivy's footer.
    """
    problems = []
    for segment in json.loads(meta_path.read_bytes())["segments"]:
        path = directory / f"{str(segment['segment_id']).replace('-', '')}.fast"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue
        length = _FOOTER_TAIL.unpack_from(raw, len(raw) - _FOOTER_TAIL.size)[0]
        body = raw[: len(raw) - _FOOTER_TAIL.size - length]
        if len(body) >= 12 and body[-8:] == _COLUMNAR_V2_TAIL:
            rows = struct.unpack_from("<I", body, len(body) - 12)[0]
            if rows != segment["max_doc"]:
                message = (
                    f"segment {segment['segment_id']}: max_doc {segment['max_doc']}, its {path.name} has {rows} rows"
                )
                problems.append(Problem(str(meta_path), message))
    return problems


def check_footer(path: Path) -> Problem | None:
    """tantivy's footer of one file: magic, length, and the CRC-32 of the body; None when intact."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            if size < _FOOTER_TAIL.size:
                return Problem(str(path), f"{size} bytes: too short for tantivy's footer")
            fh.seek(size - _FOOTER_TAIL.size)
            length, magic = _FOOTER_TAIL.unpack(fh.read(_FOOTER_TAIL.size))
            if magic != _FOOTER_MAGIC:
                return Problem(str(path), f"footer magic {magic}, expected {_FOOTER_MAGIC}", size - 4)
            body = size - _FOOTER_TAIL.size - length
            if body < 0:
                return Problem(str(path), f"footer length {length} exceeds the file ({size} bytes)", size - 8)
            fh.seek(body)
            try:
                footer = json.loads(fh.read(length))
                expected = footer["crc"]
                version = footer["version"]
                if footer.keys() != {"version", "crc"} or version.keys() != _FOOTER_VERSION_KEYS:
                    raise ValueError(f"unexpected keys {sorted(footer)} / {sorted(version)}")
                if not all(type(v) is int for v in (expected, *version.values())):
                    raise ValueError("a field is not an integer")
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                return Problem(str(path), f"unparsable footer: {err}", body)
            fh.seek(0)
            crc, left = 0, body
            while left:
                chunk = fh.read(min(_CHUNK, left))
                if not chunk:
                    return Problem(str(path), "shorter than its footer says")
                crc, left = zlib.crc32(chunk, crc), left - len(chunk)
    except OSError as err:
        return Problem(str(path), f"unreadable: {err}")
    if crc != expected:
        return Problem(str(path), f"crc32 {crc} of {body} bytes does not match the footer's {expected}")
    return None


def check_files(directory: Path) -> list[Problem]:
    """Every problem with tantivy's files under ``directory`` (meta.json, then each footer)."""
    files, problems = segment_files(directory)
    managed = directory / ".managed.json"  # tantivy's list of its files, for its garbage collection
    try:
        names = json.loads(managed.read_bytes())
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            problems.append(Problem(str(managed), "expected a JSON list of file names"))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as err:
        problems.append(Problem(str(managed), f"unparsable: {err}"))
    for path in files:
        problem = check_footer(path)
        if problem is not None:
            problems.append(problem)
    if files and not problems:  # the fast-field files are intact: their row counts can be trusted
        problems += _check_versions(files)
        problems += _check_max_doc(directory, directory / "meta.json")
    return problems


def _footer_version(path: Path) -> tuple[int, ...]:
    raw = path.read_bytes()
    length = _FOOTER_TAIL.unpack_from(raw, len(raw) - _FOOTER_TAIL.size)[0]
    version = json.loads(raw[len(raw) - _FOOTER_TAIL.size - length : len(raw) - _FOOTER_TAIL.size])["version"]
    return tuple(version[key] for key in sorted(_FOOTER_VERSION_KEYS))


def _check_versions(files: list[Path]) -> list[Problem]:
    """The tantivy version in the footers of one segment's files must agree (its CRC does not cover it).

    A segment's six component files are written together, by one tantivy; a ``.del`` file
    may come from a later version, so it is left out.
    """
    by_segment: dict[str, dict[Path, tuple[int, ...]]] = {}
    for path in files:
        if path.suffix != ".del":
            by_segment.setdefault(path.name.split(".")[0], {})[path] = _footer_version(path)
    problems = []
    for versions in by_segment.values():
        common = max(set(versions.values()), key=list(versions.values()).count)
        for path, version in versions.items():
            if version != common:
                message = f"footer says tantivy version {version}, the segment's other files {common}"
                problems.append(Problem(str(path), message))
    return problems


def check(directory: Path, fields: tuple[TextFieldSpec, ...]) -> list[Problem]:
    """The offline scrub of a text/ directory: footers, then a read-only open with the shard's
    schema (tantivy compares it with meta.json's) and a read of every segment.

    Opening takes no writer lock, so it can run beside a server, but a server's commit
    during the scrub may make files vanish; stop the server first.
    """
    problems = check_files(directory)
    if problems or not (directory / "meta.json").exists():
        return problems
    try:
        index = tantivy.Index(build_schema(fields), path=str(directory), reuse=True)
        searcher = index.searcher()
        hits = searcher.search(tantivy.Query.all_query(), 1).hits
        if searcher.num_docs and not hits:
            problems.append(Problem(str(directory), f"{searcher.num_docs} documents counted, none found"))
    except BaseException as err:  # incl. tantivy's PanicException
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        problems.append(Problem(str(directory), f"tantivy cannot read the text index: {type(err).__name__}: {err}"))
    return problems
