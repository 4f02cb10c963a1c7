"""``RemoteCollection``: what service/rpcs.py calls on a collection, on a router (writes
through the log: writes.py; reads from the replicas: reads.py, covering.py, loop.py)."""

from __future__ import annotations

from .loop import LoopSearches
from .writes import CollectionWrites


class RemoteCollection(CollectionWrites, LoopSearches):
    """A collection as the router sees it: what service/rpcs.py calls on a Collection."""
