"""The README's cluster walk-through on this machine: `make cluster-up` (a token-authenticated local
head), `make submit-train` (`ray job submit --working-dir .` of the default job), `make cluster-down`;
and a client without the token is refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO

RAY = str(REPO / ".venv" / "bin" / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_head(ray_cluster):
    """A `make cluster-up` head for this module. `make cluster-down` is `ray stop`, which stops every
    Ray process of this user, so the session's Ray stops first and starts again afterwards."""
    from trainers.run import connect_ray

    if not Path(RAY).exists():
        pytest.skip(f"{RAY} not found: these tests drive the Makefile, which uses the repo's .venv")
    ray_cluster.shutdown()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    dashboard_port = _free_port()
    make = ["make", "--no-print-directory", f"RAY_PORT={_free_port()}", f"DASHBOARD_PORT={dashboard_port}"]
    up = subprocess.run(make + ["cluster-up"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield {"make": make, "env": env, "dashboard": f"http://127.0.0.1:{dashboard_port}"}
    finally:
        subprocess.run(make + ["cluster-down"], cwd=REPO, env=env, capture_output=True, timeout=300)
        connect_ray(num_cpus=2, address="local")


def test_submit_train_runs_the_default_job_to_success(local_head, tmp_path):
    storage, sid = tmp_path / "runs", f"rayfoundry-test-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(local_head["make"] + ["submit-train", f"SUBMIT_STORAGE={storage}", f"SUBMISSION_ID={sid}"],
                          cwd=REPO, env=local_head["env"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "epoch 8/8" in proc.stdout  # the job's log streams back to the submitter
    status = subprocess.run([RAY, "job", "status", "--address", local_head["dashboard"], sid], capture_output=True,
                            text=True, env=local_head["env"] | {"RAY_AUTH_MODE": "token"}, timeout=120)
    assert f"Job '{sid}' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr  # logged to stderr
    result = json.loads((storage / "digits_cnn" / "result.json").read_text())
    assert result["epochs_completed"] == 8 and result["best_metrics"]["val_accuracy"] >= 0.95


def test_a_client_without_the_token_is_refused(local_head):
    url = f"{local_head['dashboard']}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=30)
    assert refused.value.code in (401, 403)
    wrong = urllib.request.Request(url, headers={"Authorization": "Bearer not-the-token"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(wrong, timeout=30)
    assert refused.value.code in (401, 403)
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    right = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(right, timeout=30) as ok:
        assert ok.status == 200
    # The CLI without RAY_AUTH_MODE=token sends no token and is refused too.
    cli = subprocess.run([RAY, "job", "list", "--address", local_head["dashboard"]], capture_output=True, text=True,
                         env=local_head["env"], timeout=120)
    assert cli.returncode != 0 and "auth" in (cli.stdout + cli.stderr).lower(), cli.stdout + cli.stderr
