"""Payload filters: the plain tree that every strand uses to narrow candidates.

A Filter holds three lists of conditions with Qdrant's semantics:
``must`` (all hold), ``should`` (at least one holds, when the list is non-empty)
and ``must_not`` (none holds). A condition is a keyword/int/bool equality
(Match), membership (MatchAny), a numeric or datetime range (Range), field
presence (Exists) or a nested Filter. A document without a value for a field
fails Match, MatchAny and Range on that field (and so passes their must_not).

Values are Python values of the field's payload type: str for keyword, int for
int, float or int for float, bool for bool, int microseconds since the epoch
for datetime.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .errors import InvalidArgument

Scalar = str | int | float | bool


@dataclass(frozen=True)
class Match:
    field: str
    value: Scalar


@dataclass(frozen=True)
class MatchAny:
    field: str
    values: tuple[Scalar, ...]


@dataclass(frozen=True)
class Range:
    field: str
    gt: float | int | None = None
    gte: float | int | None = None
    lt: float | int | None = None
    lte: float | int | None = None


@dataclass(frozen=True)
class Exists:
    field: str


@dataclass(frozen=True)
class Filter:
    must: tuple[Condition, ...] = ()
    should: tuple[Condition, ...] = ()
    must_not: tuple[Condition, ...] = ()

    def is_empty(self) -> bool:
        return not (self.must or self.should or self.must_not)

    def fields(self) -> set[str]:
        """Every field a condition names, nested filters' included."""
        named: set[str] = set()
        for cond in (*self.must, *self.should, *self.must_not):
            named |= cond.fields() if isinstance(cond, Filter) else {cond.field}
        return named


Condition = Match | MatchAny | Range | Exists | Filter


def match_any_values(cond: MatchAny, where: str) -> list[Scalar]:
    """A MatchAny's values as a list; InvalidArgument at ``where`` unless they are a non-empty list
    (each value's type is the caller's to check: a payload field's or a metadata scalar)."""
    if isinstance(cond.values, (str, bytes)) or not isinstance(cond.values, Iterable):
        raise InvalidArgument.field(where, f"values must be a list, received {type(cond.values).__name__}")
    values = list(cond.values)
    if not values:
        raise InvalidArgument.field(where, "match any needs at least one value")
    return values
