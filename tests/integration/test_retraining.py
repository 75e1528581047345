"""The retraining loop end to end on digits: a synthetic shift (inverted images) alarms two windows in a
row; the controller starts `python -m ray_apps retrain` on the newest data file, which trains a new
version on this Ray, exports it and starts its shadow rollout; every step is in the registry history."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import requests

from model_registry.export import ExportJob, export
from tests.integration.serving import digits_v2, free_port

pytestmark = pytest.mark.slow


def write_digits_csv(path, rows: slice) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    header = ",".join([*d.feature_names, "target"])
    lines = [header] + [",".join([*(f"{x:g}" for x in d.data[i]), str(d.target[i])]) for i in range(len(d.target))[rows]]
    path.write_text("\n".join(lines) + "\n")


def history(registry) -> list:
    from model_registry.registry import Registry

    return [e for e in Registry(str(registry)).state("digits").history if e.action == "retrain"]


def test_a_persistent_drift_retrains_exports_and_shadows_a_new_version(ray_cluster, checkpoints, tmp_path, capsys):
    from ray import serve

    from ray_apps.registry import _describe_event
    from ray_apps.rollout import controller
    from serve_deployments.app import applications, run_applications

    registry = tmp_path / "registry"
    export(ExportJob(checkpoint=str(checkpoints["cnn"]), name="digits", registry=str(registry)), log=lambda *_: None)
    data = tmp_path / "data"
    data.mkdir()
    write_digits_csv(data / "digits-2026-01.csv", slice(0, 600))
    write_digits_csv(data / "digits-2026-02.csv", slice(None))
    old = time.time() - 3600
    os.utime(data / "digits-2026-01.csv", (old, old))  # the newest by modification time is -02

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    retraining = {"enabled": True, "after_windows": 2, "train_path": str(data / "digits-*.csv"),
                  "storage_path": str(tmp_path / "retraining"), "quantize": "none",
                  "overrides": ["run.epochs=2", "tracking.backend=none", "scaling.cpus_per_worker=0.5"]}
    try:
        run_applications(applications({
            "registry": str(registry), "models": ["digits:1"], "engine": "onnx", "num_cpus": 0.25,
            "monitoring": {"window": {"instances": 100, "seconds": 2, "min_instances": 50},
                           "retraining": retraining}}))
        from sklearn.datasets import load_digits

        inverted = (16.0 - load_digits().data[:400]).tolist()  # a new scanner: ink and paper swapped
        for i in range(0, len(inverted), 20):
            r = requests.post(f"{url}/v2/models/digits/infer", json=digits_v2(inverted[i:i + 20]), timeout=30)
            assert r.status_code == 200, r.text
            time.sleep(0.25)  # about 80 instances a second: several windows

        handle = controller("digits")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            stages = [e.retraining.stage for e in history(registry)]
            if "shadow" in stages or "failed" in stages:
                break
            time.sleep(2)
        events = history(registry)
        stages = [e.retraining.stage for e in events]
        logs = list((tmp_path / "retraining" / "logs").glob("*.log"))
        assert stages == ["submitted", "trained", "exported", "shadow"], \
            (stages, logs[0].read_text()[-3000:] if logs else "no log")
        first = events[0]
        assert first.version == "1" and "features" in first.reason and first.retraining.data_path == \
            str(data / "digits-2026-02.csv")
        assert events[1].retraining.data_path == str(data / "digits-2026-02.csv")
        assert events[2].retraining.candidate == "digits:2"
        status = handle.status.remote().result()
        assert status["phase"] == "shadow" and status["candidate"] == "2"
        monitor = handle.monitor_status.remote().result()
        assert monitor["versions"]["1"]["alarmed_windows"] >= 2
        assert "retrain submitted" in _describe_event(first)
        # The new package's reference is the new data's validation split, read from the CSV file.
        from model_registry.registry import Registry

        meta = Registry(str(registry)).metadata("digits", "2")
        assert meta.training.data.train_path == str(data / "digits-2026-02.csv")
        assert meta.monitoring is not None and np.isclose(sum(meta.monitoring.class_shares), 1.0)
    finally:
        serve.shutdown()
