"""A simulated multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`): a head that takes no
work, as a production head should, and three worker nodes of 2 CPUs, each its own raylet with a custom
resource `node_i`. Nodes are added and removed while the tests run. Every test in this directory runs on
it; `make test-cluster` runs them (the rest of the suite uses its own single-node Ray, so the two never
share a session).

Serve runs behind HAProxy on every node (`proxy_location: EveryNode`). The nodes share one IP, so each
worker node's ingress gets its own port (Serve's RAY_SERVE_WORKER_PROXY_HTTP_PORT), as do HAProxy's
stats and metrics ports; the ports are free ones, so the suite never collides with another Ray here.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.serving import free_port

WORKER_NODES = 3
WORKER_CPUS = 2
OBJECT_STORE = 256 * 2**20


def cli_env() -> dict[str, str]:
    """The environment for a CLI run against the cluster by its address (`--address`), not RAY_ADDRESS."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: a file here without its marks still stays out of `make test`
def pytest_collection_modifyitems(items):
    for item in items:
        if "/tests/cluster/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.cluster)
            item.add_marker(pytest.mark.slow)


@dataclass
class SimCluster:
    """The running cluster: its `ray.cluster_utils.Cluster`, the worker nodes by name, their ingress
    ports (the head's first), and the dashboard address that `ray job submit` and `serve deploy` use."""

    cluster: object
    dashboard: str
    http_port: int
    workers: dict[str, object] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    added: int = 0

    def add_worker(self):
        """Start one more worker node (`node_<i>`, i counting every node ever added); returns its name."""
        name = f"node_{self.added}"
        self.added += 1
        self.ports[name] = free_port()
        env = {"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(self.ports[name]),
               "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}
        self.workers[name] = self.cluster.add_node(num_cpus=WORKER_CPUS, resources={name: 1}, env_vars=env,
                                                   object_store_memory=OBJECT_STORE, wait=True)
        return name

    def remove_worker(self, name: str) -> str:
        """Stop a worker node's raylet and every process on it, as a machine dying does; returns its node id."""
        node = self.workers.pop(name)
        self.cluster.remove_node(node, allow_graceful=False)
        self.ports.pop(name)
        return node.node_id

    def node_ids(self) -> dict[str, str]:
        """Worker node name -> Ray node id."""
        return {name: node.node_id for name, node in self.workers.items()}

    def name_of(self, node_id: str) -> str | None:
        return next((n for n, i in self.node_ids().items() if i == node_id), None)

    def ingress_urls(self) -> list[str]:
        """Every node's ingress: the head's, then each worker node's."""
        return [f"http://127.0.0.1:{p}" for p in [self.http_port, *self.ports.values()]]


@pytest.fixture(scope="session")
def sim_cluster():
    """The cluster, started once per session (about 10 s) and connected as the driver."""
    import ray
    from ray.cluster_utils import Cluster

    from rayfoundry.ray_env import quiet_env, quiet_process
    from serve_deployments.app import ingress_env

    quiet_process()
    # What `ray start` would get on every node: Serve's HAProxy ingress, and the venv on PATH, so that a
    # submitted job's `python` is the one with rayfoundry installed (as on a cluster built from the image).
    os.environ.update(ingress_env("haproxy"))
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "2"
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ.pop("RAY_ADDRESS", None)
    dashboard_port = free_port()
    head_env = {"RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_port": dashboard_port, "env_vars": head_env,
        "object_store_memory": OBJECT_STORE, "dashboard_agent_listen_port": free_port()})
    sim = SimCluster(cluster=cluster, dashboard=f"http://127.0.0.1:{dashboard_port}", http_port=free_port())
    try:
        for _ in range(WORKER_NODES):
            sim.add_worker()
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING, runtime_env={"env_vars": quiet_env()})
        yield sim
    finally:
        ray.shutdown()
        cluster.shutdown()
