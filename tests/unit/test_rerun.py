"""A rerun of a run name continues that run only when its config is the same: otherwise the
checkpoints and result it would resume or return were made from other data or settings.
These checks run before Ray starts.

Run: .venv/bin/python -m pytest tests/unit/test_rerun.py -q
"""

from __future__ import annotations

import json

import pytest

from rayfoundry import storage
from rayfoundry.errors import ConfigError
from trainers.config import parse_job
from trainers.run import check_same_config, run_dir, train
from trainers.summary import CONFIG_FILE, RESULT_FILE, RunSummary


def _job(tmp_path, **sections):
    raw = {"data": {"train_path": "sklearn:digits", "label_column": "target"}, "model": {"type": "cnn"},
           "run": {"name": "digits", "storage_path": str(tmp_path), "epochs": 2}}
    for section, fields in sections.items():
        raw[section] = raw.get(section, {}) | fields
    return parse_job(raw)


def test_a_finished_run_with_other_data_is_refused_naming_the_fields(tmp_path):
    old = _job(tmp_path)
    out = run_dir(old)
    finished = RunSummary(job="digits", run_dir=out, epochs_completed=2, config=old.model_dump(mode="json"))
    storage.write_text(storage.join(out, RESULT_FILE), finished.model_dump_json())
    new = _job(tmp_path, data={"train_path": "sklearn:breast_cancer"}, optim={"lr": 0.01})
    with pytest.raises(ConfigError) as refused:
        train(new)
    message = str(refused.value)
    assert message.startswith(f"{out} holds a run started with another config (")
    assert "data.train_path: 'sklearn:digits' -> 'sklearn:breast_cancer'" in message
    assert "optim.lr: 0.001 -> 0.01" in message and "--restart" in message and "run.name" in message
    # The same config returns the finished run without starting Ray.
    assert train(_job(tmp_path)).epochs_completed == 2


def test_an_unfinished_run_compares_against_the_config_it_started_with(tmp_path):
    job = _job(tmp_path)
    storage.write_text(storage.join(run_dir(job), CONFIG_FILE), job.model_dump_json())
    check_same_config(job, run_dir(job), None)
    check_same_config(_job(tmp_path, run={"epochs": 9}), run_dir(job), None)  # extending a run is allowed
    with pytest.raises(ConfigError, match=r"model\.channels: \[32, 64\] -> \[8\]"):
        check_same_config(_job(tmp_path, model={"channels": [8]}), run_dir(job), None)


def test_a_run_started_before_a_field_existed_compares_with_that_field_at_its_default(tmp_path):
    job = _job(tmp_path)
    written = json.loads(job.model_dump_json())
    for section, field in (("run", "check_rows"), ("run", "stop_at"), ("run", "check_every_steps")):
        del written[section][field]  # as an earlier version wrote job.json
    storage.write_text(storage.join(run_dir(job), CONFIG_FILE), json.dumps(written))
    check_same_config(job, run_dir(job), None)
    with pytest.raises(ConfigError, match=r"run\.check_every_steps: None -> 50"):
        check_same_config(_job(tmp_path, run={"check_every_steps": 50}), run_dir(job), None)


def test_the_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    from ray_apps.__main__ import main

    job = _job(tmp_path)
    storage.write_text(storage.join(run_dir(job), CONFIG_FILE), job.model_dump_json())
    config = tmp_path / "digits.yaml"
    config.write_text(f"data: {{train_path: 'sklearn:digits', label_column: target}}\nmodel: {{type: cnn}}\n"
                      f"run: {{storage_path: {tmp_path}, epochs: 2}}\noptim: {{lr: 0.5}}\n")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.lr: 0.001 -> 0.5" in err and err.startswith("error: ")
