"""PayloadStore: filter evaluation against a pure-Python reference, validation messages, save/load."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from braid.index.errors import DataLoss, InvalidArgument
from braid.index.filters import Exists, Filter, Match, MatchAny, Range
from braid.index.payload import PayloadStore
from braid.index.schema import PayloadFieldSpec, PayloadType

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
T0 = 1_700_000_000_000_000  # microseconds since the epoch
FIELDS = (
    PayloadFieldSpec("tag", PayloadType.KEYWORD),
    PayloadFieldSpec("count", PayloadType.INT),
    PayloadFieldSpec("price", PayloadType.FLOAT),
    PayloadFieldSpec("flag", PayloadType.BOOL),
    PayloadFieldSpec("ts", PayloadType.DATETIME),
)
TYPES = {spec.name: spec.type for spec in FIELDS}
NUMERIC = ("count", "price", "ts")
TAGS = ("red", "green", "blue", "ünïcødé", "")
PRICES = (-1.5, 0.0, -0.0, 0.5, 2.0, 3.25, 2.0**53, 1e300)


# ---------------------------------------------------------------- reference


def normalized(values: dict) -> dict:
    """What the store holds for ``values``: float fields as floats."""
    return {k: float(v) if TYPES[k] is PayloadType.FLOAT else v for k, v in values.items()}


def ref_condition(doc: dict, cond: object) -> bool:
    if isinstance(cond, Filter):
        return ref_filter(doc, cond)
    if isinstance(cond, Exists):
        return cond.field in doc
    if cond.field not in doc:
        return False
    value = doc[cond.field]
    if isinstance(cond, Match):
        return value == cond.value
    if isinstance(cond, MatchAny):
        return any(value == v for v in cond.values)
    assert isinstance(cond, Range)
    return (
        (cond.gt is None or value > cond.gt)
        and (cond.gte is None or value >= cond.gte)
        and (cond.lt is None or value < cond.lt)
        and (cond.lte is None or value <= cond.lte)
    )


def ref_filter(doc: dict, flt: Filter) -> bool:
    return (
        all(ref_condition(doc, c) for c in flt.must)
        and (not flt.should or any(ref_condition(doc, c) for c in flt.should))
        and not any(ref_condition(doc, c) for c in flt.must_not)
    )


def ref_mask(docs: list[dict | None], flt: Filter, size: int) -> np.ndarray:
    def doc_at(label: int) -> dict:
        return (docs[label] if label < len(docs) else None) or {}

    return np.array([ref_filter(doc_at(label), flt) for label in range(size)], dtype=bool)


def build(docs: list[dict | None]) -> PayloadStore:
    """A store holding ``docs`` by label; None marks a label that is never set."""
    store = PayloadStore(FIELDS)
    for label, values in enumerate(docs):
        if values is not None:
            store.validate(values)
            store.set(label, values)
    return store


# ------------------------------------------------------------ fixed dataset


def random_docs(n: int, seed: int) -> list[dict | None]:
    rng = random.Random(seed)
    makers = {
        "tag": lambda: rng.choice(TAGS),
        "count": lambda: (
            rng.choice((rng.randint(-20, 20), INT64_MIN, INT64_MAX)) if rng.random() < 0.05 else rng.randint(-20, 20)
        ),
        "price": lambda: (
            rng.choice(PRICES) if rng.random() < 0.3 else rng.choice((rng.uniform(-100, 100), rng.randint(-5, 5)))
        ),
        "flag": lambda: rng.random() < 0.5,
        "ts": lambda: T0 + rng.randint(-1000, 1000),
    }
    docs: list[dict | None] = []
    for _ in range(n):
        if rng.random() < 0.1:
            docs.append(None)  # a skipped label
        else:
            docs.append({name: make() for name, make in makers.items() if rng.random() < 0.7})
    docs.extend([None, None])  # trailing labels never set: beyond store.size
    return docs


FIXED_FILTERS = [
    Filter(),
    Filter(must=(Match("tag", "red"),)),
    Filter(must=(Match("tag", "ünïcødé"),)),
    Filter(must=(Match("tag", ""),)),
    Filter(must=(Match("tag", "never-seen"),)),
    Filter(must_not=(Match("tag", "never-seen"),)),
    Filter(must=(MatchAny("tag", ("red", "blue", "never-seen")),)),
    Filter(must=(MatchAny("tag", ("never-seen",)),)),
    Filter(must=(Match("count", 3),)),
    Filter(must=(Match("count", INT64_MAX),)),
    Filter(must=(MatchAny("count", (1, 2, INT64_MIN)),)),
    Filter(must=(Match("price", 0.5),)),
    Filter(must=(Match("price", 0),)),
    Filter(must=(Match("price", -0.0),)),
    Filter(must=(Match("price", 2**53 + 1),)),
    Filter(must=(MatchAny("price", (0.5, 2, 1e300)),)),
    Filter(must=(Match("flag", True),)),
    Filter(must=(Match("flag", False),)),
    Filter(must=(MatchAny("flag", (True, False)),)),
    Filter(must=(Match("ts", T0),)),
    Filter(must=(MatchAny("ts", (T0 - 1, T0, T0 + 1)),)),
    Filter(must=(Range("count", gt=-3),)),
    Filter(must=(Range("count", gte=-3, lt=5),)),
    Filter(must=(Range("count", lte=0),)),
    Filter(must=(Range("count", gt=2.5, lte=7.9),)),
    Filter(must=(Range("count", gte=-2.5, lt=-0.5),)),
    Filter(must=(Range("count", gt=2**70),)),
    Filter(must=(Range("count", lt=-(2**70)),)),
    Filter(must=(Range("count", gte=INT64_MAX),)),
    Filter(must=(Range("count", lte=INT64_MIN),)),
    Filter(must=(Range("count", gt=5, lt=5),)),
    Filter(must=(Range("price", gt=0.0),)),
    Filter(must=(Range("price", gte=-1.5, lte=2),)),
    Filter(must=(Range("price", lt=0.5),)),
    Filter(must=(Range("price", gt=2**53 + 1),)),
    Filter(must=(Range("price", lte=2**53 + 1),)),
    Filter(must=(Range("price", lt=2**1100),)),
    Filter(must=(Range("ts", gte=T0),)),
    Filter(must=(Range("ts", gt=T0 - 10, lt=T0 + 10),)),
    Filter(must=(Range("ts", gt=T0 + 0.5, lte=float(T0 + 100)),)),
    Filter(must=(Exists("tag"),)),
    Filter(must=(Exists("count"),)),
    Filter(must=(Exists("price"),)),
    Filter(must=(Exists("flag"),)),
    Filter(must=(Exists("ts"),)),
    Filter(must_not=(Exists("tag"),)),
    Filter(must_not=(Match("flag", True),)),
    Filter(must_not=(Range("count", gt=0),)),
    Filter(must=(Match("tag", "red"), Range("price", gt=0), Match("flag", True))),
    Filter(should=(Match("tag", "red"), Range("count", lt=-10))),
    Filter(should=(Match("tag", "never-seen"),)),
    Filter(must=(Exists("ts"),), should=(Match("flag", False), Match("tag", "blue")), must_not=(Match("count", 0),)),
    Filter(must=(Filter(should=(Match("tag", "red"), Match("tag", "green"))), Filter(must_not=(Exists("price"),)))),
    Filter(must_not=(Filter(must=(Match("flag", True), Range("ts", lt=T0))),)),
    Filter(should=(Filter(), Match("tag", "never-seen"))),
    Filter(must=(Filter(must=(Filter(should=(Range("price", gte=3.25), Exists("count"))),)),)),
]


@pytest.fixture(scope="module")
def fixed() -> tuple[list[dict | None], PayloadStore]:
    docs = random_docs(3000, seed=7)
    return docs, build(docs)


def test_size_is_last_set_label_plus_one(fixed):
    docs, store = fixed
    assert store.size == max(i for i, d in enumerate(docs) if d is not None) + 1


@pytest.mark.parametrize("flt", FIXED_FILTERS, ids=range(len(FIXED_FILTERS)))
def test_evaluate_matches_reference(fixed, flt):
    docs, store = fixed
    store.validate_filter(flt)
    ref_docs = [normalized(d) if d is not None else None for d in docs]
    for size in (store.size, store.size + 37, store.size // 3, 0):
        got = store.evaluate(flt, size)
        assert got.dtype == bool and got.shape == (size,)
        np.testing.assert_array_equal(got, ref_mask(ref_docs, flt, size), err_msg=f"size={size}")


def test_skipped_and_unset_labels_are_absent_everywhere(fixed):
    docs, store = fixed
    skipped = [i for i, d in enumerate(docs) if d is None and i < store.size]
    assert skipped
    size = store.size + 10
    for name in TYPES:
        mask = store.evaluate(Filter(must=(Exists(name),)), size)
        assert not mask[skipped].any() and not mask[store.size :].any()
    everything_but = store.evaluate(Filter(must_not=(Match("tag", "red"), Range("count", gt=0))), size)
    assert everything_but[skipped].all() and everything_but[store.size :].all()
    assert store.get(skipped[0]) == {} and store.get(store.size + 5) == {}


def test_evaluate_returns_a_fresh_array(fixed):
    _, store = fixed
    flt = Filter(must=(Exists("count"),))
    first = store.evaluate(flt, store.size)
    first[:] = False
    np.testing.assert_array_equal(store.evaluate(flt, store.size), store.evaluate(flt, store.size))
    assert store.evaluate(flt, store.size).any()


def test_get_returns_python_values(fixed):
    docs, store = fixed
    for label, values in enumerate(docs):
        got = store.get(label)
        assert got == (normalized(values) if values else {})
        for name, value in got.items():
            assert type(value) is type(normalized(values)[name])
    label = next(i for i, d in enumerate(docs) if d and {"tag", "price"} <= d.keys())
    assert store.get(label, ["price", "tag", "nope"]) == normalized({k: docs[label][k] for k in ("price", "tag")})
    assert store.get(label, []) == {}
    assert store.get(-1) == {}


def test_set_again_replaces_all_fields():
    store = PayloadStore(FIELDS)
    store.set(0, {"tag": "a", "count": 1, "price": 1.0, "flag": True, "ts": T0})
    store.set(2, {"tag": "b"})
    store.set(0, {"count": 2})
    assert store.get(0) == {"count": 2}
    assert store.size == 3
    assert store.evaluate(Filter(must=(Exists("tag"),)), 4).tolist() == [False, False, True, False]


def test_set_with_no_values_still_covers_the_label():
    store = PayloadStore(FIELDS)
    store.set(5, {})
    assert store.size == 6
    assert store.evaluate(Filter(must_not=(Exists("tag"),)), 6).all()


def test_store_grows_past_its_initial_capacity():
    store = PayloadStore(FIELDS)
    labels = [0, 1, 63, 64, 65, 500, 5000, 70_000]
    for label in labels:
        store.set(label, {"count": label, "tag": f"t{label % 3}"})
    assert store.size == 70_001
    assert np.flatnonzero(store.evaluate(Filter(must=(Exists("count"),)), store.size)).tolist() == labels
    assert [store.get(label)["count"] for label in labels] == labels


def test_match_any_with_many_values():
    rng = random.Random(11)
    docs: list[dict | None] = [
        {"tag": f"k{rng.randrange(40)}", "count": rng.randrange(40), "price": rng.randrange(40) / 4}
        if rng.random() < 0.8
        else None
        for _ in range(2000)
    ]
    store = build(docs)
    ref_docs = [normalized(d) if d is not None else None for d in docs]
    for k in (1, 2, 16, 17, 30):
        for flt in (
            Filter(must=(MatchAny("tag", (*(f"k{i}" for i in range(0, 2 * k, 2)), "never-seen")),)),
            Filter(must=(MatchAny("count", tuple(range(1, 3 * k, 3))),)),
            Filter(must_not=(MatchAny("price", tuple(i / 4 for i in range(k))),)),
        ):
            store.validate_filter(flt)
            np.testing.assert_array_equal(store.evaluate(flt, len(docs) + 3), ref_mask(ref_docs, flt, len(docs) + 3))


# --------------------------------------------------------------- hypothesis


def value_strategy(name: str) -> st.SearchStrategy:
    return {
        "tag": st.sampled_from(TAGS),
        "count": st.one_of(st.integers(-4, 4), st.sampled_from((INT64_MIN, INT64_MAX))),
        "price": st.one_of(st.sampled_from(PRICES), st.integers(-3, 3)),
        "flag": st.booleans(),
        "ts": st.integers(T0 - 3, T0 + 3),
    }[name]


def query_value_strategy(name: str) -> st.SearchStrategy:
    if name == "tag":
        return st.sampled_from((*TAGS, "never-seen"))
    if name == "price":
        return st.one_of(value_strategy(name), st.sampled_from((2**53 + 1, 7.75)))
    return value_strategy(name)


def bound_strategy(name: str) -> st.SearchStrategy:
    center = T0 if name == "ts" else 0
    return st.one_of(
        st.integers(center - 6, center + 6),
        st.floats(center - 6, center + 6, allow_nan=False, allow_infinity=False),
        st.sampled_from((2**53 + 1, -(2**53) - 1, 2**64, -(2**64), INT64_MAX, INT64_MIN, 2**1100, 1e300)),
    )


def range_strategy(name: str) -> st.SearchStrategy:
    bound = st.none() | bound_strategy(name)
    return st.builds(Range, st.just(name), gt=bound, gte=bound, lt=bound, lte=bound).filter(
        lambda r: any(b is not None for b in (r.gt, r.gte, r.lt, r.lte))
    )


def leaf_strategy() -> st.SearchStrategy:
    leaves = []
    for name in TYPES:
        values = query_value_strategy(name)
        leaves.append(st.builds(Match, st.just(name), values))
        leaves.append(st.builds(MatchAny, st.just(name), st.lists(values, min_size=1, max_size=4).map(tuple)))
        leaves.append(st.just(Exists(name)))
        if name in NUMERIC:
            leaves.append(range_strategy(name))
    return st.one_of(leaves)


def filter_of(conditions: st.SearchStrategy) -> st.SearchStrategy:
    clause = st.lists(conditions, max_size=3).map(tuple)
    return st.builds(Filter, must=clause, should=clause, must_not=clause)


FILTERS = filter_of(st.recursive(leaf_strategy(), filter_of, max_leaves=8))
DOCS = st.lists(
    st.none() | st.fixed_dictionaries({}, optional={name: value_strategy(name) for name in TYPES}),
    max_size=40,
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=DOCS, flt=FILTERS, extra=st.integers(-5, 5))
def test_random_filters_match_reference(docs, flt, extra):
    store = build(docs)
    store.validate_filter(flt)
    size = max(0, len(docs) + extra)
    ref_docs = [normalized(d) if d is not None else None for d in docs]
    np.testing.assert_array_equal(store.evaluate(flt, size), ref_mask(ref_docs, flt, size))


# --------------------------------------------------------------- validation


@pytest.fixture
def store() -> PayloadStore:
    return PayloadStore(FIELDS)


def test_validate_accepts_good_values(store):
    store.validate({"tag": "x" * 1024, "count": INT64_MIN, "price": 3, "flag": False, "ts": T0})
    store.validate({"tag": "é" * 512, "count": INT64_MAX, "price": -0.5})
    store.validate({})


@pytest.mark.parametrize(
    ("values", "path", "words"),
    [
        ({"nope": 1}, "payload.nope", ["unknown", "tag", "count", "price", "flag", "ts"]),
        ({"count": True}, "payload.count", ["int", "bool"]),
        ({"count": 1.0}, "payload.count", ["int", "float"]),
        ({"count": "1"}, "payload.count", ["int", "str"]),
        ({"count": 1 << 63}, "payload.count", ["int64"]),
        ({"price": True}, "payload.price", ["float", "bool"]),
        ({"price": "1.5"}, "payload.price", ["float", "str"]),
        ({"price": math.nan}, "payload.price", ["finite"]),
        ({"price": math.inf}, "payload.price", ["finite"]),
        ({"price": 10**400}, "payload.price", ["float64"]),
        ({"flag": 1}, "payload.flag", ["bool", "int"]),
        ({"ts": 1.5}, "payload.ts", ["int", "float"]),
        ({"ts": False}, "payload.ts", ["int", "bool"]),
        ({"tag": 5}, "payload.tag", ["keyword", "int"]),
        ({"tag": "x" * 1025}, "payload.tag", ["1025", "1024"]),
        ({"tag": "é" * 513}, "payload.tag", ["1026", "1024"]),
        ({"tag": "\ud800"}, "payload.tag", ["UTF-8"]),
        ({"tag": ["a", "b"]}, "payload.tag", ["list"]),
        ({"count": [1]}, "payload.count", ["list"]),
        ({"tag": None}, "payload.tag", ["NoneType"]),
    ],
)
def test_validate_rejects(store, values, path, words):
    with pytest.raises(InvalidArgument) as info:
        store.validate(values)
    message = str(info.value)
    assert message.startswith(f"{path}:"), message
    for word in words:
        assert word in message, message


def test_validate_uses_the_given_prefix(store):
    with pytest.raises(InvalidArgument, match=r"^documents\[3\]\.payload\.nope: "):
        store.validate({"nope": 1}, where="documents[3].payload")
    with pytest.raises(InvalidArgument, match="declared: none"):
        PayloadStore([]).validate({"a": 1})


def test_validate_filter_accepts_good_filters(store):
    for flt in FIXED_FILTERS:
        store.validate_filter(flt)


@pytest.mark.parametrize(
    ("flt", "path", "words"),
    [
        (Filter(must=(Exists("tag"), Range("price"))), "filter.must[1].range.price", ["at least one"]),
        # An undeclared field is a metadata path (index/metadata.py), checked as one.
        (Filter(must=(Match("no..pe", 1),)), "filter.must[0].match.no..pe", ["empty key"]),
        (Filter(should=(Exists(""),)), "filter.should[0].exists.", ["must not be empty"]),
        (Filter(must_not=(MatchAny("nope", ()),)), "filter.must_not[0].any.nope", ["at least one value"]),
        (Filter(must=(Range("nope"),)), "filter.must[0].range.nope", ["at least one of"]),
        (Filter(must=(Range("nope", gt="1"),)), "filter.must[0].range.nope.gt", ["finite number"]),
        (Filter(must=(Range("tag", gt=1),)), "filter.must[0].range.tag", ["keyword"]),
        (Filter(must=(Range("flag", gt=0),)), "filter.must[0].range.flag", ["bool"]),
        (Filter(must=(Range("count", gt="1"),)), "filter.must[0].range.count.gt", ["str"]),
        (Filter(must=(Range("count", gte=True),)), "filter.must[0].range.count.gte", ["bool"]),
        (Filter(must=(Range("price", lt=math.nan),)), "filter.must[0].range.price.lt", ["finite"]),
        (Filter(must=(Range("ts", lte=math.inf),)), "filter.must[0].range.ts.lte", ["finite"]),
        (Filter(must=(MatchAny("tag", ()),)), "filter.must[0].any.tag", ["at least one"]),
        (Filter(must=(MatchAny("count", (1, "2")),)), "filter.must[0].any.count.values[1]", ["int", "str"]),
        (Filter(must=(Match("count", True),)), "filter.must[0].match.count", ["int", "bool"]),
        (Filter(must=(Match("count", 1.0),)), "filter.must[0].match.count", ["int", "float"]),
        (Filter(must=(Match("flag", 1),)), "filter.must[0].match.flag", ["bool", "int"]),
        (Filter(must=(Match("tag", 1),)), "filter.must[0].match.tag", ["keyword", "int"]),
        (Filter(must=(Match("price", math.nan),)), "filter.must[0].match.price", ["finite"]),
        (Filter(must=(Match("ts", 1.5),)), "filter.must[0].match.ts", ["int", "float"]),
        (
            Filter(should=(Filter(must_not=(Exists("tag"), Match("nope", math.nan))),)),
            "filter.should[0].filter.must_not[1].match.nope",
            ["finite"],
        ),
        (Filter(must=("tag",)), "filter.must[0]", ["unknown condition", "str"]),
    ],
)
def test_validate_filter_rejects(store, flt, path, words):
    with pytest.raises(InvalidArgument) as info:
        store.validate_filter(flt)
    message = str(info.value)
    assert message.startswith(f"{path}:"), message
    for word in words:
        assert word in message, message


def test_validate_filter_allows_match_on_float_and_int_on_float(store):
    store.validate_filter(Filter(must=(Match("price", 0.5), Match("price", 2), MatchAny("price", (1, 1.5)))))
    with pytest.raises(InvalidArgument, match=r"^search\.filter\.must\[0\]\.match\.no\.\.pe: "):
        store.validate_filter(Filter(must=(Match("no..pe", 1),)), where="search.filter")


def test_validate_filter_limits_nesting(store):
    flt = Filter(must=(Exists("tag"),))
    for _ in range(100):
        flt = Filter(must=(flt,))
    with pytest.raises(InvalidArgument, match="nest deeper"):
        store.validate_filter(flt)


def test_evaluate_undeclared_field_without_metadata_matches_nothing(store):
    # An undeclared field names metadata; a store evaluated without a MetadataStore has none.
    assert store.evaluate(Filter(must=(Exists("nope"),)), 3).tolist() == [False] * 3
    assert store.evaluate(Filter(must_not=(Match("nope", 1),)), 3).tolist() == [True] * 3


def test_evaluate_on_empty_store(store):
    assert store.evaluate(Filter(), 4).tolist() == [True] * 4
    assert store.evaluate(Filter(must_not=(Match("tag", "a"),)), 3).tolist() == [True] * 3
    assert store.evaluate(Filter(must=(Range("count", gt=0),)), 3).tolist() == [False] * 3
    assert store.evaluate(Filter(), 0).shape == (0,)


# -------------------------------------------------------------- persistence


def test_save_load_round_trip(fixed, tmp_path: Path):
    docs, store = fixed
    store.save(tmp_path)
    assert (tmp_path / "payload.json").exists()
    loaded = PayloadStore.load(tmp_path, FIELDS)
    assert loaded.size == store.size
    for label in range(len(docs) + 2):
        assert loaded.get(label) == store.get(label)
    for flt in FIXED_FILTERS:
        for size in (store.size, store.size + 5):
            np.testing.assert_array_equal(loaded.evaluate(flt, size), store.evaluate(flt, size))
    # the loaded store keeps growing and interning new keywords
    loaded.set(loaded.size + 3, {"tag": "fresh", "count": 1})
    assert loaded.evaluate(Filter(must=(Match("tag", "fresh"),)), loaded.size).sum() == 1
    assert (
        loaded.evaluate(Filter(must=(Match("tag", "red"),)), loaded.size).sum()
        == store.evaluate(Filter(must=(Match("tag", "red"),)), store.size).sum()
    )


def test_load_of_a_directory_without_files_is_empty(tmp_path: Path):
    loaded = PayloadStore.load(tmp_path, FIELDS)
    assert loaded.size == 0
    assert loaded.evaluate(Filter(must=(Exists("tag"),)), 2).tolist() == [False, False]


def test_save_load_empty_store(tmp_path: Path):
    PayloadStore(FIELDS).save(tmp_path)
    loaded = PayloadStore.load(tmp_path, FIELDS)
    assert loaded.size == 0
    loaded.set(0, {"flag": True})
    assert loaded.get(0) == {"flag": True}


def test_load_with_a_field_not_saved_treats_it_as_absent(tmp_path: Path):
    old = PayloadStore(FIELDS[:2])
    old.set(1, {"tag": "a", "count": 4})
    old.save(tmp_path)
    loaded = PayloadStore.load(tmp_path, FIELDS)
    assert loaded.get(1) == {"tag": "a", "count": 4}
    assert not loaded.evaluate(Filter(must=(Exists("price"),)), 2).any()


def test_load_detects_corruption(tmp_path: Path):
    store = PayloadStore(FIELDS)
    store.set(3, {"count": 1})
    store.save(tmp_path)
    np.save(tmp_path / "payload-count.values.npy", np.zeros(2, np.int64))
    with pytest.raises(DataLoss, match=r"payload-count\.values\.npy"):
        PayloadStore.load(tmp_path, FIELDS)
    (tmp_path / "payload-count.values.npy").unlink()
    with pytest.raises(DataLoss):
        PayloadStore.load(tmp_path, FIELDS)
    with pytest.raises(DataLoss, match="tag"):
        PayloadStore.load(tmp_path, [PayloadFieldSpec("tag", PayloadType.INT)])


# -------------------------------------------------------------- performance


def test_evaluate_is_vectorized_over_a_million_labels():
    store = PayloadStore(FIELDS)
    rng = random.Random(3)
    expected = set()
    for label in [*sorted(rng.sample(range(999_999), 3000)), 999_999]:
        values = {"tag": rng.choice(TAGS), "price": rng.uniform(0, 10), "flag": rng.random() < 0.5}
        store.set(label, values)
        if values["tag"] == "red" and values["price"] > 5 and not values["flag"]:
            expected.add(label)
    flt = Filter(must=(Match("tag", "red"), Range("price", gt=5)), must_not=(Match("flag", True),))
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        mask = store.evaluate(flt, 1_000_000)
        timings.append(time.perf_counter() - start)
    assert set(np.flatnonzero(mask).tolist()) == expected
    assert min(timings) < 0.1, timings
