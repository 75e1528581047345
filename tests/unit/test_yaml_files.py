"""Every YAML file the repo ships is validated by the schema of what reads it; a new kind of YAML
without a validator here fails the suite instead of going unchecked."""

from __future__ import annotations

import logging.config
import subprocess
from pathlib import Path

import pytest
import yaml

from trainers.config import load_job

REPO = Path(__file__).resolve().parents[2]


def _tracked_yaml() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.yaml", "*.yml"], cwd=REPO, capture_output=True, text=True)
    files = [REPO / line for line in out.stdout.split()]
    return files or [p for p in REPO.rglob("*.y*ml") if ".venv" not in p.parts and "runs" not in p.parts]


def _validate_train_job(path: Path) -> None:
    load_job(path)


def _validate_runtime_env(path: Path) -> None:
    from ray.runtime_env import RuntimeEnv

    raw = yaml.safe_load(path.read_text())
    RuntimeEnv(**raw)  # raises on unknown or malformed fields
    assert ".venv/" in raw["excludes"], "the upload must never include the virtualenv"


def _validate_logging_config(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    logging.config.dictConfig(raw | {"disable_existing_loggers": False, "loggers": {}})  # builds every handler
    assert raw["handlers"]["console"]["level"] == "WARNING"
    logging.getLogger().handlers.clear()


VALIDATORS = {
    "ray_apps/configs/": _validate_train_job,
    "cluster_configs/runtime_env.yaml": _validate_runtime_env,
    "trainers/ray_data_logging.yaml": _validate_logging_config,
}


@pytest.mark.parametrize("path", _tracked_yaml(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_has_a_validator_and_passes_it(path):
    rel = str(path.relative_to(REPO))
    matches = [fn for prefix, fn in VALIDATORS.items() if rel.startswith(prefix)]
    assert matches, f"{rel}: no validator; add one to VALIDATORS in {Path(__file__).name}"
    matches[0](path)
