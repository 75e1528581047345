"""Prometheus for the tests: find `promtool` and `prometheus` (installing Debian's `prometheus` package
once when they are missing), and run a real Prometheus server on a loopback port.

    from tests.prometheus_tools import PrometheusServer, local_config, prometheus_tools

    tools = prometheus_tools()          # skips the calling test, with the reason, when none can be had
    config = local_config(tmp_path, sd_file=session_dir / "prom_metrics_service_discovery.json", interval="1s")
    with PrometheusServer(config, tmp_path / "tsdb", tools.prometheus) as prom:
        prom.alerts(), prom.query("up")
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.integration.serving import free_port

LOCAL_CONFIG = Path(__file__).resolve().parents[1] / "cluster_configs" / "monitoring" / "prometheus-local.yaml"
APT_TIMEOUT_S = 600  # the whole install, `apt-get update` included; it takes about 15 s


@dataclass(frozen=True)
class PrometheusTools:
    """Where promtool and prometheus are, and which Prometheus they are."""

    promtool: str
    prometheus: str
    version: str  # the first line of `prometheus --version`


def _which() -> PrometheusTools | None:
    promtool, prometheus = shutil.which("promtool"), shutil.which("prometheus")
    if not (promtool and prometheus):
        return None
    out = subprocess.run([prometheus, "--version"], capture_output=True, text=True, timeout=30)
    return PrometheusTools(promtool, prometheus, (out.stdout or out.stderr).splitlines()[0])


def _apt_install() -> str | None:
    """Install Debian's `prometheus` package without its recommends; the reason it could not, or None.
    In a container its maintainer scripts start no daemon (with no init system, invoke-rc.d declines); on
    a machine booted with systemd the package enables its service on port 9090, as Debian's packages do."""
    if shutil.which("apt-get") is None:
        return "promtool is not on PATH and there is no apt-get to install Debian's prometheus package"
    if os.geteuid() != 0:
        return "promtool is not on PATH; install it with `sudo apt-get install prometheus`"
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=120",
               "prometheus"]
    deadline = time.monotonic() + APT_TIMEOUT_S
    try:
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
        if done.returncode != 0:  # a new machine's package lists may be empty or out of date
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=deadline - time.monotonic())
            done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=deadline - time.monotonic())
    except subprocess.TimeoutExpired:  # also raised at once when the deadline passed before a step began
        return f"`apt-get install prometheus` did not finish within {APT_TIMEOUT_S} s"
    if done.returncode != 0:
        return f"`apt-get install prometheus` failed: {done.stderr.strip()[-500:]}"
    return None


@functools.cache
def _tools_or_reason() -> PrometheusTools | str:
    tools = _which()
    if tools is None:
        reason = _apt_install()
        tools = _which()
        if tools is None:
            return reason or "Debian's prometheus package installed, yet promtool or prometheus is not on PATH"
    return tools


def prometheus_tools() -> PrometheusTools:
    """promtool and prometheus from PATH, else from Debian's package installed once per session;
    skips the calling test with the reason when neither works."""
    found = _tools_or_reason()
    if isinstance(found, str):
        pytest.skip(found)
    return found


def local_config(folder: Path, sd_file: Path, interval: str = "15s") -> Path:
    """prometheus-local.yaml as shipped but for Ray's service discovery file (a test's Ray session writes
    its own) and the scrape and rule evaluation interval; written to folder/prometheus.yaml, its rule files
    named by absolute path."""
    raw = yaml.safe_load(LOCAL_CONFIG.read_text())
    raw["global"] = {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval}
    raw["rule_files"] = [str(LOCAL_CONFIG.parent / f) for f in raw["rule_files"]]
    (job,) = raw["scrape_configs"]
    job["file_sd_configs"] = [{"files": [str(sd_file)], "refresh_interval": interval}]
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "prometheus.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


class PrometheusServer:
    """A Prometheus server run from `config` on a free loopback port, its TSDB in `storage`; a context
    manager that starts it, waits until it is ready, and stops it on the way out. Relative paths in
    the config (rule_files) resolve against the config file's folder, as Prometheus does."""

    def __init__(self, config: Path, storage: Path, binary: str, *extra_args: str):
        self.config, self.storage, self.binary, self.extra_args = Path(config), Path(storage), binary, extra_args
        self.port = 0
        self.log = self.storage / "prometheus.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The server's base URL, once started."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30) -> PrometheusServer:
        """Start the server and return once `/-/ready` answers 200 (TSDB open, config and rules loaded);
        raises with the server's log if it exits or is not ready within timeout_s."""
        self.storage.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cmd = [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.storage}",
               f"--web.listen-address=127.0.0.1:{self.port}", *self.extra_args]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:  # not listening yet, or 503 while the TSDB opens
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"prometheus not ready within {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def _api(self, path: str, **params: str) -> dict | list:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def alerts(self) -> list[dict]:
        """The active alerts (pending and firing), each with its labels, annotations, state and value."""
        return self._api("alerts")["alerts"]

    def query(self, expr: str) -> list[dict]:
        """An instant PromQL query now: the vector's samples, each {"metric": labels, "value": [t, "v"]}."""
        return self._api("query", query=expr)["result"]

    def rules(self) -> list[dict]:
        """The loaded rules of every group, each with its name, query, health and (alerts) state."""
        return [r for g in self._api("rules")["groups"] for r in g["rules"]]

    def targets(self) -> list[dict]:
        """The active scrape targets, each with its labels, health and last error."""
        return self._api("targets")["activeTargets"]

    def stop(self, timeout_s: float = 15) -> None:
        """SIGTERM, which lets Prometheus close its TSDB, then SIGKILL if it has not exited in timeout_s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
