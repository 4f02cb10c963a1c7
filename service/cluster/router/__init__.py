"""The router (``braid serve --role router``): braid.v1 for clients, fanned out to shard replicas.

Stateless: what it knows comes from NATS (the two buckets of service/cluster/meta.py, watched
into memory), so a router restart loses nothing and any number of routers can serve. It
plugs into the standalone server as its catalog: ``RemoteCatalog`` and ``RemoteCollection``
offer what service/rpcs.py calls on a catalog and a collection, and ``RouterRpcs`` overrides
the few RPC bodies that forward protobuf messages as they are.

One concern per module:

- ``catalog``: RemoteCatalog, collections and aliases over the NATS KV buckets;
- ``replicas``: calls to one shard's replicas with failover (``Tries``), the fan-out over
  shards, consistency (the sequence each replica must have applied);
- ``writes``: validate, encode, publish through the log, wait for a replica's apply, what a
  failed write may have done; the pipelined BulkUpsert writer;
- ``covering``: a whole search on one server holding a replica of every shard;
- ``remote_shard``: RemoteShard, one shard's replicas as index/shard_api.py's ``ShardReads``
  for one request, and the map that keeps every shard's call in flight at once;
- ``reads``: counts, gets, the fanned-out search through index/collection.py's ``Scatter``
  over the request's RemoteShards (DFS idf gathering, merge and fusion, fetch);
- ``loop``: the searches that run on the event loop (grpc.aio);
- ``snapshots``: users' snapshots in the object store (create, list, restore, delete, export,
  import), what service/rpcs.py calls ``catalog.snapshots`` on a router;
- ``collection``: RemoteCollection, tying the above together;
- ``rpcs``: RouterRpcs, the braid.v1 bodies a router answers differently.

Every call to a replica carries the client call's request id (``x-request-id``), and
``RouterStats`` counts retries and failovers for /metrics (docs/operations.md).
"""

from .catalog import RemoteCatalog
from .collection import RemoteCollection
from .replicas import DEFAULT_TIMEOUT_S, Tries
from .rpcs import RouterRpcs
from .writes import AppliedUnknown, OutcomeUnknown, OutcomeUnknownDeadline, PipelinedWriter

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "AppliedUnknown",
    "OutcomeUnknown",
    "OutcomeUnknownDeadline",
    "PipelinedWriter",
    "RemoteCatalog",
    "RemoteCollection",
    "RouterRpcs",
    "Tries",
]
