"""The service under load while its replicas change (benchmarks/serve_events.py drives each scenario):
autoscaling up and back down, scale to zero and the cold start after it, the loss of a replica, a
p99 SLO that sheds what cannot make it, and a timed-out request that never reaches the engine."""

from __future__ import annotations

import pytest
import requests

from benchmarks.serve_events import cold_start, deploy, replica_loss, scale_up_and_down
from model_registry.export import ExportJob, export
from tests.integration.serving import digits_v2, free_port, together

pytestmark = pytest.mark.slow

FAST = {"upscale_delay_s": 0.5, "downscale_delay_s": 2, "look_back_period_s": 1, "target_ongoing_requests": 1}
ROW = [0.0, 0, 5, 13, 9, 1, 0, 0] * 8


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory, checkpoints):
    """Serve on the session's Ray, behind HAProxy, and a registry holding the digits CNN."""
    from ray import serve

    registry = tmp_path_factory.mktemp("events") / "registry"
    export(ExportJob(checkpoint=str(checkpoints["cnn"]), name="digits", registry=str(registry)), log=lambda *_: None)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}", {"registry": str(registry), "model": "digits", "num_cpus": 0.25}
    serve.shutdown()


def test_held_load_scales_up_within_seconds_and_back_down_when_it_stops(served):
    base, common = served
    args = common | {"batching": {"max_batch_size": 1}, "autoscaling": {"min_replicas": 1, "max_replicas": 2} | FAST}
    result = scale_up_and_down(base, args, digits_v2([ROW] * 64), clients=6)
    print(f"\nscale-up: {result.model_dump()}")
    assert result.scale_up_s is not None and result.scale_up_s < 30, result
    assert result.failed_during == 0, result
    assert result.p99_ms_during == result.p99_ms_during  # measured (not NaN): answers came back while scaling
    assert result.scale_down_s is not None and result.scale_down_s < 30, result


def test_scale_to_zero_answers_the_first_request_and_reports_its_cold_start(served):
    base, common = served
    args = common | {"autoscaling": {"min_replicas": 0, "max_replicas": 1} | FAST}
    result = cold_start(base, args, digits_v2([ROW]))
    print(f"\ncold start: {result.model_dump()}")
    assert result.first_status == 200, result
    assert result.first_answer_s > 0 and result.warm_ms < 1e3 * result.first_answer_s


def test_a_replica_killed_under_load_costs_at_most_its_in_flight_requests_and_the_service_recovers(served):
    base, common = served
    args = common | {"autoscaling": {"min_replicas": 2, "max_replicas": 2}}
    result = replica_loss(base, args, digits_v2([ROW] * 8), clients=6)
    print(f"\nreplica loss: {result.model_dump()}")
    assert result.failed <= result.in_flight_at_kill, result
    # HAProxy re-sends a request whose replica died before answering. What still fails does so visibly to
    # its client: a 5xx, a reply cut short of its Content-Length, or a connection closed with no reply
    # (seen about once in three runs); never a wrong or silently empty answer.
    visible = ("IncompleteRead", "RemoteDisconnected", "Connection aborted")
    assert all(f.startswith("5") or any(v in f for v in visible) for f in result.failures), result.failures
    assert result.recovered_s is not None and result.ok_after, result


def test_a_p99_slo_refuses_what_cannot_make_it_at_once_and_answers_the_rest(served):
    """48 requests of 256 rows at once: the first fit in 100 ms, all of them cannot (each takes 2 ms at least)."""
    base, common = served
    deploy("slo", "/slo", common | {"batching": {"max_batch_size": 256, "slo_p99_ms": 100}})
    try:
        answers = together(lambda _: requests.post(f"{base}/slo/infer", json=digits_v2([ROW] * 256), timeout=60),
                           list(range(48)))
        codes = [a.status_code for a in answers]
        assert 200 in codes and 503 in codes, codes
        refused = [a.json()["error"] for a in answers if a.status_code == 503]
        assert all("100 ms p99 SLO" in e for e in refused), refused[:3]
        stats = requests.get(f"{base}/slo/stats", timeout=10).json()["model_stats"][0]
        assert stats["refused_slo"] == len(refused) and stats["fit_per_instance_ms"] > 0
    finally:
        from ray import serve

        serve.delete("slo")


def test_a_request_that_times_out_in_the_queue_never_reaches_the_engine(served):
    base, common = served
    deploy("timeouts", "/timeouts", common | {"batching": {"max_batch_size": 1}, "limits": {"request_timeout_s": 0.05}})
    try:
        answers = together(lambda _: requests.post(f"{base}/timeouts/infer", json=digits_v2([ROW] * 256), timeout=60),
                           list(range(48)))
        codes = [a.status_code for a in answers]
        assert 408 in codes, codes
        assert all("did not answer within 0.05s" in a.json()["error"] for a in answers if a.status_code == 408)
        stats = requests.get(f"{base}/timeouts/stats", timeout=10).json()["model_stats"][0]
        assert stats["cancelled"] >= 1, stats  # timed out in the queue: dropped before the engine
        # every request either ran (one per call), was dropped, or was refused as over the queue bound
        assert stats["execution_count"] + stats["cancelled"] + codes.count(503) == len(codes), (stats, codes)
        assert stats["inference_count"] == 256 * stats["execution_count"] >= 256 * codes.count(200)
    finally:
        from ray import serve

        serve.delete("timeouts")
