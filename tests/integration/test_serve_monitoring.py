"""Monitoring a served SST-2 model: replayed traffic against the package's reference profile.

A tiny BERT trained on the first 2,000 SST-2 training phrases is exported (its reference profile is
taken on the first 2,000 rows of dev.tsv) and served by two replicas, whose counts the controller
merges into windows of 250 instances. Held-out training
phrases (rows 20,000 onwards, never trained on) are in-distribution traffic; AG News sentences (another
domain), SST-2 phrases cut to three words (a length shift) and flipped feedback labels are the shifts.
Each phase's traffic is followed by a pause longer than window.seconds, so no window mixes two phases.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest
import requests

from model_registry.export import ExportJob, export
from tests.builders import make_checkpoint
from tests.conftest import TINY_BERT
from tests.integration.serving import free_port

WINDOW = 250  # instances per drift window
SECONDS = 3.0  # a window this old closes (phases are separated by longer pauses)
PER_REQUEST = 25  # instances per request
FEEDBACK_WINDOW = 200

pytestmark = pytest.mark.slow


def read_tsv(path: Path, header: bool = True) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r[0], r[1]) for r in (rows[1:] if header else rows) if len(r) >= 2 and r[0].strip()]


@pytest.fixture(scope="module")
def sst2_service(ray_cluster, shared_data, tmp_path_factory):
    """The SST-2 model exported and served by two replicas with 250-instance windows: (url, package
    metadata, held-out rows)."""
    from ray import serve

    from serve_deployments.app import applications, run_applications

    tmp = tmp_path_factory.mktemp("monitoring")
    raw = {"data": {"train_path": str(shared_data / "sst2" / "train.tsv"),
                    "validation_path": str(shared_data / "sst2" / "dev.tsv"), "text_column": "sentence",
                    "label_column": "label", "max_rows": 2000, "max_length": 64},
           "model": {"type": "text", "from_config": TINY_BERT}, "optim": {"lr": 2e-3, "batch_size": 32}}
    ckpt = make_checkpoint(tmp / "sst2", raw, epochs=3, labels=["0", "1"])
    registry = tmp / "registry"
    meta = export(ExportJob(checkpoint=str(ckpt), name="sst2", registry=str(registry)), log=lambda *_: None)
    assert meta.monitoring is not None and meta.monitoring.text_length is not None
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    run_applications(applications({
        "registry": str(registry), "models": ["sst2:1"], "engine": "onnx", "num_cpus": 0.5,
        "autoscaling": {"min_replicas": 2, "max_replicas": 2},  # windows merge both replicas' counts
        "monitoring": {"window": {"instances": WINDOW, "seconds": SECONDS, "min_instances": 100},
                       "feedback": {"window": FEEDBACK_WINDOW, "wait_s": 5}}}))
    held_out = read_tsv(shared_data / "sst2" / "train.tsv")[20_000:]
    yield f"http://127.0.0.1:{port}", meta, held_out
    serve.shutdown()


def status(url: str) -> dict:
    return requests.get(f"{url}/v2/models/sst2/monitor", timeout=30).json()


def replay(url: str, texts: list[str], paced: bool = False) -> list[dict]:
    """POST the texts in requests of PER_REQUEST; then wait until every instance is in a closed window.
    paced: about WINDOW instances a second, the rate replicas report at, so windows hold about WINDOW each
    (a window closes at the first report that takes it to WINDOW instances or more)."""
    before = status(url)["versions"]["1"]["instances"]
    answers, started = [], time.monotonic()
    with requests.Session() as s:
        for n, i in enumerate(range(0, len(texts), PER_REQUEST)):
            if paced:
                time.sleep(max(0.0, started + n * PER_REQUEST / WINDOW - time.monotonic()))
            r = s.post(f"{url}/v1/models/sst2:predict", json={"instances": texts[i:i + PER_REQUEST]}, timeout=30)
            assert r.status_code == 200, r.text
            answers.append(r.json())
    deadline = time.monotonic() + 60
    while True:
        v = status(url)["versions"]["1"]
        if v["instances"] >= before + len(texts) and v["open_window"] == 0:
            return answers
        assert time.monotonic() < deadline, f"windows did not close: {v}"
        time.sleep(0.5)


def drift_windows(url: str, after: int) -> list[dict]:
    return [w for w in status(url)["versions"]["1"]["history"] if w["kind"] == "drift"][after:]


def count(url: str) -> int:
    return len([w for w in status(url)["versions"]["1"]["history"] if w["kind"] == "drift"])


def test_held_out_sst2_traffic_raises_no_alarm_in_95_percent_of_windows_and_shifts_alarm_in_their_first_window(
        sst2_service):
    url, meta, held_out = sst2_service
    start = count(url)
    replay(url, [t for t, _ in held_out[:40 * WINDOW]], paced=True)
    windows = drift_windows(url, start)
    assert len(windows) >= 30, [w["instances"] for w in windows]  # about 40 windows of about 250
    assert all({"class_shares", "softmax", "embedding", "text_length", "unknown_tokens"} <=
               {s["signal"] for s in w["signals"]} for w in windows)
    alarmed = [w for w in windows if w["alarm"]]
    assert len(alarmed) <= 0.05 * len(windows), [(s["signal"], s["score"], s["p_value"])
                                                 for w in alarmed for s in w["signals"] if s["alarm"]]

    # A domain shift: news sentences. Alarmed in the first window (250 instances: 10 requests).
    start = count(url)
    replay(url, agnews_texts()[:WINDOW])
    first = drift_windows(url, start)[0]
    assert first["alarm"], first
    assert {"text_length"} <= {s["signal"] for s in first["signals"] if s["alarm"]}

    # A length shift: the same kind of phrases, cut to three words.
    start = count(url)
    long_enough = [t for t, _ in held_out[40 * WINDOW:] if len(t.split()) >= 6]
    replay(url, [" ".join(t.split()[:3]) for t in long_enough[:WINDOW]])
    first = drift_windows(url, start)[0]
    assert first["alarm"] and any(s["signal"] == "text_length" and s["alarm"] for s in first["signals"]), first


def agnews_texts() -> list[str]:
    from tests.conftest import SHARED_DATA

    return [t for t, _ in read_tsv(SHARED_DATA / "agnews" / "train.tsv", header=False)]


def send_feedback(url: str, answers: list[dict], labels: list[str]) -> dict:
    items = [{"request_id": a["request_id"], "instance": i, "label": label}
             for a, chunk in zip(answers, _chunks(labels)) for i, label in enumerate(chunk)]
    totals: dict[str, int] = {}
    for i in range(0, len(items), 500):
        r = requests.post(f"{url}/v1/models/sst2:feedback", json={"feedback": items[i:i + 500]}, timeout=30)
        assert r.status_code == 200, r.text
        for k, v in r.json().items():
            if isinstance(v, int):
                totals[k] = totals.get(k, 0) + v
    return totals


def _chunks(labels: list[str]) -> list[list[str]]:
    return [labels[i:i + PER_REQUEST] for i in range(0, len(labels), PER_REQUEST)]


def feedback_windows(url: str) -> list[dict]:
    return [w for w in status(url)["versions"]["1"]["history"] if w["kind"] == "feedback"]


def test_feedback_gives_live_accuracy_and_a_label_flip_alarms_within_one_feedback_window(sst2_service):
    url, meta, held_out = sst2_service
    rows = held_out[-2 * FEEDBACK_WINDOW:]
    answers = replay(url, [t for t, _ in rows])
    truth = [label for _, label in rows]

    first = send_feedback(url, answers[:FEEDBACK_WINDOW // PER_REQUEST], truth[:FEEDBACK_WINDOW])
    assert first == {"accepted": FEEDBACK_WINDOW, "matched": FEEDBACK_WINDOW, "waiting": 0, "duplicate": 0,
                     "out_of_range": 0}
    honest = feedback_windows(url)[-1]
    predicted = [p["label"] for a in answers[:FEEDBACK_WINDOW // PER_REQUEST] for p in a["predictions"]]
    assert honest["accuracy"] == pytest.approx(sum(p == t for p, t in zip(predicted, truth)) / FEEDBACK_WINDOW)
    assert not honest["alarm"], honest  # live accuracy near the package's validation accuracy
    assert abs(honest["accuracy"] - meta.monitoring.accuracy) < 0.1

    flipped = [str(1 - int(label)) for label in truth[FEEDBACK_WINDOW:]]
    send_feedback(url, answers[FEEDBACK_WINDOW // PER_REQUEST:], flipped)
    flip = feedback_windows(url)[-1]
    assert flip["alarm"] and flip["accuracy"] == pytest.approx(1 - sum(
        p == t for p, t in zip([p["label"] for a in answers[FEEDBACK_WINDOW // PER_REQUEST:] for p in a["predictions"]],
                               truth[FEEDBACK_WINDOW:])) / FEEDBACK_WINDOW)

    # The same labels again are duplicates; an id nobody answered waits, then counts as unmatched.
    again = send_feedback(url, answers[:1], truth[:PER_REQUEST])
    assert again["duplicate"] == PER_REQUEST and again["matched"] == 0
    stranger = requests.post(f"{url}/v1/models/sst2:feedback", json={"request_id": "0" * 32, "label": "1"}, timeout=30)
    assert stranger.json()["waiting"] == 1
    bad = requests.post(f"{url}/v1/models/sst2:feedback", json={"request_id": answers[0]["request_id"],
                                                                 "label": "positive"}, timeout=30)
    assert bad.status_code == 422 and "feedback[0].label" in bad.json()["error"]
    time.sleep(7)  # past feedback.wait_s and a controller tick
    counts = status(url)["feedback"]
    assert counts["unmatched"] >= 1 and counts["duplicate"] == PER_REQUEST


def test_monitor_cli_prints_each_signal_against_its_threshold(sst2_service, capsys, tmp_path):
    from ray_apps.__main__ import main

    code = main(["monitor", "sst2", "--json-out", str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    assert code in (0, 1)  # 1: the latest window alarmed (the earlier tests end on shifts)
    assert "version 1:" in out and "reference:" in out and "live accuracy:" in out and "(alarms at >=" in out
    assert (tmp_path / "m.json").is_file()


def test_a_real_prometheus_scraping_ray_fires_the_drift_alert_from_the_shipped_rules(sst2_service, tmp_path):
    """Prometheus (Debian's package) runs the shipped prometheus-local.yaml and alerts.yaml against this Ray's
    metrics endpoints; clean traffic leaves RayfoundryModelDrift silent, news sentences make it fire."""
    import ray

    from tests.prometheus_tools import PrometheusServer, local_config, prometheus_tools

    tools = prometheus_tools()
    url, _, held_out = sst2_service
    session = Path(ray._private.worker._global_node.get_session_dir_path())  # this test session's Ray
    # Ray's metrics endpoint can take over a second to answer on a busy machine: scrapes get 3 s.
    config = local_config(tmp_path, sd_file=session / "prom_metrics_service_discovery.json", interval="3s")

    def drift_firing(prom) -> list[dict]:
        return [a for a in prom.alerts() if a["labels"]["alertname"] == "RayfoundryModelDrift"
                and a["labels"].get("model") == "sst2" and a["state"] == "firing"]

    def wait(predicate, what: str, timeout_s: float = 90):
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, (f"{what} within {timeout_s}s; scrape targets: "
                                                 f"{[(t['scrapeUrl'], t['health'], t['lastError']) for t in prom.targets()]}; "
                                                 f"latest windows: {status(url)['versions']['1']['history'][-3:]}")
            time.sleep(1)

    with PrometheusServer(config, tmp_path / "tsdb", tools.prometheus) as prom:
        replay(url, [t for t, _ in held_out[-3 * WINDOW:]], paced=True)  # clean windows: every alarm gauge 0
        clean = 'max(ray_rayfoundry_monitor_alarm{model="sst2", signal="text_length"})'
        wait(lambda: prom.query(clean), "the clean window's gauges scraped")
        wait(lambda: [float(s["value"][1]) for s in prom.query(clean)] == [0.0], "the clean window's gauge at 0",
             timeout_s=15)
        assert not drift_firing(prom)

        replay(url, agnews_texts()[WINDOW:2 * WINDOW])
        wait(lambda: drift_firing(prom), "RayfoundryModelDrift firing")
        alert = drift_firing(prom)[0]
        assert alert["labels"]["version"] == "1" and alert["labels"]["severity"] == "warning"
        assert "sst2" in alert["annotations"]["summary"]
