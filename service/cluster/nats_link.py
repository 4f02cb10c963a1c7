"""One process's connection to NATS JetStream, on an event loop of its own.

Routers and shard servers do their gRPC work on threads; NATS (nats-py) is asyncio. The
link runs nats-py on a private loop thread and offers blocking calls with a timeout, so
a NATS stall never blocks the gRPC event loop. Every failure to reach NATS (not connected,
no responders, a timeout) becomes Unavailable naming NATS, the one error callers handle.

What it offers: key-value reads, writes and watches (service/cluster/meta.py says what the
buckets hold), reads from the bucket's stream leader and compare-and-set writes by revision
(aliases), stream creation and deletion, publishing with a message id (JetStream drops
a duplicate id inside its window, so a retried publish is stored once), the last sequence
of a subject. service/cluster/log_reader.py reads one subject in order through the link.

Security (service/cluster/nats_auth.py): a link made ``for_config`` presents the server's
nats_creds and verifies NATS with nats_tls_* (TLS, a client certificate). NATS refusing them (an
authorization violation, a certificate it does not trust) is logged as an error naming the
setting, and the link keeps trying: a router or shard server stays NOT_SERVING meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE

from braid.index.errors import AlreadyExists, FailedPrecondition, Unavailable

from .meta import KIND_HEADER
from .nats_auth import NatsSecurity

log = logging.getLogger("braid.nats")


class _QuietSslEof(logging.Filter):
    """asyncio warns "returning true from eof_received() has no effect when using ssl" each time a
    TLS server closes a connection nats-py opened (every refused attempt); it means nothing here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_QuietSslEof())
T = TypeVar("T")
CONNECT_TIMEOUT_S = 2.0
WATCH_RETRY_S = 0.5
PUBLISH_TRY_S = 2.0  # one publish try waits this long for JetStream's answer, then it is sent again
PUBLISH_RETRY_S = 0.05  # the first pause between tries (doubling up to PUBLISH_RETRY_MAX_S)
PUBLISH_RETRY_MAX_S = 0.5
PUBLISH_MARGIN_S = 0.2  # publish_many answers this long before its timeout (the caller's deadline)
PUBLISH_GRACE_S = 1.0  # how long past its timeout publish_many's caller waits for the last answers
CONNECT_POLL_S = 0.05
# A call made while the link reconnects waits this long for it (nats-py tries the next node
# every reconnect_time_wait, so a link whose node died is back on another one well within it).
RECONNECT_WAIT_S = 3.0
# A connection failure repeated word for word is logged again after this long (not every second).
REPEAT_LOG_S = 30.0
# JetStream error codes of a publish refused for good: the record was not stored, and a retry
# would be refused again (wrong expected stream, message over max_payload, stream not found).
_REFUSED_ERR_CODES = {10060, 10054, 10059}


class NatsUnreachable(Unavailable):
    """Not connected to NATS for the whole of a call: nothing was sent."""


class NatsNoAnswer(Unavailable):
    """A call sent to NATS got no answer in time: what it asked for may have happened."""


class NotStored(Exception):
    """A record JetStream refused, with no earlier try that may have stored it."""


class MaybeStored(Exception):
    """A record JetStream did not confirm storing: it may be in the stream or not."""


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _refusal(err: BaseException) -> bool:
    """JetStream answered a publish with a refusal that a retry would get again."""
    if isinstance(err, nats.js.errors.BadRequestError | nats.js.errors.NotFoundError):
        return True
    return isinstance(err, nats.js.errors.APIError) and err.err_code in _REFUSED_ERR_CODES


def _never_sent(err: BaseException) -> bool:
    """A failed try that cannot have stored the record: nobody listened on the subject (no stream
    leader took it), or the connection was closed before it was sent."""
    return isinstance(
        err, nats.errors.NoRespondersError | nats.js.errors.NoStreamResponseError | nats.errors.ConnectionClosedError
    )


def _connect_failure(err: BaseException) -> str:
    """Why a connection attempt failed, saying which setting to check when NATS refused us."""
    text = _describe(err)
    lowered = text.lower()
    if "authorization violation" in lowered or "authentication" in lowered or "user authentication" in lowered:
        return f"NATS refused the credentials ({text}): check nats_creds (BRAID_NATS_CREDS)"
    if isinstance(err, ssl.SSLError) or "certificate" in lowered or "ssl" in lowered or "tls" in lowered:
        return f"TLS to NATS failed ({text}): check nats_tls_ca / nats_tls_cert / nats_tls_key (BRAID_NATS_TLS_*)"
    return text


def _refused(err: BaseException) -> bool:
    """NATS or TLS said no: retrying will not help until an operator changes something."""
    return _connect_failure(err) != _describe(err)


class NatsLink:
    """A nats-py connection on its own loop thread; blocking calls with timeouts.

    ``security`` (credentials, TLS) is what the link presents to NATS; :meth:`for_config` takes it
    from a ServerConfig's nats_creds and nats_tls_*."""

    @classmethod
    def for_config(cls, config: Any, name: str) -> NatsLink:
        """A link to ``config.nats_urls`` with its nats_creds and nats_tls_* (ValueError for a bad file)."""
        return cls(config.nats_urls, name, NatsSecurity.from_config(config))

    def __init__(self, urls: list[str], name: str, security: NatsSecurity | None = None) -> None:
        self.urls = urls
        self.name = name
        self.security = security or NatsSecurity()
        self._connect_options = self.security.connect_options()  # built once: a bad file fails here
        self.last_error = ""  # why the last connection attempt failed ("" once connected)
        self._logged: dict[str, float] = {}  # each failure logged, and when
        self._refused_at = 0.0  # when NATS last refused the credentials or the certificate
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="braid-nats", daemon=True)
        self._thread.start()
        self.nc: Any = None
        self.js: Any = None
        self._connected = threading.Event()
        self._closed = False
        self._tasks: list[asyncio.Future] = []
        self._tasks.append(asyncio.run_coroutine_threadsafe(self._connect_forever(), self.loop))

    # ------------------------------------------------------------ connection

    async def _connect_forever(self) -> None:
        """Connect (retrying until the link closes); nats-py then reconnects by itself.

        A refusal (bad credentials, an untrusted certificate) is logged as an error naming the
        setting; the same failure again is logged every REPEAT_LOG_S, not every second."""
        while not self._closed:
            try:
                self.nc = await nats.connect(
                    servers=self.urls,
                    name=self.name,
                    connect_timeout=CONNECT_TIMEOUT_S,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    **self._connect_options,
                )
                self.js = self.nc.jetstream()
                self.last_error = ""
                self._connected.set()
                log.info("connected to NATS at %s", self.nc.connected_url.netloc if self.nc.connected_url else "?")
                return
            except Exception as err:
                self._failed(err)
                self._report(err, f"cannot connect to NATS at {','.join(self.urls)}: {self.last_error}; retrying")
                await asyncio.sleep(1.0)

    def _report(self, err: BaseException, message: str, quiet: bool = False) -> None:
        """Log a connection failure: an error when NATS refused us, else a warning (a debug line
        when ``quiet``); the same message again only after REPEAT_LOG_S."""
        now = time.monotonic()
        if now - self._logged.get(message, -REPEAT_LOG_S) < REPEAT_LOG_S:
            return
        if len(self._logged) > 64:  # error texts vary (ports, addresses): keep the memory small
            self._logged.clear()
        self._logged[message] = now
        level = logging.ERROR if _refused(err) else logging.DEBUG if quiet else logging.WARNING
        log.log(level, "%s", message)

    def _failed(self, err: BaseException) -> None:
        """Remember why connecting failed; a refusal is kept over the broken pipe that follows it
        (NATS closes the connection after saying no)."""
        now = time.monotonic()
        if _refused(err):
            self._refused_at = now
        elif now - self._refused_at < 2 * CONNECT_TIMEOUT_S:
            return
        self.last_error = _connect_failure(err)

    async def _on_error(self, err: Exception) -> None:
        # nats.connect retries a failed first connection itself (max_reconnect_attempts=-1), so
        # its failures arrive here, as do those while reconnecting (a rotated credential NATS
        # refuses): a refusal is logged as an error
        if not self.connected:
            self._failed(err)
        if not self._connected.is_set():  # never connected yet: say so (a warning), not only at debug
            self._report(err, f"cannot connect to NATS at {','.join(self.urls)}: {self.last_error}; retrying")
        else:
            self._report(err, f"NATS: {_connect_failure(err)}", quiet=True)

    async def _on_disconnected(self) -> None:
        if not self._closed:
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS")

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload) if self.nc is not None else 1 << 20

    def call(self, coro: Coroutine[Any, Any, T], timeout: float, grace: float = 1.0) -> T:
        """Run ``coro`` on the link's loop within ``timeout``; NATS failures become Unavailable.

        While the link is reconnecting (its NATS node died, the others are up), the call waits up
        to RECONNECT_WAIT_S (and half its ``timeout``) for the connection instead of failing at
        once; NatsUnreachable when it did not come back (nothing was sent), early enough for the
        caller to answer before its own deadline. NatsNoAnswer when ``coro`` did not finish."""
        began = time.monotonic()
        patience = min(RECONNECT_WAIT_S, timeout / 2)
        while not self.connected:
            if self._closed or time.monotonic() - began >= patience:
                coro.close()
                raise NatsUnreachable(f"NATS unreachable at {','.join(self.urls)}")
            time.sleep(CONNECT_POLL_S)
        timeout = max(timeout - (time.monotonic() - began), 0.05)
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop)
        try:
            return future.result(timeout + grace)
        except TimeoutError as err:
            future.cancel()
            raise NatsNoAnswer(f"NATS did not answer within {timeout:.1f} s") from err
        except (nats.errors.Error, ConnectionError, OSError) as err:
            if isinstance(err, nats.js.errors.APIError) and not isinstance(err, nats.js.errors.ServiceUnavailableError):
                # JetStream answered and said no (a stream setting it cannot meet, a missing consumer)
                raise FailedPrecondition(f"NATS JetStream refused: {err}") from err
            raise Unavailable(f"NATS unreachable: {type(err).__name__}: {err}") from err

    def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.nc.close(), self.loop).result(5)
        with contextlib.suppress(Exception):  # nats-py's own tasks, so none is destroyed while pending
            asyncio.run_coroutine_threadsafe(_cancel_the_rest(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    # ------------------------------------------------------------ key-value

    async def _bucket(self, bucket: str) -> Any:
        return await self.js.key_value(bucket)

    def ensure_bucket(self, bucket: str, replicas: int, ttl: float | None = None, timeout: float = 10.0) -> None:
        async def ensure() -> None:
            try:
                await self.js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                await self.js.create_key_value(bucket=bucket, history=1, replicas=replicas, ttl=ttl)

        self.call(ensure(), timeout)

    def kv_put(self, bucket: str, key: str, value: bytes, timeout: float = 5.0) -> None:
        async def put() -> None:
            await (await self._bucket(bucket)).put(key, value)

        self.call(put(), timeout)

    def kv_create(self, bucket: str, key: str, value: bytes, timeout: float = 5.0) -> int:
        """Put ``key`` only if it does not exist (its revision); AlreadyExists otherwise."""

        async def create() -> int:
            try:
                return int(await (await self._bucket(bucket)).create(key, value))
            except nats.js.errors.KeyWrongLastSequenceError as err:
                raise AlreadyExists(f"{key!r} already exists") from err

        return self.call(create(), timeout)

    def kv_get(self, bucket: str, key: str, timeout: float = 5.0) -> tuple[bytes, int] | None:
        """(value, revision) of ``key`` now, or None when it does not exist. Read from the bucket
        stream's leader, not through a direct get a lagging replica may answer, so a key written
        before the call is seen."""

        async def get() -> tuple[bytes, int] | None:
            try:
                msg = await self.js.get_msg(f"KV_{bucket}", subject=f"$KV.{bucket}.{key}", direct=False)
            except nats.js.errors.NotFoundError:
                return None
            if (msg.headers or {}).get(KV_OP) in (KV_DEL, KV_PURGE):
                return None
            return bytes(msg.data or b""), int(msg.seq)

        return self.call(get(), timeout)

    def kv_update(self, bucket: str, key: str, value: bytes, last: int, timeout: float = 5.0) -> int | None:
        """Put ``key`` only if its revision is still ``last``: the new revision, or None when
        another write came first (compare-and-set)."""

        async def update() -> int | None:
            try:
                return int(await (await self._bucket(bucket)).update(key, value, last=last))
            except nats.js.errors.KeyWrongLastSequenceError:
                return None

        return self.call(update(), timeout)

    def kv_delete_if(self, bucket: str, key: str, last: int, timeout: float = 5.0) -> int | None:
        """Delete ``key`` only if its revision is still ``last``: the revision of the delete marker,
        or None when another write came first."""

        async def delete() -> int | None:
            headers = {KV_OP: KV_DEL, api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(last)}
            try:
                ack = await self.js.publish(f"$KV.{bucket}.{key}", b"", headers=headers)
            except nats.js.errors.APIError as err:
                if err.err_code in (10071, 10164):  # wrong last sequence (nats-py's KeyValue.update says so)
                    return None
                raise
            return int(ack.seq)

        return self.call(delete(), timeout)

    def kv_delete(self, bucket: str, key: str, timeout: float = 5.0) -> None:
        async def delete() -> None:
            await (await self._bucket(bucket)).purge(key)

        self.call(delete(), timeout)

    def kv_items(self, bucket: str, timeout: float = 5.0) -> dict[str, bytes]:
        """Every key and value of a bucket, now."""

        async def items() -> dict[str, bytes]:
            kv = await self._bucket(bucket)
            watcher = await kv.watchall()
            found: dict[str, bytes] = {}
            try:
                async for entry in watcher:
                    if entry is None:
                        break
                    if entry.operation is None and entry.value is not None:
                        found[entry.key] = entry.value
                    else:
                        found.pop(entry.key, None)
            finally:
                await watcher.stop()
            return found

        return self.call(items(), timeout)

    def watch(
        self,
        bucket: str,
        on_snapshot: Callable[[dict[str, bytes]], None],
        on_change: Callable[[str, bytes | None], None],
        silent_s: float | None = None,
        on_revision: Callable[[int], None] | None = None,
    ) -> None:
        """Follow a bucket until the link closes: ``on_snapshot`` with every key each time the
        watch (re)starts (so deletes missed while disconnected are seen), then ``on_change``
        per update (value None: deleted). Callbacks run on the link's loop: keep them short.
        ``on_revision``: the bucket revision the view now reflects, after the snapshot and after
        each change (a writer waits for its own write's revision to read its writes).

        ``silent_s``: for a bucket written all the time (heartbeats), a watch that hears
        nothing for this long is restarted: the NATS node holding its consumer may have died
        while the connection itself stayed up.
        """

        async def follow() -> None:
            while not self._closed:
                if not self.connected:
                    await asyncio.sleep(WATCH_RETRY_S)
                    continue
                watcher = None
                try:
                    watcher = await (await self._bucket(bucket)).watchall()
                    snapshot: dict[str, bytes] = {}
                    initial = True
                    seen = 0
                    while not self._closed:
                        try:
                            entry = await watcher.updates(timeout=silent_s or 5.0)
                        except (TimeoutError, nats.errors.TimeoutError):
                            if not self.connected or silent_s is not None:
                                break
                            continue
                        if entry is None:
                            if initial:
                                initial = False
                                on_snapshot(dict(snapshot))
                                if on_revision is not None:
                                    on_revision(seen)
                            continue
                        value = entry.value if entry.operation is None else None
                        seen = max(seen, int(entry.revision or 0))
                        if initial:
                            if value is None:
                                snapshot.pop(entry.key, None)
                            else:
                                snapshot[entry.key] = value
                        else:
                            on_change(entry.key, value)
                            if on_revision is not None:
                                on_revision(seen)
                except asyncio.CancelledError:
                    raise
                except Exception as err:
                    log.debug("watch of %s restarts: %s", bucket, err)
                finally:
                    if watcher is not None:
                        with contextlib.suppress(Exception):
                            await watcher.stop()
                await asyncio.sleep(WATCH_RETRY_S)

        self._tasks.append(asyncio.run_coroutine_threadsafe(follow(), self.loop))

    # -------------------------------------------------------------- streams

    def add_stream(self, name: str, subjects: list[str], replicas: int, timeout: float = 10.0) -> None:
        async def add() -> None:
            await self.js.add_stream(
                name=name,
                subjects=subjects,
                num_replicas=replicas,
                storage=api.StorageType.FILE,
                retention=api.RetentionPolicy.LIMITS,
                duplicate_window=120.0,
            )

        self.call(add(), timeout)

    def delete_stream(self, name: str, timeout: float = 10.0) -> None:
        async def delete() -> None:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.js.delete_stream(name)

        self.call(delete(), timeout)

    def publish_many(
        self, items: list[tuple[str, bytes, int, str]], stream: str, timeout: float
    ) -> list[int | BaseException]:
        """Publish several records concurrently: (subject, payload, kind, msg_id) each; the
        sequence of each, or why it has none: ``NotStored`` when JetStream refused it and no
        earlier try may have stored it, else ``MaybeStored`` (no answer within ``timeout``).

        Any failure that does not prove the record absent is retried, with the same message id
        (JetStream drops a duplicate and answers with the first one's sequence), until
        ``timeout``: a paused or killed NATS node, a stream electing a leader, a node answering
        after a pause that it no longer leads. NatsUnreachable when not connected all along
        (nothing was sent)."""

        async def one(subject: str, payload: bytes, kind: int, msg_id: str) -> int:
            headers = {"Nats-Msg-Id": msg_id, KIND_HEADER: str(kind)}
            loop = asyncio.get_running_loop()
            deadline = loop.time() + max(timeout - PUBLISH_MARGIN_S, timeout / 2)  # an answer before the caller's
            maybe = False  # a try whose outcome is unknown: the record may be in the stream
            pause = PUBLISH_RETRY_S
            while True:
                try:
                    ack = await self.js.publish(
                        subject,
                        payload,
                        timeout=max(min(deadline - loop.time(), PUBLISH_TRY_S), 0.05),
                        stream=stream,
                        headers=dict(headers),
                    )
                    return int(ack.seq)
                except asyncio.CancelledError:
                    raise
                except Exception as err:
                    refused = _refusal(err)
                    if refused and not maybe:
                        raise NotStored(f"JetStream refused it: {_describe(err)}") from err
                    maybe = maybe or not _never_sent(err)
                    if refused:
                        raise MaybeStored(
                            f"JetStream refused a retry ({_describe(err)}) after a try that may have stored it"
                        ) from err
                    if loop.time() + pause >= deadline:
                        if not maybe:  # every try went unheard: no stream leader took it
                            raise NotStored(f"no JetStream stream leader took it ({_describe(err)})") from err
                        raise MaybeStored(
                            f"no confirmation from JetStream within {timeout:.1f} s (last: {_describe(err)})"
                        ) from err
                    log.debug("publish %s to %s: retrying after %s", msg_id, subject, _describe(err))
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, PUBLISH_RETRY_MAX_S)

        async def all_of() -> list[int | BaseException]:
            return await asyncio.gather(*(one(*item) for item in items), return_exceptions=True)

        return self.call(all_of(), timeout, grace=PUBLISH_GRACE_S)

    def last_seqs(self, stream: str, subjects: list[str], timeout: float) -> list[int]:
        """The stream sequence of the last record on each subject (0 for none), asked again while
        the stream cannot answer (a leader being elected) until ``timeout``."""

        async def last(subject: str) -> int:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + max(timeout - PUBLISH_MARGIN_S, timeout / 2)
            while True:
                try:
                    try_s = max(min(deadline - loop.time(), PUBLISH_TRY_S), 0.05)
                    return int((await asyncio.wait_for(self.js.get_last_msg(stream, subject), try_s)).seq)
                except nats.js.errors.NotFoundError:
                    return 0
                except asyncio.CancelledError:
                    raise
                except Exception as err:
                    if _refusal(err) or loop.time() + PUBLISH_RETRY_MAX_S >= deadline:
                        raise
                    log.debug("last sequence of %s: retrying after %s", subject, _describe(err))
                    await asyncio.sleep(PUBLISH_RETRY_MAX_S)

        async def all_of() -> list[int]:
            return list(await asyncio.gather(*(last(subject) for subject in subjects)))

        return self.call(all_of(), timeout)


async def _cancel_the_rest() -> None:
    current = asyncio.current_task()
    rest = [task for task in asyncio.all_tasks() if task is not current]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)
