"""Load-test scenarios: TOML files that name the collection, its data, the request mix and the load.

A scenario file (``loadtest/scenarios/NAME.toml``) has one table per section below; every key
is optional except ``name``, ``[data] kind`` and ``[search] strands``. A key ending in ``_s``
takes seconds or a duration string (``"90s"``, ``"2m"``, ``"1h"``)::

    name = "dense"
    description = "what it measures"
    [collection]  name, shards, replication_factor, m, ef_construction, tags, encoder, analyzer
    [data]        kind = "vectors" (the seeded vector set, loadtest/vectors.py: n >= 100, dim, queries)
                  | "beir" (a ../shared/data collection: collection, max_docs, max_queries)
    [search]      strands = ["dense"] | ["bm25"] | ["bm25", "dense_text"] ..., limit, ef, filter
    [mix]         search, upsert (shares of the arrivals), upsert_batch, upsert_pool
    [bulk]        streams (BulkUpsert streams open beside the searches), batch, batches_per_s,
                  batches_per_stream, pool, timeout_s (of one stream)
    [load]        rate, duration_s, warmup_s, timeout_s, arrivals ("uniform" | "poisson")
    [find_max]    start, factor, max_rate, step_s, refine
    [soak]        duration_s, warmup_s, sample_s

``--set section.key=value`` on the command line overrides any key before validation; the
value is read as a TOML value (``--set data.n=2000``, ``--set data.collection="cranfield"``)
and taken as a plain string when it does not parse as one.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCENARIOS_DIR = Path(__file__).resolve().parent / "scenarios"
DATA_KINDS = ("vectors", "beir")
# Strand names a scenario's searches may use, and the data kind each needs.
STRANDS = {"dense": "vectors", "bm25": "beir", "dense_text": "beir"}
FILTERS = ("", "tag")
ARRIVALS = ("uniform", "poisson")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class ScenarioError(ValueError):
    """A scenario file or an override is invalid; the message names the key and the valid choices."""


def parse_duration(value: str | float | int, where: str = "duration") -> float:
    """Seconds from a number or a string such as ``"250ms"``, ``"30s"``, ``"2m"``, ``"1h"`` or ``"1m30s"``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?", text)
        if not text or "".join(f"{n}{u}" for n, u in parts) != text.replace(" ", ""):
            raise ScenarioError(f"{where}: not a duration: {value!r} (e.g. 30, '30s', '2m', '1h', '250ms')")
        seconds = sum(float(n) * _UNITS[u or "s"] for n, u in parts)
    if seconds < 0:
        raise ScenarioError(f"{where}: must not be negative, got {value!r}")
    return seconds


@dataclass(frozen=True)
class CollectionSpec:
    name: str = ""  # default: "loadtest_" + the scenario's name
    shards: int = 1
    replication_factor: int = 0  # 0: the server's default
    m: int = 16  # HNSW of the dense field (vectors data)
    ef_construction: int = 100
    tags: int = 0  # > 0: a KEYWORD payload field "tag" with values t0 .. t{tags-1}, by document ordinal
    encoder: str = ""  # beir data: a dense field "dense" encoded by this model from "body" (hybrid)
    analyzer: str = "english"


@dataclass(frozen=True)
class DataSpec:
    kind: str = "vectors"
    n: int = 20_000  # vectors: base vectors (loadtest/vectors.py)
    dim: int = 384
    queries: int = 2000
    collection: str = "scifact"  # beir: a folder of ../shared/data
    max_docs: int = 0  # beir: the first max_docs documents (0: all)
    max_queries: int = 0  # beir: the first max_queries judged queries (0: all)


@dataclass(frozen=True)
class SearchSpec:
    strands: tuple[str, ...] = ("dense",)
    limit: int = 10
    ef: int = 0  # dense strand's ef (0: the field's default)
    filter: str = ""  # "tag": every search filters on tag == t{i % tags}


@dataclass(frozen=True)
class MixSpec:
    search: float = 1.0
    upsert: float = 0.0
    upsert_batch: int = 1  # documents per Upsert call
    upsert_pool: int = 512  # distinct Upsert requests (their ids repeat: upsert replaces)


@dataclass(frozen=True)
class BulkSpec:
    streams: int = 0  # BulkUpsert streams kept open beside the searches
    batch: int = 100  # documents per message
    batches_per_s: float = 5.0  # per stream
    batches_per_stream: int = 20  # then the stream is closed (its status recorded) and another opened
    pool: int = 8  # distinct batches, sent in turn
    timeout_s: float = 60.0  # deadline of one stream: a slow server stretches it, and the docs/s show that


@dataclass(frozen=True)
class LoadSpec:
    rate: float = 100.0  # arrivals per second, all client processes together
    duration_s: float = 30.0
    warmup_s: float = 2.0  # at the start rate, not counted in the totals
    timeout_s: float = 5.0  # deadline of each call
    arrivals: str = "uniform"


@dataclass(frozen=True)
class FindMaxSpec:
    start: float = 50.0
    factor: float = 1.5
    max_rate: float = 5000.0
    step_s: float = 10.0
    refine: int = 2  # bisection steps between the last passing and the first failing rate


@dataclass(frozen=True)
class SoakSpec:
    duration_s: float = 120.0
    warmup_s: float = 30.0
    sample_s: float = 10.0


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str = ""
    collection: CollectionSpec = field(default_factory=CollectionSpec)
    data: DataSpec = field(default_factory=DataSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    mix: MixSpec = field(default_factory=MixSpec)
    bulk: BulkSpec = field(default_factory=BulkSpec)
    load: LoadSpec = field(default_factory=LoadSpec)
    find_max: FindMaxSpec = field(default_factory=FindMaxSpec)
    soak: SoakSpec = field(default_factory=SoakSpec)
    path: str = ""

    @property
    def collection_name(self) -> str:
        return self.collection.name or f"loadtest_{self.name}"


def _convert(value: Any, hint: Any, where: str) -> Any:
    """``value`` from TOML as the dataclass field's type ``hint`` (durations for ``*_s``)."""
    if where.endswith("_s"):
        return parse_duration(value, where)
    origin = typing.get_origin(hint)
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ScenarioError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(items)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ScenarioError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    if not isinstance(table, dict):
        raise ScenarioError(f"{where}: expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "path"]
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise ScenarioError(f"{where or 'scenario'}: unknown key(s) {unknown}; valid: {', '.join(names)}")
    values = {}
    for key, raw in table.items():
        hint = hints[key]
        name = f"{where}.{key}" if where else key
        values[key] = _build(hint, raw, name) if dataclasses.is_dataclass(hint) else _convert(raw, hint, name)
    return cls(**values)


def _override(table: dict[str, Any], assignment: str) -> None:
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ScenarioError(f"--set: expected section.key=value, got {assignment!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    *sections, last = key.strip().split(".")
    for section in sections:
        table = table.setdefault(section, {})
        if not isinstance(table, dict):
            raise ScenarioError(f"--set {key}: {section} is not a table")
    table[last] = value


def _validate(s: Scenario) -> None:
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ScenarioError(f"scenario {s.name}: {message}")

    check(s.data.kind in DATA_KINDS, f"data.kind {s.data.kind!r}; valid: {', '.join(DATA_KINDS)}")
    check(bool(s.search.strands), "search.strands is empty")
    for strand in s.search.strands:
        check(strand in STRANDS, f"search.strands: unknown {strand!r}; valid: {', '.join(STRANDS)}")
        check(STRANDS[strand] == s.data.kind, f"search strand {strand!r} needs data.kind = {STRANDS[strand]!r}")
    check(
        "dense_text" not in s.search.strands or bool(s.collection.encoder),
        "search strand 'dense_text' needs collection.encoder (a model name)",
    )
    check(s.search.filter in FILTERS, f"search.filter {s.search.filter!r}; valid: {FILTERS}")
    check(not s.search.filter or s.collection.tags > 0, "search.filter 'tag' needs collection.tags > 0")
    check(s.mix.search >= 0 and s.mix.upsert >= 0 and s.mix.search + s.mix.upsert > 0, "mix shares must be >= 0")
    check(s.mix.upsert_batch >= 1 and s.mix.upsert_pool >= 1, "mix.upsert_batch and upsert_pool must be >= 1")
    check(s.bulk.streams >= 0 and s.bulk.batch >= 1 and s.bulk.pool >= 1, "bulk: streams >= 0, batch/pool >= 1")
    check(s.bulk.batches_per_s > 0 and s.bulk.batches_per_stream >= 1, "bulk: batches_per_s > 0, per_stream >= 1")
    check(s.bulk.timeout_s > 0, "bulk.timeout_s must be > 0")
    check(s.load.rate > 0 and s.load.duration_s > 0 and s.load.timeout_s > 0, "load: rate, duration, timeout > 0")
    check(s.load.arrivals in ARRIVALS, f"load.arrivals {s.load.arrivals!r}; valid: {', '.join(ARRIVALS)}")
    check(s.find_max.start > 0 and s.find_max.factor > 1, "find_max: start > 0 and factor > 1")
    check(s.soak.sample_s > 0, "soak.sample_s must be > 0")
    check(s.data.queries >= 1 and s.data.dim >= 1, "data: dim and queries must be >= 1")
    # The vector set's ground truth is each query's exact top 100 (loadtest/vectors.py).
    check(s.data.kind != "vectors" or s.data.n >= 100, "data.n must be >= 100 for the vector set")


def scenario_path(name_or_path: str) -> Path:
    """A file path as given, or the bundled ``scenarios/NAME.toml``."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        return path
    bundled = SCENARIOS_DIR / f"{name_or_path}.toml"
    if not bundled.exists():
        raise ScenarioError(f"no scenario {name_or_path!r}; bundled: {', '.join(bundled_scenarios())}")
    return bundled


def bundled_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIOS_DIR.glob("*.toml"))


def load_scenario(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Scenario:
    """Read, override (``section.key=value``) and validate a scenario."""
    path = scenario_path(name_or_path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ScenarioError(f"{path}: {err}") from err
    for assignment in overrides:
        _override(table, assignment)
    if not isinstance(table.get("name"), str) or not table["name"]:
        raise ScenarioError(f"{path}: 'name' (a string) is required")
    scenario = dataclasses.replace(_build(Scenario, table, ""), path=str(path))
    _validate(scenario)
    return scenario
