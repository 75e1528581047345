"""Where code may depend on what: models, data code and the loop import no Ray or DeepSpeed; serving
imports nothing from trainers/ and never loads the training driver; the shared foundations import no
Ray at import time; library code leaves process-wide logging and warnings alone.

Run: .venv/bin/python -m pytest tests/unit/test_import_rules.py -q
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

NO_RAY = ["trainers/models.py", "trainers/data.py", "trainers/sources.py", "trainers/loop.py", "trainers/summary.py",
          "trainers/config.py", "rayfoundry/errors.py", "rayfoundry/storage.py", "model_registry/package.py",
          "monitoring/config.py", "monitoring/profile.py", "monitoring/window.py", "monitoring/signals.py",
          "monitoring/monitor.py"]
LIBRARIES = ["rayfoundry", "model_registry", "trainers", "tuning", "serve_deployments", "tracking", "monitoring"]
# Entry points of processes rayfoundry owns may quiet them: the CLI, a Train worker, a Serve replica.
MAY_QUIET = {"rayfoundry/ray_env.py", "trainers/worker.py", "serve_deployments/model.py",
             "serve_deployments/controller.py"}


def _imports(path: Path, top_level_only: bool = False) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


@pytest.mark.parametrize("rel", NO_RAY)
def test_models_data_loop_and_records_import_no_ray(rel):
    bad = [m for m in _imports(REPO / rel) if m.split(".")[0] in ("ray", "deepspeed")]
    assert not bad, f"{rel} imports {bad}"


@pytest.mark.parametrize("path", sorted((REPO / "serve_deployments").glob("*.py")), ids=lambda p: p.name)
def test_serving_imports_nothing_from_trainers(path):
    bad = [m for m in _imports(path) if m.split(".")[0] == "trainers"]
    assert not bad, f"{path.name} imports {bad}"


def test_rayfoundry_foundations_import_no_ray_at_import_time():
    for path in sorted((REPO / "rayfoundry").glob("*.py")):
        bad = [m for m in _imports(path, top_level_only=True) if m.split(".")[0] == "ray"]
        assert not bad, f"{path.name} imports {bad} at import time"


def test_loading_the_serving_app_and_a_package_never_loads_the_training_driver():
    code = ("import sys, serve_deployments.app, serve_deployments.model, model_registry.predictor, "
            "model_registry.registry, model_registry.gate\n"
            "print(sorted(m for m in sys.modules if m.startswith(('trainers.run', 'trainers.worker', "
            "'trainers.ray_data', 'trainers.strategy', 'ray.train', 'deepspeed'))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def _process_wide_calls(path: Path) -> list[str]:
    """Calls that change logging or warnings for the whole process, outside `with catch_warnings()`."""
    tree = ast.parse(path.read_text(), str(path))
    scoped = {id(n) for w in ast.walk(tree) if isinstance(w, ast.With)
              and any("catch_warnings" in ast.unparse(i.context_expr) for i in w.items) for n in ast.walk(w)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in scoped:
            continue
        name = ast.unparse(node.func)
        if (name.startswith("warnings.") and name.split(".")[-1] in ("filterwarnings", "simplefilter", "resetwarnings")
                or name in ("logging.basicConfig", "logging.disable", "logging.captureWarnings")
                or name.endswith(".setLevel") or name in ("quiet_process", "quiet_ray_data_console")):
            found.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    return found


def test_library_code_makes_no_process_wide_logging_or_warnings_changes():
    found = []
    for package in LIBRARIES:
        for path in sorted((REPO / package).rglob("*.py")):
            if str(path.relative_to(REPO)) not in MAY_QUIET:
                found += _process_wide_calls(path)
    assert not found, found


def test_export_leaves_the_root_logger_and_warning_filters_as_it_found_them(checkpoints, tmp_path):
    import logging
    import warnings

    from model_registry.export import ExportJob, export

    root = logging.getLogger()
    before = (root.level, list(root.filters), list(root.handlers), list(warnings.filters))
    export(ExportJob(checkpoint=str(checkpoints["mlp"]), name="mlp", registry=str(tmp_path), quantize="int8"),
           log=lambda *_: None)
    assert (root.level, list(root.filters), list(root.handlers), list(warnings.filters)) == before
