"""Hostile braid.v1 requests for hypothesis, built from the proto descriptors.

Nothing here names an RPC or a request message. `Fuzzer` walks the service's
methods, their input messages, and every field, oneof, map, repeated field,
enum and nested message, so a new RPC or field is fuzzed the day it is added.
What the fuzzer knows about Braid is a bias, and data rather than code:

- string pools keyed by field name (`collection`, `ids`, `DenseQuery.field`, the keys of
  `Document.dense`, ...) reuse the real collection names, field names, ids and words of
  `Known`, and repeated floats / packed bytes of vectors mostly have a known dimension;
- half of the requests of a type with `Known.templates` (valid requests) start from a
  template and get 0-3 of their fields, at any depth, replaced by drawn values or cleared.

So most requests get past NOT_FOUND and the first validation error into index code, and a
failing case shrinks towards a valid request with one hostile field.

Values drawn per field kind (each next to ordinary, valid-looking values):

| kind            | hostile values                                                                 |
|-----------------|--------------------------------------------------------------------------------|
| string          | "", whitespace, NUL, zero-width and bidi marks, combining and astral chars,     |
|                 | path traversal, up to ~100 K chars, real names with "\\n", case or NUL changes  |
| int / uint      | 0, -1, 2**31-1, 2**32-1, 2**63-1, 2**64-1, timestamp range edges, limit edges   |
| float / double  | nan, +-inf, +-3e38, float32 max, -0.0, 1e-45, denormals, 1e15 vs 1e16           |
| bytes (packed)  | 4 * dim bytes, NaN / inf / denormal patterns, odd lengths, 65537 floats, random |
| enum            | every declared number plus unknown ones (-1, 99, 2**31-1)                       |
| repeated        | empty to short; sometimes long (33, 100, 4097 or 10,001 items, tiled)           |
| message         | nested down to `max_depth`; a recursive message (Filter -> Condition ->         |
|                 | Filter) sometimes as a chain 5 to 1,000 levels deep                             |

Raw bodies (`Fuzzer.raw_bodies`) are hand-encoded wire bytes: random bytes, valid
requests truncated or with bits flipped, invalid UTF-8 (0xff 0xfe, overlong,
encoded surrogates) in any string field reachable from the request, wrong wire
types, a length prefix far past the end, and unknown fields (which must be ignored).
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, OneofDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from braid.v1 import braid_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Braid"]

F = FieldDescriptor
_INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}
# Boundaries of the wire types, of Braid's limits (4096 ef / sparse terms, 10,000 batch / limit,
# 65536 dims) and of google.protobuf.Timestamp (0001-01-01 .. 9999-12-31, nanos < 1e9).
_INT_EDGES = (
    0,
    1,
    -1,
    2,
    7,
    8,
    9,
    63,
    64,
    65,
    255,
    4096,
    4097,
    10_000,
    10_001,
    65536,
    65537,
    999_999_999,
    1_000_000_000,
    2**31 - 1,
    -(2**31),
    2**31,
    2**32 - 1,
    2**53 + 1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    253_402_300_799,
    253_402_300_800,
    -62_135_596_800,
    -62_135_596_801,
)
_F32_MAX = 3.4028234663852886e38
_F32_EDGES = (
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    math.nan,
    -math.nan,
    math.inf,
    -math.inf,
    3e38,
    -3e38,
    _F32_MAX,
    -_F32_MAX,
    1.401298464324817e-45,  # 1e-45 as float32: the smallest denormal
    -1.401298464324817e-45,
    1.1754942106924411e-38,  # the largest denormal
    1e-7,
    1e15,
    -1e15,
    1e16,
    -1e16,
    65504.0,
)
_F64_EDGES = (*_F32_EDGES, 1e300, -1e300, 1.7976931348623157e308, 5e-324, 2.0**63, 2.0**64)
# float32 bit patterns, little-endian: quiet NaN, negative NaN, signalling NaN, +inf, -inf, a denormal.
_F32_PATTERNS = (
    b"\x00\x00\xc0\x7f",
    b"\x00\x00\xc0\xff",
    b"\x01\x00\x80\x7f",
    b"\x00\x00\x80\x7f",
    b"\x00\x00\x80\xff",
    b"\x01\x00\x00\x00",
    b"\xff\xff\x7f\x7f",
)
_WEIRD_STRINGS = (
    "",
    " ",
    "\n",
    "\t",
    "\r\n",
    "\x00",
    "a\x00b",
    "\u200b",
    "\ufeff",
    "\u202eevil",
    "e\u0301",
    "\ufb01",
    "\u0130",
    "\u00df",
    "\u65e5\u672c\u8a9e",
    "\U0001f99c",
    "\U0010ffff",
    "\uffff",
    "\ufffd",
    ".",
    "..",
    "../",
    "../..",
    "/",
    "/etc/passwd",
    "\\",
    "C:\\",
    "%s%n%x",
    "{}",
    "' OR 1=1 --",
    "*",
    "?",
    "a" * 64,
    "a" * 65,
    "x" * 513,
    "-",
    "_",
    "0",
    "A",
)
# Chunks repeated into huge strings (up to ~100 K characters, past the 64 KiB query limit).
_HUGE_CHUNKS = ("a", "word ", "\u00e9", "\U0001f99c", "\n", "x\x00", "e\u0301")
_HUGE_LENGTHS = (1024, 65535, 65536, 65537, 100_000)
_LONG_LENGTHS = (100, 4097, 10_001)
_LONG_MESSAGE_LENGTHS = (33, 10_001)
_MAX_TILED_BYTES = 8 << 20  # a tiled repeated message field stops growing at ~8 MiB
_DEEP_LEVELS = (5, 20, 32, 33, 48, 49, 50, 64, 65, 100, 1000)
_INVALID_UTF8 = (
    b"\xff\xfe",
    b"fuzz\xff",
    b"\xc3\x28",
    b"\xc0\xaf",  # overlong "/"
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\xf4\x90\x80\x80",  # past U+10FFFF
    b"\x80",
    b"emb\xfe",
)

ANALYZERS = ("default", "en_stem", "english", "whitespace", "raw")
MODELS = ("all-minilm-l6-v2", "minilm-tied-splade", "no-such-model", "../models/x")
ENUM_LIKE = {
    "analyzer": ANALYZERS,
    "model": MODELS,
    "index": ("hnsw", "spann", "HNSW", "flat"),
    "precision": ("fp32", "int8", "fp16"),
    "query_mode": ("model", "idf", "none"),
}


# ------------------------------------------------------------------ what the server holds


@dataclass(frozen=True)
class Known:
    """Names the fuzz may reuse so that its requests reach deeper code.

    Args:
        collections: existing collections the fuzz may read, write and even delete.
        new_collections: names CreateCollection may take (and DeleteCollection drop again).
        text_fields, sparse_fields, payload_fields: field names of the known schemas.
        dense_dims: (name, dim) of the known dense fields; vectors are biased to these dims.
        ids: document ids present in the known collections.
        words: words of the documents' text, for BM25 queries and tokens.
        forbidden: names no string strategy ever produces (a canary collection's).
        templates: valid requests that half of the drawn requests of their type start from,
            with 0-3 fields (at any depth) replaced by drawn values or cleared.
    """

    collections: tuple[str, ...]
    new_collections: tuple[str, ...]
    text_fields: tuple[str, ...]
    dense_dims: tuple[tuple[str, int], ...]
    sparse_fields: tuple[str, ...]
    payload_fields: tuple[str, ...]
    ids: tuple[str, ...]
    words: tuple[str, ...]
    forbidden: frozenset[str] = frozenset()
    templates: tuple[Message, ...] = ()

    @classmethod
    def from_schemas(
        cls,
        schemas: dict[str, pb.Schema],
        ids: Iterable[str],
        words: Iterable[str],
        new_collections: Iterable[str] = (),
        forbidden: Iterable[str] = (),
        templates: Iterable[Message] = (),
    ) -> Known:
        def unique(names: Iterable[Any]) -> tuple[Any, ...]:
            return tuple(dict.fromkeys(names))

        values = list(schemas.values())
        return cls(
            collections=tuple(schemas),
            new_collections=tuple(new_collections),
            text_fields=unique(f.name for s in values for f in s.text_fields),
            dense_dims=unique((f.name, f.dim) for s in values for f in s.dense_fields),
            sparse_fields=unique(f.name for s in values for f in s.sparse_fields),
            payload_fields=unique(f.name for s in values for f in s.payload_fields),
            ids=tuple(ids),
            words=tuple(words),
            forbidden=frozenset(forbidden),
            templates=tuple(templates),
        )

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(sorted({dim for _, dim in self.dense_dims})) or (1,)

    @property
    def field_names(self) -> tuple[str, ...]:
        dense = tuple(name for name, _ in self.dense_dims)
        return tuple(dict.fromkeys(self.text_fields + dense + self.sparse_fields + self.payload_fields))


# ------------------------------------------------------------------ wire-format helpers


def varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative numbers as their 64-bit two's complement (10 bytes)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


def is_map(field: FieldDescriptor) -> bool:
    return field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def is_synthetic(oneof: OneofDescriptor) -> bool:
    """The hidden oneof proto3 gives an ``optional`` field (``_eps`` around ``eps``)."""
    return len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}"


def _tile(items: list[Any], n: int) -> list[Any]:
    """``items`` repeated to ``n`` long, or shorter where that would pass ~8 MiB."""
    each = max(1, _size(items) // max(1, len(items)))
    n = min(n, max(1, _MAX_TILED_BYTES // each))
    return (items * (n // max(1, len(items)) + 1))[:n]


def _repeat(chunk: str, n: int) -> str:
    return (chunk * (n // len(chunk) + 1))[:n]


def _pack(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


# String manglers: a real name that is almost right goes deepest.
def _trailing_newline(s: str) -> str:
    return s + "\n"


def _upper(s: str) -> str:
    return s.upper()


def _leading_space(s: str) -> str:
    return " " + s


def _trailing_nul(s: str) -> str:
    return s + "\x00"


def _doubled(s: str) -> str:
    return s + s


def _chopped(s: str) -> str:
    return s[:-1]


def _traversal(s: str) -> str:
    return "../" + s


def _zero_width(s: str) -> str:
    return s + "\u200b"


_MANGLERS = (_trailing_newline, _upper, _leading_space, _trailing_nul, _doubled, _chopped, _traversal, _zero_width)


# ------------------------------------------------------------------ messages, built in place

# Strategies draw plans of messages (`_Node`, `_Chain`) and build the request top-down at the end:
# upb's CopyFrom / MergeFrom of a message nested past 100 levels fails ("Exceeded
# upb_DecodeOptions_MaxDepth"), and copying sub-messages bottom-up would be quadratic anyway.


@dataclass(frozen=True)
class _Node:
    """A message to build: (field, value) pairs; a value is a scalar, list, dict or another plan."""

    items: tuple[tuple[FieldDescriptor, Any], ...]
    size: int  # about the encoded bytes, to keep tiled lists under _MAX_TILED_BYTES


@dataclass(frozen=True)
class _Chain:
    """A recursive message ``levels`` times around the cycle ``path``, ending in ``leaf``."""

    path: tuple[FieldDescriptor, ...]
    levels: int
    leaf: _Node

    @property
    def size(self) -> int:
        return self.levels * 2 * len(self.path) + self.leaf.size


def _size(value: Any) -> int:
    if isinstance(value, (_Node, _Chain)):
        return value.size
    if isinstance(value, (str, bytes)):
        return len(value) + 2
    if isinstance(value, list):
        return sum(_size(v) for v in value) + 1
    if isinstance(value, dict):
        return sum(_size(k) + _size(v) for k, v in value.items()) + 1
    return 8


def _fill(msg: Message, plan: _Node | _Chain) -> None:
    if isinstance(plan, _Chain):
        for _ in range(plan.levels):
            for field in plan.path:
                if field.is_repeated:
                    msg = getattr(msg, field.name).add()
                else:
                    msg = getattr(msg, field.name)
                    msg.SetInParent()
        plan = plan.leaf
    for field, value in plan.items:
        _assign(msg, field, value)


def _assign(msg: Message, field: FieldDescriptor, value: Any) -> None:
    target = getattr(msg, field.name)
    if is_map(field):
        for key, item in value.items():
            if isinstance(item, (_Node, _Chain)):
                _fill(target[key], item)
            else:
                target[key] = item
    elif field.is_repeated and field.type == F.TYPE_MESSAGE:
        for item in value:
            _fill(target.add(), item)
    elif field.is_repeated:
        target.extend(value)
    elif field.type == F.TYPE_MESSAGE:
        target.SetInParent()  # an empty sub-message is still "set" (HasField / WhichOneof see it)
        _fill(target, value)
    else:
        setattr(msg, field.name, value)


def _build_message(cls: type[Message], plan: _Node | _Chain) -> Message:
    msg = cls()
    _fill(msg, plan)
    return msg


def _truncated(body: bytes, permille: int) -> bytes:
    return body[: len(body) * permille // 1000]


def _flipped(body: bytes, bits: list[int]) -> bytes:
    if not body:
        return b"\x80"
    out = bytearray(body)
    for bit in bits:
        bit %= len(out) * 8
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# ------------------------------------------------------------------ the fuzzer


class Fuzzer:
    """Strategies for every method of a gRPC service, derived from its descriptors.

    Args:
        known: names to reuse (see `Known`).
        service: the service descriptor; Braid's by default.
        max_depth: message nesting at which message-typed fields stop being set
            (deep chains of recursive messages go past it on purpose).
    """

    def __init__(self, known: Known, service: Any = SERVICE, max_depth: int = 6) -> None:
        self.known = known
        self.service = service
        self.max_depth = max_depth
        self._plans: dict[tuple[str, int], SearchStrategy[_Node | _Chain]] = {}
        self._chains: dict[str, SearchStrategy[_Chain] | None] = {}
        self._fields: dict[tuple[str, int], SearchStrategy[Any]] = {}
        fields = known.field_names
        dense = tuple(name for name, _ in known.dense_dims)
        self._pools: dict[str, tuple[str, ...]] = {
            "collection": known.collections,
            "request_name": known.collections + known.new_collections,
            "field": fields,
            "fields": known.text_fields,
            "text_fields": known.text_fields,
            "source_fields": known.text_fields,
            "payload_fields": known.payload_fields,
            "name": fields,
            "id": known.ids,
            "ids": known.ids,
            "text.key": known.text_fields,
            "boosts.key": known.text_fields,
            "dense.key": dense,
            "DenseQuery.field": dense,
            "SparseQuery.field": known.sparse_fields,
            "Match.field": known.payload_fields,
            "MatchAny.field": known.payload_fields,
            "Range.field": known.payload_fields,
            "Exists.field": known.payload_fields,
            "sparse.key": known.sparse_fields,
            "payload.key": known.payload_fields,
            **ENUM_LIKE,
        }
        words = st.sampled_from(known.words or ("fuzz",))
        self._phrases = st.lists(words, min_size=1, max_size=4).map(" ".join)
        self._words = words
        self._hostile = self._hostile_strings()

    # ------------------------------------------------------------- public

    def methods(self) -> list[MethodDescriptor]:
        return list(self.service.methods)

    def requests(self, method: MethodDescriptor) -> SearchStrategy[Any]:
        """One request message, or a list of 0-5 for a client-streaming method."""
        one = self.message(method.input_type)
        return st.lists(one, max_size=5) if method.client_streaming else one

    def raw_requests(self, method: MethodDescriptor) -> SearchStrategy[Any]:
        """Raw request bodies (bytes), as a list of 0-5 for a client-streaming method."""
        body = self.raw_bodies(method.input_type)
        if method.client_streaming:
            valid = self.message(method.input_type).map(lambda m: m.SerializeToString())
            return st.lists(st.one_of(body, valid), max_size=5)
        return body

    def message(self, desc: Descriptor) -> SearchStrategy[Message]:
        """Messages of type ``desc``, built in place from a drawn plan."""
        cls = message_factory.GetMessageClass(desc)
        plan = self._plan(desc, 0)

        @st.composite
        def message(draw: st.DrawFn) -> Message:  # composite, not .map: a failing case prints as the message
            return _build_message(cls, draw(plan))

        templates = [t for t in self.known.templates if t.DESCRIPTOR.full_name == desc.full_name]
        if not templates:
            return message()
        return weighted((1, self._mutated(cls, templates)), (1, message()))

    def _mutated(self, cls: type[Message], templates: list[Message]) -> SearchStrategy[Message]:
        """A copy of a valid template with 0-3 fields, anywhere in it, replaced by drawn values or cleared."""

        @st.composite
        def mutated(draw: st.DrawFn) -> Message:
            msg = cls()
            msg.CopyFrom(draw(st.sampled_from(templates)))
            for _ in range(draw(st.integers(0, 3))):
                node, depth = draw(st.sampled_from(list(_sub_messages(msg, 0))))
                fields = list(node.DESCRIPTOR.fields)
                if not fields:
                    continue
                field = draw(st.sampled_from(fields))
                node.ClearField(field.name)
                if draw(st.sampled_from((True, True, True, False))):  # False: leave it cleared
                    _assign(node, field, draw(self._field(field, depth)))
            return msg

        return mutated()

    def raw_bodies(self, desc: Descriptor) -> SearchStrategy[bytes]:
        """Wire bytes meant as a ``desc``: garbage, damaged valid ones, hand-encoded invalid UTF-8."""
        valid = self.message(desc).map(lambda m: m.SerializeToString())
        options = [
            st.binary(max_size=200),
            st.builds(_truncated, valid, st.integers(0, 999)),
            st.builds(_flipped, valid, st.lists(st.integers(0, 1 << 20), min_size=1, max_size=3)),
            st.builds(bytes.__add__, valid, self._unknown_fields()),
            st.builds(bytes.__add__, valid, self._wrong_wire_types(desc)),
            st.builds(bytes.__add__, valid, self._overlong_lengths(desc)),
        ]
        paths = _string_paths(desc)
        if paths:
            options.append(st.builds(bytes.__add__, valid, self._invalid_utf8(paths)))
            options.append(self._invalid_utf8(paths))
        return st.one_of(*options)

    # ------------------------------------------------------------- messages

    def _plan(self, desc: Descriptor, depth: int) -> SearchStrategy[_Node | _Chain]:
        key = (desc.full_name, depth)
        if key not in self._plans:
            self._plans[key] = st.deferred(lambda: self._plan_now(desc, depth))
        return self._plans[key]

    def _plan_now(self, desc: Descriptor, depth: int) -> SearchStrategy[_Node | _Chain]:
        leaf = depth >= self.max_depth

        def usable(field: FieldDescriptor) -> bool:
            return not (leaf and field.type == F.TYPE_MESSAGE and not is_map(field))

        real_oneofs = [o for o in desc.oneofs if not is_synthetic(o)]
        in_oneof = {f.full_name for o in real_oneofs for f in o.fields}
        plain = [(f, self._field(f, depth)) for f in desc.fields if f.full_name not in in_oneof and usable(f)]
        choices = [[(f, self._field(f, depth)) for f in o.fields if usable(f)] for o in real_oneofs]
        choices = [options for options in choices if options]
        aligned = {f.full_name for f, _ in plain if f.is_repeated and not is_map(f) and f.type != F.TYPE_MESSAGE}
        # The first two levels (the collection name, the queries, a batch's searches' fields) are set more
        # often than nested knobs, and shrink towards set: a minimal failing request still names its collection.
        present = st.sampled_from((True, True, True, True, True, False) if depth <= 1 else (False, True))
        oneof_picks = {n: st.sampled_from((-1, *(i for i in range(n) for _ in range(3)))) for n in map(len, choices)}

        @st.composite
        def node(draw: st.DrawFn) -> _Node:
            items: list[tuple[FieldDescriptor, Any]] = []
            for field, values in plain:
                if draw(present):
                    items.append((field, draw(values)))
            for options in choices:
                pick = draw(oneof_picks[len(options)])  # -1: leave the oneof unset
                if pick >= 0:
                    field, values = options[pick]
                    items.append((field, draw(values)))
            lists = [value for field, value in items if field.full_name in aligned and value]
            if len(lists) > 1 and draw(st.booleans()):
                # Parallel lists (sparse indices / values) of one length get past the length check.
                n = min(len(value) for value in lists)
                items = [(f, v[:n] if f.full_name in aligned else v) for f, v in items]
            return _Node(tuple(items), sum(_size(v) + 2 for _, v in items) + 16)

        strategy: SearchStrategy[_Node | _Chain] = node()
        chain = self._deep_chain(desc)
        if chain is not None and depth <= 2:
            strategy = weighted((20, strategy), (1, chain))
        return strategy

    def _deep_chain(self, desc: Descriptor) -> SearchStrategy[_Chain] | None:
        """Recursive messages (Filter -> Condition -> Filter) nested 5 to 1,000 levels deep."""
        if desc.full_name not in self._chains:
            path = _cycle(desc)
            self._chains[desc.full_name] = None
            if path is not None:
                leaf = self._plan(desc, max(1, self.max_depth - 2)).filter(lambda p: isinstance(p, _Node))
                self._chains[desc.full_name] = st.builds(
                    functools.partial(_Chain, path), st.sampled_from(_DEEP_LEVELS), leaf
                )
        return self._chains[desc.full_name]

    def _field(self, field: FieldDescriptor, depth: int) -> SearchStrategy[Any]:
        key = (field.full_name, depth)
        if key not in self._fields:
            self._fields[key] = self._field_now(field, depth)
        return self._fields[key]

    def _field_now(self, field: FieldDescriptor, depth: int) -> SearchStrategy[Any]:
        hint = f"{field.containing_type.name}.{field.name}"
        if hint not in self._pools:
            hint = field.name
        if hint == "name" and field.containing_type.name.endswith("Request"):
            hint = "request_name"  # CreateCollection / GetCollection / DeleteCollection
        if is_map(field):
            entry = field.message_type
            keys = self._single(entry.fields_by_name["key"], depth + 1, f"{field.name}.key")
            values = self._single(entry.fields_by_name["value"], depth + 1, field.name)
            return st.dictionaries(keys, values, max_size=3)
        single = self._single(field, depth, hint)
        if not field.is_repeated:
            return single
        if field.type == F.TYPE_MESSAGE:
            if depth > 0:  # no long lists in long lists
                return weighted((3, st.lists(single, min_size=1, max_size=max(1, 3 - depth // 2))), (1, st.just([])))
            lengths = st.sampled_from(_LONG_MESSAGE_LENGTHS)
            long = st.builds(_tile, st.lists(single, min_size=1, max_size=2), lengths)
            return weighted((6, st.lists(single, min_size=1, max_size=3)), (1, st.just([])), (1, long))
        if field.type == F.TYPE_FLOAT and hint == "values":
            return self._vector_values()
        short = st.lists(single, max_size=6)
        long = st.builds(_tile, st.lists(single, min_size=1, max_size=3), st.sampled_from(_LONG_LENGTHS))
        return weighted((4, short), (1, long))

    def _single(self, field: FieldDescriptor, depth: int, hint: str) -> SearchStrategy[Any]:
        kind = field.type
        if kind == F.TYPE_MESSAGE:
            return self._plan(field.message_type, depth + 1)
        if kind == F.TYPE_STRING:
            return self._strings(hint)
        if kind == F.TYPE_BYTES:
            return self._vector_bytes() if hint == "packed" else st.binary(max_size=32)
        if kind == F.TYPE_BOOL:
            return st.booleans()
        if kind == F.TYPE_ENUM:
            # The zero value (UNSPECIFIED) last: the shrink target and the most drawn value is a real one.
            declared = sorted((v.number for v in field.enum_type.values), key=lambda n: n == 0)
            unknown = (-1, max(declared) + 1, 99, 2**31 - 1, -(2**31))
            return weighted((4, st.sampled_from(declared)), (1, st.sampled_from(unknown)))
        if kind == F.TYPE_FLOAT:
            return _floats32()
        if kind == F.TYPE_DOUBLE:
            return _floats64()
        low, high = _INT_RANGES[kind]
        edges = tuple(v for v in _INT_EDGES if low <= v <= high)
        small = st.integers(max(low, -3), min(high, 20))
        return weighted((2, small), (2, st.sampled_from(edges)), (1, st.integers(low, high)))

    # ------------------------------------------------------------- values

    def _strings(self, hint: str) -> SearchStrategy[str]:
        pool = self._pools.get(hint, ())
        if hint in ("text", "tokens", "keyword"):
            good: SearchStrategy[str] = self._phrases if hint == "text" else self._words
        elif pool:
            good = st.sampled_from(pool)
        else:
            good = st.sampled_from(self.known.collections + self.known.field_names + self.known.ids)
        mangled = st.builds(lambda s, f: f(s), good, st.sampled_from(_MANGLERS))
        strategy = weighted((6, good), (2, mangled), (2, self._hostile))
        forbidden = self.known.forbidden
        return strategy.filter(lambda s: s not in forbidden) if forbidden else strategy

    def _hostile_strings(self) -> SearchStrategy[str]:
        names = self.known.collections + self.known.field_names
        return st.one_of(
            st.sampled_from(_WEIRD_STRINGS),
            st.text(max_size=12),
            st.text(st.characters(codec="utf-8", min_codepoint=0x80), max_size=6),
            st.builds(_repeat, st.sampled_from(_HUGE_CHUNKS), st.sampled_from(_HUGE_LENGTHS)),
            st.lists(st.sampled_from(names or ("x",)), min_size=2, max_size=3).map("\n".join),
        )

    def _vector_values(self) -> SearchStrategy[list[float]]:
        """Repeated floats of a vector: mostly a known dim, sometimes hostile components or lengths."""
        dims = st.sampled_from(self.known.dims)
        normal = dims.flatmap(lambda n: st.lists(st.floats(-1, 1, width=32), min_size=n, max_size=n))
        hostile = dims.flatmap(lambda n: st.lists(_floats32(), min_size=n, max_size=n))
        long = st.builds(_tile, st.lists(_floats32(), min_size=1, max_size=2), st.sampled_from((4097, 65537)))
        return weighted((5, normal), (1, hostile), (1, st.lists(_floats32(), max_size=12)), (1, long))

    def _vector_bytes(self) -> SearchStrategy[bytes]:
        """Packed little-endian float32: right length, NaN / inf patterns, odd lengths, random, huge."""
        dims = st.sampled_from(self.known.dims)
        normal = dims.flatmap(lambda n: st.lists(st.floats(-1, 1, width=32), min_size=n, max_size=n)).map(_pack)
        patterns = st.builds(lambda n, p: p * n, dims, st.sampled_from(_F32_PATTERNS))
        one_bad = st.builds(lambda n, p: b"\x00\x00\x80\x3f" * (n - 1) + p, dims, st.sampled_from(_F32_PATTERNS))
        odd = st.builds(lambda n, extra: b"\x00" * (4 * n + extra), dims, st.sampled_from((-3, -1, 1, 2, 3)))
        huge = st.sampled_from((65536, 65537)).map(lambda n: b"\x00\x00\x80\x3f" * n)
        return weighted((6, normal), (1, patterns), (1, one_bad), (1, odd), (1, st.binary(max_size=64)), (1, huge))

    # ------------------------------------------------------------- raw wire bytes

    def _invalid_utf8(self, paths: list[tuple[int, ...]]) -> SearchStrategy[bytes]:
        def encode(path: tuple[int, ...], bad: bytes) -> bytes:
            body = length_delimited(path[-1], bad)
            for number in reversed(path[:-1]):
                body = length_delimited(number, body)
            return body

        return st.builds(encode, st.sampled_from(paths), st.sampled_from(_INVALID_UTF8))

    @staticmethod
    def _unknown_fields() -> SearchStrategy[bytes]:
        """Fields the schema does not have; a decoder must skip them (groups 3 / 4 are malformed)."""
        number = st.sampled_from((999, 15, 536_870_911))
        return st.one_of(
            st.builds(lambda n, v: tag(n, 0) + varint(v), number, st.integers(0, 2**64 - 1)),
            st.builds(lambda n, b: length_delimited(n, b), number, st.binary(max_size=16)),
            st.builds(lambda n: tag(n, 5) + b"\x00\x00\x80\x7f", number),
            st.builds(lambda n: tag(n, 1) + b"\x00" * 8, number),
            st.builds(lambda n, w: tag(n, w), number, st.sampled_from((3, 4, 6, 7))),
            st.just(b"\x00"),  # field number 0
        )

    @staticmethod
    def _wrong_wire_types(desc: Descriptor) -> SearchStrategy[bytes]:
        numbers = [f.number for f in desc.fields] or [1]
        return st.one_of(
            st.builds(lambda n, v: tag(n, 0) + varint(v), st.sampled_from(numbers), st.integers(0, 2**64 - 1)),
            st.builds(lambda n: tag(n, 5) + b"\xff\xff\xff\xff", st.sampled_from(numbers)),
            st.builds(lambda n: tag(n, 1) + b"\xff" * 8, st.sampled_from(numbers)),
            st.builds(lambda n, b: length_delimited(n, b), st.sampled_from(numbers), st.binary(max_size=16)),
        )

    @staticmethod
    def _overlong_lengths(desc: Descriptor) -> SearchStrategy[bytes]:
        numbers = [f.number for f in desc.fields] or [1]
        lengths = st.sampled_from((5, 2**31 - 1, 2**32 + 1, 2**63))
        return st.builds(lambda n, length: tag(n, 2) + varint(length) + b"ab", st.sampled_from(numbers), lengths)


def weighted(*options: tuple[int, SearchStrategy[Any]]) -> SearchStrategy[Any]:
    """One of ``options``, each drawn in proportion to its weight; shrinks towards the first.

    (``st.one_of`` drops repeated branches, so repeating a strategy there does not weight it.)
    """
    picks = st.sampled_from([i for i, (weight, _) in enumerate(options) for _ in range(weight)])
    strategies = [strategy for _, strategy in options]

    @st.composite
    def pick(draw: st.DrawFn) -> Any:
        return draw(strategies[draw(picks)])

    return pick()


def _sub_messages(msg: Message, depth: int, limit: int = 8) -> Iterator[tuple[Message, int]]:
    """The messages inside ``msg`` (itself included) down to ``limit`` levels, with their depth."""
    yield msg, depth
    if depth >= limit:  # a deep chain drawn by an earlier mutation
        return
    for field, value in msg.ListFields():
        if field.type != F.TYPE_MESSAGE:
            continue
        if is_map(field):
            children = list(value.values()) if field.message_type.fields_by_name["value"].message_type else []
        else:
            children = list(value) if field.is_repeated else [value]
        for child in children:
            yield from _sub_messages(child, depth + 1)


def _floats32() -> SearchStrategy[float]:
    return weighted((1, st.sampled_from(_F32_EDGES)), (2, st.floats(-1, 1, width=32)), (1, st.floats(width=32)))


def _floats64() -> SearchStrategy[float]:
    return weighted((1, st.sampled_from(_F64_EDGES)), (2, st.floats(-1e6, 1e6)), (1, st.floats()))


def _cycle(desc: Descriptor) -> tuple[FieldDescriptor, ...] | None:
    """The shortest chain of message fields that leads from ``desc`` back to itself, if any."""
    frontier: list[tuple[Descriptor, tuple[FieldDescriptor, ...]]] = [(desc, ())]
    seen = {desc.full_name}
    while frontier:
        current, path = frontier.pop(0)
        for field in current.fields:
            if field.type != F.TYPE_MESSAGE or is_map(field):
                continue
            child = field.message_type
            if child.full_name == desc.full_name:
                return (*path, field)
            if child.full_name not in seen:
                seen.add(child.full_name)
                frontier.append((child, (*path, field)))
    return None


def _string_paths(desc: Descriptor, limit: int = 4) -> list[tuple[int, ...]]:
    """Field-number paths from ``desc`` to every string field within ``limit`` levels (map keys included)."""
    out: list[tuple[int, ...]] = []

    def walk(current: Descriptor, path: tuple[int, ...], seen: frozenset[str]) -> None:
        for field in current.fields:
            here = (*path, field.number)
            if field.type == F.TYPE_STRING:
                out.append(here)
            elif field.type == F.TYPE_MESSAGE and len(here) < limit and field.message_type.full_name not in seen:
                walk(field.message_type, here, seen | {field.message_type.full_name})

    walk(desc, (), frozenset({desc.full_name}))
    return out
