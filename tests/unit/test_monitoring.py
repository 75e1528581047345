"""Monitoring without Ray: reference profiles, replica-side window counts and their merge, the drift and
accuracy tests on synthetic traffic with a known distribution, the controller's monitor on a fake clock
(windows, the feedback join, live accuracy, streaks), feedback bodies, the retraining trigger, and the
profile an export writes.

Run: .venv/bin/python -m pytest tests/unit/test_monitoring.py -q

Synthetic traffic: four standard-normal features, a fixed linear model over three classes with unequal
shares, Poisson token lengths and a 10% unknown-token rate, all drawn together (a real profile has either
text or features; one with both exercises every drift signal at once). The reference profile is built
from a 20,000-row draw, so its bin shares are close to the truth; windows are fresh draws.
"""

from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import pytest
from sklearn.metrics import f1_score

from model_registry.export import ExportJob, export
from model_registry.predictor import Predictor, softmax
from model_registry.registry import Registry
from model_registry.validation import load_validation
from monitoring import retrain
from monitoring.config import Feedback, MonitoringPolicy, Retraining, Thresholds, Window
from monitoring.monitor import Answered, FeedbackLabel, Monitor
from monitoring.profile import REFERENCE_SAMPLE, BatchStats, batch_stats, build_profile, quantile_bins
from monitoring.signals import accuracy_signal, drift_signals
from monitoring.window import Observer, WindowCounts
from rayfoundry.errors import ConfigError
from serve_deployments.protocol import MAX_FEEDBACK, ApiError, feedback_items
from tests.conftest import TINY_BERT
from tests.unit.test_rollout_decisions import FakeClock
from trainers.config import parse_job

LABELS = ["a", "b", "c"]
WEIGHTS = np.array([[1.0, -0.5, 0.2], [0.3, 0.8, -0.6], [-0.4, 0.2, 0.9], [0.5, 0.5, 0.5]])  # [F=4, K=3]
BIAS = np.array([0.8, 0.0, -0.8])  # class shares about 0.61 / 0.27 / 0.12
METRICS = {"val_accuracy": 0.9, "val_macro_f1": 0.85}
QUIET = {"log": lambda *_: None}
T0 = 1_000_000.0  # the fake clock's start: 1970-01-12T13:46:40Z


def draw(rng: np.random.Generator, n: int, length_shift: int = 0, scale: float = 1.0, shift: float = 0.0,
         flip: bool = False) -> BatchStats:
    """n instances of the synthetic traffic; the keywords shift its inputs (the model sees them) or flip its
    outputs' class order."""
    x = rng.normal(size=(n, 4)) * scale + shift
    probs = softmax(x @ WEIGHTS + BIAS)
    if flip:
        probs = probs[:, ::-1]
    return BatchStats(probs, lengths=rng.poisson(20, n) + 1 + length_shift, unknown=rng.random(n) < 0.1, features=x)


@pytest.fixture(scope="module")
def profile():
    ref = draw(np.random.default_rng(0), 20_000)
    return build_profile(ref, ref.probs.argmax(axis=1), "synthetic", "numpy", METRICS)


def window(profile, rng: np.random.Generator, n: int = 500, sample: int = 1000, **shift) -> WindowCounts:
    """What one replica reports after answering n instances of (possibly shifted) traffic."""
    observer = Observer(profile, sample, seed=int(rng.integers(1 << 31)))
    observer.observe(draw(rng, n, **shift))
    return observer.take()


def counts_of(w: WindowCounts) -> dict:
    return w.model_dump(exclude={"sample", "sampled_from"})


def index_rows(start: int, stop: int, total: int) -> BatchStats:
    """Two-class rows whose first column is the row's index scaled to [0, 1): shows which rows a sample kept."""
    x = np.arange(start, stop) / total
    return BatchStats(np.stack([x, 1 - x], axis=1))


# --- profiles ----------------------------------------------------------------------------------


def test_quantile_bins_split_continuous_data_into_tenths():
    values = np.random.default_rng(1).normal(size=10_000)
    bins = quantile_bins(values)
    assert len(bins.edges) == 9 and bins.edges == sorted(bins.edges)
    assert bins.shares == pytest.approx([0.1] * 10, abs=0.001)
    assert np.bincount(bins.index(values), minlength=10).tolist() == [round(s * 10_000) for s in bins.shares]


def test_quantile_bins_keep_tied_values_in_one_bin_and_a_constant_feature_in_one_bin():
    ties = np.random.default_rng(2).integers(0, 4, size=5000).astype(float)
    bins = quantile_bins(ties)
    assert len(set(bins.edges)) == len(bins.edges) <= 4 and sum(bins.shares) == pytest.approx(1.0)
    for v in range(4):  # a value never straddles two bins
        assert len(set(bins.index(ties[ties == v]).tolist())) == 1
    constant = quantile_bins(np.full(300, 7.5))
    assert (constant.edges, constant.shares) == ([7.5], [0.0, 1.0])
    assert constant.index(np.array([7.5, 7.4, 8.0])).tolist() == [1, 0, 1]


def test_build_profile_records_shapes_class_shares_and_a_fixed_softmax_sample():
    rng = np.random.default_rng(3)
    stats = draw(rng, 2000)
    p = build_profile(stats, stats.probs.argmax(axis=1), "val.csv", "onnx", METRICS)
    assert (p.rows, p.source, p.engine, p.accuracy, p.macro_f1) == (2000, "val.csv", "onnx", 0.9, 0.85)
    assert p.class_shares == (np.bincount(stats.probs.argmax(axis=1), minlength=3) / 2000).tolist()
    assert len(p.confidence.shares) == 10 and sum(p.confidence.shares) == pytest.approx(1.0)
    assert len(p.text_length.shares) == len(p.text_length.edges) + 1
    assert p.unknown_share == float(stats.unknown.mean())
    assert len(p.features) == 4 and all(f.shares == pytest.approx([0.1] * 10, abs=0.002) for f in p.features)
    sample = np.asarray(p.softmax_sample)
    assert sample.shape == (REFERENCE_SAMPLE, 3) == (500, 3)
    assert len({tuple(r) for r in p.softmax_sample}) == 500  # distinct rows of the input, not repeats
    assert np.abs(sample[:, None, :] - np.round(stats.probs, 5)[None]).max(axis=2).min(axis=1).max() == 0
    again = build_profile(stats, stats.probs.argmax(axis=1), "val.csv", "onnx", METRICS)
    assert again.softmax_sample == p.softmax_sample
    small = build_profile(draw(rng, 120), np.zeros(120, dtype=int), "s", "onnx", METRICS)
    assert len(small.softmax_sample) == 120 and small.features and small.rows == 120


def test_batch_stats_takes_lengths_and_unknown_tokens_from_the_attention_mask():
    feeds = {"input_ids": np.array([[101, 7, 100, 102], [101, 8, 102, 100]]),
             "attention_mask": np.array([[1, 1, 1, 1], [1, 1, 1, 0]])}  # id 100 in row 1 is padding
    stats = batch_stats(feeds, np.full((2, 2), 0.5), unk_id=100)
    assert stats.lengths.tolist() == [4, 3] and stats.unknown.tolist() == [True, False] and stats.features is None
    assert batch_stats(feeds, np.full((2, 2), 0.5), unk_id=None).unknown.tolist() == [False, False]


# --- observer and window counts ------------------------------------------------------------------


def test_counts_from_several_observe_calls_equal_counts_on_the_concatenated_batch(profile):
    stats = draw(np.random.default_rng(4), 3000)
    parts = Observer(profile, 200, seed=0)
    for lo, hi in [(0, 1), (1, 700), (700, 701), (701, 3000)]:
        parts.observe(BatchStats(stats.probs[lo:hi], stats.lengths[lo:hi], stats.unknown[lo:hi], stats.features[lo:hi]))
    whole = Observer(profile, 200, seed=0)
    whole.observe(stats)
    split, joined = parts.take(), whole.take()
    assert counts_of(split) == counts_of(joined)
    assert split.instances == split.sampled_from == 3000
    assert joined.classes == np.bincount(stats.probs.argmax(axis=1), minlength=3).tolist()
    assert joined.features[2] == np.bincount(profile.features[2].index(stats.features[:, 2]), minlength=10).tolist()
    assert joined.lengths == np.bincount(profile.text_length.index(stats.lengths),
                                         minlength=len(profile.text_length.shares)).tolist()
    assert joined.unknown_rows == int(stats.unknown.sum())
    assert len(split.sample) == len(joined.sample) == 200


@pytest.mark.parametrize("batch", [1000, 37, 100_000])
def test_reservoir_sample_stays_at_its_cap_and_is_uniform_over_every_row_seen(profile, batch):
    total, cap = 100_000, 500
    observer = Observer(profile.model_copy(update={"class_shares": [0.5, 0.5]}), cap, seed=5)
    observer.observe(index_rows(0, 10, total))  # a first batch smaller than the room left
    for start in range(10, total, batch):
        observer.observe(index_rows(start, min(total, start + batch), total))
        assert len(observer.sample) <= cap
    taken = observer.take()
    position = np.asarray(taken.sample)[:, 0]
    assert len(taken.sample) == cap and taken.sampled_from == taken.instances == total
    # Uniform positions in [0, 1): mean 0.5 with standard error 0.289 / sqrt(500) = 0.013; 0.05 is ~4 errors.
    assert abs(position.mean() - 0.5) < 0.05
    assert abs((position < 0.1).mean() - 0.1) < 0.05 and abs((position >= 0.9).mean() - 0.1) < 0.05


def test_take_resets_and_rows_with_another_class_count_are_ignored(profile):
    observer = Observer(profile, 100, seed=0)
    assert observer.take() is None
    observer.observe(BatchStats(np.full((5, 4), 0.25)))  # four classes: another model's rows
    observer.observe(BatchStats(np.empty((0, 3))))
    assert observer.take() is None
    observer.observe(draw(np.random.default_rng(6), 50))
    first = observer.take()
    assert first.instances == 50 and sum(first.classes) == 50 and len(first.sample) == 50
    assert observer.take() is None
    observer.observe(draw(np.random.default_rng(7), 3))
    assert observer.take().instances == 3


def test_merge_adds_counts_and_caps_the_sample(profile):
    rng = np.random.default_rng(8)
    a, b = window(profile, rng, 300, sample=100), window(profile, rng, 200, sample=100)
    merged = a.merge(b, cap=150, rng=rng)
    assert merged.instances == 500 and merged.sampled_from == 500
    assert merged.classes == [x + y for x, y in zip(a.classes, b.classes)]
    assert merged.lengths == [x + y for x, y in zip(a.lengths, b.lengths)]
    assert merged.features[3] == [x + y for x, y in zip(a.features[3], b.features[3])]
    assert merged.unknown_rows == a.unknown_rows + b.unknown_rows
    assert len(merged.sample) == 150 and all(row in a.sample + b.sample for row in merged.sample)
    assert len(a.merge(b, cap=1000, rng=rng).sample) == 200


@pytest.mark.parametrize("rows_a, rows_b", [(1000, 1000), (1000, 200)])
def test_merge_keeps_each_sides_rows_in_proportion_to_the_instances_they_stand_for(rows_a, rows_b):
    """Side a's rows stand for 9x the instances of side b's: a uniform sample of the merged window holds
    about 90% rows from a, whatever each side's sample size."""
    def side(rows: int, instances: int, value: float) -> WindowCounts:
        return WindowCounts(instances=instances, classes=[instances, 0], confidence=[instances],
                            sample=[[value, 1 - value]] * rows, sampled_from=instances)

    rng = np.random.default_rng(9)
    shares = [np.mean([r[0] for r in side(rows_a, 9000, 1.0).merge(side(rows_b, 1000, 0.0), 1000, rng).sample])
              for _ in range(20)]
    # Over 20 merges of 1000 rows the share's standard error is under 0.003; 0.02 is far outside it.
    assert np.mean(shares) == pytest.approx(0.9, abs=0.02)


def test_fits_rejects_counts_made_for_another_profile(profile):
    counts = window(profile, np.random.default_rng(10), 50)
    assert counts.fits(profile)
    tabular = profile.model_copy(update={"text_length": None, "unknown_share": None})
    two_features = profile.model_copy(update={"features": profile.features[:2]})
    two_classes = profile.model_copy(update={"class_shares": [0.5, 0.5]})
    assert not any(counts.fits(p) for p in (tabular, two_features, two_classes))
    assert WindowCounts.empty(tabular).fits(tabular) and not WindowCounts.empty(tabular).fits(profile)


def test_observe_from_four_threads_while_take_runs_loses_no_instance(profile):
    observer = Observer(profile, 100, seed=0)
    batches = [draw(np.random.default_rng(i), 1 + i % 13) for i in range(40)]
    rounds = 50
    observed = rounds * sum(len(b.probs) for b in batches)  # each thread serves a quarter of the batches
    taken, done, first_taken = [], threading.Event(), threading.Event()

    def serve(offset: int) -> None:
        for r in range(rounds):
            for b in batches[offset::4]:
                observer.observe(b)
            if r == 0:  # the rest is observed after a take(), however the threads are scheduled
                assert first_taken.wait(30)

    def report() -> None:
        while not done.is_set():
            if (w := observer.take()) is not None:
                taken.append(w)
                first_taken.set()

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(4)]
    reporter = threading.Thread(target=report)
    reporter.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reporter.join()
    if (last := observer.take()) is not None:
        taken.append(last)
    assert len(taken) > 1  # take() ran while the threads observed
    assert sum(w.instances for w in taken) == observed
    assert sum(sum(w.classes) for w in taken) == sum(sum(w.features[0]) for w in taken) == observed
    assert sum(w.sampled_from for w in taken) == observed and all(len(w.sample) <= 100 for w in taken)


# --- signals -----------------------------------------------------------------------------------


def alarmed(signals) -> set[str]:
    return {s.signal for s in signals if s.alarm}


@pytest.mark.parametrize("thresholds", [Thresholds(), Thresholds(alpha=0.1, min_psi=0, min_ks=0, min_unknown_increase=0)],
                         ids=["policy-defaults", "significance-alone"])
def test_windows_of_the_reference_distribution_alarm_at_most_twice_alpha(profile, thresholds):
    """Bonferroni over the signals bounds a healthy window's alarm rate by alpha when the reference is exact.
    Here it is estimated from 20,000 rows (inflating chi-squared by about 1 + 500/20,000) and 200 windows
    estimate the rate (binomial error 2.1 points at 10%), so the bound asserted is 2 x alpha. Without the
    floors the p-values alone decide: about alpha of the windows alarm, and over 40% would without the
    correction."""
    rng = np.random.default_rng(11)
    results = [drift_signals(profile, window(profile, rng), thresholds) for _ in range(200)]
    assert {s.signal for s in results[0]} == {"class_shares", "confidence", "softmax", "text_length", "unknown_tokens",
                                              "features"}
    assert all(s.alpha == thresholds.alpha / 6 for s in results[0])
    alarms = sum(bool(alarmed(r)) for r in results)
    assert alarms <= 2 * thresholds.alpha * 200


@pytest.mark.parametrize("shift, expected", [
    ({"length_shift": 5}, {"text_length"}),
    ({"flip": True}, {"class_shares", "softmax"}),
    ({"scale": 2.0}, {"features", "confidence"}),
], ids=["lengths+5", "classes-flipped", "features-x2"])
def test_a_clear_shift_alarms_on_every_window_on_the_signals_it_moves(profile, shift, expected):
    rng = np.random.default_rng(12)
    for _ in range(20):
        got = alarmed(drift_signals(profile, window(profile, rng, **shift), Thresholds()))
        assert expected <= got, got


def test_a_tiny_shift_significant_on_a_huge_window_stays_below_min_psi_and_does_not_alarm(profile):
    big = window(profile, np.random.default_rng(13), 400_000, shift=0.05)  # features move 0.05 sd
    signals = {s.signal: s for s in drift_signals(profile, big, Thresholds())}
    features = signals["features"]
    assert features.p_value < 1e-100 < features.alpha and 0 < features.score < 0.01 < features.min_score == 0.1
    assert not alarmed(signals.values())
    assert "features" in alarmed(drift_signals(profile, big, Thresholds(min_psi=0.001)))  # the floor alone held it


def test_accuracy_signal_alarms_on_a_real_drop_and_not_on_a_point(profile):
    drop = accuracy_signal(profile, 100, 200, Thresholds())
    assert drop.alarm and drop.score == pytest.approx(0.4) and drop.p_value < 1e-30 and drop.alpha == 0.01
    near = accuracy_signal(profile, 178, 200, Thresholds())
    assert not near.alarm and near.score == pytest.approx(0.01) and near.p_value > 0.01
    assert "0.8900 on 200 labels against 0.9000" in near.detail


# --- the monitor -------------------------------------------------------------------------------


POLICY = MonitoringPolicy(window=Window(instances=200, seconds=60, min_instances=50, sample=200),
                          feedback=Feedback(window=50, max_pending=100, max_age_s=600, wait_s=10))


def monitor(profile, clock: FakeClock | None = None, policy: MonitoringPolicy = POLICY) -> Monitor:
    m = Monitor("synthetic", LABELS, policy, clock=clock or FakeClock(T0), seed=0)
    m.track("1", profile)
    return m


def rid(i: int) -> str:
    return f"{i:032x}"


def answer(m: Monitor, i: int, *labels: str, version: str = "1"):
    return m.answered([Answered(request_id=rid(i), version=version, labels=list(labels))])


def label(i: int, truth: int, instance: int = 0) -> FeedbackLabel:
    return FeedbackLabel(request_id=rid(i), instance=instance, label=truth)


def test_a_count_window_closes_once_the_replicas_reports_add_up_to_window_instances(profile):
    m, rng = monitor(profile), np.random.default_rng(14)
    replicas = [window(profile, rng, 70, sample=200) for _ in range(3)]
    assert m.add("1", replicas[0]) == [] and m.add("1", replicas[1]) == []
    assert m.add("1", replicas[0].model_copy(update={"classes": [70, 0]})) == []  # another profile's bins: dropped
    assert m.add("2", replicas[0]) == []  # a version nobody tracks
    assert m.status()["versions"]["1"]["open_window"] == 140
    [closed] = m.add("1", replicas[2])
    assert (closed.kind, closed.version, closed.instances, closed.alarm) == ("drift", "1", 210, False)
    assert len(closed.signals) == 6
    status = m.status()["versions"]["1"]
    assert (status["windows"], status["open_window"], status["instances"]) == (1, 0, 210)


def test_a_time_window_closes_at_window_seconds_and_one_under_min_instances_is_dropped(profile):
    clock = FakeClock(T0)
    m, rng = monitor(profile, clock), np.random.default_rng(15)
    m.add("1", window(profile, rng, 60))
    clock.advance(59.9)
    assert m.tick() == []
    clock.advance(0.1)
    [closed] = m.tick()
    assert closed.instances == 60 and closed.opened == "1970-01-12T13:46:40Z" and closed.closed == "1970-01-12T13:47:40Z"
    m.add("1", window(profile, rng, 49))
    clock.advance(60)
    assert m.tick() == []
    status = m.status()["versions"]["1"]
    assert (status["windows"], status["dropped_windows"], status["open_window"]) == (1, 1, 0)


def test_feedback_join_counts_matched_duplicate_and_out_of_range_labels(profile):
    m = monitor(profile)
    answer(m, 1, "a", "b")
    outcome, closed = m.feedback([label(1, 0), label(1, 2), label(1, 0, instance=2), label(1, 1, instance=1)])
    assert closed == []
    assert outcome.model_dump() == {"matched": 2, "waiting": 0, "duplicate": 1, "out_of_range": 1}
    assert m.counts == {"matched": 2, "unmatched": 0, "duplicate": 1, "expired": 0, "out_of_range": 1}
    live = m.status()["versions"]["1"]["live"]
    assert (live["labels"], live["accuracy"], live["open_window"]) == (2, 1.0, 2)  # the first label of a pair counts


def test_a_second_label_for_a_one_instance_request_counts_as_duplicate(profile):
    clock = FakeClock(T0)
    m = monitor(profile, clock)
    answer(m, 2, "a")
    assert m.feedback([label(2, 0)])[0].matched == 1
    outcome, _ = m.feedback([label(2, 0)])
    assert (outcome.duplicate, outcome.waiting) == (1, 0)
    clock.advance(11)
    m.tick()
    assert (m.counts["duplicate"], m.counts["unmatched"]) == (1, 0)


def test_feedback_before_its_answer_waits_then_matches_or_after_wait_s_is_unmatched(profile):
    clock = FakeClock(T0)
    m = monitor(profile, clock)
    outcome, _ = m.feedback([label(3, 2)])
    assert outcome.waiting == 1 and m.status()["feedback"]["held_labels"] == 1
    clock.advance(5)
    assert answer(m, 3, "c") == []
    assert m.counts["matched"] == 1 and m.status()["feedback"]["held_labels"] == 0
    assert m.status()["versions"]["1"]["live"]["accuracy"] == 1.0
    m.feedback([label(4, 0)])
    clock.advance(10)
    m.tick()
    assert m.counts["unmatched"] == 0  # held exactly wait_s: still waiting
    clock.advance(0.1)
    m.tick()
    assert m.counts["unmatched"] == 1 and m.status()["feedback"]["held_labels"] == 0
    answer(m, 4, "a")  # its answer comes too late: the label is gone
    assert m.counts["matched"] == 1


def test_pending_answers_are_bounded_by_max_pending_and_expire_after_max_age(profile):
    clock = FakeClock(T0)
    m = monitor(profile, clock)
    for i in range(105):
        answer(m, i, "a")
    assert m.counts["expired"] == 5 and m.status()["feedback"]["pending_answers"] == 100
    outcome, _ = m.feedback([label(4, 0), label(5, 0)])  # request 4 was among the oldest, forgotten
    assert (outcome.waiting, outcome.matched) == (1, 1)
    clock.advance(600)
    m.tick()
    assert m.counts["expired"] == 5 and m.counts["unmatched"] == 1  # the held label gave up after wait_s
    clock.advance(0.1)
    m.tick()
    assert m.counts["expired"] == 105 and m.status()["feedback"]["pending_answers"] == 0
    assert m.feedback([label(5, 0)])[0].waiting == 1  # labelled or not, an expired answer takes no feedback


def live_window(m: Monitor, first: int, predicted: np.ndarray, truth: np.ndarray) -> list:
    """Answer one-instance requests with the predicted labels, then send the true labels one by one."""
    closed = []
    for k, (p, t) in enumerate(zip(predicted, truth)):
        answer(m, first + k, LABELS[p])
        closed += m.feedback([label(first + k, int(t))])[1]
    return closed


def test_live_accuracy_closes_after_feedback_window_labels_and_alarms_on_flipped_labels(profile):
    m, rng = monitor(profile), np.random.default_rng(16)
    predicted = rng.integers(0, 3, 50)
    truth = predicted.copy()
    wrong = rng.choice(50, 5, replace=False)
    truth[wrong] = (truth[wrong] + 1) % 3  # accuracy 0.9, the profile's
    [ok] = live_window(m, 0, predicted, truth)
    assert (ok.kind, ok.instances, ok.accuracy, ok.alarm) == ("feedback", 50, 0.9, False)
    assert ok.macro_f1 == pytest.approx(f1_score(truth, predicted, labels=[0, 1, 2], average="macro"), abs=1e-12)
    assert ok.signals[0].signal == "live_accuracy" and m.streak("1") == 0
    [flipped] = live_window(m, 50, predicted, (predicted + 1) % 3)
    assert (flipped.accuracy, flipped.macro_f1, flipped.alarm) == (0.0, 0.0, True)
    assert flipped.signals[0].score == pytest.approx(0.9) and m.streak("1") == 1
    live = m.status()["versions"]["1"]["live"]
    assert (live["labels"], live["accuracy"], live["open_window"]) == (100, 0.45, 0)


def test_a_version_without_a_profile_keeps_at_most_a_window_of_labels(profile):
    """Feedback on a package exported before profiles existed is joined and counted, and memory stays
    bounded: its open live window never grows past feedback.window labels."""
    m = monitor(profile)
    m.track("0", None)
    closed = []
    for i in range(150):
        closed += answer(m, i, "a", version="0") + m.feedback([label(i, 0)])[1]
    live = m.status()["versions"]["0"]["live"]
    assert closed == [] and (live["labels"], live["accuracy"]) == (150, 1.0)
    assert live["open_window"] <= POLICY.feedback.window


def test_streak_counts_consecutive_alarmed_windows_of_the_signals_that_count_and_resets_on_a_clean_one(profile):
    m, rng = monitor(profile), np.random.default_rng(17)
    streaks = []
    for flip in [True, True, True, False, True]:
        [closed] = m.add("1", window(profile, rng, 200, sample=200, flip=flip))
        assert closed.alarm is flip
        streaks.append(m.streak("1"))
    assert streaks == [1, 2, 3, 0, 1]
    m.reset_streak("1")
    assert m.streak("1") == 0 and m.streak("unknown") == 0
    lengths_only = POLICY.model_copy(update={"retraining": Retraining(signals=["text_length"])})
    other = monitor(profile, policy=lengths_only)
    for _ in range(3):
        assert other.add("1", window(profile, rng, 200, sample=200, flip=True))[0].alarm
    assert other.streak("1") == 0  # alarms of signals that do not count for retraining


def test_status_is_plain_json(profile):
    m, rng = monitor(profile), np.random.default_rng(18)
    m.track("0", None)
    m.add("1", window(profile, rng, 200, sample=200))
    m.add("1", window(profile, rng, 80, sample=200))
    live_window(m, 0, np.zeros(50, dtype=int), np.zeros(50, dtype=int))
    m.feedback([label(999, 1)])
    status = json.loads(json.dumps(m.status(), allow_nan=False))
    assert status["model"] == "synthetic" and set(status["versions"]) == {"0", "1"}
    v1 = status["versions"]["1"]
    assert v1["reference"] == {"rows": 20_000, "source": "synthetic", "accuracy": 0.9, "macro_f1": 0.85}
    assert (v1["windows"], v1["open_window"], len(v1["history"])) == (2, 80, 2)
    assert v1["drift"]["instances"] == 200 and v1["feedback"]["accuracy"] == 1.0
    assert status["versions"]["0"]["reference"] is None
    assert status["feedback"] == {"matched": 50, "unmatched": 0, "duplicate": 0, "expired": 0, "out_of_range": 0,
                                  "pending_answers": 50, "held_labels": 1}
    assert status["policy"]["window"]["instances"] == 200


# --- feedback bodies ---------------------------------------------------------------------------


def test_feedback_items_take_one_object_or_a_list_with_labels_by_name_or_index():
    single = feedback_items({"request_id": rid(1), "label": "c"}, "m", LABELS)
    assert single == [FeedbackLabel(request_id=rid(1), instance=0, label=2)]
    many = feedback_items({"feedback": [{"request_id": rid(1), "label": 1, "instance": 3},
                                        {"request_id": rid(2), "label": "a"}]}, "m", LABELS)
    assert many == [FeedbackLabel(request_id=rid(1), instance=3, label=1), FeedbackLabel(request_id=rid(2), instance=0,
                                                                                        label=0)]


@pytest.mark.parametrize("payload, message", [
    ({"feedback": [{"request_id": rid(1), "label": "a"}, {"request_id": rid(2), "label": "z"}]},
     "feedback[1].label: 'z' is not a label of model m (labels: a, b, c, or their index 0..2)"),
    ({"feedback": [{"request_id": rid(1), "label": 3}]}, "feedback[0].label: 3 is not a label of model m"),
    ({"feedback": [{"request_id": rid(1), "label": -1}]}, "feedback[0].label: -1 is not a label"),
    ({"request_id": "ABC", "label": "a"}, "feedback.0.request_id: String should match pattern '^[0-9a-f]{32}$' (got 'ABC')"),
    ({"request_id": rid(1), "label": "a", "score": 1}, "feedback.0.score: unknown field"),
    ({"feedback": [{"request_id": rid(1), "label": "a"}] * (MAX_FEEDBACK + 1)},
     "feedback: List should have at most 1000 items after validation, not 1001"),
    ({"feedback": [{"request_id": rid(1), "label": 0}, {"request_id": rid(1), "label": True}]}, "feedback.1.label"),
    ({"feedback": []}, "feedback: List should have at least 1 item"),
], ids=["unknown-label", "index-too-big", "negative-index", "bad-request-id", "extra-field", "too-many", "bool-label",
        "empty"])
def test_feedback_items_refuse_a_bad_item_with_422_naming_it(payload, message):
    with pytest.raises(ApiError) as e:
        feedback_items(payload, "m", LABELS)
    assert e.value.status == 422 and e.value.message.startswith(message), e.value.message


# --- retraining --------------------------------------------------------------------------------


def test_newest_data_picks_the_newest_match_by_mtime_and_passes_uris_and_plain_paths(tmp_path):
    for name, mtime in [("a.csv", 300), ("b.csv", 100), ("c.csv", 200)]:
        (tmp_path / name).write_text("x\n")
        os.utime(tmp_path / name, (mtime, mtime))
    assert retrain.newest_data(str(tmp_path / "*.csv")) == str(tmp_path / "a.csv")
    os.utime(tmp_path / "c.csv", (300, 300))  # a tie: the last name
    assert retrain.newest_data(str(tmp_path / "*.csv")) == str(tmp_path / "c.csv")
    for given in ("s3://bucket/data/*.csv", "gs://bucket/train.csv", "data/not-there.csv", "sklearn:digits"):
        assert retrain.newest_data(given) == given
    with pytest.raises(ConfigError, match=r"monitoring\.retraining\.train_path: no file matches .*\*\.tsv"):
        retrain.newest_data(str(tmp_path / "*.tsv"))


@pytest.fixture(scope="module")
def mlp_registry(checkpoints, tmp_path_factory):
    """A registry holding the MLP exported once (version 1); tests copy it before writing to it."""
    root = tmp_path_factory.mktemp("registry")
    export(ExportJob(checkpoint=str(checkpoints["mlp"]), name="mlp", registry=str(root)), **QUIET)
    return root


@pytest.fixture
def registry(mlp_registry, tmp_path) -> Registry:
    shutil.copytree(mlp_registry, tmp_path / "registry")
    return Registry(str(tmp_path / "registry"))


@pytest.fixture
def no_launch(monkeypatch) -> list:
    """Fails nothing, records any attempt to start a run."""
    started = []
    monkeypatch.setattr(retrain, "_start_local", lambda *a: started.append(("local", a)) or "process 1")
    monkeypatch.setattr(retrain, "_submit_job", lambda *a: started.append(("job", a)) or "ray job 1")
    return started


def test_a_dry_run_trigger_records_the_command_and_reason_and_starts_nothing(registry, tmp_path, no_launch):
    (tmp_path / "new.csv").write_text("x\n")
    policy = Retraining(enabled=True, dry_run=True, train_path=str(tmp_path / "*.csv"),
                        storage_path=str(tmp_path / "runs"), overrides=["optim.lr=0.01"])
    reason = "3 alarmed drift windows in a row on mlp:1"
    assert retrain.trigger(registry, "mlp", "1", policy, reason) == "dry_run"
    event = registry.state("mlp").history[-1]
    assert (event.action, event.version, event.reason) == ("retrain", "1", reason)
    record = event.retraining
    assert (record.stage, record.trigger, record.data_path, record.submission) == \
        ("dry_run", reason, str(tmp_path / "new.csv"), None)
    assert record.command == ["python", "-m", "ray_apps", "retrain", "mlp", "--from-version", "1", "--registry",
                              registry.root, "--storage", str(tmp_path / "runs"), "--quantize", "int8", "--reason", reason,
                              "--train-path", str(tmp_path / "*.csv"), "--set", "optim.lr=0.01"]
    assert no_launch == [] and not (tmp_path / "runs").exists()


def test_a_trigger_whose_train_path_matches_nothing_is_recorded_failed_with_the_reason(registry, tmp_path, no_launch):
    policy = Retraining(enabled=True, train_path=str(tmp_path / "nothing-*.csv"), storage_path=str(tmp_path / "runs"))
    assert retrain.trigger(registry, "mlp", "1", policy, "accuracy fell") == "failed"
    event = registry.state("mlp").history[-1]
    assert event.retraining.stage == "failed" and event.retraining.data_path is None
    assert event.reason.startswith("accuracy fell; could not start: ConfigError: monitoring.retraining.train_path: "
                                   "no file matches")
    assert no_launch == []


# --- the profile an export writes --------------------------------------------------------------


def test_an_exported_tabular_package_carries_a_profile_its_own_validation_rows_reproduce(mlp_registry):
    """The profile's bins are the ones serving counts in: the package's ONNX engine on its own validation rows,
    observed as a replica observes, gives the profile's class shares and alarms nothing."""
    pkg = Registry(str(mlp_registry)).open("mlp:1")
    meta = pkg.metadata
    p = meta.monitoring
    assert (p.rows, p.source, p.engine) == (meta.validation.rows, meta.validation.source, "onnx")
    assert p.accuracy == meta.validation.metrics["onnx"]["val_accuracy"]
    assert p.macro_f1 == meta.validation.metrics["onnx"]["val_macro_f1"]
    assert len(p.features) == meta.inputs.num_features == 30 and len(p.class_shares) == 2
    assert p.text_length is None and p.unknown_share is None
    assert len(p.softmax_sample) == min(REFERENCE_SAMPLE, p.rows)
    onnx = Predictor(pkg, "onnx", "cpu")
    observer = Observer(p, 1000, seed=0)
    for batch in load_validation(parse_job(meta.training.config), pkg.labels).batches(50):
        observer.observe(batch_stats({"features": batch["features"]}, softmax(onnx.logits({"features": batch["features"]})
                                                                              .astype(np.float64)), None))
    counts = observer.take()
    assert counts.instances == p.rows and [c / p.rows for c in counts.classes] == pytest.approx(p.class_shares)
    assert not alarmed(drift_signals(p, counts, Thresholds()))


def test_an_exported_text_package_carries_length_bins_and_the_unknown_token_share(checkpoints, tmp_path):
    """Token lengths and unknown tokens of the validation texts, encoded as a replica encodes requests, fall
    in the profile's length bins in the profile's shares."""
    meta = export(ExportJob(checkpoint=str(checkpoints["text"]), name="reviews", registry=str(tmp_path)), **QUIET)
    p = meta.monitoring
    assert p.features is None and p.rows == meta.validation.rows and len(p.class_shares) == 2
    assert p.accuracy == meta.validation.metrics["onnx"]["val_accuracy"]
    assert len(p.text_length.shares) == len(p.text_length.edges) + 1 and sum(p.text_length.shares) == pytest.approx(1.0)
    pkg = Registry(str(tmp_path)).open("reviews:1")
    onnx = Predictor(pkg, "onnx", "cpu")
    texts = load_validation(parse_job(meta.training.config), pkg.labels, onnx.tokenizer).texts
    feeds = onnx.encode(texts)
    stats = batch_stats(feeds, softmax(onnx.logits(feeds).astype(np.float64)), onnx.tokenizer.unk_token_id)
    assert len(texts) == p.rows and p.unknown_share == float(stats.unknown.mean())
    shares = np.bincount(p.text_length.index(stats.lengths), minlength=len(p.text_length.shares)) / p.rows
    assert shares.tolist() == pytest.approx(p.text_length.shares)


def test_a_text_package_outputs_its_pooled_embedding_and_the_embedding_signal_tells_other_text_apart(
        checkpoints, tmp_path):
    """The text graph's second output is the mean-pooled last hidden state, the profile keeps its first
    principal components, and replica-side counting of the validation texts matches that reference while
    texts of another kind move it."""
    meta = export(ExportJob(checkpoint=str(checkpoints["text"]), name="reviews", registry=str(tmp_path)), **QUIET)
    emb = meta.monitoring.embedding
    pkg = Registry(str(tmp_path)).open("reviews:1")
    for engine in ("onnx", "onnx-int8") if "onnx-int8" in pkg.engines() else ("onnx",):
        assert Predictor(pkg, engine, "cpu").has_embedding
    onnx = Predictor(pkg, "onnx", "cpu")
    assert len(emb.components) == 8 and len(emb.mean) == len(emb.components[0]) == TINY_BERT["hidden_size"]
    assert len(emb.sample) == min(REFERENCE_SAMPLE, meta.monitoring.rows) and len(emb.sample[0]) == 8
    texts = load_validation(parse_job(meta.training.config), pkg.labels, onnx.tokenizer).texts

    def window(batch_texts):
        observer = Observer(meta.monitoring, 1000, seed=0, embedding=True)
        feeds = onnx.encode(batch_texts)
        logits, embedding = onnx.logits_and_embedding(feeds)
        np.testing.assert_allclose(logits, onnx.logits(feeds), rtol=1e-6)
        observer.observe(batch_stats(feeds, softmax(logits.astype(np.float64)), onnx.tokenizer.unk_token_id, embedding))
        counts = observer.take()
        assert counts.embedding_dims == 8 and len(counts.sample[0]) == 2 + 8
        return {s.signal: s for s in drift_signals(meta.monitoring, counts, Thresholds())}

    same = window(texts)
    assert same["embedding"].score < 0.05 and not same["embedding"].alarm
    other = window([f"the quarterly report on grain exports from region {i} was published today" for i in range(60)])
    assert other["embedding"].alarm, other["embedding"]


def test_merging_a_window_with_embeddings_and_one_without_keeps_the_softmax_columns_only():
    k = 2
    a = WindowCounts(instances=10, classes=[5, 5], confidence=[10], sample=[[0.5, 0.5, 1.0, 2.0]] * 10,
                     sampled_from=10, embedding_dims=2)
    b = WindowCounts(instances=10, classes=[5, 5], confidence=[10], sample=[[0.4, 0.6]] * 10, sampled_from=10)
    merged = a.merge(b, 100, np.random.default_rng(0))
    assert merged.embedding_dims == 0 and {len(r) for r in merged.sample} == {k} and merged.instances == 20
