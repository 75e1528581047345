"""Rollouts: a candidate version goes through shadow and canary steps to champion, or back out.

The policy (`RolloutPolicy`, in the serve config under `rollout:`) says how much traffic each phase
gets, how long it holds and how many samples it needs; its guards say what fails a candidate. The
controller (serve_deployments/controller.py) merges what the model replicas report into `Evidence`
and calls `Rollout.tick` once a second; everything here is plain Python on an injected clock, so
the decisions are tested without Ray.

Guards are statistical, each with a threshold and a minimum sample count, and judge only once both
versions have that many samples:
- errors: the candidate's error rate exceeds the champion's by more than `max_increase`, and a one-
  sided Fisher exact test says the excess is not chance (p < alpha);
- latency: the candidate's p99 over the champion's p99, on the requests each one answered for its
  callers (canary; mirrored requests run beside live traffic, so their latency is not compared);
- disagreement (shadow): the Wilson interval's lower bound of the share of mirrored instances whose
  label differs from the champion's answer;
- confidence: the two-sample Kolmogorov-Smirnov statistic between the versions' top-class
  confidences, when its p-value is below alpha.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from model_registry.registry import GuardResult, RolloutRecord, VersionTally
from monitoring.monitor import AnsweredBatch
from monitoring.window import WindowCounts

SAMPLES_KEPT = 20_000  # latencies and confidences kept per version (the newest)
Phase = Literal["shadow", "canary", "promoting", "promoted", "rolled_back", "aborted"]
ACTIVE: tuple[str, ...] = ("shadow", "canary", "promoting")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Shadow(Section):
    fraction: float = Field(0.5, gt=0, le=1, description="Share of the champion's requests mirrored to the "
                            "candidate; the candidate's answers are compared and never returned.")
    hold_s: float = Field(60, ge=0, description="Shadow lasts at least this long.")
    min_samples: int = Field(200, ge=0, description="... and until this many requests were mirrored.")
    max_in_flight: int = Field(8, ge=1, description="Mirrored requests one replica runs at once; more are dropped "
                               "(and counted), so shadow work never queues behind or ahead of live traffic.")


class Step(Section):
    weight: float = Field(gt=0, lt=1, description="Share of callers the candidate answers.")
    hold_s: float = Field(60, ge=0, description="The step lasts at least this long.")
    min_samples: int = Field(200, ge=0, description="... and until the candidate answered this many requests in it.")


class ErrorGuard(Section):
    max_increase: float = Field(0.01, ge=0, le=1, description="Largest tolerated rise of the error rate "
                                "(candidate minus champion).")
    alpha: float = Field(0.01, gt=0, lt=1, description="The rise must also be significant: one-sided Fisher exact "
                         "test p-value below this.")
    min_samples: int = Field(200, ge=1, description="Requests per version before this guard judges.")


class LatencyGuard(Section):
    max_p99_ratio: float = Field(1.5, gt=0, description="Largest tolerated candidate p99 / champion p99.")
    min_samples: int = Field(200, ge=1, description="Requests per version before this guard judges.")


class DisagreementGuard(Section):
    max_rate: float = Field(0.2, ge=0, le=1, description="Largest tolerated share of mirrored instances whose label "
                            "differs from the champion's; fails when the interval's lower bound is above it.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence level of the Wilson interval.")
    min_samples: int = Field(200, ge=1, description="Mirrored instances before this guard judges.")


class ConfidenceGuard(Section):
    max_ks: float = Field(0.25, gt=0, le=1, description="Largest tolerated Kolmogorov-Smirnov distance between the "
                          "versions' top-class confidence distributions.")
    alpha: float = Field(0.01, gt=0, lt=1, description="... counted only when the KS p-value is below this.")
    min_samples: int = Field(200, ge=1, description="Instances per version before this guard judges.")


class Guards(Section):
    errors: ErrorGuard = ErrorGuard()
    latency: LatencyGuard = LatencyGuard()
    disagreement: DisagreementGuard = DisagreementGuard()
    confidence: ConfidenceGuard = ConfidenceGuard()


def _default_steps() -> list[Step]:
    return [Step(weight=0.05), Step(weight=0.25), Step(weight=0.5)]


class RolloutPolicy(Section):
    """How a candidate reaches champion. The defaults need no editing."""

    shadow: Shadow | None = Field(default_factory=Shadow, description="null skips shadow.")
    canary: list[Step] = Field(default_factory=_default_steps, description="Traffic steps, in order; [] goes from "
                               "shadow straight to promotion.")
    guards: Guards = Guards()
    key_header: str = Field("x-user-id", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$",
                            description="Request header whose value assigns the caller to a version (sticky); "
                            "without it, x-request-id, else a random draw.")
    on_promote: Literal["direct", "rollout"] = Field("rollout", description="What the service does when the alias "
                                                     "it follows (champion) moves in the registry: switch at once, "
                                                     "or roll the new version out under this policy.")
    gate_tolerance: float = Field(0.005, ge=0, le=1, description="The registry gate's tolerance at promotion.")
    max_phase_s: float = Field(3600, gt=0, description="A phase that has not gathered its samples, or whose guards "
                               "are still pending, this long after it began is rolled back (no evidence, no "
                               "promotion).")

    @field_validator("key_header")
    @classmethod
    def _lower(cls, name: str) -> str:
        return name.lower()  # HTTP header names are case-insensitive; both entry points see them lowercased

    @field_validator("canary")
    @classmethod
    def _rising(cls, steps: list[Step]) -> list[Step]:
        weights = [s.weight for s in steps]
        if weights != sorted(set(weights)):
            raise ValueError(f"canary weights must rise step by step, got {weights}")
        return steps


class Plan(BaseModel):
    """What every replica of the model serves right now: the controller's answer to each report."""

    model_config = ConfigDict(extra="forbid")
    generation: int = 0
    champion: str
    candidate: str | None = None
    weight: float = 0.0  # share of callers the candidate answers
    shadow_fraction: float = 0.0  # share of the champion's requests mirrored to the candidate
    shadow_max_in_flight: int = 8
    key_header: str = "x-user-id"


def assign(key: str | None, weight: float, rng: Callable[[], float] = random.random) -> bool:
    """True when this caller goes to the candidate: a hash of the key, so one caller sees one version
    (a caller in the candidate's share at 5% stays in it at 25%); no key, a random draw."""
    if weight <= 0:
        return False
    if key is None:
        return rng() < weight
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest) / 2**64 < weight


# --- evidence ---------------------------------------------------------------------------------
class VersionReport(BaseModel):
    """One replica's counts for one version since its last report."""

    model_config = ConfigDict(extra="forbid")
    requests: int = 0
    errors: int = 0
    instances: int = 0
    latencies_ms: list[float] = Field(default_factory=list)
    confidences: list[float] = Field(default_factory=list)


class ReplicaReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replica: str
    generation: int
    versions: dict[str, VersionReport] = Field(default_factory=dict)
    shadow_compared: int = 0
    shadow_disagreed: int = 0
    shadow_dropped: int = 0
    load_error: str | None = Field(None, description="The candidate failed to load on this replica: why.")
    monitor: dict[str, WindowCounts] = Field(default_factory=dict, description="Monitoring counts by version.")
    answered: AnsweredBatch = Field(default_factory=AnsweredBatch, description="Answered requests, for feedback "
                                    "labels.")


class Samples:
    """A version's counts and its newest latencies and confidences, all replicas merged."""

    def __init__(self) -> None:
        self.requests = self.errors = self.instances = 0
        self.latencies: deque[float] = deque(maxlen=SAMPLES_KEPT)
        self.confidences: deque[float] = deque(maxlen=SAMPLES_KEPT)

    def add(self, r: VersionReport) -> None:
        self.requests += r.requests
        self.errors += r.errors
        self.instances += r.instances
        self.latencies.extend(r.latencies_ms)
        self.confidences.extend(r.confidences)

    def tally(self) -> VersionTally:
        p50, p99 = (np.percentile(self.latencies, [50, 99]).tolist() if self.latencies else (None, None))
        return VersionTally(requests=self.requests, errors=self.errors, instances=self.instances, p50_ms=p50, p99_ms=p99)


class Evidence:
    """Everything reported during one rollout."""

    def __init__(self) -> None:
        self.versions: dict[str, Samples] = {}
        self.shadow = {"compared": 0, "disagreed": 0, "dropped": 0}

    def of(self, version: str) -> Samples:
        return self.versions.setdefault(version, Samples())

    def add(self, report: ReplicaReport) -> None:
        for version, r in report.versions.items():
            self.of(version).add(r)
        self.shadow["compared"] += report.shadow_compared
        self.shadow["disagreed"] += report.shadow_disagreed
        self.shadow["dropped"] += report.shadow_dropped


def judge(guards: Guards, champion: Samples, candidate: Samples, shadow: dict[str, int]) -> list[GuardResult]:
    """Each guard's verdict on the evidence so far: pending below its sample count, else pass or fail."""
    from scipy import stats

    def errors() -> tuple[float, bool, float | None, str]:
        g = guards.errors
        rise = candidate.errors / candidate.requests - champion.errors / champion.requests
        table = [[candidate.errors, candidate.requests - candidate.errors],
                 [champion.errors, champion.requests - champion.errors]]
        p = float(stats.fisher_exact(table, alternative="greater").pvalue)
        return rise, rise > g.max_increase and p < g.alpha, p, (f"error rate {candidate.errors}/{candidate.requests} "
                                                               f"against {champion.errors}/{champion.requests}")

    def latency() -> tuple[float, bool, float | None, str]:
        a, b = np.percentile(candidate.latencies, 99), np.percentile(champion.latencies, 99)
        ratio = float(a / max(b, 1e-6))
        return ratio, ratio > guards.latency.max_p99_ratio, None, f"p99 {a:.1f} ms against {b:.1f} ms"

    def disagreement() -> tuple[float, bool, float | None, str]:
        g, n, k = guards.disagreement, shadow["compared"], shadow["disagreed"]
        low, high = stats.binomtest(k, n).proportion_ci(confidence_level=g.confidence, method="wilson")
        return k / n, low > g.max_rate, None, (f"{k}/{n} mirrored instances disagreed; {g.confidence:.0%} interval "
                                               f"[{low:.3f}, {high:.3f}]")

    def confidence() -> tuple[float, bool, float | None, str]:
        g = guards.confidence
        ks = stats.ks_2samp(np.asarray(candidate.confidences), np.asarray(champion.confidences))
        return float(ks.statistic), bool(ks.statistic > g.max_ks and ks.pvalue < g.alpha), float(ks.pvalue), (
            f"top-class confidence: median {np.median(candidate.confidences):.3f} against "
            f"{np.median(champion.confidences):.3f}")

    checks = [("errors", guards.errors.max_increase, guards.errors.min_samples,
               min(champion.requests, candidate.requests), errors),
              ("latency", guards.latency.max_p99_ratio, guards.latency.min_samples,
               min(len(champion.latencies), len(candidate.latencies)), latency),
              ("disagreement", guards.disagreement.max_rate, guards.disagreement.min_samples, shadow["compared"],
               disagreement),
              ("confidence", guards.confidence.max_ks, guards.confidence.min_samples,
               min(len(champion.confidences), len(candidate.confidences)), confidence)]
    out = []
    for name, threshold, need, n, check in checks:
        if n < need:
            out.append(GuardResult(name=name, status="pending", threshold=threshold, samples=n, min_samples=need))
            continue
        value, fail, p, detail = check()
        out.append(GuardResult(name=name, status="fail" if fail else "pass", value=value, threshold=threshold,
                               samples=n, min_samples=need, p_value=p, detail=detail))
    return out


# --- the state machine ------------------------------------------------------------------------
class RolloutState(BaseModel):
    """A rollout as recorded (the controller's rollout.json): enough to resume after a restart."""

    model_config = ConfigDict(extra="forbid")
    champion: str
    candidate: str
    policy: RolloutPolicy
    phase: Phase = "shadow"
    step: int = 0  # canary step index
    started: str  # UTC, ISO
    started_at: float  # the clock's time
    step_started_at: float
    step_base: int = 0  # candidate requests (canary) or mirrored requests (shadow) when the step began
    alias_moved: bool = Field(False, description="The champion alias already points at the candidate (a registry "
                              "promote started this rollout); a rollback moves it back.")
    reason: str | None = None
    decided_phase: str | None = None  # the phase and weight when the decision fell
    decided_weight: float = 0.0
    guards: list[GuardResult] = Field(default_factory=list)


class Rollout:
    """One rollout's decisions: `tick` moves it forward, fails it on a guard, or asks to promote."""

    def __init__(self, state: RolloutState, clock: Callable[[], float]):
        self.state, self.clock = state, clock
        self.evidence = Evidence()

    @classmethod
    def begin(cls, champion: str, candidate: str, policy: RolloutPolicy, clock: Callable[[], float], started: str,
              alias_moved: bool = False) -> Rollout:
        now = clock()
        phase = "shadow" if policy.shadow else ("canary" if policy.canary else "promoting")
        return cls(RolloutState(champion=champion, candidate=candidate, policy=policy, phase=phase, started=started,
                                started_at=now, step_started_at=now, alias_moved=alias_moved), clock)

    @property
    def active(self) -> bool:
        return self.state.phase in ACTIVE

    @property
    def weight(self) -> float:
        """The candidate's share of callers: the canary step's, held while the promotion is written."""
        s = self.state
        return s.policy.canary[s.step].weight if s.phase in ("canary", "promoting") and s.policy.canary else 0.0

    @property
    def shadow_fraction(self) -> float:
        s = self.state
        return s.policy.shadow.fraction if s.phase == "shadow" and s.policy.shadow else 0.0

    def _progress(self) -> int:
        """Requests the candidate answered: mirrored ones in shadow, its callers' in canary."""
        return self.evidence.of(self.state.candidate).requests

    def guards(self) -> list[GuardResult]:
        s = self.state
        return judge(s.policy.guards, self.evidence.of(s.champion), self.evidence.of(s.candidate),
                     self.evidence.shadow)

    def tick(self) -> Phase:
        """Judge the guards, then move on when the phase held long enough with enough samples."""
        s = self.state
        if not self.active or s.phase == "promoting":
            return s.phase
        s.guards = self.guards()
        failed = [g for g in s.guards if g.status == "fail"]
        if failed:
            self.fail("guard " + ", ".join(f"{g.name} failed ({g.detail or g.value})" for g in failed))
            return s.phase
        held = self.clock() - s.step_started_at
        need_s, need_n = ((s.policy.shadow.hold_s, s.policy.shadow.min_samples) if s.phase == "shadow" else
                          (s.policy.canary[s.step].hold_s, s.policy.canary[s.step].min_samples))
        got = self._progress() - s.step_base
        # The last phase promotes only on judged guards (disagreement is measured in shadow only).
        last = s.phase == "canary" and s.step + 1 == len(s.policy.canary) or s.phase == "shadow" and not s.policy.canary
        pending = [g.name for g in s.guards if g.status == "pending" and (g.name != "disagreement" or s.phase == "shadow")]
        if held >= need_s and got >= need_n and not (last and pending):
            self._next()
        elif held >= s.policy.max_phase_s:
            missing = f"{got}/{need_n} candidate requests" + (f", guards pending: {', '.join(pending)}" if pending else "")
            self.fail(f"no decision within max_phase_s ({s.policy.max_phase_s:g}s) in {s.phase}: {missing}")
        return s.phase

    def _next(self) -> None:
        s = self.state
        if s.phase == "shadow" and s.policy.canary:
            s.phase, s.step = "canary", 0
        elif s.phase == "canary" and s.step + 1 < len(s.policy.canary):
            s.step += 1
        else:
            s.phase = "promoting"
        s.step_started_at = self.clock()
        s.step_base = self._progress()

    def fail(self, reason: str, phase: Phase = "rolled_back") -> None:
        self._decide(phase, reason)

    def promoted(self, reason: str) -> None:
        self._decide("promoted", reason)

    def _decide(self, phase: Phase, reason: str) -> None:
        s = self.state
        if s.phase not in ACTIVE:
            return  # decided already: the first decision stands
        s.decided_phase, s.decided_weight = s.phase, self.weight
        s.guards = s.guards or self.guards()
        s.phase, s.reason = phase, reason

    def record(self) -> RolloutRecord:
        """The decision and its evidence, for the registry history (after fail or promoted)."""
        s = self.state
        outcome = {"promoted": "promoted", "aborted": "aborted"}.get(s.phase, "rolled_back")
        return RolloutRecord(outcome=outcome, champion=s.champion, candidate=s.candidate,
                             phase=s.decided_phase or s.phase, weight=s.decided_weight, started=s.started,
                             guards=s.guards,
                             tallies={v: x.tally() for v, x in self.evidence.versions.items()},
                             shadow=dict(self.evidence.shadow))
