"""The README's cluster walk-through on this machine: `make cluster-up` (a token-authenticated local
head), `make submit-train` (`ray job submit --working-dir .` of the default job), `make cluster-down`;
a client without the token is refused, the token file is private, and `make cluster-down` stops that
head and nothing else: the session's own Ray (the `ray_cluster` fixture) runs on beside it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # `make test-fast` skips it; `make test` runs it

RAY = str(REPO / ".venv" / "bin" / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _names(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def _naming_processes(root: str) -> list[psutil.Process]:
    """Processes whose command line names `root` (a path under it, or `--flag=path`)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != os.getpid() and any(_names(a.split("=", 1)[-1], root) for a in p.info["cmdline"] or []):
            found.append(p)
    return found


def _head_processes(root: str) -> list[psutil.Process]:
    """The head's processes as seen from outside: those whose command line or open files name its temp
    dir, and their descendants (agents, workers, job drivers and the dashboard's module processes show
    no path in their command line)."""
    roots = _naming_processes(root)
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and any(_names(f.path, root) for f in p.open_files()):
                roots.append(p)
        except psutil.Error:
            pass
    found = {}
    for p in roots:
        try:
            found.update({q.pid: q for q in [p, *p.children(recursive=True)]})
        except psutil.Error:
            pass
    return list(found.values())


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE  # is_running() also rules out a reused pid
    except psutil.Error:
        return False


@pytest.fixture(scope="module")
def local_head(ray_cluster, request):
    """A `make cluster-up` head for this module, beside the session's Ray, which keeps running: the head
    gets free ports where Ray's defaults are fixed (GCS, dashboard, Ray Client server; the dashboard
    agent's HTTP port is 0 = free by default) and its own temp dir. The last test stops it with `make
    cluster-down`; this teardown runs it again in case that test did not run."""
    if not Path(RAY).exists():
        pytest.skip(f"{RAY} not found: these tests drive the Makefile, which uses the repo's .venv")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    ray_port, dashboard_port = _free_port(), _free_port()
    temp_dir = f"/tmp/rayfoundry-head-{ray_port}"  # the Makefile's default RAY_TEMP_DIR for RAY_PORT
    # -o: the tests run from the installed .venv; `make` must not reinstall it under the session's Ray.
    make = ["make", "--no-print-directory", "-o", ".venv/.installed", f"RAY_PORT={ray_port}",
            f"DASHBOARD_PORT={dashboard_port}", f"RAY_CLIENT_PORT={_free_port()}"]
    failed_before = request.session.testsfailed
    up = subprocess.run(make + ["cluster-up"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield {"make": make, "env": env, "dashboard": f"http://127.0.0.1:{dashboard_port}", "temp_dir": temp_dir}
    finally:
        subprocess.run(make + ["cluster-down"], cwd=REPO, env=env, capture_output=True, timeout=300)
        if request.session.testsfailed == failed_before:  # keep the head's logs when something failed
            shutil.rmtree(temp_dir, ignore_errors=True)


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


def test_the_token_file_is_private_after_cluster_up(local_head):
    # The session's ray.init() may have created it first, under the usual umask 022 (mode 0644).
    token = Path.home() / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600, oct(token.stat().st_mode)
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700, oct(token.parent.stat().st_mode)


def test_cluster_down_stops_the_head_and_only_the_head(local_head, ray_cluster):
    """Runs last in this module: it stops the head the other tests use."""
    temp_dir = local_head["temp_dir"]
    head = _head_processes(temp_dir)
    names = {p.name() for p in head if _alive(p)}
    assert {"gcs_server", "raylet"} <= names, names  # the head runs, and this finds its processes
    session_node = ray_cluster.get_runtime_context().get_node_id()

    down = subprocess.run(local_head["make"] + ["cluster-down"], cwd=REPO, env=local_head["env"],
                          capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    assert not [p for p in head if _alive(p)], [(p.pid, p.name()) for p in head if _alive(p)]
    assert not [p for p in _naming_processes(temp_dir) if _alive(p)]

    # The session's Ray was not touched: same node, and it still runs tasks.
    @ray_cluster.remote
    def ping() -> str:
        return "pong"

    assert ray_cluster.get(ping.remote(), timeout=60) == "pong"
    assert ray_cluster.get_runtime_context().get_node_id() == session_node
    assert [n["NodeID"] for n in ray_cluster.nodes() if n["Alive"]] == [session_node]
