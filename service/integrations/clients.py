"""What the framework adapters do the same way against the server: ``StoreClients`` (the clients a
store holds and the collection calls both make through them), ``ClientMethods`` (the store's
client, async_client, close and aclose, over its StoreClients), ``dense_field`` (what a store
learns of its collection) and ``search_options``.

A store holds a StoreClients by composition (``_clients``): a BraidClient for its sync methods and,
for its async ones, an AsyncBraidClient per running event loop (or one given). Shared by
braid.integrations.langchain and braid.integrations.llamaindex (imports no framework).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from braid.service.aio import AsyncBraidClient
from braid.service.client import BraidClient
from braid.v1 import braid_pb2 as pb

# Documents per Upsert call: well under the server's batch and message limits.
BATCH = 256
# BraidClient.search's options a framework call may carry as they are.
SEARCH_OPTIONS = ("score_threshold", "depth", "timeout")


class StoreClients:
    """A store's clients: ``client`` (made from address, timeout and ``options`` unless given, and
    then closed by ``close``) and ``aio``, the AsyncBraidClient of the running event loop."""

    def __init__(
        self,
        address: str,
        timeout: float,
        client: BraidClient | None,
        async_client: AsyncBraidClient | None,
        options: dict[str, Any],
    ) -> None:
        self.address, self.timeout, self.options = address, timeout, options
        self.client = client or BraidClient(address, timeout, **options)
        self.own_client = client is None
        self.given_aclient = async_client
        self._aclient: AsyncBraidClient | None = None  # made for the loop _aloop
        self._aloop: asyncio.AbstractEventLoop | None = None

    @property
    def aio(self) -> AsyncBraidClient:
        """The AsyncBraidClient of the running event loop (a grpc.aio channel belongs to one loop)."""
        if self.given_aclient is not None:
            return self.given_aclient
        loop = asyncio.get_running_loop()
        if self._aclient is None or self._aloop is not loop:
            # A new loop (each asyncio.run makes one): the old client's channel died with its loop.
            # The loop is held, not its id, so a later loop at the same address is still a new one.
            self._aloop, self._aclient = loop, AsyncBraidClient(self.address, self.timeout, **self.options)
        return self._aclient

    def close(self) -> None:
        """Close the sync client made here (async ones: ``aclose`` on their loop)."""
        if self.own_client:
            self.client.close()

    async def aclose(self) -> None:
        """Close the async client made here for the running loop."""
        if self._aclient is not None and self._aloop is asyncio.get_running_loop():
            aclient, self._aclient, self._aloop = self._aclient, None, None
            await aclient.close()

    # ------------------------------------------------------------- collection

    def info(self, collection: str, missing_ok: bool) -> pb.CollectionInfo | None:
        """The collection's info; None when it is missing and ``missing_ok`` (else NOT_FOUND raises)."""
        try:
            return self.client.get_collection(collection)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND or not missing_ok:
                raise
            return None

    async def ainfo(self, collection: str, missing_ok: bool) -> pb.CollectionInfo | None:
        try:
            return await self.aio.get_collection(collection)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND or not missing_ok:
                raise
            return None

    def learn(self, collection: str, missing_ok: bool, learn: Callable[[pb.CollectionInfo], None]) -> bool:
        """Whether the collection exists, ``learn`` given its info when it does (``info``'s missing_ok)."""
        info = self.info(collection, missing_ok)
        if info is not None:
            learn(info)
        return info is not None

    async def alearn(self, collection: str, missing_ok: bool, learn: Callable[[pb.CollectionInfo], None]) -> bool:
        info = await self.ainfo(collection, missing_ok)
        if info is not None:
            learn(info)
        return info is not None

    def create(self, collection: str, schema: pb.Schema) -> pb.CollectionInfo:
        """Create the collection (one made meanwhile by another writer is no error); its info."""
        try:
            self.client.create_collection(collection, schema)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        return self.client.get_collection(collection)

    async def acreate(self, collection: str, schema: pb.Schema) -> pb.CollectionInfo:
        try:
            await self.aio.create_collection(collection, schema)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        return await self.aio.get_collection(collection)

    def upsert(self, collection: str, docs: Sequence[dict[str, Any]]) -> None:
        """Upsert ``docs`` in calls of ``BATCH`` documents."""
        for start in range(0, len(docs), BATCH):
            self.client.upsert(collection, docs[start : start + BATCH])

    async def aupsert(self, collection: str, docs: Sequence[dict[str, Any]]) -> None:
        for start in range(0, len(docs), BATCH):
            await self.aio.upsert(collection, docs[start : start + BATCH])


class ClientMethods:
    """The client surface of a store holding its StoreClients as ``_clients`` (a plain base with no
    state of its own, so a pydantic store can inherit it beside its framework's base)."""

    if TYPE_CHECKING:
        _clients: StoreClients

    @property
    def client(self) -> BraidClient:
        return self._clients.client

    @property
    def async_client(self) -> AsyncBraidClient:
        """The AsyncBraidClient of the running event loop (a grpc.aio channel belongs to one loop)."""
        return self._clients.aio

    def close(self) -> None:
        """Close the sync client this store made (async ones: ``aclose`` on their loop)."""
        self._clients.close()

    async def aclose(self) -> None:
        """Close the async client this store made for the running loop."""
        await self._clients.aclose()


def dense_field(info: pb.CollectionInfo, collection: str, name: str) -> pb.DenseVectorField:
    """The dense field ``name`` of ``collection`` (``info``, as GetCollection returns it); a
    ValueError when it has none."""
    for field in info.schema.dense_fields:
        if field.name == name:
            return field
    raise ValueError(f"collection {collection!r} has no dense field {name!r}")


def search_options(args: dict[str, Any], kwargs: dict[str, Any], what: str) -> dict[str, Any]:
    """``args`` with the SEARCH_OPTIONS of a call's ``kwargs`` (taken from them); any other
    keyword left is a ValueError naming it (``what``: "search" or "query", as the framework says)."""
    for key in SEARCH_OPTIONS:
        if key in kwargs:
            args[key] = kwargs.pop(key)
    if kwargs:
        raise ValueError(f"unknown {what} argument(s): {', '.join(sorted(kwargs))}")
    return args
