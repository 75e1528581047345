"""TrainJob parsing: every shipped YAML validates, and every kind of mistake gets a one-line error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainers.config import ConfigError, TrainJob, apply_overrides, load_job, parse_job

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "ray_apps" / "configs").glob("*.yaml"))
TRAIN_CONFIGS = [p for p in SHIPPED if "model" in (yaml.safe_load(p.read_text()) or {})]


def test_the_four_documented_jobs_ship():
    names = {p.stem for p in SHIPPED}
    assert {"digits_cnn", "breast_cancer_mlp", "sst2_minilm", "agnews_minilm"} <= names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_train_config_validates_and_names_its_launch_command(path):
    job = load_job(path)
    assert isinstance(job, TrainJob)
    assert job.run.name == path.stem
    header = path.read_text().split("\n", 8)[:8]
    assert any(f"--config ray_apps/configs/{path.name}" in line and line.startswith("#") for line in header)


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


BASE = "data: {train_path: 'sklearn:digits', label_column: target}\nmodel: {type: cnn}\n"


def test_overrides_apply_with_yaml_types(tmp_path):
    job = load_job(_write(tmp_path, BASE), ["optim.lr=3e-4", "scaling.num_workers=4", "model.channels=[8, 16]",
                                             "optim.batch_size=128"])
    assert job.optim.lr == 3e-4 and job.scaling.num_workers == 4 and job.model.channels == [8, 16]
    assert job.micro_batch_size == 32


@pytest.mark.parametrize("text, overrides, expected", [
    (BASE + "optim: {lr: 0.1, momentum: 0.9}\n", [], "job.yaml: optim.momentum: unknown field"),
    (BASE, ["optim.lr=fast"], "job.yaml: optim.lr: Input should be a valid number"),
    (BASE, ["optim.lr=-1"], "job.yaml: optim.lr: Input should be greater than 0"),
    ("model: {type: cnn}\n", [], "job.yaml: data: required field is missing"),
    (BASE, ["model.type=transformer"], "job.yaml: model: Input tag 'transformer' found using 'type' does not match"),
    (BASE, ["optim.batch_size=63"],
     "optim.batch_size 63 must divide evenly over scaling.num_workers x optim.grad_accum_steps = 2"),
    ("data: {train_path: x.tsv, text_column: s}\nmodel: {type: cnn}\n", [], "data.text_column is set but model.type cnn"),
    ("data: {train_path: x.tsv}\nmodel: {type: text}\n", [], "data.text_column is required for model.type text"),
    ("data: {train_path: x.tsv, header: false, text_column: t}\nmodel: {type: text}\n", [],
     "data.columns must name the columns when data.header is false"),
    ("data: {train_path: 'sklearn:iris'}\nmodel: {type: mlp}\n", [], "unknown built-in 'sklearn:iris'"),
    (BASE, ["optim"], "--set 'optim': expected key=value"),
    (BASE, ["data.train_path.x=1"], "--set data.train_path.x: 'train_path' is not a section"),
    ("data: [1, 2\n", [], "job.yaml: line 2 invalid YAML"),
    ("- a\n- b\n", [], "job.yaml: expected a mapping of sections"),
])
def test_config_errors_are_one_line_and_name_file_and_field(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_job(_write(tmp_path, text), overrides)
    msg = str(err.value)
    assert expected in msg
    assert "\n" not in msg


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="nope.yaml: no such config file"):
        load_job("nope.yaml")


def test_derived_values_and_defaults():
    job = parse_job({"data": {"train_path": "a.csv", "text_column": "t"}, "model": {"type": "text"},
                     "checkpoint": {"metric": "val_loss"}})
    assert job.checkpoint.resolved_mode == "min"
    assert job.data.resolved_format("s3://bucket/x.TSV") == "tsv"
    with pytest.raises(ConfigError, match="cannot tell the format of 'data.txt'"):
        job.data.resolved_format("data.txt")


def test_apply_overrides_creates_sections():
    assert apply_overrides({}, ["a.b.c=1", "x="]) == {"a": {"b": {"c": 1}}, "x": None}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray_apps", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cli_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path):
    bad = _write(tmp_path, BASE + "optim: {lr: 0.1, lrr: 2}\n")
    proc = _cli("train", "--config", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: optim.lrr: unknown field"
    assert "Traceback" not in proc.stderr


def test_cli_help_names_the_command_to_run():
    proc = _cli("train", "--help")
    assert proc.returncode == 0
    assert "python -m ray_apps train --config ray_apps/configs/digits_cnn.yaml" in proc.stdout
    assert "--dry-run" in proc.stdout and "--set" in proc.stdout and "--restart" in proc.stdout


def test_cli_missing_data_file_exits_2_before_starting_ray(tmp_path):
    (tmp_path / "sst2_minilm").mkdir()  # even a finished run of that name does not mask the bad path
    (tmp_path / "sst2_minilm" / "result.json").write_text('{"epochs_completed": 99}')
    proc = _cli("train", "--config", "ray_apps/configs/sst2_minilm.yaml", "--set", "data.train_path=/nonexistent/t.tsv",
                "--set", f"run.storage_path={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: data.train_path: no such file or directory: '/nonexistent/t.tsv'"


def test_deepspeed_config_is_derived_from_the_job_with_overrides_merged():
    from trainers.strategy import deepspeed_config

    job = parse_job({"data": {"train_path": "a.tsv", "text_column": "t"}, "model": {"type": "text"},
                     "optim": {"batch_size": 64, "grad_accum_steps": 2, "max_grad_norm": 0.5, "precision": "bf16"},
                     "strategy": {"name": "deepspeed", "zero_stage": 3, "offload_optimizer": "cpu",
                                  "deepspeed_config": {"zero_optimization": {"overlap_comm": True}}}})
    cfg = deepspeed_config(job.optim, job.strategy, world_size=2)
    assert cfg["train_micro_batch_size_per_gpu"] == 16 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 64 and cfg["gradient_clipping"] == 0.5 and cfg["bf16"] == {"enabled": True}
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu" and zero["overlap_comm"] is True
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("override, expected", [
    ({"train_batch_size": 128}, "strategy.deepspeed_config.train_batch_size is derived from optim.batch_size"),
    ({"gradient_clipping": 2.0}, "gradient_clipping is derived from optim.max_grad_norm; set that instead"),
    ({"zero_optimization": {"stage": 1}}, "set stage and offload through strategy.zero_stage"),
])
def test_deepspeed_overrides_cannot_restate_derived_numbers(override, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        parse_job({"data": {"train_path": "a.tsv", "text_column": "t"}, "model": {"type": "text"},
                   "strategy": {"name": "deepspeed", "deepspeed_config": override}})
