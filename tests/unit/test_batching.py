"""The replica's dynamic batcher against a simulated clock: batch sizing, waits, SLO refusals,
cancellation, queue bounds and live reconfiguration, with no Ray and no real waiting.

Run: .venv/bin/python -m pytest tests/unit/test_batching.py -q

Time is simulated: the batcher, the fake engine and the asyncio loop all read one `FakeClock`.
The engine's call takes a*n + b simulated seconds (`asyncio.sleep` on the simulated loop), tests
stall the replica by advancing the clock themselves, and when every task waits the loop jumps the
clock to its next timer instead of sleeping, so callers' timeouts and the batch wait cost nothing.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable
from typing import Any

import pytest

from serve_deployments.batching import Batcher, LatencyFit, Pending, Plan, Refused, SloPlanner

A, B = 0.01, 0.05  # the fake engine's batch time: A seconds per instance + B per call


class FakeClock:
    """Simulated seconds, shared by the batcher, the engine and the event loop."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _JumpToNextTimer(selectors.DefaultSelector):
    """Instead of sleeping until the next timer, move the simulated clock to it."""

    def __init__(self, clock: FakeClock):
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None):
        if timeout is None:  # no timer and nothing ready: a real loop would hang here
            raise RuntimeError(f"simulated deadlock at t={self.clock.now:g}: every task waits and no timer is set")
        self.clock.advance(timeout)
        return super().select(0)


class SimulatedLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: FakeClock):
        self.clock = clock
        super().__init__(_JumpToNextTimer(clock))

    def time(self) -> float:
        return self.clock.now


class EngineError(Exception):
    pass


class FakeEngine:
    """Scores a batch in A*n + B simulated seconds, records it, reports its time to the batcher's fit
    and answers every request with its own instances (as the replica's engine does)."""

    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.batcher: Batcher | None = None
        self.calls: list[tuple[float, list[Any]]] = []  # (start time, instances of each request)
        self.slow_next = 0.0  # extra seconds for the next call only
        self.fail_on: str | None = None  # an instance that makes its whole call raise

    @property
    def batches(self) -> list[list[Any]]:
        return [requests for _, requests in self.calls]

    async def __call__(self, batch: list[Pending]) -> None:
        self.calls.append((self.clock(), [p.instances for p in batch]))
        n = sum(p.size for p in batch)
        seconds, self.slow_next = A * n + B + self.slow_next, 0.0
        await asyncio.sleep(seconds)  # requests keep arriving meanwhile
        self.batcher.observe(n, seconds)
        if any(self.fail_on in p.instances for p in batch):
            raise EngineError(f"cannot score {self.fail_on}")
        for p in batch:
            if not p.future.done():  # its caller gave up during the call
                p.future.set_result(("answer", p.instances))


class Simulation:
    """A Batcher, its fake engine and the simulated clock they share."""

    def __init__(self, calibrated: bool = False, **batcher_args: Any):
        self.clock = FakeClock()
        self.engine = FakeEngine(self.clock)
        self.batcher = Batcher(self.engine, clock=self.clock, **batcher_args)
        self.engine.batcher = self.batcher
        if calibrated:  # as the replica does at start-up: exact engine times at sizes 1..8
            for n in list(range(1, 9)) * 4:
                self.batcher.observe(n, A * n + B)

    def run(self, requests: list[tuple], at: list[tuple[float, Callable[[], Any]]] = (),
            via: str = "submit") -> list[tuple[Any, float]]:
        """Send each request (arrival time, instances[, caller's timeout]) through `via` (submit, or
        enqueue as the replica does) and call each `at` hook (time, fn) at its time; return each
        request's outcome (answer or exception, time it came back)."""

        async def request(arrival: float, instances: list[str], timeout: float | None = None) -> tuple[Any, float]:
            await asyncio.sleep(arrival - self.clock())
            try:
                call = getattr(self.batcher, via)(instances, len(instances))
                outcome = await (asyncio.wait_for(call, timeout) if timeout else call)
            except (Refused, EngineError, TimeoutError) as e:
                outcome = e
            return outcome, self.clock()

        async def hook(when: float, fn: Callable[[], Any]) -> None:
            await asyncio.sleep(when - self.clock())
            fn()

        async def main() -> list[tuple[Any, float]]:
            hooks = [asyncio.create_task(hook(*h)) for h in at]
            outcomes = await asyncio.gather(*(request(*r) for r in requests))
            await asyncio.gather(*hooks)
            return outcomes

        with asyncio.Runner(loop_factory=lambda: SimulatedLoop(self.clock)) as runner:
            return runner.run(main())


def exact_fit(sizes=range(1, 9), repeats: int = 4) -> LatencyFit:
    fit = LatencyFit()
    for n in list(sizes) * repeats:
        fit.observe(n, A * n + B)
    return fit


def queued(size: int, arrived: float) -> Pending:
    return Pending([f"x{i}" for i in range(size)], size, arrived, future=None)  # plan() never touches the future


def answered(outcome: tuple[Any, float], instances: list[str]) -> bool:
    return outcome[0] == ("answer", instances)


# --- LatencyFit --------------------------------------------------------------------------------


def test_latency_fit_recovers_per_instance_and_fixed_cost_from_several_batch_sizes():
    fit = exact_fit(sizes=[1, 2, 4, 8, 16], repeats=1)
    assert fit.a == pytest.approx(A) and fit.b == pytest.approx(B)
    assert fit.margin == pytest.approx(1.0) and fit.margin >= 1.0
    assert fit.predict(32) == pytest.approx(A * 32 + B)


def test_latency_fit_with_one_batch_size_charges_per_instance_and_over_predicts_larger_batches():
    fit = LatencyFit()
    assert not fit.ready
    for _ in range(3):
        fit.observe(4, A * 4 + B)
    assert fit.ready
    assert fit.b == 0.0 and fit.a == pytest.approx((A * 4 + B) / 4)
    assert fit.predict(4) == pytest.approx(A * 4 + B)
    for n in (8, 16, 64):
        assert fit.predict(n) > A * n + B


def test_latency_fit_margin_is_the_p99_of_actual_over_predicted_so_noisy_slow_calls_raise_it():
    fit, calls = LatencyFit(), []
    for i in range(200):
        n = 1 + i % 8
        seconds = (A * n + B) * (2.0 if i % 20 == 0 else 1.0)  # every 20th call is twice as slow
        fit.observe(n, seconds)
        calls.append((n, seconds))
    assert fit.margin > 1.5  # a mean or median of the ratios would stay near 1
    beyond = sum(seconds > fit.predict(n) for n, seconds in calls)
    assert beyond <= 0.01 * len(calls) + 1  # the 99th percentile: about 1% of calls take longer


def test_latency_fit_margin_never_drops_below_one_when_calls_run_faster_than_the_fit():
    fit = LatencyFit()
    for i in range(64):
        n = 1 + i % 8
        fit.observe(n, (A * n + B) * (0.5 if i % 2 else 1.0))
    assert fit.margin >= 1.0


# --- SloPlanner --------------------------------------------------------------------------------


def _finish(planner: SloPlanner, now: float, queue: list[Pending], take: int) -> float:
    return now + planner.fit.predict(sum(p.size for p in queue[:take]))


@pytest.mark.parametrize("slo_s, now, oldest, size, max_batch, expected_take", [
    (0.205, 0.0, 0.0, 1, 32, 15),    # 0.01*15 + 0.05 = 0.20 <= 0.205 < 0.21
    (0.105, 0.0, 0.0, 1, 32, 5),     # a smaller SLO, a smaller batch
    (0.205, 0.05, 0.0, 1, 32, 10),   # the requests have already waited 50 ms
    (0.205, 0.0, -0.05, 1, 32, 10),  # the oldest request's deadline rules the whole batch
    (0.205, 0.0, 0.0, 3, 32, 5),     # 15 instances in 5 requests, not 15 requests
    (0.205, 0.0, 0.0, 1, 8, 8),      # max_batch caps it first
])
def test_plan_takes_the_largest_batch_that_finishes_before_the_oldest_requests_deadline(
        slo_s, now, oldest, size, max_batch, expected_take):
    planner = SloPlanner(slo_s, exact_fit())
    queue = [queued(size, oldest)] + [queued(size, 0.0) for _ in range(29)]
    plan = planner.plan(now, queue, max_batch, 0.0)
    assert plan == Plan(refuse=0, take=expected_take, wait_s=0.0)
    deadline = oldest + slo_s
    assert _finish(planner, now, queue, plan.take) <= deadline
    if sum(p.size for p in queue[:plan.take + 1]) <= max_batch:
        assert _finish(planner, now, queue, plan.take + 1) > deadline


def test_a_smaller_slo_never_gives_a_larger_batch():
    fit, queue = exact_fit(), [queued(1, 0.0) for _ in range(64)]
    takes = [SloPlanner(slo_ms / 1e3, fit).plan(0.0, queue, 64, 0.0).take for slo_ms in (700, 400, 200, 120, 80)]
    assert takes == sorted(takes, reverse=True) and takes[0] > takes[-1] >= 1


def test_plan_refuses_head_requests_that_cannot_finish_even_alone():
    queue = [queued(1, -0.2), queued(8, -0.1), queued(1, 0.0)]
    # the first needs 0.06 s of the 0.005 s it has left; the second, 8 instances, 0.13 s of its 0.105 s
    # (one instance would have made it); the third has time
    assert SloPlanner(0.205, exact_fit()).plan(0.0, queue, 32, 0.0) == Plan(refuse=2, take=1, wait_s=0.0)
    assert SloPlanner(None, exact_fit()).plan(0.0, queue, 32, 0.0).refuse == 0
    assert SloPlanner(0.205, LatencyFit()).plan(0.0, queue, 32, 0.0).refuse == 0  # unknown speed: no refusal


def test_admits_counts_the_running_call_and_the_queue_ahead_in_full_batches():
    planner = SloPlanner(0.3, exact_fit())
    assert planner.admits(0.0, queued=0, size=1, busy_until=0.06, max_batch=8)       # 0.06 + 0.06
    assert planner.admits(0.0, queued=8, size=1, busy_until=0.06, max_batch=8)       # 0.06 + 0.13 + 0.06
    assert not planner.admits(0.0, queued=9, size=1, busy_until=0.06, max_batch=8)   # + 0.06 for the 9th: 0.31
    assert not planner.admits(0.0, queued=0, size=26, busy_until=0.0, max_batch=8)   # 0.31 alone
    assert SloPlanner(None, exact_fit()).admits(0.0, queued=10**6, size=1, busy_until=9.0, max_batch=8)


def test_plan_waits_only_with_other_requests_queued_and_never_past_the_oldests_arrival_plus_wait_s():
    planner = SloPlanner(None, exact_fit())
    two = [queued(1, 0.0), queued(1, 0.02)]
    assert planner.plan(0.03, two, 8, 0.1) == Plan(refuse=0, take=2, wait_s=pytest.approx(0.07))
    assert planner.plan(0.2, two, 8, 0.1).wait_s == 0.0  # the oldest has waited wait_s already
    assert planner.plan(0.03, two[:1], 8, 0.1).wait_s == 0.0  # a lone request never waits
    assert planner.plan(0.03, two, 8, 0.0).wait_s == 0.0
    assert planner.plan(0.03, [queued(4, 0.0), queued(4, 0.02)], 8, 0.1).wait_s == 0.0  # the batch is full


def test_plan_never_waits_when_the_queue_already_holds_more_than_one_batch():
    # Only the first 3-instance request fits in 4: whatever arrives now queues behind the second,
    # so waiting cannot grow this batch, it only delays it.
    planner = SloPlanner(None, exact_fit())
    assert planner.plan(0.03, [queued(3, 0.0), queued(3, 0.02)], 4, 0.1) == Plan(refuse=0, take=1, wait_s=0.0)


def test_plan_wait_with_an_slo_is_bounded_by_the_slack_before_the_oldests_deadline():
    two = [queued(1, 0.0), queued(1, 0.02)]
    # deadline 0.3; a full batch of 16 takes 0.21 s, so at 0.03 the slack is 0.06 s (< wait_s left, 0.07)
    assert SloPlanner(0.3, exact_fit()).plan(0.03, two, 16, 0.1).wait_s == pytest.approx(0.06)
    assert SloPlanner(0.2, exact_fit()).plan(0.03, two, 16, 0.1).wait_s == 0.0  # no slack left
    assert SloPlanner(5.0, exact_fit()).plan(0.03, two, 16, 0.1).wait_s == pytest.approx(0.07)


# --- Batcher -----------------------------------------------------------------------------------


def test_a_lone_request_goes_to_the_engine_at_once_even_with_a_batch_wait():
    sim = Simulation(max_batch_size=8, wait_s=0.5)
    [outcome] = sim.run([(0.0, ["a"])])
    assert sim.engine.calls == [(0.0, [["a"]])]  # started at t=0: no wait on an empty queue
    assert answered(outcome, ["a"]) and outcome[1] == pytest.approx(A + B)


def test_requests_arriving_during_a_call_form_the_next_batch_capped_at_max_batch_size_instances():
    sim = Simulation(max_batch_size=4)
    schedule = [(0.0, ["a"]), (0.01, ["b"]), (0.02, ["c1", "c2"]), (0.03, ["d"]), (0.04, ["e1", "e2", "e3"]), (0.05, ["f"])]
    outcomes = sim.run(schedule)
    # a runs 0 -> 0.06; b..f arrive meanwhile; 1 + 2 + 1 instances fill the next batch of 4, not 4 requests
    assert sim.engine.batches == [[["a"]], [["b"], ["c1", "c2"], ["d"]], [["e1", "e2", "e3"], ["f"]]]
    assert [t for t, _ in sim.engine.calls] == pytest.approx([0.0, 0.06, 0.15])
    assert all(answered(o, r[1]) for o, r in zip(outcomes, schedule))
    assert sim.batcher.queued_instances == 0 and sim.batcher.stats["last_batch"] == 4


def test_a_request_larger_than_max_batch_size_runs_alone_instead_of_stalling_the_queue():
    sim = Simulation(max_batch_size=4)
    big = [f"g{i}" for i in range(6)]
    outcomes = sim.run([(0.0, ["a"]), (0.01, big), (0.02, ["h"])])
    assert sim.engine.batches == [[["a"]], [big], [["h"]]]
    assert all(answered(o, r) for o, r in zip(outcomes, [["a"], big, ["h"]]))


def test_a_partial_batch_waits_for_more_but_not_past_the_oldests_arrival_plus_wait_s():
    sim = Simulation(max_batch_size=8, wait_s=0.1)
    outcomes = sim.run([(0.0, ["a"]), (0.01, ["b"]), (0.02, ["c"]), (0.09, ["d"]), (0.3, ["e"])])
    # after a (0 -> 0.06), b and c wait for more until b's arrival + 0.1; d joins them in the wait
    # (planning again does not restart the wait); e, alone at 0.3, runs at once
    assert sim.engine.batches == [[["a"]], [["b"], ["c"], ["d"]], [["e"]]]
    assert [t for t, _ in sim.engine.calls] == pytest.approx([0.0, 0.11, 0.3])
    assert all(answered(o, [x]) for o, x in zip(outcomes, "abcde"))


def test_a_request_that_cannot_make_the_slo_behind_the_queue_is_refused_on_arrival():
    schedule = [(0.0, ["a"]), (0.001, ["b1", "b2", "b3", "b4"]), (0.002, ["c1", "c2", "c3", "c4"])]
    # a runs until 0.06, b would end at 0.15, c at 0.24: past its deadline 0.202
    sim = Simulation(calibrated=True, max_batch_size=8, slo_ms=200)
    a, b, c = sim.run(schedule)
    assert answered(a, ["a"]) and answered(b, ["b1", "b2", "b3", "b4"])
    assert isinstance(c[0], Refused) and "200 ms p99 SLO" in str(c[0])
    assert c[1] == pytest.approx(0.002)  # at once, not after queueing
    assert sim.batcher.stats["refused_slo"] == 1 and sim.engine.batches == [[["a"]], [["b1", "b2", "b3", "b4"]]]

    no_slo = Simulation(calibrated=True, max_batch_size=8, slo_ms=None)
    a, b, c = no_slo.run(schedule)
    assert answered(c, ["c1", "c2", "c3", "c4"]) and no_slo.batcher.stats["refused_slo"] == 0


def test_a_request_that_waited_past_its_slo_is_refused_from_the_loop_and_never_reaches_the_engine():
    sim = Simulation(calibrated=True, max_batch_size=8, slo_ms=200)
    sim.engine.slow_next = 0.5  # a's call takes 0.56 s instead of the 0.06 s the fit predicts
    a, b = sim.run([(0.0, ["a"]), (0.01, ["b"])])  # b is admitted: a should be done by 0.06
    assert answered(a, ["a"])
    assert isinstance(b[0], Refused) and "waited past the 200 ms p99 SLO" in str(b[0])
    assert b[1] == pytest.approx(0.56)  # as soon as the engine was free, without running it
    assert sim.engine.batches == [[["a"]]] and sim.batcher.stats["refused_slo"] == 1


def test_a_request_whose_deadline_passes_during_the_batch_wait_is_refused_not_run():
    sim = Simulation(calibrated=True, max_batch_size=16, wait_s=0.1, slo_ms=500)
    big = [f"b{i}" for i in range(8)]
    # a runs 0 -> 0.06; b (deadline 0.51) and c (0.55) then wait for more until 0.11; at 0.08 the
    # replica stalls 0.4 s: at 0.48 b needs 0.13 s (late), c needs 0.06 s (in time)
    a, b, c = sim.run([(0.0, ["a"]), (0.01, big), (0.05, ["c"])], at=[(0.08, lambda: sim.clock.advance(0.4))])
    assert sim.engine.batches == [[["a"]], [["c"]]]
    assert isinstance(b[0], Refused) and b[1] == pytest.approx(0.48)
    assert answered(c, ["c"])


@pytest.mark.parametrize("via", ["submit", "enqueue"])
def test_a_request_cancelled_before_its_batch_starts_never_reaches_the_engine(via):
    sim = Simulation(max_batch_size=8)
    # c's caller gives up at 0.04 (as asyncio.wait_for does on the replica's request timeout), while a runs
    a, b, c, d = sim.run([(0.0, ["a"]), (0.01, ["b"]), (0.02, ["c"], 0.02), (0.03, ["d"])], via=via)
    assert isinstance(c[0], TimeoutError) and c[1] == pytest.approx(0.04)
    assert answered(a, ["a"]) and answered(b, ["b"]) and answered(d, ["d"])
    assert sim.engine.batches == [[["a"]], [["b"], ["d"]]]
    assert sim.batcher.stats["cancelled"] == 1 and sim.batcher.queued_instances == 0


def test_a_request_cancelled_during_the_batch_wait_never_reaches_the_engine():
    sim = Simulation(max_batch_size=8, wait_s=0.1)
    # after a (0 -> 0.06) b and c wait for more until 0.11; c's caller gives up at 0.07
    a, b, c = sim.run([(0.0, ["a"]), (0.01, ["b"]), (0.02, ["c"], 0.05)])
    assert sim.engine.batches == [[["a"]], [["b"]]]
    assert isinstance(c[0], TimeoutError) and c[1] == pytest.approx(0.07)
    assert answered(b, ["b"]) and b[1] == pytest.approx(0.11 + A + B)
    assert sim.batcher.stats["cancelled"] == 1


def test_max_queued_instances_refuses_at_once_naming_the_bound_and_frees_as_batches_run():
    sim = Simulation(max_batch_size=4, max_queued_instances=4)
    a, b, c, d, e = sim.run([(0.0, ["a"]), (0.01, ["b1", "b2", "b3"]), (0.02, ["c1", "c2"]), (0.03, ["d"]),
                             (0.07, ["e1", "e2", "e3", "e4"])])
    # a runs at once (it leaves the queue); b queues 3, c's 2 more would make 5 > 4, d's 1 makes 4
    assert isinstance(c[0], Refused) and c[1] == pytest.approx(0.02)
    assert str(c[0]) == "3 instances are queued in this replica; this request's 2 would pass the bound of 4"
    # at 0.06 b and d leave the queue for the engine, so e's 4 fit at 0.07
    assert answered(b, ["b1", "b2", "b3"]) and answered(d, ["d"]) and answered(e, ["e1", "e2", "e3", "e4"])
    assert sim.batcher.stats["refused_full"] == 1 and sim.batcher.stats["refused_slo"] == 0
    assert sim.engine.batches == [[["a"]], [["b1", "b2", "b3"], ["d"]], [["e1", "e2", "e3", "e4"]]]


def test_configure_changes_max_batch_size_for_the_next_batches():
    sim = Simulation(max_batch_size=8)
    schedule = [(0.0, ["a"]), (0.01, ["b"]), (0.02, ["c"]), (0.03, ["d"]), (0.3, ["e"]), (0.31, ["f"]), (0.32, ["g"])]
    outcomes = sim.run(schedule, at=[(0.005, lambda: sim.batcher.configure(1, 0.0, None)),
                                     (0.2, lambda: sim.batcher.configure(2, 0.0, None))])
    assert sim.engine.batches == [[["a"]], [["b"]], [["c"]], [["d"]],  # one request per batch from 0.005
                                  [["e"]], [["f"], ["g"]]]             # two from 0.2
    assert all(answered(o, r[1]) for o, r in zip(outcomes, schedule))


def test_configure_sets_and_clears_the_slo_live():
    sim = Simulation(calibrated=True, max_batch_size=8)
    eight = [f"x{i}" for i in range(8)]
    a, b, c = sim.run([(0.0, eight), (0.02, eight), (0.04, eight)],
                      at=[(0.01, lambda: sim.batcher.configure(8, 0.0, 100)),
                          (0.03, lambda: sim.batcher.configure(8, 0.0, None))])
    # b at 0.02 would start when a ends (0.13) and end at 0.26: past 0.12; c comes with no SLO
    assert answered(a, eight) and isinstance(b[0], Refused) and "100 ms p99 SLO" in str(b[0]) and answered(c, eight)


def test_an_engine_that_raises_fails_every_request_of_its_batch_and_the_batcher_serves_the_next():
    sim = Simulation(max_batch_size=8)
    sim.engine.fail_on = "bad"
    a, b, c, d = sim.run([(0.0, ["a"]), (0.01, ["bad"]), (0.02, ["c"]), (0.5, ["d"])])
    assert answered(a, ["a"])
    assert isinstance(b[0], EngineError) and c[0] is b[0]  # the batch [bad, c] failed as one call
    assert answered(d, ["d"]) and sim.engine.batches == [[["a"]], [["bad"], ["c"]], [["d"]]]
