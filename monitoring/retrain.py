"""The retraining loop: a persistent alarm of the served champion starts `python -m ray_apps retrain`,
which trains the model's job on the newest data, exports the result and starts a shadow rollout of it.

The controller calls `trigger` (on a thread); the command itself runs as a local process on the
controller's node or as a Ray job, so a training run never blocks the service. Every step, and a
dry run, is recorded in the model's registry history (`registry show NAME:V`).
"""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from model_registry.registry import RetrainRecord
from monitoring.config import Retraining
from rayfoundry.errors import ConfigError

logger = logging.getLogger("ray.serve")


def alarm_reason(monitor: Any, version: str) -> str:
    """One line: which signals alarmed in the champion's latest windows."""
    v = monitor.versions[version]
    streak = max(v.streak.values())
    alarmed = [r for r in list(v.history)[-streak:] if r.alarm] or [r for r in v.history if r.alarm][-1:]
    signals = sorted({f"{s.signal} {s.score:.3g} (p={s.p_value:.2g})" for r in alarmed[-1:] for s in r.signals
                      if s.alarm})
    return f"{streak} alarmed {alarmed[-1].kind if alarmed else ''} windows in a row on {monitor.name}:{version}; " \
           f"latest: {', '.join(signals)}"


def newest_data(pattern: str) -> str:
    """A path or URI as given; a local glob's newest match by modification time (ties: the last name)."""
    if "://" in pattern or not glob.has_magic(pattern):
        return pattern
    matches = [p for p in glob.glob(pattern) if os.path.exists(p)]
    if not matches:
        raise ConfigError(f"monitoring.retraining.train_path: no file matches {pattern!r}")
    return max(matches, key=lambda p: (os.path.getmtime(p), p))


def retrain_command(name: str, version: str, registry: str, policy: Retraining, reason: str) -> list[str]:
    cmd = ["-m", "ray_apps", "retrain", name, "--from-version", version, "--registry", registry,
           "--storage", policy.storage_path, "--quantize", policy.quantize, "--reason", reason]
    if policy.job:
        cmd += ["--job", policy.job]
    if policy.train_path:
        cmd += ["--train-path", policy.train_path]
    for override in policy.overrides:
        cmd += ["--set", override]
    return cmd


RUNNING: list[Any] = []  # local retraining processes started by this controller, reaped when they end


def running() -> int:
    """Local retraining processes still running (finished ones are reaped)."""
    RUNNING[:] = [p for p in RUNNING if p.poll() is None]
    return len(RUNNING)


def trigger(registry: Any, name: str, version: str, policy: Retraining, reason: str) -> str:
    """Start (or, in a dry run, describe) retraining; record it; return submitted, dry_run or failed."""
    cmd = retrain_command(name, version, registry.root, policy, reason)
    record = RetrainRecord(stage="dry_run", trigger=reason, command=["python", *cmd])
    try:
        record.data_path = newest_data(policy.train_path) if policy.train_path else None
        if policy.dry_run:
            logger.warning("%s: retraining due (dry run, nothing started): %s; would run: python %s", name, reason,
                           " ".join(cmd))
        elif policy.submit == "local":
            record.stage, record.submission = "submitted", _start_local(cmd, policy.storage_path, name)
        else:
            record.stage, record.submission = "submitted", _submit_job(cmd, policy)
        if record.stage == "submitted":
            logger.warning("%s: retraining started (%s): %s", name, record.submission, reason)
    except Exception as e:  # noqa: BLE001 - recorded: the service goes on serving
        logger.exception("%s: retraining could not start", name)
        record.stage = "failed"
        reason = f"{reason}; could not start: {type(e).__name__}: {e}"[:1000]
    registry.record(name, "retrain", version=version, reason=reason, retraining=record)
    return record.stage


def _start_local(cmd: list[str], storage: str, name: str) -> str:
    """A detached process on this node that joins this Ray cluster; its output goes to a log file."""
    import ray

    logs = Path(storage) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"retrain_{name}_{time.strftime('%Y%m%d-%H%M%S')}.log"
    env = dict(os.environ)
    if ray.is_initialized():
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, *cmd], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=os.getcwd())
    RUNNING.append(proc)
    return f"process {proc.pid}, log {log}"


def _submit_job(cmd: list[str], policy: Retraining) -> str:
    import ray
    from ray.job_submission import JobSubmissionClient

    # Ray reads RAY_ADDRESS first; otherwise this cluster's GCS leads to its job server from any node.
    address = policy.address or (ray.get_runtime_context().gcs_address if ray.is_initialized() else "auto")
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=" ".join(["python", *(_quote(c) for c in cmd)]))
    return f"ray job {job_id}"


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
