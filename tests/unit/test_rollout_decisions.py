"""Rollout decisions on synthetic evidence and a simulated clock: sticky caller assignment, the
statistical guards, the shadow -> canary -> promotion state machine, the policy's validation and the
registry's rollout history and documents, with no Ray and no real waiting.

Run: .venv/bin/python -m pytest tests/unit/test_rollout.py -q

Guards get `Samples` filled by hand; the state machine gets `ReplicaReport`s in `rollout.evidence`
and a `FakeClock` the tests advance. Statistical thresholds below were checked against scipy
(e.g. the 95% Wilson interval of 28/100 is [0.2014, 0.3749], of 50/200 is [0.1951, 0.3143]).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from pydantic import ValidationError

from model_registry.registry import Registry, RegistryError
from serve_deployments.rollout import (
    SAMPLES_KEPT,
    DisagreementGuard,
    ErrorGuard,
    Evidence,
    Guards,
    ReplicaReport,
    Rollout,
    RolloutPolicy,
    RolloutState,
    Samples,
    Shadow,
    Step,
    VersionReport,
    assign,
    judge,
)

CHAMPION, CANDIDATE, STARTED = "1", "2", "2024-05-01T12:00:00Z"
NO_SHADOW = {"compared": 0, "disagreed": 0, "dropped": 0}


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def samples(requests: int = 0, errors: int = 0, latencies=(), confidences=()) -> Samples:
    s = Samples()
    s.requests, s.errors = requests, errors
    s.latencies.extend(latencies)
    s.confidences.extend(confidences)
    return s


def verdicts(guards: Guards, champion: Samples, candidate: Samples, shadow=NO_SHADOW) -> dict:
    return {g.name: g for g in judge(guards, champion, candidate, dict(shadow))}


def feed(r: Rollout, champion: int = 0, candidate: int = 0, cand_errors: int = 0, **shadow: int) -> None:
    """Requests as replicas report them: each answered one with a 10 ms latency and 0.9 confidence;
    the candidate's requests also count as compared in shadow unless `shadow` says otherwise."""
    def answered(n: int, errors: int = 0) -> VersionReport:
        ok = n - errors
        return VersionReport(requests=n, errors=errors, latencies_ms=[10.0] * ok, confidences=[0.9] * ok)

    shadow.setdefault("shadow_compared", candidate)
    versions = {CHAMPION: answered(champion), CANDIDATE: answered(candidate, cand_errors)}
    r.evidence.add(ReplicaReport(replica="r0", generation=1, versions=versions, **shadow))


def never() -> float:
    raise AssertionError("the rng must not be drawn")


# --- assign ------------------------------------------------------------------------------------


def test_assign_is_deterministic_per_key_and_ignores_the_rng_when_a_key_is_given():
    keys = [f"user-{i}" for i in range(2000)]
    first = [assign(k, 0.3, rng=never) for k in keys]
    assert first == [assign(k, 0.3, rng=never) for k in keys]
    assert 0 < sum(first) < len(keys)


def test_assign_is_monotone_so_a_caller_in_the_candidates_share_at_5_percent_stays_in_it_at_25():
    keys = [f"user-{i}" for i in range(5000)]
    at5 = {k for k in keys if assign(k, 0.05)}
    at25 = {k for k in keys if assign(k, 0.25)}
    assert at5 and at5 < at25


@pytest.mark.parametrize("weight", [0.05, 0.25, 0.5])
def test_assign_share_over_20k_random_keys_matches_the_weight_within_four_standard_errors(weight):
    rnd, n = random.Random(1234), 20_000
    share = sum(assign(f"{rnd.getrandbits(64):016x}", weight) for _ in range(n)) / n
    assert abs(share - weight) < 4 * math.sqrt(weight * (1 - weight) / n)  # 0.6 points at 5%, 1.4 at 50%


def test_assign_weight_zero_never_assigns_and_never_draws_but_without_a_key_draws_from_the_injected_rng():
    assert not any(assign(f"user-{i}", 0.0) for i in range(2000))
    assert assign(None, 0.0, rng=never) is False and assign(None, -0.1, rng=never) is False
    draws = iter([0.29, 0.3])  # the draw is compared strictly: 0.3 at weight 0.3 stays with the champion
    assert assign(None, 0.3, rng=lambda: next(draws)) is True
    assert assign(None, 0.3, rng=lambda: next(draws)) is False


# --- judge -------------------------------------------------------------------------------------


def test_every_guard_is_pending_below_its_min_samples_even_on_terrible_evidence():
    champion = samples(10_000, 0, [10.0] * 10_000, [0.9] * 10_000)
    candidate = samples(199, 199, [5000.0] * 199, [0.1] * 199)
    got = verdicts(Guards(), champion, candidate, {"compared": 199, "disagreed": 199, "dropped": 0})
    assert list(got) == ["errors", "latency", "disagreement", "confidence"]
    for g in got.values():
        assert (g.status, g.samples, g.min_samples, g.value, g.p_value) == ("pending", 199, 200, None, None)
    assert [g.threshold for g in got.values()] == [0.01, 1.5, 0.2, 0.25]


def test_errors_guard_passes_on_equal_error_rates():
    g = verdicts(Guards(), samples(2000, 10), samples(2000, 10))["errors"]
    assert (g.status, g.value, g.samples, g.threshold) == ("pass", 0.0, 2000, 0.01)
    assert g.p_value > 0.5


def test_errors_guard_fails_on_a_significant_rise_beyond_max_increase():
    g = verdicts(Guards(), samples(2000, 10), samples(2000, 100))["errors"]  # 0.5% -> 5%
    assert g.status == "fail" and g.value == pytest.approx(0.045) and g.p_value < 1e-15
    assert "100/2000" in g.detail and "10/2000" in g.detail


def test_errors_guard_passes_a_significant_rise_smaller_than_max_increase():
    champion, candidate = samples(2000, 10), samples(2000, 40)  # 0.5% -> 2%, p ~ 1e-5
    assert verdicts(Guards(), champion, candidate)["errors"].status == "fail"
    g = verdicts(Guards(errors=ErrorGuard(max_increase=0.02)), champion, candidate)["errors"]
    assert g.status == "pass" and g.value == pytest.approx(0.015) and g.p_value < 1e-4


def test_errors_guard_passes_a_large_rise_that_is_not_significant_on_tiny_samples():
    champion, candidate = samples(10, 0), samples(10, 3)  # 0% -> 30%, Fisher one-sided p = 0.105
    g = verdicts(Guards(errors=ErrorGuard(min_samples=10)), champion, candidate)["errors"]
    assert g.status == "pass" and g.value == pytest.approx(0.3) and g.p_value == pytest.approx(2 / 19)
    assert verdicts(Guards(errors=ErrorGuard(min_samples=10, alpha=0.2)), champion, candidate)["errors"].status == "fail"


@pytest.mark.parametrize("candidate_ms, status", [(14.9, "pass"), (15.0, "pass"), (15.1, "fail")])
def test_latency_guard_fails_only_when_candidate_p99_exceeds_max_ratio_times_champion_p99(candidate_ms, status):
    g = verdicts(Guards(), samples(latencies=[10.0] * 300), samples(latencies=[candidate_ms] * 300))["latency"]
    assert (g.status, g.samples, g.threshold, g.p_value) == (status, 300, 1.5, None)
    assert g.value == pytest.approx(candidate_ms / 10)


def test_latency_guard_judges_the_tail_not_the_mean():
    candidate = [10.0] * 285 + [100.0] * 15  # mean 14.5 ms (under 1.5 x 10), p99 100 ms
    g = verdicts(Guards(), samples(latencies=[10.0] * 300), samples(latencies=candidate))["latency"]
    assert g.status == "fail" and g.value == pytest.approx(10.0)


@pytest.mark.parametrize("disagreed, compared, status", [
    (40, 100, "fail"),  # rate 0.40, Wilson [0.309, 0.498]
    (28, 100, "fail"),  # rate 0.28, lower bound 0.2014 just above 0.2
    (50, 200, "pass"),  # rate 0.25 above 0.2, but lower bound 0.1951 is not
    (25, 200, "pass"),  # rate 0.125, Wilson [0.086, 0.178]
])
def test_disagreement_guard_fails_when_the_wilson_lower_bound_exceeds_max_rate(disagreed, compared, status):
    guards = Guards(disagreement=DisagreementGuard(max_rate=0.2, min_samples=100))
    g = verdicts(guards, samples(), samples(), {"compared": compared, "disagreed": disagreed, "dropped": 0})["disagreement"]
    assert (g.status, g.samples, g.threshold) == (status, compared, 0.2)
    assert g.value == pytest.approx(disagreed / compared)


def test_confidence_guard_fails_on_shifted_distributions_and_passes_on_the_same_distribution():
    rng = np.random.default_rng(0)
    champion, same, shifted = (rng.beta(*ab, 500).tolist() for ab in [(8, 2), (8, 2), (4, 2)])
    ok = verdicts(Guards(), samples(confidences=champion), samples(confidences=same))["confidence"]
    bad = verdicts(Guards(), samples(confidences=champion), samples(confidences=shifted))["confidence"]
    assert ok.status == "pass" and ok.value < 0.1 and ok.p_value > 0.01 and ok.samples == 500
    assert bad.status == "fail" and bad.value > 0.3 and bad.p_value < 1e-20 and bad.threshold == 0.25


def test_confidence_guard_passes_a_significant_shift_smaller_than_max_ks():
    rng = np.random.default_rng(7)
    champion, candidate = rng.beta(8, 2, 20_000), rng.beta(8, 2, 20_000) + 0.02
    g = verdicts(Guards(), samples(confidences=champion), samples(confidences=candidate))
    assert g["confidence"].status == "pass" and g["confidence"].p_value < 1e-20 and 0.05 < g["confidence"].value < 0.25


# --- evidence ----------------------------------------------------------------------------------


def test_evidence_add_merges_several_replicas_reports_per_version_and_the_shadow_counts():
    ev = Evidence()
    ev.add(ReplicaReport(replica="a", generation=1, shadow_compared=5, shadow_disagreed=1, shadow_dropped=2, versions={
        "1": VersionReport(requests=3, errors=1, instances=6, latencies_ms=[1.0, 2.0], confidences=[0.9]),
        "2": VersionReport(requests=1, instances=1, latencies_ms=[7.0])}))
    ev.add(ReplicaReport(replica="b", generation=1, shadow_compared=4, shadow_disagreed=2, versions={
        "1": VersionReport(requests=2, errors=2, instances=2, latencies_ms=[3.0], confidences=[0.8, 0.7])}))
    one, two = ev.of("1"), ev.of("2")
    assert (one.requests, one.errors, one.instances, list(one.latencies), list(one.confidences)) == (
        5, 3, 8, [1.0, 2.0, 3.0], [0.9, 0.8, 0.7])
    assert (two.requests, two.errors, two.instances, list(two.latencies)) == (1, 0, 1, [7.0])
    assert ev.shadow == {"compared": 9, "disagreed": 3, "dropped": 2}


def test_samples_tally_gives_counts_p50_p99_and_keeps_only_the_newest_latencies():
    s = samples(100, 4, [float(x) for x in range(1, 101)])
    t = s.tally()
    assert (t.requests, t.errors, t.p50_ms, t.p99_ms) == (100, 4, pytest.approx(50.5), pytest.approx(99.01))
    assert (Samples().tally().p50_ms, Samples().tally().p99_ms) == (None, None)
    s.latencies.extend([0.0] * (SAMPLES_KEPT - 50))
    assert len(s.latencies) == SAMPLES_KEPT and list(s.latencies)[:2] == [51.0, 52.0]


# --- the state machine -------------------------------------------------------------------------


def policy(**kw) -> RolloutPolicy:
    kw.setdefault("shadow", Shadow(fraction=0.3, hold_s=60, min_samples=100))
    kw.setdefault("canary", [Step(weight=0.05, hold_s=30, min_samples=50), Step(weight=0.25, hold_s=30, min_samples=50)])
    kw.setdefault("guards", Guards.model_validate({g: {"min_samples": 50} for g in Guards.model_fields}))
    return RolloutPolicy(**kw)


def begin(p: RolloutPolicy, clock: FakeClock) -> Rollout:
    return Rollout.begin(CHAMPION, CANDIDATE, p, clock, STARTED)


def test_rollout_advances_shadow_canary_steps_promoting_only_after_hold_and_samples_both():
    clock = FakeClock()
    r = begin(policy(), clock)
    assert (r.state.phase, r.weight, r.shadow_fraction, r.state.started_at, r.active) == ("shadow", 0.0, 0.3, 1000.0, True)
    feed(r, champion=300, candidate=100)  # enough mirrored requests, not held long enough
    clock.advance(59.9)
    assert r.tick() == "shadow"
    clock.advance(0.1)
    assert r.tick() == "canary"
    s = r.state
    assert (s.step, s.step_base, s.step_started_at, r.weight, r.shadow_fraction) == (0, 100, 1060.0, 0.05, 0.0)
    clock.advance(30)  # held long enough, no samples in this step yet
    assert r.tick() == "canary" and s.step == 0
    feed(r, champion=1000, candidate=49)
    assert r.tick() == "canary" and s.step == 0
    feed(r, candidate=1)
    assert r.tick() == "canary" and (s.step, s.step_base, r.weight) == (1, 150, 0.25)
    feed(r, champion=200, candidate=50)  # enough samples, not held long enough
    clock.advance(29)
    assert r.tick() == "canary" and s.step == 1
    clock.advance(1)
    assert r.tick() == "promoting" and (r.weight, r.shadow_fraction, r.active) == (0.25, 0.0, True)
    clock.advance(1000)
    assert r.tick() == "promoting"
    r.promoted("gate passed")
    rec = r.record()
    assert (rec.outcome, rec.phase, rec.weight, rec.started, rec.champion, rec.candidate) == (
        "promoted", "promoting", 0.25, STARTED, CHAMPION, CANDIDATE)
    assert (r.state.reason, r.active, r.weight) == ("gate passed", False, 0.0)


def test_a_failing_guard_rolls_back_naming_the_guard_with_the_phase_weight_tallies_and_guards():
    clock = FakeClock()
    r = begin(policy(shadow=None, canary=[Step(weight=0.05, hold_s=0, min_samples=10), Step(weight=0.25)]), clock)
    feed(r, champion=100, candidate=10, shadow_compared=0)
    assert r.tick() == "canary" and r.state.step == 1
    feed(r, champion=1900, candidate=1990, cand_errors=100, shadow_compared=0)
    assert r.tick() == "rolled_back" and not r.active
    assert r.state.reason.startswith("guard errors failed (error rate 100/2000 against 0/2000")
    rec = r.record()
    assert (rec.outcome, rec.phase, rec.weight) == ("rolled_back", "canary", 0.25)
    assert {v: (t.requests, t.errors) for v, t in rec.tallies.items()} == {CHAMPION: (2000, 0), CANDIDATE: (2000, 100)}
    assert [(g.name, g.status) for g in rec.guards] == [
        ("errors", "fail"), ("latency", "pass"), ("disagreement", "pending"), ("confidence", "pass")]
    assert rec.shadow == NO_SHADOW


def test_too_much_disagreement_in_shadow_rolls_back_with_weight_zero():
    r = begin(policy(), FakeClock())
    feed(r, champion=200, candidate=200, shadow_compared=200, shadow_disagreed=100)
    assert r.tick() == "rolled_back" and "disagreement failed" in r.state.reason
    rec = r.record()
    assert (rec.phase, rec.weight, rec.shadow["disagreed"]) == ("shadow", 0.0, 100)


def test_abort_and_a_decision_before_any_tick_still_records_the_judged_guards():
    r = begin(policy(), FakeClock())
    r.fail("operator aborted", "aborted")
    rec = r.record()
    assert (rec.outcome, rec.phase, r.state.reason) == ("aborted", "shadow", "operator aborted")
    assert [g.status for g in rec.guards] == ["pending"] * 4


def test_a_finished_rollout_ignores_ticks():
    clock = FakeClock()
    r = begin(policy(), clock)
    r.fail("operator aborted", "aborted")
    before = r.state.model_dump()
    feed(r, champion=10_000, candidate=10_000, cand_errors=10_000)
    clock.advance(10_000)
    assert r.tick() == "aborted" and r.state.model_dump() == before


def test_policy_without_shadow_starts_in_canary_and_without_canary_goes_from_shadow_to_promoting():
    clock = FakeClock()
    r = begin(policy(shadow=None), clock)
    assert (r.state.phase, r.state.step, r.weight, r.shadow_fraction) == ("canary", 0, 0.05, 0.0)
    r = begin(policy(canary=[]), clock)
    feed(r, champion=100, candidate=100)
    clock.advance(60)
    assert r.tick() == "promoting" and (r.weight, r.shadow_fraction) == (0.0, 0.0)
    assert begin(policy(shadow=None, canary=[]), clock).state.phase == "promoting"


# --- policy and persisted state ----------------------------------------------------------------


def test_default_policy_is_valid_with_three_rising_steps_and_shadow_on():
    p = RolloutPolicy()
    assert [s.weight for s in p.canary] == [0.05, 0.25, 0.5] and p.shadow is not None
    assert RolloutPolicy.model_validate_json(p.model_dump_json()) == p


@pytest.mark.parametrize("weights", [[0.25, 0.05], [0.05, 0.05], [0.05, 0.5, 0.25]])
def test_canary_weights_must_strictly_rise(weights):
    with pytest.raises(ValidationError, match="must rise"):
        RolloutPolicy(canary=[{"weight": w} for w in weights])


@pytest.mark.parametrize("weight", [0.0, 1.0, -0.1, 1.5])
def test_a_step_weight_must_lie_strictly_between_0_and_1(weight):
    with pytest.raises(ValidationError):
        RolloutPolicy.model_validate({"canary": [{"weight": weight}]})


@pytest.mark.parametrize("data", [{"canry": []}, {"shadow": {"fracton": 0.5}}, {"guards": {"errors": {"max_increse": 0.1}}},
                                  {"canary": [{"weight": 0.1, "hold": 5}]}])
def test_unknown_policy_keys_are_refused_at_every_level(data):
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        RolloutPolicy.model_validate(data)


def test_rollout_state_round_trips_through_json_mid_canary_and_after_a_rollback():
    clock = FakeClock()
    r = Rollout.begin(CHAMPION, CANDIDATE, policy(), clock, STARTED, alias_moved=True)
    feed(r, champion=300, candidate=100)
    clock.advance(60)
    r.tick()
    assert RolloutState.model_validate_json(r.state.model_dump_json()) == r.state
    r.fail("guard latency failed")
    back = RolloutState.model_validate_json(r.state.model_dump_json())
    assert back == r.state and (back.decided_phase, back.decided_weight, back.alias_moved) == ("canary", 0.05, True)


# --- registry history and documents ------------------------------------------------------------


def test_registry_record_appends_the_rollout_event_with_its_evidence(tmp_path):
    reg, r = Registry(str(tmp_path)), begin(policy(), FakeClock())
    feed(r, champion=10, candidate=5)
    r.fail("guard errors failed")
    first = reg.record("sst2", "rollout", version=CANDIDATE, previous=CHAMPION, reason="x", rollout=r.record())
    reg.record("sst2", "rollout", version="3", previous=CHAMPION, rollout=r.record())
    history = reg.state("sst2").history
    assert [(e.action, e.version) for e in history] == [("rollout", CANDIDATE), ("rollout", "3")]
    assert history[0] == first and history[0].rollout == r.record() and history[0].rollout.tallies[CANDIDATE].requests == 5


def test_registry_documents_read_none_when_missing_and_read_back_what_was_written(tmp_path):
    reg = Registry(str(tmp_path))
    assert reg.read_document("sst2", "rollout.json") is None
    (tmp_path / "sst2").mkdir()
    assert reg.read_document("sst2", "rollout.json") is None
    reg.write_document("sst2", "rollout.json", b'{"a": 1}')
    reg.write_document("sst2", "rollout.json", b'{"a": 2}')
    assert reg.read_document("sst2", "rollout.json") == b'{"a": 2}'
    assert sorted(p.name for p in (tmp_path / "sst2").iterdir()) == ["rollout.json"]


@pytest.mark.parametrize("name, filename", [("../x", "f.json"), ("a/b", "f.json"), ("sst2", "../f.json"),
                                            ("sst2", "sub/f.json"), ("sst2", ".hidden"), ("", "f.json")])
def test_registry_documents_refuse_names_reaching_outside_the_model_directory(tmp_path, name, filename):
    reg = Registry(str(tmp_path / "root"))
    (tmp_path / "root" / "sst2").mkdir(parents=True)
    with pytest.raises(RegistryError):
        reg.read_document(name, filename)
    with pytest.raises(RegistryError):
        reg.write_document(name, filename, b"x")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["root", "sst2"]


def test_registry_record_refuses_a_bad_name_without_creating_anything_outside_the_root(tmp_path):
    reg = Registry(str(tmp_path / "root"))
    with pytest.raises(RegistryError):
        reg.record("../escaped", "rollout")
    assert not (tmp_path / "escaped").exists()


def test_the_last_phase_promotes_only_on_judged_guards_and_a_phase_without_evidence_is_rolled_back():
    clock = FakeClock()
    r = begin(policy(shadow=None, canary=[Step(weight=0.5, hold_s=0, min_samples=10)]), clock)
    feed(r, champion=0, candidate=60)  # enough candidate requests, but nothing to compare them with
    assert r.tick() == "canary"
    assert {g.name for g in r.state.guards if g.status == "pending"} >= {"errors", "latency"}
    feed(r, champion=60)
    assert r.tick() == "promoting"  # disagreement stays pending without a shadow phase: not required
    r = begin(policy(), clock)
    feed(r, champion=10, candidate=5)
    clock.advance(3599)
    assert r.tick() == "shadow"
    clock.advance(1)
    assert r.tick() == "rolled_back"
    assert r.state.reason.startswith("no decision within max_phase_s (3600s) in shadow: 5/100 candidate requests")
