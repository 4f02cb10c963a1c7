"""Schemaless metadata of one shard: each document's JSON object, stored exactly, and filters on it.

A document may carry, beside its declared (typed, columnar) payload fields, a JSON object of
undeclared keys: nested objects, lists, strings, ints, floats, bools and nulls. This module owns

- ``canonical``: validation of the text a client sent (a JSON object; at most ``max_bytes``
  UTF-8 bytes and ``max_depth`` nested containers; no NaN/Infinity, no int outside int64, no
  key twice in one object, no top-level key that is a declared payload field) into the
  canonical text stored and returned: ``json.dumps(obj, separators=(",", ":"),
  ensure_ascii=False)`` of the parsed value, so ints stay ints, floats keep their shortest
  round-trip form and key order is kept. "" means no metadata (``{}`` is an empty object);
- ``MetadataStore``: the canonical text per live label, and filter evaluation on it;
- ``check_condition``: the validation of a filter condition on a metadata path.

Filters: a field that is not a declared payload field is a metadata path, dotted for nested
objects (``loc.lines.from``; a key that itself contains a dot cannot be named). The value at
the path, or every element of a list there, is compared: Match and MatchAny on keywords,
bools and numbers (an int and a float are equal when their values are: 3 matches 3.0),
Range on numbers (compared as float64, like JSON numbers in JavaScript), Exists on any
value but null. The first filter that names a path turns that path's values into a column
(one pass over the shard's stored metadata); later writes extend it while it is kept (at most
``MAX_COLUMNS`` paths a shard, least recently used dropped); a column that removed
documents left mostly stale is rebuilt at its next use. Columns are memory only: after a
restart each is built again on first use.

On disk (``save``, into a checkpoint's staging directory; the checkpoint's CHECKSUMS covers
it like every file of the generation), little-endian::

    metadata.bin   magic b"BRMETA1\\0" | u64 count | count x i64 labels (ascending)
                   | (count + 1) x u64 offsets into the blob | blob (UTF-8 canonical texts)

written only when some live label has metadata (a generation without the file has none).
"""

from __future__ import annotations

import json
import math
import struct
import threading
from collections import OrderedDict
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from . import durable
from .errors import DataLoss, InvalidArgument
from .filters import Condition, Exists, Match, MatchAny, Range, match_any_values

FILE = "metadata.bin"
MAGIC = b"BRMETA1\0"
MAX_BYTES = 64 * 1024  # default Limits.max_metadata_bytes
MAX_DEPTH = 16  # nested objects and lists, the top-level object counting as 1
MAX_KEY_BYTES = 1024  # a key, and a filter's whole path
MAX_COLUMNS = 256  # filtered paths kept as columns per shard
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_U64 = struct.Struct("<Q")

# Entry kinds of a column: the value's JSON type; OTHER marks a value (an object, an empty list,
# a list of non-scalars) that only Exists can see.
_STR, _INT, _FLOAT, _BOOL, _OTHER = 0, 1, 2, 3, 4


# ------------------------------------------------------------------ validation


class _Duplicate(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _Constant(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen.add(key)
    return out


def _constant(name: str) -> Any:
    raise _Constant(name)


def canonical(text: str, where: str, declared: Collection[str] = (), max_bytes: int = MAX_BYTES) -> str:
    """The canonical text of a client's metadata, or InvalidArgument naming ``where`` and the problem."""
    if not text:
        return ""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument.field(where, "metadata is not valid UTF-8") from None
    if size > max_bytes:
        raise InvalidArgument.field(where, f"metadata is {size} bytes, more than the maximum of {max_bytes}")
    try:
        obj = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)
    except _Duplicate as err:
        raise InvalidArgument.field(where, f"key {err.key!r} appears twice in one object") from None
    except _Constant as err:
        raise InvalidArgument.field(where, f"{err} is not a JSON number (values must be finite)") from None
    except RecursionError:
        raise InvalidArgument.field(where, f"metadata nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as err:
        raise InvalidArgument.field(where, f"not valid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise InvalidArgument.field(where, f"must be a JSON object, received {_json_type(obj)}")
    _check_tree(obj, where)
    for key in obj:
        if key in declared:
            raise InvalidArgument.field(
                f"{where}.{key}", f"{key!r} is a declared payload field: send it in payload, not metadata"
            )
    out = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    try:
        out.encode("utf-8")
    except UnicodeEncodeError:  # a "\ud800" escape decodes to a lone surrogate
        raise InvalidArgument.field(where, "metadata holds a lone surrogate (\\ud800-\\udfff) escape") from None
    return out


def _check_tree(obj: dict[str, Any], where: str) -> None:
    stack: list[tuple[Any, str, int]] = [(obj, where, 1)]
    while stack:
        value, at, depth = stack.pop()
        if isinstance(value, dict):
            if depth > MAX_DEPTH:
                raise InvalidArgument.field(at, f"metadata nests deeper than {MAX_DEPTH} levels")
            for key, item in value.items():
                if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
                    raise InvalidArgument.field(at, f"a key is longer than {MAX_KEY_BYTES} bytes")
                stack.append((item, f"{at}.{key}", depth + 1))
        elif isinstance(value, list):
            if depth > MAX_DEPTH:
                raise InvalidArgument.field(at, f"metadata nests deeper than {MAX_DEPTH} levels")
            stack.extend((item, f"{at}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):  # 1e999 parses as inf
            raise InvalidArgument.field(at, f"number {value} is out of the float64 range")
        elif isinstance(value, int) and not isinstance(value, bool) and not _INT64_MIN <= value <= _INT64_MAX:
            raise InvalidArgument.field(at, f"int {value} is outside the int64 range")


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a bool"
    return "a number"


def check_path(path: object, where: str) -> None:
    """A filter's metadata path: non-empty dot-separated keys."""
    if not isinstance(path, str) or not path:
        raise InvalidArgument.field(where, "field must not be empty")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidArgument.field(where, f"field is longer than {MAX_KEY_BYTES} bytes")
    if "" in path.split("."):
        raise InvalidArgument.field(where, f"metadata path {path!r} has an empty key (a stray dot)")


def _scalar_problem(value: object) -> str | None:
    if isinstance(value, (bool, str)):
        return None
    if isinstance(value, int):
        return None if _INT64_MIN <= value <= _INT64_MAX else f"int {value} is outside the int64 range"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"value must be finite, received {value}"
    return f"expected a keyword, int, float or bool, received {type(value).__name__}"


def check_condition(cond: Condition, where: str) -> None:
    """Raise InvalidArgument naming ``where`` for a condition on a metadata path that cannot be evaluated."""
    check_path(cond.field, where)  # type: ignore[union-attr]
    if isinstance(cond, Match):
        problem = _scalar_problem(cond.value)
        if problem is not None:
            raise InvalidArgument.field(where, problem)
    elif isinstance(cond, MatchAny):
        for i, value in enumerate(match_any_values(cond, where)):
            problem = _scalar_problem(value)
            if problem is not None:
                raise InvalidArgument.field(f"{where}.values[{i}]", problem)
    elif isinstance(cond, Range):
        given = [name for name in ("gt", "gte", "lt", "lte") if getattr(cond, name) is not None]
        if not given:
            raise InvalidArgument.field(where, "range needs at least one of gt, gte, lt, lte")
        for name in given:
            bound = getattr(cond, name)
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or _scalar_problem(bound):
                raise InvalidArgument.field(f"{where}.{name}", f"range bound must be a finite number, got {bound!r}")


# --------------------------------------------------------------------- columns


# The C scanner json.loads ends in, without its wrappers: stored texts are canonical JSON.
_scan = json.JSONDecoder().scan_once


def _parse(text: str) -> Any:
    return _scan(text, 0)[0]


class _Column:
    """One path's values as parallel entry arrays: label, kind, an int (int value, keyword code,
    bool 0/1) and a float (numbers). A list value gives one entry per scalar element. Writes
    append to Python lists; ``flush`` (before a filter reads) moves them into the arrays."""

    def __init__(self, path: str) -> None:
        self.keys = path.split(".")
        self.codes: dict[str, int] = {}
        self.size = 0
        self.labels = np.empty(0, np.int64)
        self.kinds = np.empty(0, np.int8)
        self.ints = np.empty(0, np.int64)
        self.floats = np.empty(0, np.float64)
        self._pending: tuple[list[int], list[int], list[int], list[float]] = ([], [], [], [])
        self.documents = 0  # labels that gave entries since the build (removed ones included)

    def add(self, label: int, obj: Any) -> None:
        value = obj
        for key in self.keys:
            if not isinstance(value, dict):
                return
            value = value.get(key)
        if value is None:
            return
        self.documents += 1
        labels, kinds, ints, floats = self._pending
        before = len(labels)
        for item in value if isinstance(value, list) else (value,):
            if isinstance(item, str):
                code = self.codes.get(item)
                if code is None:
                    code = self.codes[item] = len(self.codes)
                kind, whole, real = _STR, code, 0.0
            elif isinstance(item, bool):
                kind, whole, real = _BOOL, int(item), 0.0
            elif isinstance(item, int):
                kind, whole, real = _INT, item, float(item)
            elif isinstance(item, float):
                kind, whole, real = _FLOAT, 0, item
            else:
                continue
            labels.append(label)
            kinds.append(kind)
            ints.append(whole)
            floats.append(real)
        if len(labels) == before:  # an object, an empty list, a list of non-scalars: only Exists sees it
            labels.append(label)
            kinds.append(_OTHER)
            ints.append(0)
            floats.append(0.0)

    def flush(self) -> None:
        labels, kinds, ints, floats = self._pending
        if not labels:
            return
        needed = self.size + len(labels)
        if needed > len(self.labels):
            capacity = max(64, len(self.labels))
            while capacity < needed:
                capacity *= 2
            for name in ("labels", "kinds", "ints", "floats"):
                old = getattr(self, name)
                grown = np.empty(capacity, old.dtype)
                grown[: self.size] = old[: self.size]
                setattr(self, name, grown)
        self.labels[self.size : needed] = labels
        self.kinds[self.size : needed] = kinds
        self.ints[self.size : needed] = ints
        self.floats[self.size : needed] = floats
        self.size = needed
        self._pending = ([], [], [], [])

    def select(self, cond: Condition) -> np.ndarray:
        """Bool over entries: those satisfying ``cond``."""
        n = self.size
        kinds, ints, floats = self.kinds[:n], self.ints[:n], self.floats[:n]
        if isinstance(cond, Exists):
            return np.ones(n, dtype=bool)
        if isinstance(cond, Range):
            out = (kinds == _INT) | (kinds == _FLOAT)
            for name, op in (("gt", np.greater), ("gte", np.greater_equal), ("lt", np.less), ("lte", np.less_equal)):
                bound = getattr(cond, name)
                if bound is not None:
                    out &= op(floats, float(bound))
            return out
        values = (cond.value,) if isinstance(cond, Match) else tuple(cond.values)  # type: ignore[union-attr]
        codes, whole, reals, flags = [], [], [], []
        for value in values:
            if isinstance(value, bool):
                flags.append(int(value))
            elif isinstance(value, str):
                if value in self.codes:
                    codes.append(self.codes[value])
            elif isinstance(value, int):
                whole.append(value)
                if float(value) == value:
                    reals.append(float(value))
            elif isinstance(value, float):
                reals.append(value)
                if value.is_integer() and _INT64_MIN <= int(value) <= _INT64_MAX:
                    whole.append(int(value))
        out = np.zeros(n, dtype=bool)
        for kind, wanted in ((_STR, codes), (_BOOL, flags), (_INT, whole)):
            if len(wanted) == 1:
                out |= (kinds == kind) & (ints == wanted[0])
            elif wanted:
                out |= (kinds == kind) & np.isin(ints, np.asarray(wanted, np.int64))
        if reals:
            out |= (kinds == _FLOAT) & np.isin(floats, np.asarray(reals, np.float64))
        return out


# ----------------------------------------------------------------------- store


class MetadataStore:
    """The canonical metadata text of each live label of one shard, and columns for filters on it."""

    def __init__(self) -> None:
        # Writes are prepared outside the shard's write lock while searches read: one lock here.
        self._lock = threading.Lock()
        self._texts: dict[int, str] = {}
        self._columns: OrderedDict[str, _Column] = OrderedDict()

    def __len__(self) -> int:
        return len(self._texts)

    def set(self, label: int, text: str) -> None:
        """Store the canonical ``text`` of a new label ("" stores nothing)."""
        if not text:
            return
        with self._lock:
            self._texts[label] = text
            if self._columns:
                obj = _parse(text)
                for column in self._columns.values():
                    column.add(label, obj)

    def remove(self, label: int) -> None:
        """Forget a label's metadata (its document was deleted or replaced)."""
        with self._lock:
            self._texts.pop(label, None)

    def get(self, label: int) -> str:
        return self._texts.get(label, "")

    def memory_bytes(self) -> int:
        """Approximate bytes: the texts (as UTF-8) and the columns' arrays."""
        with self._lock:
            texts = sum(len(text) for text in self._texts.values()) + 100 * len(self._texts)
            columns = sum(
                c.labels.nbytes + c.kinds.nbytes + c.ints.nbytes + c.floats.nbytes for c in self._columns.values()
            )
        return texts + columns

    def mask(self, cond: Condition, size: int) -> np.ndarray:
        """Bool mask of length ``size``: labels whose metadata satisfies ``cond`` (validated first)."""
        path = cond.field  # type: ignore[union-attr]
        out = np.zeros(size, dtype=bool)
        with self._lock:
            column = self._column(path)
            column.flush()
            if column.size == 0:
                return out
            selected = column.select(cond)
            labels = column.labels[: column.size][selected]
        out[labels[labels < size]] = True
        return out

    def _column(self, path: str) -> _Column:
        column = self._columns.get(path)
        if column is not None and column.documents <= 2 * len(self._texts) + 1024:
            self._columns.move_to_end(path)
            return column
        column = _Column(path)  # first use, or mostly removed documents' entries: one pass over the texts
        # Stored texts are json.dumps output, which spells a key as json.dumps spells it alone: a text
        # without '"<first key>":' cannot hold the path and is skipped unparsed.
        first = json.dumps(column.keys[0], ensure_ascii=False) + ":"
        texts = self._texts
        for label in sorted(texts):
            text = texts[label]
            if first in text:
                column.add(label, _parse(text))
        self._columns[path] = column
        self._columns.move_to_end(path)
        while len(self._columns) > MAX_COLUMNS:
            self._columns.popitem(last=False)
        return column

    # ------------------------------------------------------------ persistence

    def save(self, directory: Path, size: int) -> None:
        """Write ``metadata.bin`` (labels below ``size`` only) into ``directory``, when any has metadata."""
        with self._lock:
            labels = sorted(label for label in self._texts if label < size)
            texts = [self._texts[label].encode("utf-8") for label in labels]
        if not labels:
            return
        offsets = np.zeros(len(labels) + 1, "<u8")
        np.cumsum([len(text) for text in texts], out=offsets[1:])
        data = b"".join((MAGIC, _U64.pack(len(labels)), np.asarray(labels, "<i8").tobytes(), offsets.tobytes(), *texts))
        durable.write_bytes(Path(directory) / FILE, data)

    @classmethod
    def load(cls, directory: Path) -> MetadataStore:
        """Read what ``save`` wrote; a directory without ``metadata.bin`` gives an empty store."""
        store = cls()
        path = Path(directory) / FILE
        if not path.exists():
            return store
        data = path.read_bytes()
        head = len(MAGIC) + _U64.size
        if len(data) < head or data[: len(MAGIC)] != MAGIC:
            raise DataLoss(f"{path}: not a metadata file (bad magic)")
        (count,) = _U64.unpack_from(data, len(MAGIC))
        start = head + 8 * count + 8 * (count + 1)
        if start > len(data):
            raise DataLoss(f"{path}: {count} entries do not fit in {len(data)} bytes")
        labels = np.frombuffer(data, "<i8", count, head)
        offsets = np.frombuffer(data, "<u8", count + 1, head + 8 * count)
        blob = data[start:]
        if offsets[0] != 0 or int(offsets[-1]) != len(blob) or np.any(np.diff(offsets.astype(np.int64)) < 0):
            raise DataLoss(f"{path}: offsets do not match the {len(blob)} bytes of text")
        if count and (labels[0] < 0 or np.any(np.diff(labels) <= 0)):
            raise DataLoss(f"{path}: labels are not ascending")
        bounds = offsets.tolist()
        try:
            store._texts = {
                label: blob[bounds[i] : bounds[i + 1]].decode("utf-8") for i, label in enumerate(labels.tolist())
            }
        except UnicodeDecodeError as err:
            raise DataLoss(f"{path}: metadata text is not UTF-8: {err}") from err
        return store
