"""One client process of the load generator: an asyncio loop that sends calls when they are due.

A worker gets a :class:`Plan` (picklable: the requests are already serialized bytes, so the
worker spends no time on protobuf) and its index k of P. It opens ``channels`` gRPC channels
(each on its own TCP connection), says it is ready, waits for the shared start time t0, then

    due time (schedule.arrivals) -> pick an op by weight -> start the call without waiting
    -> on completion: latency = done - due (and done - sent), binned by completion time

Every ``window_s`` it sends the finished windows (per op: an HdrHistogram of the latencies of
OK calls, the OK count and errors by status code) to the parent; at the end its totals, which
count only the calls *due* after the warm-up. BulkUpsert lanes (``bulk.streams``, spread over
the workers) each keep one stream open at a time, sending ``batches_per_s`` batches a second.

The event loop uses select() rather than epoll: epoll_wait sleeps in whole milliseconds
(asyncio rounds every timeout up to the next one), which would add up to 1 ms of timer slop
to every send; select() sleeps to the microsecond. A worker has a handful of descriptors, far
below select()'s limit of 1024.

Messages to the parent (a multiprocessing queue): ``("ready", k, None)``,
``("window", k, dict)``, ``("done", k, dict)`` and ``("error", k, traceback text)``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import selectors
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from . import stats
from .schedule import Profile, arrivals

# Not a gRPC status: the call was never sent because max_in_flight calls were outstanding.
IN_FLIGHT_CAP = "LOADTEST_IN_FLIGHT_CAP"
BULK_OP = "bulk"
START_TIMEOUT_S = 60.0  # to connect, and to wait for the parent's start signal


@dataclass
class BulkPlan:
    streams: int
    batches: list[bytes]  # serialized UpsertRequests, sent in turn
    batch_docs: int
    batches_per_s: float
    batches_per_stream: int
    timeout_s: float = 60.0  # deadline of one stream
    method: str = "/braid.v1.Braid/BulkUpsert"


@dataclass
class Plan:
    """Everything a worker needs; the same for every worker."""

    address: str
    profile: Profile
    timeout_s: float
    ops: dict[str, tuple[str, list[bytes]]]  # op -> (method path, serialized requests)
    weights: dict[str, float]  # op -> share of the arrivals
    bulk: BulkPlan | None = None
    poisson: bool = False
    seed: int = 0
    channels: int = 2
    window_s: float = 1.0
    max_in_flight: int = 10_000
    metadata: tuple[tuple[str, str], ...] = ()
    options: tuple[tuple[str, Any], ...] = field(
        default=(
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel, not one shared
        )
    )

    @property
    def drain_s(self) -> float:
        """After the last due time, how long outstanding calls and streams may still take (their deadlines)."""
        return max(self.timeout_s, self.bulk.timeout_s if self.bulk is not None else 0.0) + 5.0


class _Cell:
    """One op's results in one window (or in the totals)."""

    __slots__ = ("errors", "hist", "ok", "sent_hist")

    def __init__(self, with_sent: bool = False) -> None:
        self.hist = stats.histogram()  # from the due time
        self.sent_hist = stats.histogram() if with_sent else None  # from the actual send
        self.ok = 0
        self.errors: collections.Counter[str] = collections.Counter()

    def export(self) -> dict[str, Any]:
        out = {"hist": stats.encode(self.hist), "ok": self.ok, "errors": dict(self.errors)}
        if self.sent_hist is not None:
            out["sent_hist"] = stats.encode(self.sent_hist)
        return out


class _Worker:
    def __init__(self, plan: Plan, index: int, processes: int, queue: Any) -> None:
        self.plan = plan
        self.index = index
        self.processes = processes
        self.queue = queue
        self.t0 = 0.0
        self.measure_from = 0.0
        self.windows: dict[int, dict[str, _Cell]] = {}
        self.window_lag: dict[int, float] = collections.defaultdict(float)  # max send lag (s) per window
        self.totals: dict[str, _Cell] = {}
        self.lag = stats.histogram()
        self.in_flight: set[asyncio.Task[None]] = set()
        self.max_in_flight = 0
        self.sent = 0
        self.scheduled = 0
        self.first_done = float("inf")
        self.last_done = 0.0
        self.bulk_docs = 0
        self.cpu_mark = time.process_time()

    # ----------------------------------------------------------------- recording

    def _window(self, when: float) -> int:
        return int((when - self.t0) // self.plan.window_s)

    def record(self, op: str, due: float, sent: float, done: float, code: str) -> None:
        cell = self.windows.setdefault(self._window(done), {}).setdefault(op, _Cell())
        if code == "OK":
            cell.ok += 1
            stats.record_s(cell.hist, done - due)
        else:
            cell.errors[code] += 1
        if due < self.measure_from:
            return  # warm-up: in the time series only
        total = self.totals.setdefault(op, _Cell(with_sent=True))
        if code == "OK":
            total.ok += 1
            stats.record_s(total.hist, done - due)
            stats.record_s(total.sent_hist, done - sent)  # type: ignore[arg-type]
        else:
            total.errors[code] += 1
        if op != BULK_OP:
            self.first_done = min(self.first_done, done)
            self.last_done = max(self.last_done, done)

    def flush(self, final: bool = False) -> None:
        """Send every window that can get no more completions (all of them when ``final``)."""
        current = self._window(time.monotonic())
        now_cpu = time.process_time()
        cpu, self.cpu_mark = now_cpu - self.cpu_mark, now_cpu
        ready = sorted(w for w in self.windows if final or w < current)
        for i, w in enumerate(ready):
            cells = self.windows.pop(w)
            report = {
                "index": w,
                "ops": {op: cell.export() for op, cell in cells.items()},
                "lag_max_s": self.window_lag.pop(w, 0.0),
                "cpu_s": cpu if i == len(ready) - 1 else 0.0,  # this flush's CPU goes with its last window
            }
            self.queue.put(("window", self.index, report))

    # -------------------------------------------------------------------- calls

    async def call(self, op: str, method: Any, payload: bytes, due: float, sent: float) -> None:
        try:
            await method(payload, timeout=self.plan.timeout_s, metadata=self.plan.metadata or None)
            code = "OK"
        except grpc.aio.AioRpcError as err:
            code = err.code().name
        except asyncio.CancelledError:
            code = "CANCELLED"  # still outstanding when the drain ended
        except Exception as err:  # not a status: a client-side failure, still counted
            code = f"CLIENT_{type(err).__name__}"
        self.record(op, due, sent, time.monotonic(), code)

    async def send_loop(self, callables: list[dict[str, Any]]) -> None:
        plan = self.plan
        ops = [op for op, share in plan.weights.items() if share > 0]
        weights = [plan.weights[op] for op in ops]
        rng = random.Random(plan.seed * 7919 + self.index)
        # Each op's requests in turn, each worker starting at its own offset.
        cursors = {
            op: itertools.islice(itertools.cycle(payloads), self.index * len(payloads) // self.processes, None)
            for op, (_, payloads) in plan.ops.items()
        }
        channel = itertools.cycle(callables)
        loop = asyncio.get_running_loop()
        for offset in arrivals(plan.profile, self.index, self.processes, plan.poisson, plan.seed):
            due = self.t0 + offset
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.monotonic()
            lag = max(sent - due, 0.0)
            stats.record_s(self.lag, lag)
            w = self._window(sent)
            self.window_lag[w] = max(self.window_lag[w], lag)
            self.scheduled += 1
            op = ops[0] if len(ops) == 1 else rng.choices(ops, weights)[0]
            if len(self.in_flight) >= plan.max_in_flight:
                self.record(op, due, sent, sent, IN_FLIGHT_CAP)
                continue
            task = loop.create_task(self.call(op, next(channel)[op], next(cursors[op]), due, sent))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)
            self.sent += 1
            self.max_in_flight = max(self.max_in_flight, len(self.in_flight))

    async def bulk_lane(self, stream: Any, lane: int) -> None:
        """Open a BulkUpsert stream, send its batches at the planned pace, record its status; repeat."""
        bulk = self.plan.bulk
        assert bulk is not None
        batches = itertools.cycle(bulk.batches[lane % len(bulk.batches) :] + bulk.batches[: lane % len(bulk.batches)])
        end = self.t0 + self.plan.profile.end_s
        while time.monotonic() < end:
            opened = time.monotonic()
            sent_batches = 0

            async def requests(opened: float = opened) -> Any:
                nonlocal sent_batches
                for b in range(bulk.batches_per_stream):
                    delay = opened + b / bulk.batches_per_s - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if b and time.monotonic() >= end:
                        return
                    sent_batches += 1
                    yield next(batches)

            try:
                await stream(requests(), timeout=bulk.timeout_s, metadata=self.plan.metadata or None)
                code = "OK"
            except grpc.aio.AioRpcError as err:
                code = err.code().name
            done = time.monotonic()
            if code == "OK":
                self.bulk_docs += sent_batches * bulk.batch_docs
            self.record(BULK_OP, opened, opened, done, code)
            if code != "OK":
                await asyncio.sleep(0.5)  # a refused stream must not turn into a tight reconnect loop

    async def flusher(self) -> None:
        while True:
            await asyncio.sleep(self.plan.window_s)
            self.flush()

    # --------------------------------------------------------------------- run

    async def run(self, start_value: Any, go: Any) -> None:
        plan = self.plan
        channels = [grpc.aio.insecure_channel(plan.address, options=list(plan.options)) for _ in range(plan.channels)]
        try:
            await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), START_TIMEOUT_S)
            callables = [
                {
                    op: c.unary_unary(method, request_serializer=None, response_deserializer=None)
                    for op, (method, _) in plan.ops.items()
                }
                for c in channels
            ]
            self.queue.put(("ready", self.index, None))
            loop = asyncio.get_running_loop()
            if not await loop.run_in_executor(None, go.wait, START_TIMEOUT_S):
                raise TimeoutError(f"no start signal in {START_TIMEOUT_S:.0f} s")
            self.t0 = start_value.value
            self.measure_from = self.t0 + plan.profile.warmup_s
            cpu0, wall0 = time.process_time(), time.monotonic()
            self.cpu_mark = cpu0
            flusher = loop.create_task(self.flusher())
            lanes = []
            if plan.bulk is not None and plan.bulk.streams:
                for lane in range(self.index, plan.bulk.streams, self.processes):
                    stream = channels[lane % len(channels)].stream_unary(
                        plan.bulk.method, request_serializer=None, response_deserializer=None
                    )
                    lanes.append(loop.create_task(self.bulk_lane(stream, lane)))
            await self.send_loop(callables)
            # Drain: every call has a deadline, so this ends; the margin covers a late wake-up.
            pending = set(self.in_flight) | set(lanes)
            if pending:
                _, late = await asyncio.wait(pending, timeout=plan.drain_s)
                for task in late:
                    task.cancel()
                if late:
                    await asyncio.wait(late, timeout=5.0)
            flusher.cancel()
            self.flush(final=True)
            self.queue.put(("done", self.index, self.result(time.process_time() - cpu0, time.monotonic() - wall0)))
        finally:
            for c in channels:
                await c.close()

    def result(self, cpu_s: float, wall_s: float) -> dict[str, Any]:
        return {
            "totals": {op: cell.export() for op, cell in self.totals.items()},
            "lag_hist": stats.encode(self.lag),
            "cpu_s": cpu_s,
            "wall_s": wall_s,
            "scheduled": self.scheduled,
            "sent": self.sent,
            "max_in_flight": self.max_in_flight,
            "first_done": self.first_done - self.t0 if self.last_done else None,
            "last_done": self.last_done - self.t0 if self.last_done else None,
            "bulk_docs": self.bulk_docs,
        }


def worker_main(plan: Plan, index: int, processes: int, queue: Any, start_value: Any, go: Any) -> None:
    """Entry point of a worker process (multiprocessing, spawn)."""
    sys.setswitchinterval(0.0005)  # grpc's poller thread hands results over promptly
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_Worker(plan, index, processes, queue).run(start_value, go))
    except BaseException:
        queue.put(("error", index, traceback.format_exc()))
    finally:
        loop.close()
