"""Serving across nodes, deployed with `serve deploy` as on a real cluster: model replicas on several
nodes, an HAProxy ingress on every node that answers, and a node lost under load costing at most the
requests in flight on it, visibly, while the replicas come back on the other nodes."""

from __future__ import annotations

import subprocess
import time

import pytest
import requests
import yaml

from benchmarks.serve_events import Load, running_replicas, wait_for
from model_registry.export import ExportJob, export
from serve_deployments.app import MODEL_DEPLOYMENT
from tests.cluster.conftest import cli_env
from tests.conftest import REPO
from tests.integration.serving import digits_v2

pytestmark = [pytest.mark.cluster, pytest.mark.slow]  # `make test-cluster` runs these

REPLICAS = 3
ROW = [0.0, 0, 5, 13, 9, 1, 0, 0] * 8
APP = "model-digits"


def model_replicas() -> dict[str, str]:
    """Alive model replicas of the digits application (not its rollout controller): actor id -> node id."""
    from ray.util.state import list_actors

    return {a["actor_id"]: a["node_id"] for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if a["class_name"] == f"ServeReplica:{APP}:{MODEL_DEPLOYMENT}"}


@pytest.fixture(scope="module")
def served(sim_cluster, tmp_path_factory, checkpoints):
    """The digits CNN exported to a registry every node reads (an absolute path on this one disk) and
    deployed with `serve deploy`: 3 replicas, one HAProxy ingress per node."""
    from ray import serve

    from serve_deployments.app import applications

    tmp = tmp_path_factory.mktemp("cluster_serve")
    registry = tmp / "registry"
    export(ExportJob(checkpoint=str(checkpoints["cnn"]), name="digits", registry=str(registry)), log=lambda *_: None)
    config = {"proxy_location": "EveryNode", "http_options": {"host": "127.0.0.1", "port": sim_cluster.http_port},
              "applications": applications({"registry": str(registry), "models": ["digits"], "num_cpus": 0.5,
                                            "autoscaling": {"min_replicas": REPLICAS, "max_replicas": REPLICAS}})}
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = cli_env()
    deploy = subprocess.run(["serve", "deploy", str(path), "--address", sim_cluster.dashboard], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    assert wait_for(lambda: running_replicas(APP) >= REPLICAS and len(model_replicas()) >= REPLICAS, 180) is not None
    yield sim_cluster
    serve.shutdown()


def predict(base: str) -> requests.Response:
    return requests.post(f"{base}/v1/models/digits:predict", json={"instances": [ROW]}, timeout=30)


def test_replicas_spread_over_nodes_and_every_node_ingress_answers(served):
    nodes = set(model_replicas().values())
    assert len(nodes) >= 2 and nodes <= set(served.node_ids().values()), (nodes, served.node_ids())
    urls = served.ingress_urls()
    assert len(urls) == 1 + len(served.node_ids())
    # Each ingress is up once its HAProxy has the routes (they are pushed to every node's proxy).
    assert wait_for(lambda: all(requests.get(f"{u}/v2/health/ready", timeout=5).ok for u in urls), 60) is not None
    answers = [predict(u) for u in urls]
    assert [a.status_code for a in answers] == [200] * len(urls), [a.text for a in answers]
    assert all(a.json()["predictions"] == answers[0].json()["predictions"] for a in answers)  # one model behind all


def test_a_node_lost_under_load_costs_only_its_in_flight_requests_and_the_replicas_come_back(served):
    base = f"http://127.0.0.1:{served.http_port}"  # the head's ingress: the node every client reaches
    victim_node = next(n for n in model_replicas().values() if served.name_of(n))
    victim = served.name_of(victim_node)
    try:
        with Load(f"{base}/v2/models/digits/infer", digits_v2([ROW] * 4), clients=4) as load:
            time.sleep(3)
            with load.lock:
                in_flight = load.in_flight  # on every replica: a bound on those of the lost node
            removed_at = time.perf_counter()
            served.remove_worker(victim)
            whole = wait_for(lambda: len(model_replicas()) >= REPLICAS and victim_node not in model_replicas().values()
                             and running_replicas(APP) >= REPLICAS, 120)
            time.sleep(3)
            settled = time.perf_counter()
            time.sleep(3)
            after = load.between(settled, time.perf_counter())
    finally:
        served.add_worker()  # the next tests get a full cluster again
    failed = [a for a in load.answers if a[2] != 200]
    during = [a for a in load.answers if a[0] >= removed_at]
    print(f"\nnode loss under load: {len(during)} requests after the loss, {len(failed)} failed "
          f"(in flight at the loss: {in_flight}); whole again after {whole:.1f} s" if whole is not None else "")
    assert whole is not None, "the replicas did not come back on the remaining nodes"
    assert len(failed) <= in_flight, failed
    # What fails does so visibly to its client: a 5xx, or a reply cut short (HAProxy re-sends a request
    # whose replica died before answering); never a wrong or silently empty answer.
    visible = ("IncompleteRead", "RemoteDisconnected", "Connection aborted")
    assert all(a[2] >= 500 or any(v in str(a[3]) for v in visible) for a in failed), failed
    assert after and all(a[2] == 200 for a in after), after[-5:]
    assert all(a[3]["outputs"] for a in load.answers if a[2] == 200)
