"""The inference service over real HTTP on the session's Ray: /v1 predict, the V2 protocol (JSON and
tritonclient's binary tensors), a table of bad requests, a poisoned instance inside a batch,
overload, and a batch-size change through user_config without a replica restart."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest
import requests

from benchmarks.serve_events import deploy
from model_registry.export import ExportJob, export
from tests.integration.serving import digits_v2, free_port, together

pytestmark = pytest.mark.slow  # `make test-fast` skips it; `make test` runs it

DIGIT_ROW = [0.0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8,
             8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10,
             0, 0, 0]  # sklearn digits row 0, a "0"


SLOW_BODY_S = 2.0  # the service's body deadline, short so the slow-client test is quick


def deploy_config(registry, reviews_user_config: dict | None = None) -> None:
    """Deploy the service the way `serve deploy` does (a config, applied by the controller), so a change
    of user_config alone is an in-place update; `serve.run` of a Python app restarts replicas."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from serve_deployments.app import applications

    apps = applications({"registry": str(registry), "models": ["digits@champion", "reviews"], "num_cpus": 0.25,
                         "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.05},
                         "limits": {"body_timeout_s": SLOW_BODY_S}})
    if reviews_user_config:
        apps[1]["deployments"] = [{"name": "ModelServer", "user_config": reviews_user_config}]
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": apps}), _blocking=True)


def model_app(registry, name: str, prefix: str, **args) -> str:
    """One model application alone at `prefix` (its V2 routes under it); returns its infer path."""
    deploy(name, prefix, {"registry": str(registry), "model": "digits", "num_cpus": 0.25} | args)
    return f"{prefix}/infer"


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory, checkpoints):
    """Digits (CNN) and a tiny-BERT review classifier, exported and served; yields (url, registry)."""
    from ray import serve

    from model_registry.registry import Registry

    tmp = tmp_path_factory.mktemp("serve")
    registry = tmp / "registry"
    for kind, name in (("cnn", "digits"), ("text", "reviews")):
        export(ExportJob(checkpoint=str(checkpoints[kind]), name=name, registry=str(registry)), log=lambda *_: None)
    Registry(str(registry)).promote("digits:1", "champion")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy_config(registry)
    yield f"http://127.0.0.1:{port}", registry
    serve.shutdown()


def replica_pids() -> dict[str, int]:
    from ray.util.state import list_actors

    return {a.name: a.pid for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if a.class_name.startswith(("ServeReplica:model-", "ServeReplica:rayfoundry:"))}


def stats(url: str, model: str) -> dict:
    return requests.get(f"{url}/v2/models/{model}/stats", timeout=10).json()["model_stats"][0]


def test_v1_v2_json_and_tritonclient_binary_give_the_same_answers(service):
    import tritonclient.http as triton

    url, _ = service
    texts = ["a great film number 10", "a dull film number 11", "lovely and moving"]
    v1 = requests.post(f"{url}/v1/models/reviews:predict", json={"instances": texts}, timeout=30).json()
    assert v1["model"] == "reviews" and v1["model_version"] == "1"
    v1_probs = np.array([[p["probabilities"][k] for k in ("neg", "pos")] for p in v1["predictions"]])
    assert [p["label"] for p in v1["predictions"]][:2] == ["pos", "neg"]  # rows it trained on

    v2 = requests.post(f"{url}/v2/models/reviews/infer", timeout=30, json={
        "id": "r1", "inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": texts}]}).json()
    assert v2["id"] == "r1" and v2["model_version"] == "1"
    out = {o["name"]: o for o in v2["outputs"]}
    np.testing.assert_allclose(np.array(out["probabilities"]["data"]).reshape(3, 2), v1_probs, atol=1e-6)

    client = triton.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("reviews")
    assert client.get_model_metadata("digits")["inputs"][0] == {"name": "features", "datatype": "FP32", "shape": [-1, 64]}
    tensor = triton.InferInput("text", [3], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))  # binary by default
    result = client.infer("reviews", [tensor], outputs=[triton.InferRequestedOutput("probabilities"),
                                                        triton.InferRequestedOutput("label")])
    np.testing.assert_allclose(result.as_numpy("probabilities"), v1_probs, atol=1e-6)
    assert [x.decode() for x in result.as_numpy("label")] == [p["label"] for p in v1["predictions"]]

    image = triton.InferInput("features", [2, 8, 8], "FP32")
    image.set_data_from_numpy(np.array([DIGIT_ROW, DIGIT_ROW], dtype=np.float32).reshape(2, 8, 8))
    digits = client.infer("digits", [image])
    v1_digits = requests.post(f"{url}/v1/models/digits:predict", json={"instances": [DIGIT_ROW]}, timeout=30).json()
    assert [x.decode() for x in digits.as_numpy("label")] == ["0", "0"] == [v1_digits["predictions"][0]["label"]] * 2


BIG = b'{"instances": ["' + b"x" * (1 << 20) + b'"]}'
BAD_REQUESTS = [
    ("malformed JSON", "POST", "/v1/models/reviews:predict", b'{"instances": [', 400, "invalid JSON"),
    ("NaN", "POST", "/v1/models/digits:predict", b'{"instances": [[NaN]]}', 400, "NaN is not valid JSON"),
    ("Infinity", "POST", "/v1/models/digits:predict", b'{"instances": [[Infinity]]}', 400, "Infinity is not valid JSON"),
    ("invalid UTF-8", "POST", "/v1/models/reviews:predict", b'{"instances": ["\xff"]}', 400, "not valid UTF-8"),
    ("deep nesting", "POST", "/v1/models/digits:predict", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ("oversized body", "POST", "/v1/models/reviews:predict", BIG, 413, "the limit is 1048576"),
    ("empty instances", "POST", "/v1/models/reviews:predict", b'{"instances": []}', 422, "at least 1 item"),
    ("missing instances", "POST", "/v1/models/reviews:predict", b'{"inputs": ["a"]}', 422,
     "instances: required field is missing"),
    ("wrong type", "POST", "/v1/models/reviews:predict", b'{"instances": [{"text": "a"}]}', 422, "instances.0"),
    ("number for a text model", "POST", "/v1/models/reviews:predict", b'{"instances": [[1.0]]}', 422,
     "instances[0]: expected a text string"),
    ("too many instances", "POST", "/v1/models/reviews:predict",
     b'{"instances": [' + b",".join([b'"a"'] * 300) + b"]}", 422, "300 instances; the limit is 256"),
    ("text too long", "POST", "/v1/models/reviews:predict", b'{"instances": ["' + b"y" * 5000 + b'"]}', 422,
     "text of 5000 characters; the limit is 4096"),
    ("wrong image shape", "POST", "/v1/models/digits:predict", b'{"instances": [[1, 2, 3]]}', 422,
     "digits takes 8x8 images or rows of 64 pixel values"),
    ("unknown model", "POST", "/v1/models/nope:predict", b'{"instances": ["a"]}', 404, "unknown model 'nope'"),
    ("unknown version", "POST", "/v2/models/digits/versions/7/infer", b'{"inputs": []}', 404, "no version '7'"),
    ("V2 wrong datatype", "POST", "/v2/models/digits/infer",
     b'{"inputs": [{"name": "features", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}', 422, "takes FP32"),
    ("V2 wrong shape", "POST", "/v2/models/digits/infer",
     b'{"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}', 422, "expected [N, 64]"),
    ("V2 data/shape mismatch", "POST", "/v2/models/reviews/infer",
     b'{"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a"]}]}', 422, "1 values for shape [2]"),
    ("V2 truncated binary", "POST", "/v2/models/digits/infer", None, 400, "binary_data_size 256 does not fit"),
    ("400-digit integer", "POST", "/v1/models/digits:predict",
     b'{"instances": [[' + b"9" * 400 + b"," + b",".join([b"0"] * 63) + b"]]}", 422, "instances[0]: a number beyond float32"),
    ("number beyond float32", "POST", "/v1/models/digits:predict",
     b'{"instances": [[1e39' + b",0" * 63 + b"]]}", 422, "instances[0]: a value is not finite or beyond float32"),
    ("text for an image model", "POST", "/v1/models/digits:predict", b'{"instances": ["a"]}', 422, "not text"),
    ("V2 65 dimensions", "POST", "/v2/models/digits/infer",
     b'{"inputs": [{"name": "features", "shape": [' + b",".join([b"1"] * 65) + b'], "datatype": "FP32", "data": [1]}]}',
     422, "65 dimensions; at most 8"),
    ("V2 shape past int64", "POST", "/v2/models/digits/infer",
     b'{"inputs": [{"name": "features", "shape": [4611686018427387904, 4611686018427387904, 4], "datatype": "FP32", '
     b'"data": [1]}]}', 422, "a dimension above 2147483648"),
    ("V2 empty tensor of a huge shape", "POST", "/v2/models/digits/infer",
     b'{"inputs": [{"name": "features", "shape": [0, 1180591620717411303424], "datatype": "FP32", "data": []}]}',
     422, "a dimension above 2147483648"),
    ("unpaired surrogate", "POST", "/v1/models/reviews:predict", b'{"instances": ["\\ud800 x"]}', 422,
     "instances[0]: text holds an unpaired surrogate"),
    ("V2 unknown output", "POST", "/v2/models/digits/infer",
     b'{"inputs": [{"name": "features", "shape": [1, 64], "datatype": "FP32", "data": [' + b",".join([b"0"] * 64)
     + b']}], "outputs": [{"name": "logits"}]}', 422, "unknown output 'logits'"),
    ("V2 huge integer data", "POST", "/v2/models/digits/infer",
     b'{"inputs": [{"name": "features", "shape": [1, 64], "datatype": "FP32", "data": [' + b"9" * 400
     + b"," + b",".join([b"0"] * 63) + b"]}]}", 422, "data[0]: beyond the range of FP32"),
]


def _send(url: str, method: str, path: str, body: bytes | None):
    if body is None:  # a binary V2 request whose tensor bytes were cut short
        header = (b'{"inputs": [{"name": "features", "shape": [1, 64], "datatype": "FP32", '
                  b'"parameters": {"binary_data_size": 256}}]}')
        return requests.post(url + path, data=header + b"\0" * 100, timeout=30,
                             headers={"Inference-Header-Content-Length": str(len(header))})
    return requests.request(method, url + path, data=body, timeout=30)


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_its_status_and_a_json_error(service, case):
    url, _ = service
    _, method, path, body, status, message = case
    before = replica_pids()
    response = _send(url, method, path, body)
    assert response.status_code == status, response.text[:300]
    assert message in response.json()["error"]
    assert replica_pids() == before  # no replica crashed or restarted
    ok = requests.post(f"{url}/v1/models/digits:predict", json={"instances": [DIGIT_ROW]}, timeout=30)
    assert ok.status_code == 200 and ok.json()["predictions"][0]["label"] == "0"


def test_a_poisoned_instance_fails_only_its_own_request_in_a_batch(service):
    """On the text model, whose calls take long enough for simultaneous requests to queue into one batch."""
    url, _ = service
    before = stats(url, "reviews")
    texts = [[f"a fine film number {k}"] for k in range(12)] + [["   "]]
    answers = together(lambda t: requests.post(f"{url}/v2/models/reviews/infer", timeout=30, json={
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": t}]}), texts)
    assert [a.status_code for a in answers] == [200] * 12 + [422]
    assert "instances[0]: empty text" in answers[-1].json()["error"]
    after = stats(url, "reviews")
    assert after["inference_count"] - before["inference_count"] == 12
    assert after["execution_count"] - before["execution_count"] < 12  # the good ones really were batched


def test_huge_and_non_finite_inputs_fail_only_their_own_request_without_rerunning_the_batch(service):
    url, _ = service
    before = stats(url, "digits")
    huge = {"instances": [[int("9" * 400)] + [0] * 63]}  # caught where it enters: never joins a batch
    blowup = {"instances": [[3e38] * 64]}  # finite float32, but the model's output is not
    bodies = [{"instances": [DIGIT_ROW]}] * 6 + [huge, blowup]
    answers = together(lambda b: requests.post(f"{url}/v1/models/digits:predict", json=b, timeout=30), bodies)
    assert [a.status_code for a in answers] == [200] * 6 + [422, 422], [a.text[:200] for a in answers]
    assert "a number beyond float32" in answers[-2].json()["error"]
    assert "the model's output is not finite" in answers[-1].json()["error"]
    after = stats(url, "digits")
    assert after["inference_count"] - before["inference_count"] == 7  # 6 good rows and the blow-up row
    calls = after["engine_calls"] - before["engine_calls"]
    assert calls == after["execution_count"] - before["execution_count"]  # no request-by-request re-run


def _read_reply(sock: socket.socket) -> str:
    """An HTTP reply read until its JSON body is complete (headers and body may arrive apart)."""
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")


def test_a_slow_client_gets_408_after_the_body_deadline_and_holds_nothing(service):
    url, _ = service
    host, port = url.removeprefix("http://").split(":")
    began = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"instances\": [")  # and then nothing more
        reply = _read_reply(sock)
    waited = time.perf_counter() - began
    assert reply.startswith("HTTP/1.1 408"), reply[:300]
    assert "request body not received within 2s" in reply
    assert SLOW_BODY_S <= waited < SLOW_BODY_S + 10
    ok = requests.post(f"{url}/v1/models/digits:predict", json={"instances": [DIGIT_ROW]}, timeout=30)
    assert ok.status_code == 200


def test_user_config_changes_the_batch_size_without_restarting_replicas(service):
    """On the text model, whose calls take long enough for concurrent requests to queue behind each other."""
    url, registry = service
    pids = replica_pids()
    texts = [f"a fine film number {k}" for k in range(16)]

    def burst() -> int:
        before = stats(url, "reviews")["execution_count"]
        codes = together(lambda t: requests.post(f"{url}/v1/models/reviews:predict", json={"instances": [t]},
                                                 timeout=30).status_code, texts)
        assert codes == [200] * 16
        return stats(url, "reviews")["execution_count"] - before

    deploy_config(registry, reviews_user_config={"max_batch_size": 1, "batch_wait_timeout_s": 0.05})
    assert stats(url, "reviews")["max_batch_size"] == 1
    assert burst() == 16  # one model call per request
    deploy_config(registry, reviews_user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.05})
    assert stats(url, "reviews")["max_batch_size"] == 16
    assert burst() < 16
    assert replica_pids() == pids


def test_overload_is_refused_quickly_with_json_503_and_every_accepted_request_succeeds(service):
    """The instances queued in one replica are bounded over all its requests: one 256-row request fits
    under 300, the rest of a burst is refused at once with a JSON 503, and nothing accepted fails."""
    url, registry = service
    path = model_app(registry, "tight", "/tight", batching={"max_batch_size": 1}, limits={"max_queued_instances": 300})
    try:
        def call(_):
            began = time.perf_counter()
            r = requests.post(url + path, json=digits_v2([DIGIT_ROW] * 256), timeout=60)
            return r.status_code, time.perf_counter() - began, r

        results = together(call, list(range(24)))
        codes = [c for c, _, _ in results]
        assert set(codes) == {200, 503} and codes.count(200) >= 1, codes
        refused = [(t, r) for c, t, r in results if c == 503]
        assert all("instances are queued" in r.json()["error"] and "the bound of 300" in r.json()["error"]
                   and r.headers.get("retry-after") == "1" for _, r in refused), [r.text for _, r in refused[:3]]
        assert max(t for t, _ in refused) < 5  # refused at once, not after a timeout
        assert all(r.json()["outputs"][0]["shape"] == [256, 10] for c, _, r in results if c == 200)
    finally:
        serve_delete("tight")


def test_request_bodies_in_flight_are_bounded_with_503(service):
    """Slow clients cannot take every body slot of a replica."""
    url, registry = service
    path = model_app(registry, "bounded", "/bounded", limits={"max_bodies_in_flight": 2, "body_timeout_s": 20})
    host, port = url.removeprefix("http://").split(":")
    slow = []
    try:
        for _ in range(2):  # two clients that send half a body and stall
            sock = socket.create_connection((host, int(port)), timeout=30)
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{".encode())
            slow.append(sock)
        deadline = time.time() + 20
        while True:  # once both stalled bodies are being read, a third request is refused at once
            r = requests.post(url + path, json=digits_v2([DIGIT_ROW]), timeout=30)
            if r.status_code == 503 or time.time() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 503 and "2 request bodies are being received" in r.json()["error"], r.text[:300]
        assert r.headers.get("retry-after") == "1"
    finally:
        for sock in slow:
            sock.close()
        serve_delete("bounded")


def test_a_served_answer_traces_back_to_its_run_config_and_data_fingerprint(service, digits_run, capsys):
    """model_version in an answer -> the package's metadata -> its source run, tracked in MLflow -> the
    config hash and the fingerprint of the data it read, which still matches the data."""
    from mlflow import MlflowClient

    from ray_apps.__main__ import main
    from tracking.fingerprint import fingerprint_data
    from tracking.tracker import config_hash

    url, registry = service
    _, summary, _ = digits_run
    export(ExportJob(checkpoint=summary.run_dir, name="traced", registry=str(registry)), log=lambda *_: None)
    path = model_app(registry, "traced", "/traced", model="traced")
    try:
        answer = requests.post(url + path, json=digits_v2([DIGIT_ROW]), timeout=30).json()
    finally:
        serve_delete("traced")
    capsys.readouterr()
    assert main(["registry", "--registry", str(registry), "show", f"{answer['model_name']}:{answer['model_version']}",
                 "--json"]) == 0
    lineage = json.loads(capsys.readouterr().out)["metadata"]["training"]["lineage"]
    assert lineage["data"]["digest"] == fingerprint_data(summary.config["data"]["train_path"]).digest
    assert lineage["config_hash"] == config_hash(summary.config)
    run = MlflowClient(lineage["tracking"]["uri"]).get_run(lineage["tracking"]["run_id"])
    assert run.info.run_name == summary.job and run.data.tags["rayfoundry.run_dir"] == summary.run_dir
    assert run.data.tags["rayfoundry.data_fingerprint"] == lineage["data"]["digest"]
    assert run.data.metrics["package_version"] == int(answer["model_version"])  # export recorded it on the run
    assert main(["registry", "--registry", str(registry), "show", "traced:1"]) == 0
    shown = capsys.readouterr().out
    assert f"tracked: mlflow run {run.info.run_id}" in shown and f"data fingerprint: {lineage['data']['digest']}" in shown


def serve_delete(name: str) -> None:
    from ray import serve

    serve.delete(name)


def test_prometheus_metrics_are_exported_for_requests_batches_and_errors(service):
    import ray

    url, _ = service
    requests.post(f"{url}/v1/models/digits:predict", json={"instances": [DIGIT_ROW]}, timeout=30)
    requests.post(f"{url}/v1/models/digits:predict", json={"instances": [[1, 2]]}, timeout=30)
    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = ['ray_rayfoundry_requests_total{', 'status="200"', 'status="422"', "ray_rayfoundry_request_latency_seconds_bucket",
              "ray_rayfoundry_batch_size_bucket", "ray_rayfoundry_queue_wait_seconds_bucket",
              "ray_rayfoundry_inference_seconds_bucket"]
    deadline, text = time.time() + 40, ""
    while time.time() < deadline and not all(w in text for w in wanted):
        time.sleep(2)  # Ray exports metrics every few seconds
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert all(w in text for w in wanted), [w for w in wanted if w not in text]
    # the bad digits request above, by model and version
    counted = [line for line in text.splitlines() if line.startswith("ray_rayfoundry_requests_total{")
               and 'status="422"' in line and 'model="digits"' in line and 'version="1"' in line]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= 1, counted
