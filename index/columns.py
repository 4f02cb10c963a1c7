"""Typed, label-indexed columns: the storage and the filter primitives behind PayloadStore.

One column per payload field, indexed by document label and grown by doubling:
keyword (int32 codes into a per-field dictionary, -1 absent), bool (int8, -1 absent),
and int / float / datetime (a values array plus a presence mask). Each column answers
``exists``, ``match``, ``match_any`` and ``range`` as bool masks over labels; range
bounds mixing int and float compare exactly as Python would, even past 2**53.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .errors import DataLoss
from .filters import Range
from .schema import PayloadType

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
BOUNDS = ("gt", "gte", "lt", "lte")
_FEW_VALUES = 16  # up to this many MatchAny values, OR-ed comparisons; beyond, a lookup table or np.isin


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    for name in BOUNDS:
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
    return bound if is_int(bound) or math.isinf(bound) else math.floor(bound)


def _ceil(bound: int | float) -> int | float:
    return bound if is_int(bound) or math.isinf(bound) else math.ceil(bound)


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


class Column:
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


class _KeywordColumn(Column):
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


class _BoolColumn(Column):
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


class _NumberColumn(Column):
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
        return value if is_int(value) and INT64_MIN <= value <= INT64_MAX else None

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
        for name in BOUNDS:
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


def new_column(kind: PayloadType, capacity: int) -> Column:
    if kind is PayloadType.KEYWORD:
        return _KeywordColumn(capacity)
    if kind is PayloadType.BOOL:
        return _BoolColumn(capacity)
    return _NumberColumn(kind, capacity)


# ------------------------------------------------------------------- store
