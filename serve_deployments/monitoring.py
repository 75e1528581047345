"""The monitoring of a served model, run by its rollout controller (serve_deployments/controller.py).

`ServedMonitoring` holds the drift `Monitor` (monitoring/monitor.py) of the versions the service
serves, its Prometheus series and the retraining trigger's state. The controller hands it what the
replicas report (window counts and the answers' request ids), the users' feedback labels and a tick
a second; it closes windows, exports their signals, retires versions no longer served and, when the
champion's alarm persists, triggers retraining (monitoring/retrain.py).

    python -m ray_apps monitor digits
    GET /v2/models/digits/monitor
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from serve_deployments.rollout import ReplicaReport

logger = logging.getLogger("ray.serve")


class ServedMonitoring:
    """Drift and live accuracy of the versions one service serves; `monitor` is None when monitoring is
    off (monitoring.enabled false), and the series are still declared. `served` gives what the service
    serves now: the champion, and the candidate during a rollout."""

    def __init__(self, registry: Any, name: str, served: Callable[[], tuple[str, str | None]],
                 monitoring: dict[str, Any] | None):
        from monitoring.config import MonitoringPolicy
        from monitoring.monitor import Monitor

        self.registry, self.name, self.served = registry, name, served
        self.policy = MonitoringPolicy.model_validate(monitoring or {})
        labels = self.registry.metadata(name, served()[0]).task.labels
        self.monitor = Monitor(name, labels, self.policy) if self.policy.enabled else None
        self.last_retrain = 0.0  # when retraining last triggered (monotonic)
        self._metrics()

    def _metrics(self) -> None:
        from ray.serve import metrics

        # The latest closed window of each version and signal.
        self.score_gauge = metrics.Gauge("rayfoundry_monitor_score", "Each monitoring signal's score in the latest "
                                         "window: PSI, KS distance, unknown-token share rise, or accuracy drop.",
                                         tag_keys=("model", "version", "signal"))
        self.p_gauge = metrics.Gauge("rayfoundry_monitor_p_value", "Each signal's p-value in the latest window.",
                                     tag_keys=("model", "version", "signal"))
        self.alarm_gauge = metrics.Gauge("rayfoundry_monitor_alarm", "1 when the signal alarmed in the latest window "
                                         "(significant after Bonferroni and at least the minimum effect).",
                                         tag_keys=("model", "version", "signal"))
        self.windows_counter = metrics.Counter("rayfoundry_monitor_windows_total", "Closed monitoring windows, by kind "
                                               "(drift, feedback) and outcome (alarm, ok).",
                                               tag_keys=("model", "version", "kind", "outcome"))
        self.live_gauge = metrics.Gauge("rayfoundry_live_accuracy", "Accuracy on the latest window of feedback labels "
                                        "(metric=accuracy, macro_f1, reference: the package's validation accuracy).",
                                        tag_keys=("model", "version", "metric"))
        self.feedback_counter = metrics.Counter("rayfoundry_feedback_labels_total", "Feedback labels by outcome: "
                                                "matched, unmatched, duplicate, expired (answers forgotten), "
                                                "out_of_range.", tag_keys=("model", "outcome"))
        self.retrain_counter = metrics.Counter("rayfoundry_retraining_triggers_total", "Retraining triggers by outcome "
                                               "(submitted, dry_run, failed).", tag_keys=("model", "outcome"))
        for m in (self.score_gauge, self.p_gauge, self.alarm_gauge, self.windows_counter, self.live_gauge,
                  self.feedback_counter, self.retrain_counter):
            m.set_default_tags({"model": self.name})
        self.feedback_exported = dict.fromkeys(("matched", "unmatched", "duplicate", "expired", "out_of_range"), 0)

    async def _track(self, versions: set[str]) -> None:
        for version in versions - {v for v in versions if self.monitor.has(v)}:
            try:
                profile = (await asyncio.to_thread(self.registry.metadata, self.name, version)).monitoring
            except Exception:  # noqa: BLE001 - a version gone from the registry: counted, not tested
                logger.exception("%s: no reference profile for version %s", self.name, version)
                profile = None
            self.monitor.track(version, profile)

    async def report(self, report: ReplicaReport) -> None:
        """A replica's window counts and answered request ids (kept for the feedback join)."""
        if self.monitor is None or not (report.monitor or report.answered.request_ids):
            return
        await self._track(set(report.monitor) | set(report.answered.versions))
        results = [r for version, counts in report.monitor.items() for r in self.monitor.add(version, counts)]
        results += self.monitor.answered(report.answered.items())
        self._export_windows(results)

    def feedback(self, items: list[Any]) -> dict[str, Any]:
        """Labels for answered requests (checked by the server application): joined by request id."""
        if self.monitor is None:
            from rayfoundry.errors import ConfigError

            raise ConfigError(f"{self.name}: monitoring is off for this service (monitoring.enabled false)")
        outcome, results = self.monitor.feedback(items)
        self._export_windows(results)
        return outcome.model_dump()

    async def status(self) -> dict[str, Any]:
        """Each served version's signals, live accuracy and volume, and the retraining policy."""
        if self.monitor is None:
            return {"model": self.name, "enabled": False, "versions": {}}
        await self._track(self._versions())
        champion, candidate = self.served()  # what is served once the versions are tracked
        return {"enabled": True, "champion": champion, "candidate": candidate} | self.monitor.status() | \
            {"retraining": self.policy.retraining.model_dump() | {"last_trigger_s_ago": round(
                time.monotonic() - self.last_retrain, 1) if self.last_retrain else None}}

    async def tick(self) -> None:
        """Once a second: close the windows due, retire versions no longer served, retrain when due."""
        if self.monitor is None:
            return
        self._export_windows(self.monitor.tick())
        self._retire_versions()
        await self._retrain_if_due()

    def _versions(self) -> set[str]:
        champion, candidate = self.served()
        return {champion} | ({candidate} if candidate is not None else set())

    def _export_windows(self, results: list[Any]) -> None:
        for r in results:
            tags = {"version": r.version}
            for sig in r.signals:
                t = tags | {"signal": sig.signal}
                self.score_gauge.set(sig.score, tags=t)
                self.p_gauge.set(sig.p_value, tags=t)
                self.alarm_gauge.set(1.0 if sig.alarm else 0.0, tags=t)
            self.windows_counter.inc(tags=tags | {"kind": r.kind, "outcome": "alarm" if r.alarm else "ok"})
            if r.kind == "feedback":
                self.live_gauge.set(r.accuracy, tags=tags | {"metric": "accuracy"})
                self.live_gauge.set(r.macro_f1, tags=tags | {"metric": "macro_f1"})
                drop = next((sig.score for sig in r.signals if sig.signal == "live_accuracy"), None)  # reference - live
                if drop is not None:
                    self.live_gauge.set(r.accuracy + drop, tags=tags | {"metric": "reference"})
            if r.alarm:
                logger.warning("%s:%s: %s window alarm: %s", self.name, r.version, r.kind,
                               "; ".join(f"{s.signal} {s.score:.3g} (p={s.p_value:.2g})" for s in r.signals if s.alarm))
        for outcome, n in self.monitor.counts.items():
            if n > self.feedback_exported[outcome]:
                self.feedback_counter.inc(n - self.feedback_exported[outcome], tags={"outcome": outcome})
                self.feedback_exported[outcome] = n

    def _retire_versions(self) -> None:
        """A version no longer served leaves the monitor; its alarm gauges go to 0, so no alert keeps firing
        for a model nobody is served by."""
        from monitoring.config import SIGNALS

        for version in self.monitor.retire(self._versions()):
            for signal in SIGNALS:
                self.alarm_gauge.set(0.0, tags={"version": version, "signal": signal})

    async def _retrain_if_due(self) -> None:
        """An alarm of the champion that persisted `after_windows` windows: train on the newest data, export,
        shadow (monitoring/retrain.py). Not during a rollout, not while the last local retraining runs, and
        not again within the cooldown."""
        from monitoring.retrain import alarm_reason, running, trigger

        policy, (champion, candidate) = self.policy.retraining, self.served()
        if not policy.enabled or candidate is not None or self.monitor.streak(champion) < policy.after_windows:
            return
        if running():  # the last local retraining has not finished: its shadow rollout comes next
            return
        if self.last_retrain and time.monotonic() - self.last_retrain < policy.cooldown_s:
            return
        self.last_retrain = time.monotonic()
        reason = alarm_reason(self.monitor, champion)
        self.monitor.reset_streak(champion)
        outcome = await asyncio.to_thread(trigger, self.registry, self.name, champion, policy, reason)
        self.retrain_counter.inc(tags={"outcome": outcome})
