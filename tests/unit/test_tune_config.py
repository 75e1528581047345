"""TuneJob validation, the trials-at-once rule, and the best-trial YAML: no Ray started."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO
from trainers.config import ConfigError, ScalingSection, load_job
from trainers.hardware import NodeShape
from tuning.config import load_tune
from tuning.sweep import SweepError, best_train_yaml, concurrency

TUNE_DIGITS = REPO / "ray_apps" / "configs" / "tune_digits.yaml"
SRC = "tune_digits.yaml (base digits_cnn.yaml)"


@pytest.mark.parametrize("config", ["tune_digits.yaml", "tune_sst2_minilm.yaml"])
def test_shipped_sweeps_validate(config):
    loaded = load_tune(REPO / "ray_apps" / "configs" / config)
    assert loaded.spec.run.name == config.removesuffix(".yaml")


@pytest.mark.parametrize(("override", "message"), [
    ("space.optim.lrr={uniform: [1, 2]}", f"{SRC}: space.optim.lrr: unknown TrainJob field"),
    ("space.model.layers={choice: [1, 2]}", f"{SRC}: space.model.layers: unknown TrainJob field (model.* fields depend "
                                            "on model.type, here cnn)"),
    ("space.model.hidden={choice: []}", f"{SRC}: space.model.hidden: choice needs a non-empty list of values"),
    ("space.optim.lr={uniform: [2, 1]}", f"{SRC}: space.optim.lr: uniform needs low < high (got [2, 1])"),
    ("space.optim.lr={loguniform: [0, 1]}", f"{SRC}: space.optim.lr: loguniform needs 0 < low (got 0)"),
    ("space.optim.lr={uniform: [-1, 1]}", f"{SRC}: space.optim.lr: the value -1 makes an invalid job: optim.lr: "
                                          "Input should be greater than 0"),
    ("space.optim.lr={uniform: [1]}", f"{SRC}: space.optim.lr: uniform needs [low, high] numbers (got [1])"),
    ("space.optim.lr={normal: [0, 1]}", f"{SRC}: space.optim.lr: expected one of uniform, loguniform, randint, choice"),
    ("space.model.hidden={randint: [8.5, 64]}", f"{SRC}: space.model.hidden: randint needs integer bounds"),
    ("space.model.hidden={choice: [64, -1]}", f"{SRC}: space.model.hidden: the value -1 makes an invalid job: "
                                              "model.hidden: Input should be greater than 0"),
    ("num_samples=0", "tune_digits.yaml: num_samples: Input should be greater than or equal to 1"),
    ("scheduler.type=hyperband", "tune_digits.yaml: scheduler: Input tag 'hyperband' found using 'type' does not match"),
    ("scheduler={type: pbt}", "tune_digits.yaml: space.model.hidden: PBT continues trials from other trials' weights, "
                              "so it can only mutate optim.lr, optim.weight_decay, model.dropout"),
    ("search.type=optuna", None),  # valid: every choice is a single value
    ("space.model.channels={choice: [[16, 32], [32, 64]]}", None),  # list choices are fine for random search
])
def test_sweep_config_errors_name_the_field(override, message):
    if message is None:
        load_tune(TUNE_DIGITS, [override])
        return
    with pytest.raises(ConfigError) as err:
        load_tune(TUNE_DIGITS, [override])
    assert str(err.value).startswith(str(TUNE_DIGITS.parent / message)) or message in str(err.value), str(err.value)


def test_optuna_refuses_list_choices_and_pbt_refuses_other_searchers():
    with pytest.raises(ConfigError, match="space.model.channels: Optuna's choices must be single values"):
        load_tune(TUNE_DIGITS, ["search.type=optuna", "space.model.channels={choice: [[16, 32], [32, 64]]}"])
    with pytest.raises(ConfigError, match="search.type: PBT samples its own mutations"):
        load_tune(TUNE_DIGITS, ["scheduler={type: pbt}", "search.type=optuna"])


def nodes(*cpus: float, gpus: float = 0) -> list[NodeShape]:
    return [NodeShape(cpus=c, gpus=gpus / len(cpus)) for c in cpus]


@pytest.mark.parametrize(("workers", "cpus", "cluster", "samples", "expected"), [
    (1, 0.45, nodes(2), 8, 2),                # this machine: two trials, one whole CPU left for Ray Data
    (1, 0.5, nodes(2), 8, 1),                 # 2 x 0.51 would leave 0.98 CPU: Ray Data's 1-CPU tasks never run
    (2, 1.0, nodes(64), 100, 31),             # a big node fills up
    (2, 1.0, nodes(64, gpus=4), 100, 2),      # use_gpu auto: 2 GPUs per trial bound it
    (1, 1.0, nodes(1000), 8, 8),              # never more than num_samples
    (1, 1.0, nodes(0, 2, 2, 2), 8, 2),        # 1.01 per trial: one per 2-CPU node, and one node keeps a whole CPU
    (1, 0.45, nodes(0, 2, 2, 2), 16, 10),     # 4 + 4 on two nodes, 2 beside the reserve on the third
    (2, 1.0, nodes(1, 1, 1, 1), 8, 1),        # no node holds a 2.01-CPU trial: 3 worker slots beside the reserve
    (2, 1.5, nodes(2, 2, 2, 2), 8, 1),        # spanning trials: one 1.5-CPU slot per node, none beside the reserve
    (1, 0.5, nodes(4, 4, 0.5), 32, 12),       # the reserve goes on a node that holds it: 5 + 7 + 0
])
def test_trials_at_once_follow_the_resource_rule(workers, cpus, cluster, samples, expected):
    spec = load_tune(TUNE_DIGITS, [f"num_samples={samples}"]).spec
    at_once, why = concurrency(spec, ScalingSection(num_workers=workers, cpus_per_worker=cpus), cluster)
    assert at_once == expected, why
    assert why.startswith(f"{expected} trial(s) at once")


def test_on_several_nodes_the_reserve_stays_whole_on_one_node():
    """6 CPUs in all would give floor(5 / 1.01) = 4 trials, each on its own node's 2 CPUs: Ray Data's
    1-CPU tasks would then find 0.99 free on every node and never run."""
    spec = load_tune(TUNE_DIGITS, ["num_samples=8"]).spec
    _, why = concurrency(spec, ScalingSection(num_workers=1, cpus_per_worker=1.0), nodes(0, 2, 2, 2))
    assert why == ("2 trial(s) at once: min(num_samples 8, 0 + 1 + 1 whole trials of 1.01 CPUs on 3 nodes (2/2/2 CPUs), "
                   "reserve 1 kept whole on one = 2)")


def test_a_trial_that_cannot_fit_is_an_error_not_a_hang():
    spec = load_tune(TUNE_DIGITS).spec
    with pytest.raises(SweepError, match="one trial needs 2.01 CPUs .* but the cluster has 2"):
        concurrency(spec, ScalingSection(num_workers=2, cpus_per_worker=1.0), nodes(2))


def test_best_yaml_is_a_complete_train_job_with_the_trial_values_at_the_base_scaling(tmp_path):
    loaded = load_tune(TUNE_DIGITS)
    path = tmp_path / "best_train.yaml"
    path.write_text(best_train_yaml(loaded, {"optim.lr": 0.004, "model.hidden": 64, "model.dropout": 0.2}, str(path)))
    assert f"# Train it:  python -m ray_apps train --config {path}" in path.read_text()
    job = load_job(path)
    base = load_job(REPO / "ray_apps" / "configs" / "digits_cnn.yaml")
    assert (job.optim.lr, job.model.hidden, job.model.dropout) == (0.004, 64, 0.2)
    assert job.run.epochs == 6 and job.run.name == "tune_digits_best"  # the sweep's train overrides apply
    assert job.scaling == base.scaling  # trials ran at 1 worker; the YAML is for a full run


def test_cli_bad_sweep_config_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "ray_apps", "tune", "--config", str(TUNE_DIGITS),
                           "--set", "space.optim.lr={loguniform: [0, 1]}"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {TUNE_DIGITS}: space.optim.lr: loguniform needs 0 < low (got 0)".replace(
            f"{TUNE_DIGITS}:", f"{TUNE_DIGITS} (base digits_cnn.yaml):")]
    assert yaml.safe_load(TUNE_DIGITS.read_text())["space"]  # the shipped file is untouched
