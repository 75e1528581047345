"""The registry and export as an attacker or a careless operator would try them: a gate metric taken
from the candidate, a corrupt champion, refs that climb out of the root, symlinks and unlisted files
in packages and checkpoints, a stale remote cache.

Run: .venv/bin/python -m pytest tests/unit/test_registry_hardening.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model_registry.export import ExportJob, export
from model_registry.package import COMMIT_MARKER, METADATA, ModelPackage, PackageError, write_metadata
from model_registry.registry import GateRefused, Registry, RegistryError, parse_ref
from rayfoundry import storage
from rayfoundry.errors import CheckpointError

QUIET = {"log": lambda *_: None}


def _export(ckpt: Path, registry: Path, name: str = "cnn"):
    return export(ExportJob(checkpoint=str(ckpt), name=name, registry=str(registry)), **QUIET)


@pytest.fixture
def champion_and_weak(checkpoints, weak_cnn, tmp_path) -> Registry:
    """cnn:1 strong and champion; cnn:2 weak, not promoted."""
    _export(checkpoints["cnn"], tmp_path)
    _export(weak_cnn, tmp_path)
    reg = Registry(str(tmp_path))
    reg.promote("cnn:1", "champion")
    return reg


def test_the_gate_policy_comes_from_the_registry_not_from_the_candidates_metadata(champion_and_weak, tmp_path):
    reg = champion_and_weak
    assert reg.state("cnn").policy.metric == "val_accuracy" and reg.state("cnn").policy.mode == "max"
    assert reg.state("cnn").history[0].action == "policy"  # set by the first version, recorded
    # The weak candidate's metadata claims a metric on which lower is better: the gate ignores it.
    meta = reg.metadata("cnn", "2")
    meta.validation.metric, meta.validation.mode = "val_loss", "min"
    write_metadata(tmp_path / "cnn" / "2", meta)
    with pytest.raises(GateRefused, match=r"cnn:2 not promoted to champion: val_accuracy 0\.\d+ vs champion cnn:1"):
        reg.promote("cnn:2", "champion")
    assert reg.resolve("cnn@champion") == ("cnn", "1")


def test_changing_the_policy_needs_force_and_a_reason_and_is_recorded(champion_and_weak, capsys):
    from ray_apps.__main__ import main

    reg = champion_and_weak
    cli = ["registry", "--registry", reg.root, "policy", "cnn"]
    assert main(cli) == 0 and "cnn: the gate compares val_accuracy (higher is better)" in capsys.readouterr().out
    assert main(cli + ["--metric", "val_loss", "--mode", "min"]) == 2
    assert "changing the gate policy needs --force and --reason" in capsys.readouterr().err
    assert main(cli + ["--metric", "val_loss", "--mode", "max", "--force", "--reason", "x"]) == 2
    assert "mode max contradicts it" in capsys.readouterr().err
    assert main(cli + ["--metric", "val_macro_f1", "--force", "--reason", "classes are imbalanced"]) == 0
    assert "now gates on val_macro_f1 (higher is better) (was val_accuracy" in capsys.readouterr().out
    event = reg.state("cnn").history[-1]
    assert (event.action, event.policy.metric, event.previous_policy.metric, event.reason) == \
        ("policy", "val_macro_f1", "val_accuracy", "classes are imbalanced")
    with pytest.raises(GateRefused, match="val_macro_f1"):
        reg.promote("cnn:2", "champion")


def test_a_job_whose_mode_contradicts_its_metric_is_refused_when_it_loads():
    from rayfoundry.errors import ConfigError
    from trainers.config import parse_job

    raw = {"data": {"train_path": "sklearn:digits", "label_column": "target"}, "model": {"type": "cnn"},
           "checkpoint": {"metric": "val_accuracy", "mode": "min"}}
    with pytest.raises(ConfigError, match="checkpoint.mode min contradicts checkpoint.metric val_accuracy"):
        parse_job(raw, "job.yaml")
    assert parse_job(raw | {"checkpoint": {"metric": "val_loss"}}).checkpoint.resolved_mode == "min"


def test_force_replaces_a_corrupt_champion_and_records_it(champion_and_weak, tmp_path, capsys):
    from ray_apps.__main__ import main

    reg = champion_and_weak
    onnx = tmp_path / "cnn" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"tampered")
    with pytest.raises(RegistryError, match=r"cnn@champion is cnn:1, whose package is corrupt .*sha256 mismatch"):
        reg.promote("cnn:2", "champion")
    cli = ["registry", "--registry", str(tmp_path), "promote", "cnn:2", "--to", "champion"]
    assert main(cli + ["--force", "--reason", "champion disk corrupted"]) == 0
    assert "promoted: cnn:2 is now @champion (was 1) (forced past the gate; recorded)" in capsys.readouterr().out
    event = reg.state("cnn").history[-1]
    assert event.forced and event.gate.champion_corrupt and event.reason == "champion disk corrupted"
    assert reg.resolve("cnn@champion") == ("cnn", "2")
    # A corrupt candidate is refused even with --force.
    (tmp_path / "cnn" / "2" / "model.onnx").write_bytes(b"")
    reg.promote("cnn:1", "challenger")
    assert main(cli[:4] + ["cnn:2", "--to", "challenger", "--force", "--reason", "x"]) == 0  # ungated alias
    assert main(["registry", "--registry", str(tmp_path), "show", "cnn:2"]) == 2
    assert "model.onnx: sha256 mismatch" in capsys.readouterr().err


@pytest.mark.parametrize("ref", ["../../x/digits:1", "cnn/../../etc:1", "..", "cnn@../../x", "cnn:1/..", ".hidden",
                                 "cnn:-1", "cnn:1e3", "", "cnn@"])
def test_refs_outside_the_name_pattern_are_refused(champion_and_weak, ref, capsys):
    from ray_apps.__main__ import main

    with pytest.raises(RegistryError):
        parse_ref(ref)
    assert main(["registry", "--registry", champion_and_weak.root, "show", ref]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_registry_methods_check_names_too(champion_and_weak):
    reg = champion_and_weak
    for call in (lambda: reg.rollback("../cnn"), lambda: reg.versions(".."), lambda: reg.state("a/b"),
                 lambda: reg.promote("cnn:1", "../../x"), lambda: reg.rollback("cnn", alias="../x")):
        with pytest.raises(RegistryError, match="must match"):
            call()


def _package(checkpoints, tmp_path) -> Path:
    _export(checkpoints["mlp"], tmp_path, "mlp")
    return tmp_path / "mlp" / "1"


def test_loading_refuses_unlisted_files_and_symlinks(checkpoints, tmp_path):
    pkg = _package(checkpoints, tmp_path)
    ModelPackage.open(pkg)
    (pkg / "extra.py").write_text("print('not part of the package')\n")
    with pytest.raises(PackageError, match=r"extra\.py: not listed in metadata\.json"):
        ModelPackage.open(pkg)
    (pkg / "extra.py").unlink()
    # A listed file swapped for a symlink to identical bytes elsewhere is refused all the same.
    outside = tmp_path / "outside.json"
    shutil.copyfile(pkg / "label_map.json", outside)
    (pkg / "label_map.json").unlink()
    (pkg / "label_map.json").symlink_to(outside)
    with pytest.raises(PackageError, match=r"label_map\.json: a symlink"):
        ModelPackage.open(pkg)


def test_a_file_list_naming_paths_outside_the_package_is_refused(checkpoints, tmp_path):
    pkg = _package(checkpoints, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the package")
    meta = json.loads((pkg / METADATA).read_text())
    meta["files"]["../../secret.txt"] = {"sha256": storage.sha256(secret), "bytes": secret.stat().st_size}
    (pkg / METADATA).write_text(json.dumps(meta))
    (pkg / COMMIT_MARKER).write_text(storage.sha256(pkg / METADATA))  # a consistent, hostile package
    with pytest.raises(PackageError, match=r"files: .*'\.\./\.\./secret\.txt' is not a plain file name"):
        ModelPackage.open(pkg)


def test_export_copies_only_listed_regular_files_and_refuses_symlinks(checkpoints, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["mlp"], ckpt)
    (ckpt / "notes.txt").write_text("not in any checksum manifest")
    meta = _export(ckpt, tmp_path / "registry", "mlp")
    assert "notes.txt" not in meta.files and not (tmp_path / "registry" / "mlp" / "1" / "notes.txt").exists()
    target = tmp_path / "elsewhere.json"
    shutil.copyfile(ckpt / "config.json", target)
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").symlink_to(target)  # same bytes, so the sha256 manifest alone would pass
    with pytest.raises(CheckpointError, match=rf"{ckpt / 'config.json'}: a symlink"):
        _export(ckpt, tmp_path / "registry", "mlp")
    (ckpt / "config.json").unlink()
    shutil.copyfile(target, ckpt / "config.json")
    (ckpt / "link").symlink_to("/etc/passwd")  # unlisted, but a symlink all the same: named and refused
    with pytest.raises(CheckpointError, match=rf"{ckpt / 'link'}: a symlink"):
        _export(ckpt, tmp_path / "registry", "mlp")
    assert Registry(str(tmp_path / "registry")).versions("mlp") == ["1"]


def test_a_remote_registry_refetches_a_cache_that_no_longer_matches_the_remote(checkpoints, tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    store = tmp_path / "bucket"
    store.mkdir()
    monkeypatch.setenv("RAYFOUNDRY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("model_registry.registry.filesystem_for",
                        lambda uri: (pafs.SubTreeFileSystem(str(store), pafs.LocalFileSystem()), "models"))
    export(ExportJob(checkpoint=str(checkpoints["mlp"]), name="mlp", registry="s3://bucket/models"), **QUIET)
    reg = Registry("s3://bucket/models")
    first = reg.open("mlp")
    assert first.path.is_relative_to(tmp_path / "cache")
    # The remote version is rewritten (a consistent package with other metadata): the cache, still
    # internally valid, no longer matches the remote's digest and is fetched again.
    remote = store / "models" / "mlp" / "1"
    meta = reg.metadata("mlp", "1")
    meta.created_at = "2030-01-01T00:00:00Z"
    write_metadata(remote, meta)
    again = reg.open("mlp")
    assert again.metadata.created_at == "2030-01-01T00:00:00Z"
    assert (again.path / COMMIT_MARKER).read_text() == (remote / COMMIT_MARKER).read_text()


def test_packages_carry_sample_inputs_so_serving_needs_no_training_data(checkpoints, tmp_path):
    meta = _export(checkpoints["text"], tmp_path, "reviews")
    assert len(meta.samples) == 2 and all(isinstance(s, str) and s.strip() for s in meta.samples)
    digits = _export(checkpoints["cnn"], tmp_path, "digits")
    assert len(digits.samples) == 2 and all(len(row) == 64 for row in digits.samples)
    import ray_apps.serve

    assert "model_registry.validation" not in Path(ray_apps.serve.__file__).read_text()
