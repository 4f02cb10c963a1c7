"""Logging for operators: text or JSON lines, request ids, and the slow-query log.

- ``configure_logging("text" | "json")``: the root logger writes to stderr, either the
  classic ``time LEVEL logger: message`` lines or one JSON object per line with ``time``
  (UTC, ISO 8601), ``level``, ``logger``, ``message``, ``request_id`` (while a call is
  handled), every ``extra=`` field the call site gave, and ``exception`` when there is one.
- Request ids: a client may send gRPC metadata ``x-request-id`` (printable ASCII, at most
  128 characters); otherwise the server makes one. It is echoed in the trailing metadata
  ``x-request-id``, bound to a context variable while the call runs (worker threads
  inherit it: service/admission.py), so every log line written meanwhile carries it, and
  a router forwards it to the shard servers it calls (``forward_metadata``).
- The slow-query log (``slow_query``): a Search or BatchSearch slower than the threshold is
  logged at WARNING with the shape of its plan (strand kinds, fields, limit, filter present,
  fusion) and its timings; never query text, vectors, document text or payload values.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import itertools
import json
import logging
import sys
import uuid
from collections.abc import Iterable
from typing import Any

from braid.index.stats import SearchTrace

from .tracing import trace_headers

REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID = 128
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SLOW_SEARCHES_LOGGED = 8  # a slow BatchSearch logs the shape of its first searches only

log = logging.getLogger("braid.slow_query")
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("braid_request_id", default=None)
_PREFIX = uuid.uuid4().hex[:12]  # this process's request ids: <prefix>-<counter>, unique and cheap
_counter = itertools.count(1)

# LogRecord attributes that are not "extra" fields.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName", "request_id"}


# ------------------------------------------------------------------- request ids


def request_id_of(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The client's ``x-request-id`` when it sent a usable one, else a new id."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _usable(value):
            return value
    return f"{_PREFIX}-{next(_counter):x}"


def _usable(value: str) -> bool:
    return 0 < len(value) <= MAX_REQUEST_ID and value.isascii() and value.isprintable() and " " not in value


def current_request_id() -> str | None:
    """The id of the call this code runs for (None outside a call)."""
    return _request_id.get()


def bind_request_id(request_id: str | None) -> contextvars.Token:
    """Make ``request_id`` the current one; reset with ``unbind_request_id(token)``."""
    return _request_id.set(request_id)


def unbind_request_id(token: contextvars.Token) -> None:
    _request_id.reset(token)


def with_request_id(metadata: tuple = ()) -> tuple:
    """``metadata`` with the current request id in front (for trailing metadata a handler sets itself)."""
    request_id = _request_id.get()
    return metadata if request_id is None else ((REQUEST_ID_KEY, request_id), *metadata)


def forward_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata for a call made on behalf of the current one (a router to a shard server): its request
    id and, when tracing, the W3C ``traceparent`` of the current span (service/tracing.py)."""
    request_id = _request_id.get()
    ids = () if request_id is None else ((REQUEST_ID_KEY, request_id),)
    return ids + trace_headers()


# ------------------------------------------------------------------- formatting


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or _request_id.get()
        if request_id is not None:
            out["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """Root logging to stderr in ``fmt`` (text or json), replacing handlers set before."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


# ----------------------------------------------------------------- slow queries


def _safe(name: str) -> str:
    """A client-given name (collection, field) as logged: names are never document text, but a
    request for one that does not exist may carry anything, so odd ones are not echoed."""
    return name if len(name) <= 64 and name.isascii() and name.isprintable() else "<invalid name>"


def plan_shape(request: Any) -> dict[str, Any]:
    """What a braid.v1 SearchRequest asks for, without its texts or vectors."""
    strands = []
    for sub in request.queries:
        kind = sub.WhichOneof("query") or "none"
        strand: dict[str, Any] = {"kind": kind}
        if kind in ("dense", "sparse"):
            query = getattr(sub, kind)
            strand["field"] = _safe(query.field)
            strand["by"] = "text" if query.text else "vector"
            if kind == "dense":
                strand.update({k: v for k, v in (("ef", query.ef), ("max_lists", query.max_lists)) if v})
        elif kind == "bm25":
            strand["fields"] = [_safe(name) for name in sub.bm25.fields] or "all"
        if sub.depth:
            strand["depth"] = sub.depth
        strands.append(strand)
    rule = request.fusion.WhichOneof("rule") if request.HasField("fusion") else None
    fusion = rule or ("default" if len(request.queries) > 1 else "single")
    return {
        "collection": _safe(request.collection),
        "strands": strands,
        "limit": request.limit or 10,
        "offset": request.offset,
        "filter": request.HasField("filter"),
        "fusion": fusion,
        "payload": bool(request.include_payload or request.payload_fields),
        "text_fields": len(request.text_fields),
        "explain": request.explain,
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def slow_query(method: str, request: Any, seconds: float, threshold_s: float, code: str, trace: SearchTrace) -> None:
    """Log a slow Search or BatchSearch (WARNING, logger ``braid.slow_query``)."""
    searches = [request] if method == "Search" else list(request.searches[:SLOW_SEARCHES_LOGGED])
    shapes = [plan_shape(search) for search in searches]
    for shape, timing in zip(shapes, trace.searches, strict=False):
        if timing.strands:
            shape["strand_ms"] = [_ms(s) for s in timing.strands]
        shape["fusion_ms"], shape["fetch_ms"] = _ms(timing.fusion_s), _ms(timing.fetch_s)
    stages = {name: _ms(s) for name, s in trace.stages.items()}
    summary = "; ".join(_summary(shape) for shape in shapes)
    if method == "BatchSearch" and len(request.searches) > len(searches):
        summary += f"; ... {len(request.searches) - len(searches)} more searches"
    staged = "".join(f" {name} {ms:g} ms" for name, ms in stages.items())
    log.warning(
        "slow query: %s %s in %.1f ms (threshold %g ms):%s %s",
        method,
        code,
        seconds * 1000,
        threshold_s * 1000,
        staged,
        summary,
        extra={
            "event": "slow_query",
            "method": method,
            "code": code,
            "duration_ms": _ms(seconds),
            "threshold_ms": _ms(threshold_s),
            "stages_ms": stages,
            "searches": shapes,
            "search_count": len(request.searches) if method == "BatchSearch" else 1,
        },
    )


def _summary(shape: dict[str, Any]) -> str:
    times = shape.get("strand_ms")
    parts = []
    for i, strand in enumerate(shape["strands"]):
        what = strand["kind"]
        if "field" in strand:
            what += f":{strand['field']}({strand['by']})"
        elif "fields" in strand:
            fields = strand["fields"]
            what += f"[{','.join(fields) if isinstance(fields, list) else fields}]"
        if times is not None and i < len(times):
            what += f" {times[i]:g} ms"
        parts.append(what)
    return (
        f"collection={shape['collection']} strands=[{', '.join(parts)}] limit={shape['limit']} "
        f"filter={'yes' if shape['filter'] else 'no'} fusion={shape['fusion']}"
    )
