"""The rollout controller: one small deployment in each model's application.

It decides what every replica of the model serves (`Plan`): the champion version, and during a
rollout the candidate, its traffic weight and its shadow share. Replicas report their counts once a
second and get the plan back; the controller merges the counts into the rollout's evidence, ticks
the rollout (serve_deployments/rollout.py) and records each decision, with its evidence, in the
model's registry history. It also follows the registry: when the champion alias moves, the service
switches to the new version directly or rolls it out, as the policy says. The monitoring of the
served versions (drift, live accuracy, retraining) is its `ServedMonitoring`
(serve_deployments/monitoring.py), fed with the same reports and ticked by the same loop.

Its state is kept beside the model's registry.json (`rollout.json`), written at every change, so a
restarted controller resumes the rollout where it was (the evidence gathered so far restarts).

    python -m ray_apps rollout start digits --candidate digits:3 [--policy policy.yaml]
    python -m ray_apps rollout status digits
    GET /v2/models/digits/rollout
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict
from ray import serve

from serve_deployments.monitoring import ServedMonitoring
from serve_deployments.rollout import ACTIVE, Plan, ReplicaReport, Rollout, RolloutPolicy, RolloutState

logger = logging.getLogger("ray.serve")
STATE_FILE = "rollout.json"
TICK_S = 1.0
REGISTRY_POLL_S = 2.0
PHASES = ("none", "shadow", "canary", "promoting", "promoted", "rolled_back", "aborted")


class ServiceState(BaseModel):
    """rollout.json: what the running service serves, and its rollout."""

    model_config = ConfigDict(extra="forbid")
    built: str  # the version the application was deployed with; a redeploy with another one starts afresh
    champion: str
    generation: int = 0
    followed: str | None = None  # the followed alias's version the controller last acted on
    rollout: RolloutState | None = None


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_service(registry: Any, name: str, built: str) -> ServiceState:
    """The recorded service state, or a fresh one when there is none or it was for another deployment."""
    data = registry.read_document(name, STATE_FILE)
    if data is not None:
        try:
            state = ServiceState.model_validate_json(data)
            if state.built == built:
                return state
        except ValueError as e:
            logger.warning("%s: ignoring unreadable %s (%s)", name, STATE_FILE, e)
    return ServiceState(built=built, champion=built)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                  health_check_period_s=10, logging_config={"log_level": "WARNING"})
class RolloutController:
    def __init__(self, registry: str, name: str, built: str, follow: str | None, policy: dict[str, Any],
                 monitoring: dict[str, Any] | None = None):
        from model_registry.registry import Registry
        from rayfoundry.ray_env import quiet_process

        quiet_process()
        self.registry, self.name, self.follow = Registry(registry), name, follow
        self.policy = RolloutPolicy.model_validate(policy)
        self.service = read_service(self.registry, name, built)
        self.rollout: Rollout | None = None
        self.last: Rollout | None = None  # the latest finished rollout, for status and report
        if self.service.rollout is not None:
            state = self.service.rollout
            state.step_base = 0  # the evidence restarts with this process
            if state.phase in ACTIVE:
                self.rollout = Rollout(state, time.time)
            else:
                self.last = Rollout(state, time.time)
        # A move of the alias while no controller ran is acted on at the first tick; a new service
        # starts from the alias as it is.
        self.followed = self.service.followed if self.service.followed is not None else self._alias()
        self.warned: set[tuple[str, int]] = set()
        self.monitoring = ServedMonitoring(self.registry, name, self._served, monitoring)
        self._metrics()
        self.task: asyncio.Task | None = None
        # A new generation at every start: replicas apply it, and no plan of an earlier life of this
        # controller (published, perhaps never written) is taken for the current one.
        self._changed()

    def _metrics(self) -> None:
        from ray.serve import metrics

        self.weight_gauge = metrics.Gauge("rayfoundry_rollout_weight", "Share of callers the candidate answers.",
                                          tag_keys=("model",))
        self.shadow_gauge = metrics.Gauge("rayfoundry_rollout_shadow_fraction", "Share of requests mirrored to the "
                                          "candidate.", tag_keys=("model",))
        self.phase_gauge = metrics.Gauge("rayfoundry_rollout_phase", "1 for the rollout's current phase.",
                                         tag_keys=("model", "phase"))
        self.guard_gauge = metrics.Gauge("rayfoundry_rollout_guard", "Each guard's current value (its threshold "
                                         "is in the status).", tag_keys=("model", "guard"))
        for m in (self.weight_gauge, self.shadow_gauge, self.phase_gauge, self.guard_gauge):
            m.set_default_tags({"model": self.name})

    def _ensure_loop(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._loop())

    async def check_health(self) -> None:
        self._ensure_loop()
        if self.task.done() and not self.task.cancelled() and self.task.exception() is not None:
            raise RuntimeError(f"the rollout loop stopped: {self.task.exception()!r}")

    # --- what the replicas ask -------------------------------------------------------------------
    def plan(self) -> Plan:
        r, s = self.rollout, self.service
        policy = r.state.policy if r else self.policy  # a rollout started with its own policy file uses it all
        return Plan(generation=s.generation, champion=s.champion, candidate=r.state.candidate if r else None,
                    weight=r.weight if r else 0.0, shadow_fraction=r.shadow_fraction if r else 0.0,
                    shadow_max_in_flight=policy.shadow.max_in_flight if policy.shadow else 8,
                    key_header=policy.key_header)

    async def report(self, report: ReplicaReport) -> Plan:
        self._ensure_loop()
        r = self.rollout
        if r is not None and report.generation == self.service.generation:
            r.evidence.add(report)
            if report.load_error:
                await self._finish(r, "rolled_back", f"the candidate failed to load on replica {report.replica}: "
                                                      f"{report.load_error}")
        elif report.load_error and (report.replica, report.generation) not in self.warned:
            self.warned.add((report.replica, report.generation))  # it keeps serving the version it has
            logger.warning("%s: replica %s could not load version %s: %s", self.name, report.replica,
                           self.service.champion, report.load_error)
        await self.monitoring.report(report)
        return self.plan()

    def _served(self) -> tuple[str, str | None]:
        """The champion, and the candidate during a rollout."""
        return self.service.champion, self.rollout.state.candidate if self.rollout else None

    # --- what users ask ----------------------------------------------------------------------------
    async def start(self, candidate: str, policy: dict[str, Any] | None = None, shadow: bool = False) -> dict[str, Any]:
        """Begin a rollout of `candidate`; `shadow` adds a shadow phase when the policy has none (retraining's
        candidates are always shadowed first)."""
        from rayfoundry.errors import ConfigError

        self._ensure_loop()
        name, version = await asyncio.to_thread(self.registry.resolve, candidate)
        if name != self.name:
            raise ConfigError(f"candidate {candidate}: this service serves {self.name}, not {name}")
        if self.rollout is not None:
            raise ConfigError(f"{self.name}: a rollout of {self.name}:{self.rollout.state.candidate} is in progress "
                              f"({self.rollout.state.phase}); abort it first")
        if version == self.service.champion:
            raise ConfigError(f"candidate {candidate}: {self.name}:{version} is already the champion served")
        mismatch = await asyncio.to_thread(self._incompatible, version)
        if mismatch:
            raise ConfigError(f"candidate {candidate}: {mismatch}")
        chosen = RolloutPolicy.model_validate(policy) if policy is not None else self.policy
        if shadow and chosen.shadow is None:
            from serve_deployments.rollout import Shadow

            chosen = chosen.model_copy(update={"shadow": Shadow()})
        await self._begin(version, chosen, alias_moved=False)
        return await self.status()

    async def abort(self, reason: str | None = None) -> dict[str, Any]:
        from rayfoundry.errors import ConfigError

        if self.rollout is None:
            raise ConfigError(f"{self.name}: no rollout in progress")
        await self._finish(self.rollout, "aborted", reason or "aborted by request")
        return await self.status()

    async def feedback(self, items: list[Any]) -> dict[str, Any]:
        """Labels for answered requests (checked by the server application): joined by request id."""
        return self.monitoring.feedback(items)

    async def monitor_status(self) -> dict[str, Any]:
        """Each served version's drift signals, live accuracy and volume (serve_deployments/monitoring.py)."""
        return await self.monitoring.status()

    async def status(self) -> dict[str, Any]:
        """Phase, weight, each guard against its threshold, and the counts (JSON-ready)."""
        r = self.rollout or self.last
        doc: dict[str, Any] = {"model": self.name, "champion": self.service.champion, "generation":
                               self.service.generation, "following": self.follow, "phase": "none"}
        if r is not None:
            s = r.state
            guards = r.guards() if r.active else s.guards
            doc |= {"phase": s.phase, "candidate": s.candidate, "weight": r.weight,
                    "shadow_fraction": r.shadow_fraction, "step": s.step + 1 if s.phase == "canary" else None,
                    "steps": len(s.policy.canary), "started": s.started, "reason": s.reason,
                    "held_s": round(time.time() - s.step_started_at, 1),
                    "guards": [g.model_dump() for g in guards],
                    "tallies": {v: x.tally().model_dump() for v, x in r.evidence.versions.items()},
                    "shadow": dict(r.evidence.shadow)}
        return doc

    async def ab_report(self) -> dict[str, Any]:
        """The versions compared on the traffic each one served, with 95% intervals."""
        from scipy import stats

        r = self.rollout or self.last
        if r is None:
            return {"model": self.name, "versions": {}, "note": "no rollout has run since this service started"}
        out: dict[str, Any] = {}
        for version, x in r.evidence.versions.items():
            row: dict[str, Any] = {"requests": x.requests, "errors": x.errors, "instances": x.instances}
            if x.requests:
                ci = stats.binomtest(x.errors, x.requests).proportion_ci(method="wilson")
                row["error_rate"] = {"value": x.errors / x.requests, "low": ci.low, "high": ci.high}
            lat = np.asarray(x.latencies, dtype=float)[-5000:]
            for q in (50, 90, 99):
                if len(lat) >= 20:
                    boot = stats.bootstrap((lat,), lambda a, axis, q=q: np.percentile(a, q, axis=axis),
                                           n_resamples=400, method="percentile", random_state=0)
                    row[f"p{q}_ms"] = {"value": float(np.percentile(lat, q)), "low": float(boot.confidence_interval.low),
                                       "high": float(boot.confidence_interval.high)}
            if x.confidences:
                row["mean_confidence"] = float(np.mean(x.confidences))
            out[version] = row
        shadow = dict(r.evidence.shadow)
        if shadow["compared"]:
            ci = stats.binomtest(shadow["disagreed"], shadow["compared"]).proportion_ci(method="wilson")
            shadow["disagreement"] = {"value": shadow["disagreed"] / shadow["compared"], "low": ci.low, "high": ci.high}
        return {"model": self.name, "champion": r.state.champion, "candidate": r.state.candidate,
                "phase": r.state.phase, "versions": out, "shadow": shadow,
                "accuracy": {v: self.monitoring.monitor.live_accuracy(v) for v in out} if self.monitoring.monitor is not None else
                "needs feedback labels (monitoring is off for this service)"}

    # --- the loop ----------------------------------------------------------------------------------
    async def _loop(self) -> None:
        polled = 0.0
        while True:
            await asyncio.sleep(TICK_S)
            try:
                if time.monotonic() - polled >= REGISTRY_POLL_S:
                    polled = time.monotonic()
                    await self._follow()
                r = self.rollout
                if r is not None:
                    before = (r.state.phase, r.state.step)
                    phase = r.tick()
                    if phase == "promoting":
                        await self._promote(r)
                    elif phase in ("rolled_back", "aborted"):
                        await self._finish(r, phase, r.state.reason or "")
                    elif (phase, r.state.step) != before:
                        self._changed()
                await self.monitoring.tick()
                self._export()
            except Exception:  # noqa: BLE001 - a registry hiccup must not stop the controller
                logger.exception("%s: rollout controller tick failed", self.name)

    def _alias(self) -> str | None:
        return self._alias_move()[0]

    def _alias_move(self) -> tuple[str | None, bool]:
        """The followed alias's version, and whether a `registry rollback` put it there last."""
        if self.follow is None:
            return None, False
        state = self.registry.state(self.name)
        last = next((e for e in reversed(state.history) if e.alias == self.follow), None)
        return state.aliases.get(self.follow), last is not None and last.action == "rollback"

    async def _follow(self) -> None:
        """Act on a move of the followed alias: a `registry promote` switches or starts a rollout (the
        policy's on_promote); a `registry rollback` is an emergency and switches at once."""
        version, rolled_back = await asyncio.to_thread(self._alias_move)
        if version is None or version == self.followed:
            return
        self.followed = version
        r = self.rollout
        if r is not None and version == r.state.candidate:
            r.state.alias_moved = True  # promoted by hand during the rollout: a rollback moves the alias back
            self._changed()
            return
        if r is not None:
            await self._finish(r, "aborted", f"the {self.follow} alias moved to {version} during the rollout")
        if version == self.service.champion:
            return
        if self.policy.on_promote == "rollout" and not rolled_back:
            await self._begin(version, self.policy, alias_moved=True)
            return
        mismatch = await asyncio.to_thread(self._incompatible, version)
        if mismatch:  # the replicas could not answer the champion's callers with it
            logger.error("%s: not switching to version %s: %s", self.name, version, mismatch)
            return
        self.service.champion = version
        self._changed()

    def _incompatible(self, version: str) -> str | None:
        """Why `version` cannot answer the champion's callers (other inputs or labels), or None."""
        new, old = (self.registry.metadata(self.name, v) for v in (version, self.service.champion))
        for what, a, b in (("inputs", new.inputs.kind, old.inputs.kind),
                           ("features per instance", new.inputs.num_features, old.inputs.num_features),
                           ("labels", new.task.labels, old.task.labels)):
            if a != b:
                return f"{self.name}:{version} takes other {what} than the champion {self.name}:{old.version} ({a} vs {b})"
        return None

    async def _begin(self, candidate: str, policy: RolloutPolicy, alias_moved: bool) -> None:
        self.rollout = Rollout.begin(self.service.champion, candidate, policy, time.time, now_iso(),
                                     alias_moved=alias_moved)
        self._changed()
        mismatch = await asyncio.to_thread(self._incompatible, candidate)
        if mismatch:  # a promote in the registry cannot be refused; its rollout fails at once
            await self._finish(self.rollout, "rolled_back", mismatch)

    async def _promote(self, r: Rollout) -> None:
        from model_registry.registry import GATED_ALIAS, GateRefused, RegistryError

        ref = f"{self.name}:{r.state.candidate}"
        if self.follow and not r.state.alias_moved:
            try:
                await asyncio.to_thread(self.registry.promote, ref, self.follow, tolerance=r.state.policy.gate_tolerance,
                                        reason="rollout: every phase passed its guards")
                self.followed = r.state.candidate
            except (GateRefused, RegistryError) as e:
                await self._finish(r, "rolled_back", f"the registry gate refused {ref} for @{self.follow or GATED_ALIAS}: {e}")
                return
        if self.rollout is r:  # not aborted while the registry was written
            await self._finish(r, "promoted", "every phase passed its guards")

    async def _finish(self, r: Rollout, outcome: str, reason: str) -> None:
        """Record the decision and its evidence; the service then serves the winner alone. A rollout is
        decided once: a second decision (an abort racing the promotion) is ignored."""
        if self.rollout is not r:
            return
        if outcome == "promoted":
            r.promoted(reason)
            self.service.champion = r.state.candidate
        elif r.active:
            r.fail(reason, "aborted" if outcome == "aborted" else "rolled_back")
        record = r.record()
        self.rollout, self.last = None, r
        self._changed()
        try:
            await asyncio.to_thread(self._record, r, record)
        except Exception:  # noqa: BLE001 - the service has switched; the history write is retried by nobody
            logger.exception("%s: could not record the rollout decision in the registry", self.name)

    def _record(self, r: Rollout, record: Any) -> None:
        self.registry.record(self.name, "rollout", version=r.state.candidate, previous=r.state.champion,
                             reason=f"{record.outcome}: {r.state.reason}", rollout=record)
        if record.outcome != "promoted" and r.state.alias_moved and self.follow:
            if self.registry.state(self.name).aliases.get(self.follow) == r.state.candidate:
                self.registry.rollback(self.name, self.follow, reason=f"rollout {record.outcome}: {r.state.reason}")
                self.followed = self._alias()

    def _changed(self) -> None:
        """A new plan: the replicas pick it up with their next report; the state is written at once."""
        self.service.generation += 1
        self.service.followed = self.followed
        self.service.rollout = (self.rollout or self.last).state if (self.rollout or self.last) else None
        try:
            self.registry.write_document(self.name, STATE_FILE, self.service.model_dump_json(indent=2).encode())
        except Exception:  # noqa: BLE001 - the plan stands; a restart would resume from the last written state
            logger.exception("%s: could not write %s", self.name, STATE_FILE)
        self._export()

    def _export(self) -> None:
        r, shown = self.rollout, self.rollout or self.last
        self.weight_gauge.set(r.weight if r else 0.0)
        self.shadow_gauge.set(r.shadow_fraction if r else 0.0)
        current = shown.state.phase if shown else "none"  # a finished rollout shows its outcome until the next
        for phase in PHASES:
            self.phase_gauge.set(1.0 if phase == current else 0.0, tags={"phase": phase})
        if r is not None:
            for g in r.state.guards:
                if g.value is not None:
                    self.guard_gauge.set(g.value, tags={"guard": g.name})
