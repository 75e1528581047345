"""The deployment-wide monitor, kept by each model's controller: windows merged over every replica's
reports, their drift tests, the feedback join and live accuracy, and when retraining is due.

No Ray here: the controller feeds it reports and feedback and exports what it returns; tests drive it
with a clock of their own.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from monitoring.config import MonitoringPolicy
from monitoring.profile import ReferenceProfile
from monitoring.signals import SignalResult, accuracy_signal, drift_signals
from monitoring.window import WindowCounts

HISTORY = 50  # closed windows kept per version and kind
REQUEST_ID = r"^[0-9a-f]{32}$"


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WindowResult(Record):
    version: str
    kind: Literal["drift", "feedback"]
    opened: str
    closed: str
    instances: int = Field(description="Instances (drift) or labels (feedback) in the window.")
    signals: list[SignalResult]
    alarm: bool
    accuracy: float | None = None
    macro_f1: float | None = None


class Answered(Record):
    """One answered request a replica reports, so feedback on it can be joined: its id, version and labels."""

    request_id: str
    version: str
    labels: list[str]


class AnsweredBatch(Record):
    """A replica's answered requests since its last report, column by column (cheap to build and send)."""

    request_ids: list[str] = Field(default_factory=list)
    versions: list[str] = Field(default_factory=list)
    labels: list[list[str]] = Field(default_factory=list)

    def items(self) -> Iterator[Answered]:
        for request_id, version, labels in zip(self.request_ids, self.versions, self.labels):
            yield Answered.model_construct(request_id=request_id, version=version, labels=labels)


class FeedbackLabel(Record):
    """A checked feedback label: the request, which of its instances (0 for the first), and the label's index."""

    request_id: str
    instance: int
    label: int


class FeedbackOutcome(Record):
    matched: int = 0
    waiting: int = Field(0, description="Ids not known yet: held for feedback.wait_s, then counted unmatched.")
    duplicate: int = 0
    out_of_range: int = Field(0, description="instance beyond the request's instances.")


@dataclass
class _Pending:
    version: str
    labels: list[str]
    at: float
    labelled: set[int] = field(default_factory=set)


@dataclass
class _Live:
    """A version's feedback window: true and predicted label indices."""

    opened: float
    truth: list[int] = field(default_factory=list)
    predicted: list[int] = field(default_factory=list)


@dataclass
class _Version:
    profile: ReferenceProfile | None
    window: WindowCounts | None = None
    opened: float = 0.0
    instances: int = 0
    windows: int = 0
    alarmed: int = 0
    dropped_windows: int = 0
    streak: dict[str, int] = field(default_factory=lambda: {"drift": 0, "feedback": 0})
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    live: _Live | None = None
    labels_total: int = 0
    correct_total: int = 0


class Monitor:
    def __init__(self, name: str, labels: list[str], policy: MonitoringPolicy, clock: Callable[[], float] = time.time,
                 seed: int | None = None):
        self.name, self.labels, self.policy, self.clock = name, labels, policy, clock
        self.index = {label: i for i, label in enumerate(labels)}
        self.rng = np.random.default_rng(seed)
        self.versions: dict[str, _Version] = {}
        self.pending: OrderedDict[str, _Pending] = OrderedDict()
        self.waiting: OrderedDict[str, list[tuple[float, FeedbackLabel]]] = OrderedDict()
        self.waiting_labels = 0
        self.counts = {"matched": 0, "unmatched": 0, "duplicate": 0, "expired": 0, "out_of_range": 0}

    # --- versions and their reference ------------------------------------------------------------
    def has(self, version: str) -> bool:
        return version in self.versions

    def track(self, version: str, profile: ReferenceProfile | None) -> None:
        """Start monitoring a version. A package exported before reference profiles existed has none: its
        feedback is joined and counted, and nothing is tested."""
        if version not in self.versions:
            self.versions[version] = _Version(profile)

    # --- drift -----------------------------------------------------------------------------------
    def add(self, version: str, counts: WindowCounts) -> list[WindowResult]:
        """A replica's counts for `version`; returns the window it closed, if it filled one."""
        v = self.versions.get(version)
        if v is None or v.profile is None or not counts.fits(v.profile):
            return []
        now = self.clock()
        v.instances += counts.instances
        if v.window is None:
            v.window, v.opened = counts, now
        else:
            v.window = v.window.merge(counts, self.policy.window.sample, self.rng)
        if v.window.instances >= self.policy.window.instances:
            return [self._close(version, v, now)]
        return []

    def _close(self, version: str, v: _Version, now: float) -> WindowResult:
        window, v.window = v.window, None
        signals = drift_signals(v.profile, window, self.policy.thresholds)
        return self._closed(version, v, WindowResult(version=version, kind="drift", opened=iso(v.opened),
                                                     closed=iso(now), instances=window.instances, signals=signals,
                                                     alarm=any(s.alarm for s in signals)))

    def _closed(self, version: str, v: _Version, result: WindowResult) -> WindowResult:
        v.windows += 1
        v.alarmed += result.alarm
        counted = any(s.alarm for s in result.signals if s.signal in self.policy.retraining.signals)
        v.streak[result.kind] = v.streak[result.kind] + 1 if counted else 0
        v.history.append(result)
        return result

    def tick(self) -> list[WindowResult]:
        """Close windows that are old enough; expire old answers; give up on feedback held too long."""
        now, out = self.clock(), []
        w = self.policy.window
        for version, v in self.versions.items():
            if v.window is not None and now - v.opened >= w.seconds:
                if v.window.instances >= w.min_instances:
                    out.append(self._close(version, v, now))
                else:
                    v.window, v.dropped_windows = None, v.dropped_windows + 1
        f = self.policy.feedback
        while self.pending and now - next(iter(self.pending.values())).at > f.max_age_s:
            self.pending.popitem(last=False)
            self.counts["expired"] += 1
        while self.waiting:
            request_id, held = next(iter(self.waiting.items()))
            if now - held[0][0] <= f.wait_s:
                break
            self.waiting.popitem(last=False)
            self.waiting_labels -= len(held)
            self.counts["unmatched"] += len(held)
        return out

    # --- feedback ----------------------------------------------------------------------------------
    def answered(self, answers: Iterable[Answered]) -> list[WindowResult]:
        """Remember answered requests for their feedback (bounded: the oldest are forgotten first); match
        feedback that arrived before them."""
        now, out = self.clock(), []
        for a in answers:
            self.pending[a.request_id] = _Pending(a.version, a.labels, now)
            self.pending.move_to_end(a.request_id)
            held = self.waiting.pop(a.request_id, None)
            if held:
                self.waiting_labels -= len(held)
                for _, item in held:
                    out += self._match(item, FeedbackOutcome())
        while len(self.pending) > self.policy.feedback.max_pending:
            self.pending.popitem(last=False)
            self.counts["expired"] += 1
        return out

    def feedback(self, items: list[FeedbackLabel]) -> tuple[FeedbackOutcome, list[WindowResult]]:
        outcome, out = FeedbackOutcome(), []
        now = self.clock()
        for item in items:
            if item.request_id in self.pending:
                out += self._match(item, outcome)
                continue
            if self.waiting_labels >= self.policy.feedback.max_pending:  # bounded: the oldest held give way
                _, dropped = self.waiting.popitem(last=False)
                self.waiting_labels -= len(dropped)
                self.counts["unmatched"] += len(dropped)
            self.waiting.setdefault(item.request_id, []).append((now, item))
            self.waiting_labels += 1
            outcome.waiting += 1
        return outcome, out

    def _match(self, item: FeedbackLabel, outcome: FeedbackOutcome) -> list[WindowResult]:
        p = self.pending[item.request_id]
        if item.instance >= len(p.labels):
            self.counts["out_of_range"] += 1
            outcome.out_of_range += 1
            return []
        if item.instance in p.labelled:
            self.counts["duplicate"] += 1
            outcome.duplicate += 1
            return []
        p.labelled.add(item.instance)  # kept until it expires, so a repeated label counts as a duplicate
        self.counts["matched"] += 1
        outcome.matched += 1
        v = self.versions.get(p.version)
        predicted = self.index.get(p.labels[item.instance])
        if v is None or predicted is None:
            return []
        v.labels_total += 1
        v.correct_total += predicted == item.label
        if v.profile is None:  # no reference accuracy to test against: counted only
            return []
        now = self.clock()
        v.live = v.live or _Live(opened=now)
        v.live.truth.append(item.label)
        v.live.predicted.append(predicted)
        if len(v.live.truth) < self.policy.feedback.window:
            return []
        return [self._close_live(p.version, v, now)]

    def _close_live(self, version: str, v: _Version, now: float) -> WindowResult:
        from sklearn.metrics import f1_score

        live, v.live = v.live, None
        truth, predicted = np.asarray(live.truth), np.asarray(live.predicted)
        correct = int((truth == predicted).sum())
        signal = accuracy_signal(v.profile, correct, len(truth), self.policy.thresholds)
        f1 = float(f1_score(truth, predicted, labels=list(range(len(self.labels))), average="macro", zero_division=0))
        return self._closed(version, v, WindowResult(
            version=version, kind="feedback", opened=iso(live.opened), closed=iso(now), instances=len(truth),
            signals=[signal], alarm=signal.alarm, accuracy=correct / len(truth), macro_f1=f1))

    # --- what the controller reads -----------------------------------------------------------------
    def streak(self, version: str) -> int:
        v = self.versions.get(version)
        return max(v.streak.values()) if v else 0

    def reset_streak(self, version: str) -> None:
        if version in self.versions:
            self.versions[version].streak = {"drift": 0, "feedback": 0}

    def retire(self, served: set[str]) -> list[str]:
        """Forget versions the service no longer serves; returns them (their gauges are cleared)."""
        gone = [v for v in self.versions if v not in served]
        for version in gone:
            del self.versions[version]
        return gone

    def live_accuracy(self, version: str) -> dict:
        v = self.versions.get(version)
        if v is None or not v.labels_total:
            return {"labels": 0, "accuracy": None}
        return {"labels": v.labels_total, "accuracy": v.correct_total / v.labels_total}

    def status(self) -> dict:
        """JSON-ready: per version its reference, volume, last windows and live accuracy; feedback counts."""
        versions = {}
        for version, v in self.versions.items():
            last = {kind: next((r for r in reversed(v.history) if r.kind == kind), None) for kind in ("drift", "feedback")}
            p = v.profile
            versions[version] = {
                "reference": None if p is None else {"rows": p.rows, "source": p.source, "accuracy": p.accuracy,
                                                     "macro_f1": p.macro_f1},
                "instances": v.instances, "windows": v.windows, "alarmed_windows": v.alarmed,
                "dropped_windows": v.dropped_windows, "open_window": v.window.instances if v.window else 0,
                "streak": max(v.streak.values()),
                "drift": last["drift"].model_dump() if last["drift"] else None,
                "feedback": last["feedback"].model_dump() if last["feedback"] else None,
                "live": {"labels": v.labels_total, "accuracy": v.correct_total / v.labels_total if v.labels_total else None,
                         "open_window": len(v.live.truth) if v.live else 0},
                "history": [r.model_dump() for r in v.history],
            }
        return {"model": self.name, "policy": self.policy.model_dump(), "versions": versions,
                "feedback": dict(self.counts) | {"pending_answers": len(self.pending), "held_labels": self.waiting_labels}}
