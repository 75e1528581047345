"""Rollouts end to end, under generated traffic: a good candidate is promoted, one that errors on a
few inputs and a slower one are rolled back by their guards, a candidate that cannot load is rolled
back with the reason, a rollout survives the loss of a replica and of its controller, and every
decision is in `registry show`.

The registry holds the digits CNN four times: v1 the champion, v2 the same model (a good candidate),
v3 whose ONNX graph gives NaN for inputs whose last pixel is lit (1 request in 10 here), and v4
whose graph does 64 extra 2048-wide matrix products per row (about 0.5 GFLOP: same answers, at least ten
times slower, so that the p99 ratio stays far above its bound on a busy machine). Policies are the
defaults with short holds and small sample counts.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from benchmarks.serve_events import Load, deploy, replica_names, wait_for
from model_registry.export import ExportJob, export
from tests.integration.serving import digits_v2, free_port

pytestmark = pytest.mark.slow

ROW = [0.0, 0, 5, 13, 9, 1, 0, 0] * 8
MARKED = ROW[:-1] + [16.0]  # v3 answers NaN for this one
BODIES = [digits_v2([ROW])] * 9 + [digits_v2([MARKED])]
MIN = 60
POLICY = {"shadow": {"fraction": 0.5, "hold_s": 1, "min_samples": MIN},
          "canary": [{"weight": 0.3, "hold_s": 1, "min_samples": MIN}, {"weight": 0.6, "hold_s": 1, "min_samples": MIN}],
          "guards": {"errors": {"min_samples": MIN}, "latency": {"min_samples": 300, "max_p99_ratio": 2.0},
                     "disagreement": {"min_samples": MIN}, "confidence": {"min_samples": MIN}}}
DONE = ("promoted", "rolled_back", "aborted")


def _rewrite_onnx(package: Path, change) -> None:
    """Change a published package's ONNX graph and re-seal its metadata (as if it had been exported so)."""
    import onnx

    from model_registry.package import file_digests, read_metadata, write_metadata

    model = onnx.load(package / "model.onnx")
    change(model.graph)
    onnx.save(model, package / "model.onnx")
    meta = read_metadata(package / "metadata.json")
    write_metadata(package, meta.model_copy(update={"files": meta.files | file_digests(package, ["model.onnx"])}))


def _add_to_logits(graph, nodes, initializers, term: str) -> None:
    """logits := logits + term ([n, 1], broadcast); `nodes` compute `term` from the flattened input `flat`."""
    from onnx import helper, numpy_helper

    producer = next(n for n in graph.node if "logits" in n.output)
    producer.output[list(producer.output).index("logits")] = "raw_logits"
    graph.node.append(helper.make_node("Flatten", [graph.input[0].name], ["flat"], axis=1))
    graph.node.extend(nodes)
    graph.node.append(helper.make_node("Add", ["raw_logits", term], ["logits"]))
    graph.initializer.extend(numpy_helper.from_array(np.asarray(v, dtype=np.float32) if not k.startswith("i_")
                                                     else np.asarray(v, dtype=np.int64), k) for k, v in initializers.items())


def nan_on_last_pixel(graph) -> None:
    from onnx import helper

    nodes = [helper.make_node("Slice", ["flat", "i_start", "i_end", "i_axis"], ["last"]),
             helper.make_node("Sub", ["half", "last"], ["d"]),  # negative when the pixel is lit
             helper.make_node("Log", ["d"], ["logd"]),
             helper.make_node("Mul", ["logd", "zero"], ["nan_or_zero"])]
    _add_to_logits(graph, nodes, {"i_start": [63], "i_end": [64], "i_axis": [1], "half": 0.5, "zero": 0.0},
                   "nan_or_zero")


def extra_work(graph, width: int = 2048, layers: int = 64) -> None:
    from onnx import helper

    nodes = [helper.make_node("MatMul", ["flat", "w_in"], ["h0"])]
    nodes += [helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]) for i in range(layers)]
    nodes += [helper.make_node("MatMul", [f"h{layers}", "w_out"], ["nothing"])]
    _add_to_logits(graph, nodes, {"w_in": np.zeros((64, width)), "w": np.zeros((width, width)),
                                  "w_out": np.zeros((width, 1))}, "nothing")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, checkpoints) -> Path:
    from model_registry.registry import Registry

    root = tmp_path_factory.mktemp("rollout") / "registry"
    for _ in range(4):
        export(ExportJob(checkpoint=str(checkpoints["cnn"]), name="digits", registry=str(root)), log=lambda *_: None)
    _rewrite_onnx(root / "digits" / "3", nan_on_last_pixel)
    _rewrite_onnx(root / "digits" / "4", extra_work)
    Registry(str(root)).promote("digits:1", "champion")
    return root


@pytest.fixture(scope="module")
def base(ray_cluster):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture
def service(pristine, base, tmp_path):
    """The digits service on a fresh copy of the registry, following @champion."""
    from ray import serve

    from ray_apps.rollout import controller

    registry = tmp_path / "registry"
    shutil.copytree(pristine, registry)
    deploy("model-digits", "/v2/models/digits", {"registry": str(registry), "model": "digits@champion",
                                                 "engine": "onnx", "num_cpus": 0.25, "rollout": POLICY,
                                                 "autoscaling": {"min_replicas": 2, "max_replicas": 2}})
    yield base, registry, controller("digits")
    serve.delete("model-digits")


def status(handle) -> dict:
    """The rollout controller's status. A call that reached a controller the test has just killed fails
    with RayActorError; the next one goes to its replacement."""
    import ray

    for _ in range(40):
        try:
            return handle.status.remote().result()
        except ray.exceptions.RayActorError:
            time.sleep(0.5)
    return handle.status.remote().result()


def roll_out(service, candidate: str, clients: int = 4, during=None, timeout_s: float = 90):
    """Start a rollout under load and wait for its decision: (final status, the load's answers)."""
    base, _, handle = service
    with Load(f"{base}/v2/models/digits/infer", BODIES, clients, keyed=True) as load:
        time.sleep(1)
        handle.start.remote(candidate).result()
        if during is not None:
            during(handle)
        wait_for(lambda: status(handle)["phase"] in DONE, timeout_s, every_s=0.25)
        decided = time.perf_counter()
        time.sleep(2)  # the replicas pick up the decision with their next report
        final = status(handle)
        after = time.perf_counter()
        time.sleep(2)
    return final, load.answers, after, decided


def served_after(answers, after: float) -> set[str]:
    return {a[3]["model_version"] for a in answers if a[0] >= after and a[2] == 200}


def test_a_good_candidate_is_promoted_with_no_failed_request_and_callers_stick_to_a_version(service):
    final, answers, after, decided = roll_out(service, "digits:2")
    assert final["phase"] == "promoted", final
    assert final["champion"] == "2" and all(g["status"] == "pass" for g in final["guards"]), final
    assert [a[:4] for a in answers if a[2] != 200] == []  # promote under load: nothing failed
    assert served_after(answers, after) == {"2"}
    from model_registry.registry import Registry

    reg = Registry(str(service[1]))
    assert reg.state("digits").aliases["champion"] == "2"  # through the registry's gate
    # Callers are assigned by a hash of x-user-id: user-0 and user-2 fall in the 30% and 60% canary
    # shares, user-1 (0.604) and user-3 (0.885) in neither. Until the promotion (less the second the
    # replicas take to pick it up, and the poll), the latter never saw the candidate and the former did.
    before = decided - 1.5
    seen = {c: {a[3]["model_version"] for a in answers if a[4] == c and a[2] == 200 and a[0] < before} for c in range(4)}
    assert seen[1] == seen[3] == {"1"}, seen
    assert "2" in seen[0] and "2" in seen[2], seen


def test_a_candidate_that_errors_on_some_inputs_is_rolled_back_by_the_error_guard(service):
    final, answers, after, _ = roll_out(service, "digits:3")
    assert final["phase"] == "rolled_back", final
    errors = next(g for g in final["guards"] if g["name"] == "errors")
    assert errors["status"] == "fail" and errors["value"] > 0.01 and errors["p_value"] < 0.01, errors
    assert final["champion"] == "1" and served_after(answers, after) == {"1"}
    # Only the candidate's own answers failed: each failure is a JSON 422 naming the non-finite output.
    failed = [a for a in answers if a[2] != 200]
    assert all(a[2] == 422 and "not finite" in a[3]["error"] for a in failed), failed[:3]


def test_a_slower_candidate_is_rolled_back_by_the_latency_guard(service):
    final, answers, after, _ = roll_out(service, "digits:4")
    assert final["phase"] == "rolled_back", json.dumps(final, indent=1)
    latency = next(g for g in final["guards"] if g["name"] == "latency")
    assert latency["status"] == "fail" and latency["value"] > 2.0, final["guards"]
    assert [a[:4] for a in answers if a[2] != 200] == []  # slow, never wrong
    assert served_after(answers, after) == {"1"}


def test_a_candidate_that_cannot_load_is_rolled_back_with_the_reason(service):
    _, registry, _ = service
    (registry / "digits" / "2" / "model.onnx").write_bytes(b"not a model")  # its sha256 no longer matches
    final, answers, _, _ = roll_out(service, "digits:2", timeout_s=30)
    assert final["phase"] == "rolled_back" and "failed to load" in final["reason"], final
    assert "sha256 mismatch" in final["reason"], final
    assert [a[:4] for a in answers if a[2] != 200] == []


def test_a_rollout_survives_the_loss_of_a_replica_and_of_its_controller_and_is_in_registry_show(service, capsys):
    import ray

    def kill_mid_rollout(handle) -> None:
        wait_for(lambda: handle.status.remote().result()["phase"] == "canary", 60, every_s=0.25)
        for name in replica_names("model-digits")[:1] + [
                a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if "model-digits" in a["name"] and "RolloutController" in a["name"]]:
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)

    final, answers, after, _ = roll_out(service, "digits:2", during=kill_mid_rollout)
    assert final["phase"] == "promoted", json.dumps(final, indent=1)
    assert served_after(answers, after) == {"2"}
    failed = [a for a in answers if a[2] != 200]
    assert len(failed) <= 4, failed  # at most what was in flight on the killed replica (4 clients)

    from ray_apps.__main__ import main

    registry = str(service[1])
    assert main(["registry", "--registry", registry, "show", "digits:2"]) == 0
    shown = capsys.readouterr().out
    assert "rollout of 2 against 1: promoted" in shown and "errors: pass" in shown, shown


def test_status_and_report_over_http_and_the_cli(service, capsys):
    base, _, handle = service
    status = requests.get(f"{base}/v2/models/digits/rollout", timeout=30).json()
    assert status["phase"] == "none" and status["champion"] == "1"
    final, _, _, _ = roll_out(service, "digits:2")
    report = requests.get(f"{base}/v2/models/digits/rollout/report", timeout=30).json()
    assert set(report["versions"]) == {"1", "2"}, report
    row = report["versions"]["2"]
    assert row["requests"] > 0 and row["p99_ms"]["low"] <= row["p99_ms"]["value"] <= row["p99_ms"]["high"]
    assert report["shadow"]["compared"] >= MIN and "disagreement" in report["shadow"]
    from ray_apps.__main__ import main

    assert main(["rollout", "report", "digits"]) == 0
    assert main(["rollout", "status", "digits"]) == 0
    out = capsys.readouterr().out
    assert "95% intervals" in out and "phase promoted" in out, out
    assert main(["rollout", "abort", "digits"]) == 2  # nothing to abort: a one-line error, exit 2
    assert "no rollout in progress" in capsys.readouterr().err


def test_registry_promote_reaches_the_running_service_and_a_registry_rollback_switches_back_at_once(service):
    """The service follows @champion: a promote starts a rollout under its policy; a rollback is an
    emergency and switches directly."""
    from ray_apps.__main__ import main

    base, registry, handle = service
    with Load(f"{base}/v2/models/digits/infer", BODIES, 4, keyed=True) as load:
        time.sleep(1)
        assert main(["registry", "--registry", str(registry), "promote", "digits:2", "--to", "champion"]) == 0
        assert wait_for(lambda: handle.status.remote().result()["phase"] in DONE, 90, every_s=0.5) is not None
        status = handle.status.remote().result()
        assert status["phase"] == "promoted", json.dumps(status, indent=1)
        assert main(["registry", "--registry", str(registry), "rollback", "digits"]) == 0
        assert wait_for(lambda: handle.status.remote().result()["champion"] == "1", 20, every_s=0.25) is not None
        time.sleep(2.5)  # the replicas pick the plan up with their next report
        after = time.perf_counter()
        time.sleep(2)
    assert handle.status.remote().result()["phase"] == "promoted"  # no new rollout: the rollback was direct
    assert served_after(load.answers, after) == {"1"}
    assert [a[:4] for a in load.answers if a[2] != 200] == []
