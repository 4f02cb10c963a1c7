"""Columnar payload store of one shard: typed columns indexed by label, and filter evaluation over them.

This module owns the typed payload values of a shard's documents, their
validation against the schema's payload fields, the validation of Filter trees
against those fields, and the vectorised evaluation of a Filter into a bool
mask over labels (the semantics are those documented in index/filters.py).

Labels are the shard's integer document-version labels (0, 1, 2, ...; never
reused). Every field is one column (index/columns.py) indexed by label, grown by capacity doubling:

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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import durable
from . import metadata as meta
from .columns import BOUNDS, INT64_MAX, INT64_MIN, Column, is_int, new_column
from .errors import DataLoss, InvalidArgument
from .filters import Condition, Exists, Filter, Match, MatchAny, Range, match_any_values
from .schema import PayloadFieldSpec, PayloadType

FORMAT_VERSION = 1
MAX_KEYWORD_BYTES = 1024
# Filters nested deeper are refused. Below protobuf's own limit: upb refuses messages nested
# 100 deep, which a SearchRequest reaches at about 50 filter levels (Filter -> Condition -> Filter
# is two messages a level), so this check, not a DecodeError, is what a client meets.
MAX_FILTER_DEPTH = 32
_INITIAL_CAPACITY = 64
_META_FILE = "payload.json"
_NUMERIC_TYPES = (PayloadType.INT, PayloadType.FLOAT, PayloadType.DATETIME)


# ------------------------------------------------------------------ values


def _type_name(value: object) -> str:
    return type(value).__name__


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
    if not is_int(value):
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
    if is_int(value):
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
    if is_int(value):
        return None
    return f"expected int or float range bound, received {_type_name(value)}"


class PayloadStore:
    """Typed payload columns of one shard, indexed by label."""

    def __init__(self, fields: Sequence[PayloadFieldSpec]) -> None:
        self._specs: tuple[PayloadFieldSpec, ...] = tuple(fields)
        self._types: dict[str, PayloadType] = {spec.name: PayloadType(spec.type) for spec in self._specs}
        self._capacity = _INITIAL_CAPACITY
        self._size = 0
        self._columns: dict[str, Column] = {
            name: new_column(kind, self._capacity) for name, kind in self._types.items()
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
        elif isinstance(cond, (Match, MatchAny, Range, Exists)) and cond.field not in self._types:
            # Not a declared field: a path into the schemaless metadata (index/metadata.py).
            kind = {Match: "match", MatchAny: "any", Range: "range", Exists: "exists"}[type(cond)]
            meta.check_condition(cond, f"{where}.{kind}.{cond.field}")
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
        for i, value in enumerate(match_any_values(cond, where)):
            problem = _value_problem(kind, value)
            if problem is not None:
                raise InvalidArgument.field(f"{where}.values[{i}]", problem)

    def _validate_range(self, cond: Range, where: str) -> None:
        kind = self._field_type(cond.field, where)
        if kind not in _NUMERIC_TYPES:
            raise InvalidArgument.field(
                where, f"range needs an int, float or datetime field; {cond.field!r} is {kind.value}"
            )
        given = [name for name in BOUNDS if getattr(cond, name) is not None]
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

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of each field's column arrays (allocated capacity; a keyword column's strings not counted)."""
        capacity = self._capacity
        return {
            name: sum(array.nbytes for array in column.arrays(capacity).values())
            for name, column in list(self._columns.items())
        }

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

    def evaluate(self, flt: Filter, size: int, metadata: meta.MetadataStore | None = None) -> np.ndarray:
        """Bool mask of length ``size``: the labels passing ``flt`` (call ``validate_filter`` first).

        Labels at or beyond ``self.size`` are absent in every field. A field that is not declared
        is a path into ``metadata`` (absent everywhere without one); values that cannot occur in
        the field (unseen keywords, wrong types) match nothing.
        """
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        return self._filter_mask(flt, size, metadata)

    def _filter_mask(self, flt: Filter, size: int, metadata: meta.MetadataStore | None) -> np.ndarray:
        out = np.ones(size, dtype=bool)
        for cond in flt.must:
            np.logical_and(out, self._condition_mask(cond, size, metadata), out=out)
        if flt.should:
            any_of = np.zeros(size, dtype=bool)
            for cond in flt.should:
                np.logical_or(any_of, self._condition_mask(cond, size, metadata), out=any_of)
            np.logical_and(out, any_of, out=out)
        for cond in flt.must_not:
            out &= ~self._condition_mask(cond, size, metadata)
        return out

    def _condition_mask(self, cond: Condition, size: int, metadata: meta.MetadataStore | None) -> np.ndarray:
        """Mask of length ``size`` for one condition; may be a view of a column: never modify it."""
        if isinstance(cond, Filter):
            return self._filter_mask(cond, size, metadata)
        column = self._columns.get(cond.field)
        if column is None:
            return metadata.mask(cond, size) if metadata is not None else np.zeros(size, dtype=bool)
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

    def save(self, directory: Path, size: int | None = None) -> None:
        """Write every column (truncated to ``size``, default all labels set) and ``payload.json`` into
        ``directory``, fsyncing each. Writes may prepare labels past ``size`` meanwhile (index/shard/indexes.py):
        they are left out, and every file agrees on ``size``."""
        directory = Path(directory)
        size = self._size if size is None else min(size, self._size)
        meta_fields: dict[str, Any] = {}
        for name, column in self._columns.items():
            for part, array in column.arrays(size).items():
                _write_npy(directory / _column_file(name, part), array)
            meta_fields[name] = column.meta()
        meta = {"format": FORMAT_VERSION, "size": size, "fields": meta_fields}
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

    def _restore_column(self, directory: Path, name: str, column: Column, saved: Any, size: int) -> None:
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
    if not is_int(size) or size < 0 or not isinstance(meta.get("fields"), dict):
        raise DataLoss(f"{path}: malformed payload metadata")
    return meta


def _write_npy(path: Path, array: np.ndarray) -> None:
    durable.write_npy(path, array)  # a temporary name, fsynced, read back, renamed (index/durable.py)


def _write_bytes(path: Path, data: bytes) -> None:
    durable.write_bytes(path, data)
