"""Columnar payload store of one shard: typed columns indexed by label, and filter evaluation over them.

This module owns the typed payload values of a shard's documents, their
validation against the schema's payload fields, the validation of Filter trees
against those fields, and the vectorised evaluation of a Filter into a bool
mask over labels (the semantics are those documented in index/filters.py).

Labels are the shard's integer document-version labels (0, 1, 2, ...; never
reused). Every field is one column indexed by label, grown by capacity doubling:

    keyword   int32 codes (-1 = absent) + a dictionary value -> code, code -> value
    int       int64 values + bool presence mask
    float     float64 values + bool presence mask
    bool      int8 (-1 = absent, 0 = false, 1 = true)
    datetime  int64 microseconds since the Unix epoch + bool presence mask

A document carries at most one value per field (lists are not supported).
Labels at or beyond ``size`` (and labels never ``set``) are absent in every field.

On disk (written by ``save`` into a fresh directory; the caller publishes it atomically):

    payload.json                      {"format": 1, "size": N,
                                       "fields": {name: {"type": t, "values": [keyword by code]}}}
                                      ("values" only for keyword fields)
    payload-<field>.codes.npy         keyword: int32 codes, length N
    payload-<field>.values.npy        int / datetime: int64, float: float64, bool: int8; length N
    payload-<field>.present.npy       int / float / datetime: bool presence, length N

Every file is fsynced after it is written. ``load`` of a directory without
``payload.json`` gives an empty store.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataLoss, InvalidArgument
from .filters import Condition, Exists, Filter, Match, MatchAny, Range
from .schema import PayloadFieldSpec, PayloadType

FORMAT_VERSION = 1
MAX_KEYWORD_BYTES = 1024
MAX_FILTER_DEPTH = 64
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
_INITIAL_CAPACITY = 64
_META_FILE = "payload.json"
_NUMERIC_TYPES = (PayloadType.INT, PayloadType.FLOAT, PayloadType.DATETIME)
_BOUNDS = ("gt", "gte", "lt", "lte")
_FEW_VALUES = 16  # up to this many MatchAny values, OR-ed comparisons; beyond, a lookup table or np.isin


# ------------------------------------------------------------------ values


def _type_name(value: object) -> str:
    return type(value).__name__


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _value_problem(kind: PayloadType, value: object) -> str | None:
    """Why ``value`` cannot be a value of a ``kind`` field, or None when it can."""
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        return f"expected one {kind.value} value, received {_type_name(value)} (lists are not supported)"
    if kind is PayloadType.KEYWORD:
        return _keyword_problem(value)
    if kind is PayloadType.BOOL:
        return None if isinstance(value, bool) else f"expected bool, received {_type_name(value)}"
    if kind is PayloadType.FLOAT:
        return _float_problem(value)
    if not _is_int(value):
        what = "int microseconds since the epoch" if kind is PayloadType.DATETIME else "int"
        return f"expected {what}, received {_type_name(value)}"
    if not INT64_MIN <= value <= INT64_MAX:  # type: ignore[operator]
        return f"{kind.value} value {value} is outside the int64 range"
    return None


def _keyword_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"expected keyword (str), received {_type_name(value)}"
    try:
        length = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "keyword is not valid UTF-8 (lone surrogate)"
    if length > MAX_KEYWORD_BYTES:
        return f"keyword is {length} UTF-8 bytes; at most {MAX_KEYWORD_BYTES} are allowed"
    return None


def _float_problem(value: object) -> str | None:
    if _is_int(value):
        try:
            float(value)  # type: ignore[arg-type]
        except OverflowError:
            return f"int value {value} is outside the float64 range"
        return None
    if not isinstance(value, float):
        return f"expected float, received {_type_name(value)}"
    if not math.isfinite(value):
        return f"float value must be finite, received {value}"
    return None


def _bound_problem(value: object) -> str | None:
    """Why ``value`` cannot bound a range, or None when it can (any int, any finite float)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else f"range bound must be finite, received {value}"
    if _is_int(value):
        return None
    return f"expected int or float range bound, received {_type_name(value)}"


def _float_or_none(value: int | float) -> float | None:
    """``value`` as a float64 when that is exact, else None."""
    try:
        as_float = float(value)
    except OverflowError:
        return None
    return as_float if as_float == value else None


def _int_bounds(rng: Range) -> tuple[int | float, int | float]:
    """Inclusive integer bounds [lo, hi] equivalent to ``rng`` on an integer column (lo > hi: nothing)."""
    lo: int | float = -math.inf
    hi: int | float = math.inf
    for name in _BOUNDS:
        bound = getattr(rng, name)
        if bound is None:
            continue
        if isinstance(bound, float) and math.isnan(bound):
            return math.inf, -math.inf
        if name == "gte":
            lo = max(lo, _ceil(bound))
        elif name == "gt":
            lo = max(lo, _floor(bound) + 1)
        elif name == "lte":
            hi = min(hi, _floor(bound))
        else:
            hi = min(hi, _ceil(bound) - 1)
    return lo, hi


def _floor(bound: int | float) -> int | float:
    return bound if _is_int(bound) or math.isinf(bound) else math.floor(bound)


def _ceil(bound: int | float) -> int | float:
    return bound if _is_int(bound) or math.isinf(bound) else math.ceil(bound)


def _float_bound(name: str, bound: int | float) -> tuple[str, float]:
    """An (operator, float64) pair with exactly the meaning of ``name bound`` over float64 values."""
    if isinstance(bound, float):
        return name, bound
    try:
        near = float(bound)
    except OverflowError:
        near = math.inf if bound > 0 else -math.inf
    if near == bound:
        return name, near
    lower = name in ("gt", "gte")
    if near > bound:  # no float64 lies in (bound, near)
        return ("gte", near) if lower else ("lt", near)
    return ("gt", near) if lower else ("lte", near)  # no float64 lies in (near, bound)


def _compare(values: np.ndarray, op: str, bound: float) -> np.ndarray:
    if op == "gt":
        return values > bound
    if op == "gte":
        return values >= bound
    if op == "lt":
        return values < bound
    return values <= bound


def _equal_any(array: np.ndarray, wanted: Iterable[Any]) -> np.ndarray:
    """``array == w`` for any ``w`` in ``wanted`` (non-empty): a few comparisons beat np.isin's sort."""
    items = iter(wanted)
    out = array == next(items)
    for item in items:
        out |= array == item
    return out


# ----------------------------------------------------------------- columns


class _Column:
    """One field's storage. Masks returned have length ``n`` and may be views: never modify them."""

    kind: PayloadType

    def resize(self, capacity: int) -> None:
        raise NotImplementedError

    def put(self, label: int, value: Any) -> None:
        raise NotImplementedError

    def clear(self, label: int) -> None:
        raise NotImplementedError

    def value(self, label: int) -> Any:
        """The Python value at ``label``, or None when absent."""
        raise NotImplementedError

    def exists(self, n: int) -> np.ndarray:
        raise NotImplementedError

    def match(self, value: Any, n: int) -> np.ndarray:
        raise NotImplementedError

    def match_any(self, values: Sequence[Any], n: int) -> np.ndarray:
        raise NotImplementedError

    def range(self, rng: Range, n: int) -> np.ndarray:
        return np.zeros(n, dtype=bool)

    def arrays(self, n: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def restore(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], capacity: int) -> None:
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        return {"type": self.kind.value}


def _grown(array: np.ndarray, capacity: int, fill: object) -> np.ndarray:
    out = np.full(capacity, fill, dtype=array.dtype)
    keep = min(len(array), capacity)
    out[:keep] = array[:keep]
    return out


class _KeywordColumn(_Column):
    kind = PayloadType.KEYWORD

    def __init__(self, capacity: int) -> None:
        self.codes = np.full(capacity, -1, dtype=np.int32)
        self.code_of: dict[str, int] = {}
        self.strings: list[str] = []

    def resize(self, capacity: int) -> None:
        self.codes = _grown(self.codes, capacity, -1)

    def _intern(self, value: str) -> int:
        code = self.code_of.get(value)
        if code is None:
            code = self.code_of[value] = len(self.strings)
            self.strings.append(value)
        return code

    def put(self, label: int, value: Any) -> None:
        self.codes[label] = self._intern(value)

    def clear(self, label: int) -> None:
        self.codes[label] = -1

    def value(self, label: int) -> Any:
        code = self.codes[label]
        return self.strings[code] if code >= 0 else None

    def exists(self, n: int) -> np.ndarray:
        return self.codes[:n] >= 0

    def match(self, value: Any, n: int) -> np.ndarray:
        code = self.code_of.get(value) if isinstance(value, str) else None
        return np.zeros(n, dtype=bool) if code is None else self.codes[:n] == code

    def match_any(self, values: Sequence[Any], n: int) -> np.ndarray:
        known = {self.code_of.get(v) for v in values if isinstance(v, str)} - {None}
        if not known:
            return np.zeros(n, dtype=bool)
        codes = self.codes[:n]
        if len(known) <= _FEW_VALUES:
            return _equal_any(codes, known)
        table = np.zeros(len(self.strings) + 1, dtype=bool)  # the last slot answers code -1 (absent)
        table[np.fromiter(known, dtype=np.int64, count=len(known))] = True
        return table.take(codes)

    def arrays(self, n: int) -> dict[str, np.ndarray]:
        return {"codes": self.codes[:n]}

    def restore(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], capacity: int) -> None:
        strings = meta.get("values")
        if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
            raise DataLoss("payload.json: keyword dictionary is missing or malformed")
        codes = arrays["codes"]
        if len(codes) and (int(codes.max()) >= len(strings) or int(codes.min()) < -1):
            raise DataLoss("payload.json: keyword code outside the dictionary")
        self.strings = list(strings)
        self.code_of = {s: i for i, s in enumerate(strings)}
        self.codes = _grown(codes.astype(np.int32, copy=False), capacity, -1)

    def meta(self) -> dict[str, Any]:
        return {"type": self.kind.value, "values": self.strings}


class _BoolColumn(_Column):
    kind = PayloadType.BOOL

    def __init__(self, capacity: int) -> None:
        self.values = np.full(capacity, -1, dtype=np.int8)

    def resize(self, capacity: int) -> None:
        self.values = _grown(self.values, capacity, -1)

    def put(self, label: int, value: Any) -> None:
        self.values[label] = 1 if value else 0

    def clear(self, label: int) -> None:
        self.values[label] = -1

    def value(self, label: int) -> Any:
        stored = self.values[label]
        return None if stored < 0 else bool(stored)

    def exists(self, n: int) -> np.ndarray:
        return self.values[:n] >= 0

    def match(self, value: Any, n: int) -> np.ndarray:
        if not isinstance(value, bool):
            return np.zeros(n, dtype=bool)
        return self.values[:n] == int(value)

    def match_any(self, values: Sequence[Any], n: int) -> np.ndarray:
        wanted = {v for v in values if isinstance(v, bool)}
        if len(wanted) == 2:
            return self.exists(n)
        return self.match(wanted.pop(), n) if wanted else np.zeros(n, dtype=bool)

    def arrays(self, n: int) -> dict[str, np.ndarray]:
        return {"values": self.values[:n]}

    def restore(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], capacity: int) -> None:
        self.values = _grown(arrays["values"].astype(np.int8, copy=False), capacity, -1)


class _NumberColumn(_Column):
    """int, float and datetime: a value array plus a presence mask."""

    def __init__(self, kind: PayloadType, capacity: int) -> None:
        self.kind = kind
        self.is_float = kind is PayloadType.FLOAT
        self.dtype = np.float64 if self.is_float else np.int64
        self.convert = float if self.is_float else int
        self.values = np.zeros(capacity, dtype=self.dtype)
        self.present = np.zeros(capacity, dtype=bool)

    def resize(self, capacity: int) -> None:
        self.values = _grown(self.values, capacity, 0)
        self.present = _grown(self.present, capacity, False)

    def put(self, label: int, value: Any) -> None:
        self.values[label] = self.convert(value)
        self.present[label] = True

    def clear(self, label: int) -> None:
        self.values[label] = 0
        self.present[label] = False

    def value(self, label: int) -> Any:
        return self.convert(self.values[label]) if self.present[label] else None

    def exists(self, n: int) -> np.ndarray:
        return self.present[:n]

    def _exact(self, value: Any) -> int | float | None:
        """``value`` in this column's dtype when some stored value could equal it exactly, else None."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if self.is_float:
            return value if isinstance(value, float) else _float_or_none(value)
        return value if _is_int(value) and INT64_MIN <= value <= INT64_MAX else None

    def match(self, value: Any, n: int) -> np.ndarray:
        exact = self._exact(value)
        if exact is None:
            return np.zeros(n, dtype=bool)
        return (self.values[:n] == exact) & self.present[:n]

    def match_any(self, values: Sequence[Any], n: int) -> np.ndarray:
        wanted = [e for e in (self._exact(v) for v in values) if e is not None]
        if not wanted:
            return np.zeros(n, dtype=bool)
        values = self.values[:n]
        if len(wanted) <= _FEW_VALUES:
            return _equal_any(values, wanted) & self.present[:n]
        return np.isin(values, np.asarray(wanted, dtype=self.dtype)) & self.present[:n]

    def range(self, rng: Range, n: int) -> np.ndarray:
        if self.is_float:
            return self._float_range(rng, n)
        lo, hi = _int_bounds(rng)
        if lo > hi or lo > INT64_MAX or hi < INT64_MIN:
            return np.zeros(n, dtype=bool)
        mask = self.present[:n]
        values = self.values[:n]
        if lo > INT64_MIN:
            mask = mask & (values >= lo)
        if hi < INT64_MAX:
            mask = mask & (values <= hi)
        return mask

    def _float_range(self, rng: Range, n: int) -> np.ndarray:
        mask = self.present[:n]
        values = self.values[:n]
        for name in _BOUNDS:
            bound = getattr(rng, name)
            if bound is not None and not isinstance(bound, bool) and isinstance(bound, (int, float)):
                op, limit = _float_bound(name, bound)
                mask = mask & _compare(values, op, limit)
        return mask

    def arrays(self, n: int) -> dict[str, np.ndarray]:
        return {"values": self.values[:n], "present": self.present[:n]}

    def restore(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], capacity: int) -> None:
        self.values = _grown(arrays["values"].astype(self.dtype, copy=False), capacity, 0)
        self.present = _grown(arrays["present"].astype(bool, copy=False), capacity, False)


def _new_column(kind: PayloadType, capacity: int) -> _Column:
    if kind is PayloadType.KEYWORD:
        return _KeywordColumn(capacity)
    if kind is PayloadType.BOOL:
        return _BoolColumn(capacity)
    return _NumberColumn(kind, capacity)


# ------------------------------------------------------------------- store


class PayloadStore:
    """Typed payload columns of one shard, indexed by label."""

    def __init__(self, fields: Sequence[PayloadFieldSpec]) -> None:
        self._specs: tuple[PayloadFieldSpec, ...] = tuple(fields)
        self._types: dict[str, PayloadType] = {spec.name: PayloadType(spec.type) for spec in self._specs}
        self._capacity = _INITIAL_CAPACITY
        self._size = 0
        self._columns: dict[str, _Column] = {
            name: _new_column(kind, self._capacity) for name, kind in self._types.items()
        }

    @property
    def size(self) -> int:
        """Number of labels covered: the largest label ever ``set`` plus one."""
        return self._size

    @property
    def fields(self) -> tuple[PayloadFieldSpec, ...]:
        return self._specs

    # ------------------------------------------------------------ validation

    def _declared(self) -> str:
        return ", ".join(self._types) if self._types else "none"

    def _unknown(self, where: str, name: object) -> InvalidArgument:
        return InvalidArgument.field(where, f"unknown payload field {name!r} (declared: {self._declared()})")

    def validate(self, values: Mapping[str, object], where: str = "payload") -> None:
        """Raise InvalidArgument naming ``where.<field>`` for an unknown field or a value that does not fit."""
        if not isinstance(values, Mapping):
            raise InvalidArgument.field(where, f"expected a map of field -> value, received {_type_name(values)}")
        for name, value in values.items():
            kind = self._types.get(name) if isinstance(name, str) else None
            if kind is None:
                raise self._unknown(f"{where}.{name}", name)
            problem = _value_problem(kind, value)
            if problem is not None:
                raise InvalidArgument.field(f"{where}.{name}", problem)

    def validate_filter(self, flt: Filter, where: str = "filter") -> None:
        """Raise InvalidArgument naming the path (``filter.must[1].range.price``) of the first bad condition."""
        self._validate_filter(flt, where, 1)

    def _validate_filter(self, flt: Filter, where: str, depth: int) -> None:
        if not isinstance(flt, Filter):
            raise InvalidArgument.field(where, f"expected a filter, received {_type_name(flt)}")
        if depth > MAX_FILTER_DEPTH:
            raise InvalidArgument.field(where, f"filters nest deeper than {MAX_FILTER_DEPTH} levels")
        for clause in ("must", "should", "must_not"):
            for i, cond in enumerate(getattr(flt, clause)):
                self._validate_condition(cond, f"{where}.{clause}[{i}]", depth)

    def _validate_condition(self, cond: Condition, where: str, depth: int) -> None:
        if isinstance(cond, Filter):
            self._validate_filter(cond, f"{where}.filter", depth + 1)
        elif isinstance(cond, Match):
            self._validate_match(cond, f"{where}.match.{cond.field}")
        elif isinstance(cond, MatchAny):
            self._validate_match_any(cond, f"{where}.any.{cond.field}")
        elif isinstance(cond, Range):
            self._validate_range(cond, f"{where}.range.{cond.field}")
        elif isinstance(cond, Exists):
            self._field_type(cond.field, f"{where}.exists.{cond.field}")
        else:
            raise InvalidArgument.field(where, f"unknown condition type {_type_name(cond)}")

    def _field_type(self, name: object, where: str) -> PayloadType:
        kind = self._types.get(name) if isinstance(name, str) else None
        if kind is None:
            raise self._unknown(where, name)
        return kind

    def _validate_match(self, cond: Match, where: str) -> None:
        kind = self._field_type(cond.field, where)
        problem = _value_problem(kind, cond.value)
        if problem is not None:
            raise InvalidArgument.field(where, problem)

    def _validate_match_any(self, cond: MatchAny, where: str) -> None:
        kind = self._field_type(cond.field, where)
        if isinstance(cond.values, (str, bytes)) or not isinstance(cond.values, Iterable):
            raise InvalidArgument.field(where, f"values must be a list, received {_type_name(cond.values)}")
        values = list(cond.values)
        if not values:
            raise InvalidArgument.field(where, "match any needs at least one value")
        for i, value in enumerate(values):
            problem = _value_problem(kind, value)
            if problem is not None:
                raise InvalidArgument.field(f"{where}.values[{i}]", problem)

    def _validate_range(self, cond: Range, where: str) -> None:
        kind = self._field_type(cond.field, where)
        if kind not in _NUMERIC_TYPES:
            raise InvalidArgument.field(
                where, f"range needs an int, float or datetime field; {cond.field!r} is {kind.value}"
            )
        given = [name for name in _BOUNDS if getattr(cond, name) is not None]
        if not given:
            raise InvalidArgument.field(where, "range needs at least one of gt, gte, lt, lte")
        for name in given:
            problem = _bound_problem(getattr(cond, name))
            if problem is not None:
                raise InvalidArgument.field(f"{where}.{name}", problem)

    # ---------------------------------------------------------------- writes

    def _grow(self, needed: int) -> None:
        capacity = self._capacity
        while capacity < needed:
            capacity *= 2
        for column in self._columns.values():
            column.resize(capacity)
        self._capacity = capacity

    def set(self, label: int, values: Mapping[str, object]) -> None:
        """Store the (validated) ``values`` of ``label``; fields not in ``values`` are absent for it."""
        if label < 0:
            raise ValueError(f"label must be >= 0, got {label}")
        if label >= self._capacity:
            self._grow(label + 1)
        if label < self._size:
            for column in self._columns.values():
                column.clear(label)
        else:
            self._size = label + 1
        columns = self._columns
        for name, value in values.items():
            columns[name].put(label, value)

    # ----------------------------------------------------------------- reads

    def get(self, label: int, fields: Iterable[str] | None = None) -> dict[str, object]:
        """The values present for ``label`` (all fields when ``fields`` is None; unknown names are skipped)."""
        out: dict[str, object] = {}
        if not 0 <= label < self._size:
            return out
        columns = self._columns
        if fields is None:
            for name, column in columns.items():
                value = column.value(label)
                if value is not None:
                    out[name] = value
            return out
        for name in fields:
            column = columns.get(name)
            if column is not None:
                value = column.value(label)
                if value is not None:
                    out[name] = value
        return out

    def evaluate(self, flt: Filter, size: int) -> np.ndarray:
        """Bool mask of length ``size``: the labels passing ``flt`` (call ``validate_filter`` first).

        Labels at or beyond ``self.size`` are absent in every field. Unknown fields raise
        InvalidArgument; values that cannot occur in the field (unseen keywords, wrong types) match nothing.
        """
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        return self._filter_mask(flt, size)

    def _filter_mask(self, flt: Filter, size: int) -> np.ndarray:
        out = np.ones(size, dtype=bool)
        for cond in flt.must:
            np.logical_and(out, self._condition_mask(cond, size), out=out)
        if flt.should:
            any_of = np.zeros(size, dtype=bool)
            for cond in flt.should:
                np.logical_or(any_of, self._condition_mask(cond, size), out=any_of)
            np.logical_and(out, any_of, out=out)
        for cond in flt.must_not:
            out &= ~self._condition_mask(cond, size)
        return out

    def _condition_mask(self, cond: Condition, size: int) -> np.ndarray:
        """Mask of length ``size`` for one condition; may be a view of a column: never modify it."""
        if isinstance(cond, Filter):
            return self._filter_mask(cond, size)
        column = self._columns.get(cond.field)
        if column is None:
            raise self._unknown(f"filter.{cond.field}", cond.field)
        n = min(size, self._size)
        if isinstance(cond, Match):
            mask = column.match(cond.value, n)
        elif isinstance(cond, MatchAny):
            mask = column.match_any(tuple(cond.values), n)
        elif isinstance(cond, Range):
            mask = column.range(cond, n)
        else:
            mask = column.exists(n)
        if n == size:
            return mask
        padded = np.zeros(size, dtype=bool)
        padded[:n] = mask
        return padded

    # ----------------------------------------------------------- persistence

    def save(self, directory: Path) -> None:
        """Write every column (truncated to ``size``) and ``payload.json`` into ``directory``, fsyncing each."""
        directory = Path(directory)
        meta_fields: dict[str, Any] = {}
        for name, column in self._columns.items():
            for part, array in column.arrays(self._size).items():
                _write_npy(directory / _column_file(name, part), array)
            meta_fields[name] = column.meta()
        meta = {"format": FORMAT_VERSION, "size": self._size, "fields": meta_fields}
        _write_bytes(directory / _META_FILE, json.dumps(meta, ensure_ascii=False).encode("utf-8"))

    @classmethod
    def load(cls, directory: Path, fields: Sequence[PayloadFieldSpec]) -> PayloadStore:
        """Read a store written by ``save``; a directory without ``payload.json`` gives an empty store."""
        directory = Path(directory)
        store = cls(fields)
        meta_path = directory / _META_FILE
        if not meta_path.exists():
            return store
        meta = _read_meta(meta_path)
        size = meta["size"]
        store._grow(max(size, 1))
        store._size = size
        for name, column in store._columns.items():
            saved = meta["fields"].get(name)
            if saved is not None:
                store._restore_column(directory, name, column, saved, size)
        return store

    def _restore_column(self, directory: Path, name: str, column: _Column, saved: Any, size: int) -> None:
        if not isinstance(saved, dict) or saved.get("type") != column.kind.value:
            raise DataLoss(f"payload.json: field {name!r} was saved as {saved!r}, schema says {column.kind.value}")
        arrays = {}
        for part in column.arrays(0):
            path = directory / _column_file(name, part)
            try:
                array = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataLoss(f"{path}: cannot read payload column: {exc}") from exc
            if array.ndim != 1 or len(array) != size:
                raise DataLoss(f"{path}: payload column has shape {array.shape}, expected ({size},)")
            arrays[part] = array
        column.restore(arrays, saved, self._capacity)


def _column_file(name: str, part: str) -> str:
    return f"payload-{name}.{part}.npy"


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataLoss(f"{path}: cannot read payload metadata: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise DataLoss(f"{path}: unsupported payload format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    size = meta.get("size")
    if not _is_int(size) or size < 0 or not isinstance(meta.get("fields"), dict):
        raise DataLoss(f"{path}: malformed payload metadata")
    return meta


def _write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
