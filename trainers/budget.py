"""How many optimizer steps a run takes, and when it stops: `run.epochs`, `run.max_steps` and
`run.time_budget_min`.

Without a time budget the plan is fixed before training: every epoch's steps, capped by max_steps.
With one, the first steps are timed (`WARMUP_STEPS`, and at least `WARMUP_SECONDS` or 2% of the
budget, whichever is less), and the plan becomes the steps that fit before the deadline, less the
validations and checkpoints still to come; the learning-rate schedule is then laid out again over
exactly those steps, so it ends when the budget does. Every `RECHECK_SHARE` of the plan the speed
is measured again: a plan that no longer fits is cut, and one that leaves more than `LENGTHEN_SHARE`
of itself unused (the first steps ran slow, a neighbour went quiet) is lengthened; either way the
schedule is laid out again over the new plan from the current step. All ranks agree on each plan
through one collective (the slowest rank's estimate), at steps fixed by step counts alone.

The plan is stored in every checkpoint (`trainer_state.json` `plan`), so a resumed run finishes the
same schedule as an uninterrupted one; the deadline belongs to the first launch and is not re-timed.
No Ray here: the worker (`worker.py`) wires it in as a step hook.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

WARMUP_STEPS = 20  # steps timed before the first estimate (after SKIPPED_STEPS: allocator and kernel warm-up)
SKIPPED_STEPS = 3
WARMUP_SECONDS = 10.0  # ... and at least this long, or WARMUP_SHARE of the budget if less
WARMUP_SHARE = 0.02
RECHECK_SHARE = 0.05  # re-measure the speed every 5% of the plan
LENGTHEN_SHARE = 0.02  # lengthen a plan only when this much more fits (no re-layout for noise)
EVAL_COST = 1 / 3  # a validation row costs about a third of a training row (forward only)
MARGIN_SHARE, MARGIN_S = 0.02, 10.0  # kept free before the deadline: 2% of the budget, at least 10 s

EndedBy = Literal["epochs", "max_steps", "time_budget"]


class StepPlan(BaseModel):
    """The optimizer steps a run takes and why it stops there; stored in each checkpoint."""

    model_config = ConfigDict(extra="forbid")

    total: int = Field(ge=1, description="Optimizer steps the run takes; the schedule ends at the last.")
    ended_by: EndedBy = Field(description="What sets `total`: every epoch, run.max_steps, or the time budget.")
    seconds_per_step: float | None = Field(None, description="The measured speed the last time the plan was set.")
    timed: bool = Field(False, description="Whether the time budget has set the plan yet.")


def initial_plan(steps_per_epoch: int, epochs: int, max_steps: int | None) -> StepPlan:
    """Before any timing: every epoch, or max_steps if that is fewer."""
    every = steps_per_epoch * epochs
    if max_steps is not None and max_steps < every:
        return StepPlan(total=max_steps, ended_by="max_steps")
    return StepPlan(total=every, ended_by="epochs")


def steps_that_fit(*, done: int, seconds_per_step: float, seconds_left: float, steps_per_epoch: int,
                   eval_seconds: float, cap: int, check_every: int | None = None, check_seconds: float = 0.0) -> int:
    """The largest total number of steps such that training the rest and every validation and checkpoint
    it entails (one per epoch end reached, and a final one), and every in-epoch check (one per
    `check_every` steps), end within `seconds_left`; at least `done + 1` and at most `cap`."""
    best = done + 1
    lo, hi = done + 1, cap
    while lo <= hi:  # the time needed grows with the total: bisect on it
        total = (lo + hi) // 2
        # epoch ends in [done, total] (one at `done` itself is still to come: hooks run before it), and the last
        validations = total // steps_per_epoch - (max(done, 1) - 1) // steps_per_epoch + (total % steps_per_epoch > 0)
        checks = total // check_every - (max(done, 1) - 1) // check_every if check_every else 0
        if (total - done) * seconds_per_step + validations * eval_seconds + checks * check_seconds <= seconds_left:
            best, lo = total, total + 1
        else:
            hi = total - 1
    return min(best, cap)


def margin(budget_s: float) -> float:
    return max(MARGIN_S, MARGIN_SHARE * budget_s)


class BudgetClock:
    """A step hook for a run with a time budget: sets the plan after the warm-up and re-checks it.

    Speed is the time between optimizer steps, summed over epochs: `epoch_started` marks where the
    validation and checkpoint between two epochs ended, so they are not counted as steps, and
    `epoch_ended` gives their measured cost, which then replaces the estimate of a validation;
    `check_ended` does the same for an in-epoch check (run.check_every_steps) of `check_rows` rows.
    `agree` takes this rank's numbers and returns each one's minimum over the ranks (one collective), so
    every rank uses the slowest rank's speed and validation, the least time left, and reaches the same
    plan; `relayout(total)` lays the
    learning-rate schedule out again over `total` steps from the current one; `log` prints on rank 0."""

    def __init__(self, plan: StepPlan, *, deadline: float, budget_s: float, cap: int, steps_per_epoch: int,
                 eval_rows: int, rows_per_step: int, agree: Callable[[list[float]], list[float]],
                 relayout: Callable[[int], None], log: Callable[[str], None], clock: Callable[[], float] = time.time,
                 check_every: int | None = None, check_rows: int = 0):
        self.plan, self.deadline, self.budget_s, self.cap = plan, deadline, budget_s, cap
        self.check_every, self.check_rows, self.check_s = check_every, check_rows, None
        self.capped_by = plan.ended_by  # epochs or max_steps: what ends the run if the budget does not
        self.steps_per_epoch, self.eval_rows, self.rows_per_step = steps_per_epoch, eval_rows, rows_per_step
        self.agree, self.relayout, self.log, self.clock = agree, relayout, log, clock
        self.last: float | None = None  # when the previous step (or this epoch) ended
        self.steps, self.seconds, self.first = 0, 0.0, None  # measured since the last decision
        self.epoch_end_s: float | None = None
        self.next_check: int | None = None

    def epoch_started(self) -> None:
        self.last = self.clock() if self.last is not None else None

    def epoch_ended(self, seconds: float) -> None:
        """The validation, checkpoint and report after an epoch took `seconds`."""
        self.epoch_end_s = seconds

    def check_ended(self, seconds: float) -> None:
        """An in-epoch check took `seconds`: not step time, and the measured cost of the checks to come."""
        self.check_s = seconds
        self.last = self.clock() if self.last is not None else None

    def __call__(self, global_step: int) -> None:
        """After optimizer step `global_step` (1-based, counted over the whole run). Whether a step is a
        check depends on step counts only, never on one rank's clock, so every rank joins the same
        collectives."""
        now = self.clock()
        if global_step <= SKIPPED_STEPS or self.last is None:
            self.last = now
            return
        self.steps, self.seconds, self.last = self.steps + 1, self.seconds + now - self.last, now
        self.first = global_step if self.first is None else self.first
        if self.next_check is None:
            self.next_check = global_step + WARMUP_STEPS - 1
        if global_step < self.next_check or global_step >= self.plan.total:
            return
        per_step = self.seconds / self.steps
        eval_seconds = self.epoch_end_s if self.epoch_end_s is not None else \
            self.eval_rows / self.rows_per_step * per_step * EVAL_COST
        check_seconds = self.check_s if self.check_s is not None else \
            self.check_rows / self.rows_per_step * per_step * EVAL_COST
        slower, seconds_left, measured, longer_eval, longer_check = self.agree(
            [-per_step, self.deadline - margin(self.budget_s) - now, self.seconds, -eval_seconds, -check_seconds])
        if not self.plan.timed and measured < min(WARMUP_SECONDS, WARMUP_SHARE * self.budget_s):
            self.next_check = global_step + self.steps  # not warm yet: look again after as many steps again
            return
        per_step, eval_seconds = -slower, -longer_eval
        fit = steps_that_fit(done=global_step, seconds_per_step=per_step, seconds_left=seconds_left,
                             steps_per_epoch=self.steps_per_epoch, eval_seconds=eval_seconds, cap=self.cap,
                             check_every=self.check_every, check_seconds=-longer_check)
        first_time, old = not self.plan.timed, self.plan.total
        if first_time or fit < old or fit > old * (1 + LENGTHEN_SHARE):
            ended_by = "time_budget" if fit < self.cap else self.capped_by
            self.plan = StepPlan(total=fit, ended_by=ended_by, seconds_per_step=per_step, timed=True)
            if fit != old:
                self.relayout(fit)
            verb = "plan" if first_time else f"behind the plan of {old} steps: cut to" if fit < old else \
                f"ahead of the plan of {old} steps: lengthened to"
            self.log(f"time budget {self.budget_s / 60:.1f} min: {per_step:.3f} s/step over steps {self.first}-"
                     f"{global_step}, {max(seconds_left, 0):.0f} s left -> {verb} {fit} steps"
                     + (f" (capped by {'run.max_steps' if ended_by == 'max_steps' else 'run.epochs'})"
                        if fit == self.cap else "") + "; the learning-rate schedule ends there")
        self.steps, self.seconds, self.first = 0, 0.0, None
        self.next_check = global_step + max(1, math.ceil(RECHECK_SHARE * self.plan.total))
