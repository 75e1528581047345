"""The step plan of run.epochs, run.max_steps and run.time_budget_min (trainers/budget.py), and the
learning-rate schedule laid out again over a plan (strategy.relayout_schedule): without Ray, on a
simulated clock."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from trainers.budget import (
    SKIPPED_STEPS,
    WARMUP_SECONDS,
    WARMUP_STEPS,
    BudgetClock,
    StepPlan,
    initial_plan,
    margin,
    steps_that_fit,
)
from trainers.config import OptimSection
from trainers.strategy import build_optimizer, build_scheduler, relayout_schedule


def test_initial_plan_takes_every_epoch_unless_max_steps_is_fewer():
    assert initial_plan(100, 3, None) == StepPlan(total=300, ended_by="epochs")
    assert initial_plan(100, 3, 250) == StepPlan(total=250, ended_by="max_steps")
    assert initial_plan(100, 3, 900) == StepPlan(total=300, ended_by="epochs")


def test_steps_that_fit_leave_room_for_every_validation_the_plan_reaches():
    # 1 s a step, 60 s left, validations of 10 s: 50 more steps if no epoch end comes before the last
    assert steps_that_fit(done=0, seconds_per_step=1, seconds_left=60, steps_per_epoch=1000, eval_seconds=10,
                          cap=1000) == 50
    # epochs of 20 steps: total 40 reaches 2 epoch ends (2 x 10 s) and 40 s of steps = 60 s
    assert steps_that_fit(done=0, seconds_per_step=1, seconds_left=60, steps_per_epoch=20, eval_seconds=10,
                          cap=1000) == 40
    assert steps_that_fit(done=10, seconds_per_step=1, seconds_left=1e9, steps_per_epoch=20, eval_seconds=10,
                          cap=77) == 77  # the epochs (or max_steps) cap it
    assert steps_that_fit(done=10, seconds_per_step=1, seconds_left=-5, steps_per_epoch=20, eval_seconds=10,
                          cap=77) == 11  # past the deadline: one more step, then the final validation


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(clock: BudgetClock, fake: FakeClock, speeds, until: int) -> int:
    """Drive the hook as the loop does, one step at a time at the given seconds per step; returns the
    steps taken before the plan stopped the run."""
    step = 0
    while step < clock.plan.total and step < until:
        fake.now += speeds(step)
        step += 1
        clock(step)
    return step


def make_clock(fake, budget_s=600.0, cap=10_000, steps_per_epoch=10_000, logs=None, relayouts=None):
    return BudgetClock(initial_plan(steps_per_epoch, 1, cap), deadline=budget_s, budget_s=budget_s, cap=cap,
                       steps_per_epoch=steps_per_epoch, eval_rows=3200, rows_per_step=32, agree=lambda v: v,
                       relayout=(relayouts if relayouts is not None else []).append,
                       log=(logs if logs is not None else []).append, clock=fake)


def test_the_plan_is_the_steps_that_fit_before_the_deadline_less_the_final_validation():
    fake, logs, relayouts = FakeClock(), [], []
    clock = make_clock(fake, logs=logs, relayouts=relayouts)
    steps = run(clock, fake, lambda s: 0.5, until=100_000)
    # 600 s less a 12 s margin, less the final validation (100 batches of eval at a third of a step)
    expected_eval = 3200 / 32 * 0.5 / 3
    assert clock.plan.timed and clock.plan.ended_by == "time_budget"
    assert steps == clock.plan.total == pytest.approx((600 - margin(600) - expected_eval) / 0.5, abs=2)
    assert fake.now + expected_eval <= 600 - margin(600) + 0.5  # the final validation ends within the budget
    assert relayouts[0] == clock.plan.total and len(logs) == 1 and "plan" in logs[0] and "s/step" in logs[0]
    first_plan_at = SKIPPED_STEPS + max(WARMUP_STEPS, int(WARMUP_SECONDS / 0.5))
    assert f"steps {SKIPPED_STEPS + 1}-{first_plan_at}" in logs[0]


def test_a_run_that_slows_down_has_its_plan_cut_and_relaid_and_still_ends_in_time():
    fake, logs, relayouts = FakeClock(), [], []
    clock = make_clock(fake, logs=logs, relayouts=relayouts)
    steps = run(clock, fake, lambda s: 0.5 if s < 300 else 1.0, until=100_000)  # twice as slow after step 300
    assert len(relayouts) >= 2 and relayouts == sorted(relayouts, reverse=True)  # cut, never lengthened
    assert steps == clock.plan.total == relayouts[-1]
    assert fake.now <= 600 - margin(600)
    assert any("behind the plan" in line for line in logs)


def test_a_run_that_speeds_up_has_its_plan_lengthened_and_uses_its_budget():
    fake, logs, relayouts = FakeClock(), [], []
    clock = make_clock(fake, logs=logs, relayouts=relayouts)
    steps = run(clock, fake, lambda s: 1.0 if s < 100 else 0.5, until=100_000)  # slow first steps, then twice as fast
    assert relayouts[1] > relayouts[0] and any("ahead of the plan" in line and "lengthened to" in line for line in logs)
    assert steps == clock.plan.total == relayouts[-1] and clock.plan.ended_by == "time_budget"
    assert 600 - margin(600) - 20 < fake.now <= 600 - margin(600)  # the budget is used, and kept


def test_a_lengthened_plan_stops_at_the_epochs():
    fake, logs = FakeClock(), []
    clock = make_clock(fake, cap=800, steps_per_epoch=800, logs=logs)
    steps = run(clock, fake, lambda s: 1.0 if s < 100 else 0.1, until=100_000)
    assert steps == 800 and clock.plan.ended_by == "epochs" and "capped by run.epochs" in logs[-1]


def test_validations_between_epochs_are_not_counted_as_steps_and_their_cost_is_planned_for():
    fake, logs = FakeClock(), []
    clock = make_clock(fake, steps_per_epoch=50, logs=logs)
    step = 0
    while step < clock.plan.total:
        fake.now += 0.5
        step += 1
        clock(step)
        if step % 50 == 0 or step == clock.plan.total:  # each epoch ends with a 30 s validation and checkpoint
            fake.now += 30
            clock.epoch_ended(30)
            clock.epoch_started()
    assert clock.plan.seconds_per_step == pytest.approx(0.5)  # the 30 s gaps are not in the speed
    assert fake.now <= 600 - margin(600)  # the last validation included
    assert fake.now > 600 - margin(600) - 30 - 0.5 * 50  # and not much sooner: less than one epoch's worth is idle


def test_in_epoch_checks_are_not_counted_as_steps_and_their_cost_is_planned_for():
    fake = FakeClock()
    clock = BudgetClock(initial_plan(10_000, 1, None), deadline=600, budget_s=600, cap=10_000, steps_per_epoch=10_000,
                        eval_rows=320, rows_per_step=32, agree=lambda v: v, relayout=lambda total: None,
                        log=lambda line: None, clock=fake, check_every=40, check_rows=3200)
    step = 0
    while step < clock.plan.total:
        fake.now += 0.5
        step += 1
        clock(step)
        if step % 40 == 0:  # a check of 8 s every 40 steps (20 s of steps)
            fake.now += 8
            clock.check_ended(8)
    assert clock.plan.seconds_per_step == pytest.approx(0.5)  # the checks are not in the speed
    assert fake.now <= 600 - margin(600)  # every check, and the final validation, within the budget
    assert fake.now > 600 - margin(600) - 8 - 20  # and not much sooner
    assert steps_that_fit(done=0, seconds_per_step=1, seconds_left=60, steps_per_epoch=1000, eval_seconds=0,
                          cap=1000, check_every=10, check_seconds=5) == 40  # 40 s of steps and 4 checks of 5 s


def test_a_budget_larger_than_the_epochs_keeps_the_epochs_plan():
    fake, relayouts, logs = FakeClock(), [], []
    clock = make_clock(fake, cap=500, steps_per_epoch=500, logs=logs, relayouts=relayouts)
    steps = run(clock, fake, lambda s: 0.1, until=100_000)
    assert steps == 500 and clock.plan.ended_by == "epochs" and clock.plan.timed and relayouts == []
    assert "capped by run.epochs" in logs[0]


def test_ranks_use_the_slowest_ranks_speed():
    fake, agreed = FakeClock(), []

    def agree(values):  # another rank is twice as slow and has the same time left
        agreed.append(values)
        return [min(values[0], -1.0), *values[1:]]

    clock = BudgetClock(initial_plan(10_000, 1, None), deadline=600, budget_s=600, cap=10_000, steps_per_epoch=10_000,
                        eval_rows=0, rows_per_step=32, agree=agree, relayout=lambda t: None, log=lambda line: None,
                        clock=fake)
    run(clock, fake, lambda s: 0.5, until=40)
    assert clock.plan.seconds_per_step == 1.0 and agreed[0][0] == pytest.approx(-0.5)


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "polynomial"])
def test_the_relaid_schedule_continues_from_the_current_step_and_ends_at_the_plans_last(scheduler):
    cfg = OptimSection(lr=1e-3, scheduler=scheduler, warmup_fraction=0.1)
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer(model, cfg)
    engine = SimpleNamespace(model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg, 10_000),
                             global_step=0)
    for _ in range(23):  # the warm-up, on the schedule laid out over every epoch
        optimizer.step(), engine.scheduler.step()
        engine.global_step += 1
    relayout_schedule(engine, cfg, 400)
    fresh = build_scheduler(build_optimizer(torch.nn.Linear(4, 2), cfg), cfg, 400)
    for _ in range(23):
        fresh.optimizer.step(), fresh.step()
    assert engine.scheduler.get_last_lr() == pytest.approx(fresh.get_last_lr())  # as if planned from the start
    for _ in range(400 - 23):
        optimizer.step(), engine.scheduler.step()
    assert engine.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-7 if scheduler != "polynomial" else 1e-6)


def test_ranks_with_different_clocks_check_at_the_same_steps_and_reach_the_same_plan():
    """Two ranks, one 40% slower, in threads; `agree` is a real collective (a barrier and a minimum),
    which would hang if one rank checked at a step the other did not."""
    import threading

    barrier, slots, calls = threading.Barrier(2, timeout=10), [None, None], [[], []]

    def agree_for(rank):
        def agree(values):
            slots[rank] = values
            barrier.wait()
            out = [min(a, b) for a, b in zip(*slots)]
            barrier.wait()
            return out
        return agree

    clocks, fakes = [], []
    for rank in range(2):
        fake = FakeClock()
        fakes.append(fake)
        clocks.append(BudgetClock(initial_plan(10_000, 1, None), deadline=600, budget_s=600, cap=10_000,
                                  steps_per_epoch=10_000, eval_rows=3200, rows_per_step=32, agree=agree_for(rank),
                                  relayout=lambda t: None, log=lambda line: None, clock=fake))

    def drive(rank, step_s):
        original = clocks[rank].agree
        clocks[rank].agree = lambda v: (calls[rank].append(step), original(v))[1]
        step = 0
        while step < clocks[rank].plan.total:
            fakes[rank].now += step_s
            step += 1
            clocks[rank](step)

    threads = [threading.Thread(target=drive, args=(r, s)) for r, s in enumerate((0.5, 0.7))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert calls[0] == calls[1] and len(calls[0]) > 3
    assert clocks[0].plan == clocks[1].plan and clocks[0].plan.seconds_per_step == pytest.approx(0.7)
    assert fakes[1].now <= 600 - margin(600)  # the slower rank ends in time too
