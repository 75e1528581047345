"""Dynamic batching inside a model replica: a queue, one engine call at a time, and an optional p99 SLO.

The engine never waits on an empty queue: when it is free it takes what is queued (up to
`max_batch_size` instances) and runs at once, so a lone request pays no batching delay and, under
load, batches form from the requests that arrived during the previous call (Triton's dynamic
batcher with no queue delay). `batch_wait_timeout_s > 0` lets a partial batch wait for more, and
only while other requests are already queued.

With `slo_p99_ms` set, `SloPlanner` keeps every request inside its deadline (arrival + SLO):
- `LatencyFit` fits the engine's batch time as a*n + b online, from the calls the replica makes
  (least squares over a window, scaled by the 99th percentile of actual/predicted);
- each batch takes the most instances that still finish before the oldest request's deadline
  (Clipper's batch sizing, solved from the fit instead of probed with AIMD);
- a request that can no longer make its deadline, even alone, is refused with 503 at once, on
  arrival or while queued (BentoML's adaptive dispatcher sheds the same way).

Everything here takes a `clock` so the planner is tested against a simulated one; the replica
passes `time.monotonic`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Refused(Exception):
    """The request cannot be answered in time (slo=True), or the queue is full: a 503."""

    def __init__(self, message: str, slo: bool = False):
        super().__init__(message)
        self.slo = slo


@dataclass
class Pending:
    """One request in the queue."""

    instances: Any
    size: int  # instances in this request
    arrived: float
    future: asyncio.Future = field(repr=False)


class LatencyFit:
    """Engine time of a batch of n instances, fitted as a*n + b over the last `window` calls. The fit
    is redone when it is next read, so a replica without an SLO only appends to a window."""

    def __init__(self, window: int = 256, quantile: float = 99.0):
        self.calls: deque[tuple[int, float]] = deque(maxlen=window)
        self.quantile = quantile
        self._fit, self._stale = (0.0, 0.0, 1.0), False

    def observe(self, n: int, seconds: float) -> None:
        self.calls.append((n, seconds))
        self._stale = True

    def _refit(self) -> tuple[float, float, float]:
        if self._stale:
            ns = np.array([c[0] for c in self.calls], dtype=np.float64)
            ts = np.array([c[1] for c in self.calls], dtype=np.float64)
            a, b = float(np.mean(ts / ns)), 0.0  # one size seen: per-instance cost over-estimates larger batches (safe)
            if np.ptp(ns) > 0:
                slope, intercept = np.polyfit(ns, ts, 1)
                if slope > 0:  # time falling with size is noise: keep charging it all per instance
                    a, b = float(slope), max(float(intercept), 0.0)
            predicted = np.maximum(a * ns + b, 1e-9)
            self._fit = (a, b, max(1.0, float(np.percentile(ts / predicted, self.quantile))))
            self._stale = False
        return self._fit

    @property
    def a(self) -> float:
        return self._refit()[0]

    @property
    def b(self) -> float:
        return self._refit()[1]

    @property
    def margin(self) -> float:
        return self._refit()[2]

    @property
    def ready(self) -> bool:
        return bool(self.calls)

    def predict(self, n: int) -> float:
        """Seconds a batch of n instances takes, at the 99th percentile of what was seen."""
        a, b, margin = self._refit()
        return (a * n + b) * margin


@dataclass(frozen=True)
class Plan:
    """What the batcher does next: refuse `refuse` requests at the head, then run `take` requests
    (or wait up to `wait_s` for more first)."""

    refuse: int
    take: int
    wait_s: float


class SloPlanner:
    """Batch size, wait and refusals that keep each request within slo_s of its arrival."""

    def __init__(self, slo_s: float | None, fit: LatencyFit):
        self.slo_s, self.fit = slo_s, fit

    def admits(self, now: float, queued: int, size: int, busy_until: float, max_batch: int) -> bool:
        """Can a request of `size` instances, behind `queued` instances and a call running until
        `busy_until`, finish within the SLO? Unknown engine speed admits (the fit learns from it)."""
        if self.slo_s is None or not self.fit.ready:
            return True
        ahead, start = queued, max(now, busy_until)
        while ahead > 0:  # the queue ahead drains in full batches
            n = min(ahead, max_batch)
            start += self.fit.predict(n)
            ahead -= n
        return start + self.fit.predict(size) <= now + self.slo_s

    def plan(self, now: float, queue: list[Pending], max_batch: int, wait_s: float) -> Plan:
        """For a free engine and a non-empty queue (oldest first)."""
        refuse = 0
        if self.slo_s is not None and self.fit.ready:
            while refuse < len(queue) and now + self.fit.predict(queue[refuse].size) > queue[refuse].arrived + self.slo_s:
                refuse += 1
        rest = queue[refuse:]
        if not rest:
            return Plan(refuse, 0, 0.0)
        take, total = 0, 0
        deadline = rest[0].arrived + self.slo_s if self.slo_s is not None else math.inf
        for p in rest:
            if take and (total + p.size > max_batch or
                         (self.fit.ready and now + self.fit.predict(total + p.size) > deadline)):
                break
            take, total = take + 1, total + p.size
        wait = 0.0
        # never wait with a lone request queued, nor when requests already queued are left out (what
        # arrives now queues behind them, so waiting cannot grow this batch)
        if wait_s > 0 and 1 < take == len(rest) and total < max_batch:
            wait = max(0.0, rest[0].arrived + wait_s - now)  # the oldest waits wait_s at most in all
            if self.slo_s is not None and self.fit.ready:
                wait = min(wait, max(0.0, deadline - now - self.fit.predict(max_batch)))
        return Plan(refuse, take, wait)


Engine = Callable[[list[Pending]], Awaitable[None]]


class Batcher:
    """The replica's request queue. `submit` waits for its request's answer; one loop task takes
    batches off the queue and hands them to `engine`, which must set every future it is given."""

    def __init__(self, engine: Engine, max_batch_size: int, wait_s: float = 0.0, slo_ms: float | None = None,
                 max_queued_instances: int = 8192, clock: Callable[[], float] = time.monotonic):
        self.engine, self.clock = engine, clock
        self.fit = LatencyFit()
        self.planner = SloPlanner(None, self.fit)
        self.configure(max_batch_size, wait_s, slo_ms)
        self.max_queued_instances = max_queued_instances
        self.queue: deque[Pending] = deque()
        self.queued_instances = 0
        self.busy_until = 0.0  # predicted end of the running call
        self.running = 0  # requests in the running call
        self.arrived = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.stats = {"refused_slo": 0, "refused_full": 0, "cancelled": 0, "last_batch": 0}

    def configure(self, max_batch_size: int, wait_s: float, slo_ms: float | None) -> None:
        self.max_batch_size, self.wait_s = max_batch_size, wait_s
        self.planner.slo_s = slo_ms / 1e3 if slo_ms else None

    def observe(self, n: int, seconds: float) -> None:
        """The engine's time for n instances, for the SLO fit."""
        self.fit.observe(n, seconds)

    async def submit(self, instances: Any, size: int) -> Any:
        """The request's answer; a caller cancelled before its batch starts is dropped from the queue."""
        future = self.enqueue(instances, size)
        try:
            return await future
        except asyncio.CancelledError:  # the caller gave up (408, disconnect): drop it if not started
            if not future.done():
                future.cancel()
            raise

    def enqueue(self, instances: Any, size: int) -> asyncio.Future:
        """Queue a request, or raise Refused. Cancelling the returned future before its batch starts
        drops the request (asyncio.wait_for on it does, with no task per request as submit needs)."""
        now = self.clock()
        if self.queued_instances + size > self.max_queued_instances:
            self._drop_cancelled()  # requests whose callers gave up while a long batch ran free their room
        if self.queued_instances + size > self.max_queued_instances:
            self.stats["refused_full"] += 1
            raise Refused(f"{self.queued_instances} instances are queued in this replica; this request's {size} "
                          f"would pass the bound of {self.max_queued_instances}")
        if not self.planner.admits(now, self.queued_instances, size, self.busy_until, self.max_batch_size):
            self.stats["refused_slo"] += 1
            raise Refused(f"the queue ahead would take this request past the {self.planner.slo_s * 1e3:g} ms p99 SLO",
                          slo=True)
        item = Pending(instances, size, now, asyncio.get_running_loop().create_future())
        self.queue.append(item)
        self.queued_instances += size
        self.arrived.set()
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._loop())
        return item.future

    def _pop(self, k: int) -> list[Pending]:
        out = [self.queue.popleft() for _ in range(k)]
        self.queued_instances -= sum(p.size for p in out)
        return out

    def _drop_cancelled(self) -> None:
        if any(p.future.done() for p in self.queue):
            keep = [p for p in self.queue if not p.future.done()]
            self.stats["cancelled"] += len(self.queue) - len(keep)
            self.queue = deque(keep)
            self.queued_instances = sum(p.size for p in keep)

    async def _loop(self) -> None:
        waited = False  # the last plan's wait ran out: run what is queued now
        while True:
            self._drop_cancelled()
            if not self.queue:
                waited = False
                self.arrived.clear()
                await self.arrived.wait()
                continue
            plan = self.planner.plan(self.clock(), list(self.queue), self.max_batch_size, 0.0 if waited else self.wait_s)
            for p in self._pop(plan.refuse):
                self.stats["refused_slo"] += 1
                if not p.future.done():
                    late = f"the request waited past the {self.planner.slo_s * 1e3:g} ms p99 SLO before the engine was free"
                    p.future.set_exception(Refused(late, slo=True))
            if plan.wait_s > 0:
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), plan.wait_s)
                except TimeoutError:
                    waited = True
                # plan again: with what arrived, or, once the wait ran out, without the requests
                # cancelled or past their deadline by now (refused above, never run)
                continue
            waited = False
            if not plan.take:
                continue
            batch = self._pop(plan.take)
            size = sum(p.size for p in batch)
            self.stats["last_batch"], self.running = size, len(batch)
            self.busy_until = self.clock() + (self.fit.predict(size) if self.planner.slo_s and self.fit.ready else 0.0)
            try:
                await self.engine(batch)
            except Exception as e:  # noqa: BLE001 - the engine answers per request; this is its last resort
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
            finally:
                self.running, self.busy_until = 0, 0.0
