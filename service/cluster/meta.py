"""Cluster metadata: what lives in the JetStream key-value buckets, and replica placement.

Buckets (JetStream KV, replicated like the streams):

- ``braid-collections``: key = collection name, value = ``CollectionMeta`` as JSON
  ``{"name", "uid", "schema", "shards", "replication_factor", "created_at", "placement",
  "restore_from"}``. ``uid`` names one incarnation: a collection deleted and created again
  under the same name gets a new uid, a new stream and new replica directories.
  ``restore_from`` (absent or "" for a new, empty collection) names the user snapshot a
  restored collection starts from: a replica opening an empty directory lays in the
  snapshot's ``user/<snapshot>/shard-NNN`` object (service/cluster/replica.py) before it
  follows the new stream from sequence 1.
- ``braid-aliases``: key = alias name, value = ``AliasMeta`` as JSON ``{"name", "collection",
  "uid"}``: the collection it points at and that collection's uid, so an alias left behind
  by a DeleteCollection racing a CreateAlias on another router answers NOT_FOUND instead of
  resolving to a later collection of the same name. A separate bucket: collection entries
  stay what shard servers parse. Routers write it with compare-and-set (create only if
  absent, update and delete only at the revision they read), so two routers never both
  create one alias, and an UpdateAlias never revives a deleted one.
- ``braid-nodes``: key = shard-server node id, value = ``{"node_id", "address", "started_at"}``,
  put every ``HEARTBEAT_S``; the bucket's TTL (``NODE_TTL_S``) drops a node that stops.

The write log of a collection is the stream ``BRAID_<uid>`` with one subject per shard,
``braid.<uid>.<shard>``; each message is one write record (index/records.py), its kind in
the ``Braid-Kind`` header.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("braid.cluster")
COLLECTIONS_BUCKET = "braid-collections"
ALIASES_BUCKET = "braid-aliases"
NODES_BUCKET = "braid-nodes"
HEARTBEAT_S = 1.0
NODE_TTL_S = 5.0
KIND_HEADER = "Braid-Kind"
_NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class CollectionMeta:
    name: str
    uid: str
    schema: dict[str, Any]
    shards: int
    replication_factor: int
    created_at: float
    placement: tuple[tuple[str, ...], ...]  # per shard, the node ids holding a replica
    restore_from: str = ""  # the user snapshot a restored collection starts from ("" none)

    @property
    def stream(self) -> str:
        return f"BRAID_{self.uid}"

    def subject(self, shard: int) -> str:
        return f"braid.{self.uid}.{shard}"

    def to_json(self) -> bytes:
        data = asdict(self)
        data["placement"] = [list(nodes) for nodes in self.placement]
        if not self.restore_from:  # entries of plain collections stay what older servers parse
            del data["restore_from"]
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> CollectionMeta:
        data = json.loads(raw)
        data["placement"] = tuple(tuple(nodes) for nodes in data["placement"])
        return cls(**data)


@dataclass(frozen=True)
class AliasMeta:
    name: str
    collection: str
    uid: str  # of the collection when the alias was pointed at it

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> AliasMeta:
        return cls(**json.loads(raw))


def parse_alias(name: str, raw: bytes) -> AliasMeta | None:
    """An alias entry, or None (logged) when it is damaged: a damaged alias never resolves."""
    try:
        alias = AliasMeta.from_json(raw)
    except (ValueError, TypeError, KeyError) as err:
        log.error("alias %r in %s is damaged, ignored: %s", name, ALIASES_BUCKET, err)
        return None
    if alias.name != name:
        log.error("alias %r in %s names %r, ignored", name, ALIASES_BUCKET, alias.name)
        return None
    return alias


def alias_changed(aliases: dict[str, AliasMeta], key: str, value: bytes | None) -> dict[str, AliasMeta]:
    """A copy of ``aliases`` after one update of the aliases bucket (as ``changed``)."""
    return _with(aliases, key, parse_alias(key, value) if value is not None else None)


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    address: str
    started_at: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> NodeInfo:
        return cls(**json.loads(raw))


def parse_collections(items: dict[str, bytes]) -> dict[str, CollectionMeta]:
    """The bucket's entries that parse; a damaged one is logged and left out, never fatal."""
    metas = {}
    for name, raw in items.items():
        meta = parse_collection(name, raw)
        if meta is not None:
            metas[name] = meta
    return metas


def parse_collection(name: str, raw: bytes) -> CollectionMeta | None:
    try:
        return CollectionMeta.from_json(raw)
    except (ValueError, TypeError, KeyError) as err:
        log.error("collection metadata %r in %s is damaged, ignored: %s", name, COLLECTIONS_BUCKET, err)
        return None


def changed(metas: dict[str, CollectionMeta], key: str, value: bytes | None) -> dict[str, CollectionMeta]:
    """A copy of ``metas`` after one update of the collections bucket (value None: deleted; a
    damaged value counts as deleted). A copy, so readers of the old dict never see it change."""
    return _with(metas, key, parse_collection(key, value) if value is not None else None)


def _with(entries: dict[str, Any], key: str, entry: Any) -> dict[str, Any]:
    """A copy of ``entries`` with ``key`` set to ``entry``, or removed when it is None."""
    out = dict(entries)
    if entry is None:
        out.pop(key, None)
    else:
        out[key] = entry
    return out


def parse_node(name: str, raw: bytes) -> NodeInfo | None:
    try:
        return NodeInfo.from_json(raw)
    except (ValueError, TypeError, KeyError) as err:
        log.error("node entry %r in %s is damaged, ignored: %s", name, NODES_BUCKET, err)
        return None


def place(shards: int, replication_factor: int, nodes: list[str]) -> tuple[tuple[str, ...], ...]:
    """Deterministic placement: shard i's replicas on the sorted nodes i, i+1, ... (mod n).

    No two replicas of a shard share a node (the caller checks replication_factor <= len(nodes)),
    and consecutive shards start on consecutive nodes, so shards spread evenly.
    """
    ordered = sorted(nodes)
    count = len(ordered)
    return tuple(tuple(ordered[(i + r) % count] for r in range(replication_factor)) for i in range(shards))


def check_node_id(node_id: str) -> str:
    if not _NODE_ID.fullmatch(node_id):
        raise ValueError(f"node_id: {node_id!r} must match [A-Za-z0-9_-]{{1,64}} (it names a key in NATS)")
    return node_id


def node_id_from_host(host_name: str) -> str:
    """A default node id from the host name (a StatefulSet pod's name carries its ordinal)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "-", host_name.split(".")[0])[:64]
    return cleaned or "node"
