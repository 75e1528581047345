"""Export and registry without Ray: packages for image, tabular and text checkpoints, parity, int8,
corrupt files, crashes mid-export, the promotion gate and rollback.

Checkpoints here are written by the training code's own `save_checkpoint` from models trained in
this process for a few steps, so they have exactly the layout a Ray Train run writes.

Run: .venv/bin/python -m pytest tests/unit/test_export.py -q
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest
import torch

from model_registry.export import ExportError, ExportJob, export
from model_registry.package import ModelPackage, PackageError
from model_registry.predictor import Predictor, score
from model_registry.registry import GateRefused, Registry, RegistryError
from model_registry.validation import load_validation
from tests.conftest import REPO
from trainers.config import parse_job


@pytest.mark.parametrize("kind", ["cnn", "mlp", "text"])
def test_export_parity_int8_delta_and_metadata(checkpoints, tmp_path, kind):
    meta = export(ExportJob(checkpoint=str(checkpoints[kind]), name=kind, registry=str(tmp_path), quantize="int8"),
                  log=lambda *_: None)
    pkg = Registry(str(tmp_path)).open(kind)
    assert pkg.metadata == meta and meta.version == "1"
    assert {"model.safetensors", "model.onnx", "model.int8.onnx", "label_map.json", "config.json",
            "README.md"} <= set(meta.files)
    assert not [p for p in pkg.path.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    assert meta.parity.max_abs_logit_diff <= 1e-4 and meta.parity.rows == min(64, meta.validation.rows)
    assert len({tuple(s) for s in meta.parity.shapes}) >= 3  # several batch (and sequence) shapes
    m = meta.validation.metrics
    assert meta.validation.int8_accuracy_drop == pytest.approx(m["onnx"]["val_accuracy"] - m["onnx-int8"]["val_accuracy"])
    # The recorded ONNX numbers are what torch scores on the same validation rows.
    job = parse_job(meta.training.config)
    torch_pred = Predictor(pkg, "torch", "cpu")
    torch_metrics = score(torch_pred, load_validation(job, pkg.labels, torch_pred.tokenizer))
    assert torch_metrics["val_accuracy"] == m["onnx"]["val_accuracy"] and torch_metrics["val_rows"] == meta.validation.rows
    assert m["onnx"]["val_loss"] == pytest.approx(torch_metrics["val_loss"], rel=1e-5)
    assert meta.task.type == {"cnn": "image-classification", "mlp": "tabular-classification",
                                    "text": "text-classification"}[kind]
    assert {"torch", "onnxruntime-gpu", "transformers"} <= set(meta.libraries)
    assert meta.source.checkpoint == str(checkpoints[kind].resolve())
    # Serving-side predictions from the int8 engine on raw instances.
    instances = ["a great film", "an awful film"] if kind == "text" else \
        load_validation(job, pkg.labels).features[:2].tolist()
    int8 = Predictor(pkg, "onnx-int8", "cpu")
    assert int8.logits(int8.encode(instances)).shape == (2, len(pkg.labels))


def test_trained_models_beat_chance(checkpoints, tmp_path):
    """Quality sanity for the fixtures the gate tests rely on."""
    for kind, floor in (("cnn", 0.8), ("mlp", 0.9)):
        meta = export(ExportJob(checkpoint=str(checkpoints[kind]), name=kind, registry=str(tmp_path)), log=lambda *_: None)
        assert meta.validation.metrics["onnx"]["val_accuracy"] >= floor


@pytest.fixture
def packaged(checkpoints, tmp_path) -> ModelPackage:
    export(ExportJob(checkpoint=str(checkpoints["mlp"]), name="mlp", registry=str(tmp_path)), log=lambda *_: None)
    return Registry(str(tmp_path)).open("mlp:1")


@pytest.mark.parametrize("damage", ["truncate:model.onnx", "flip:model.safetensors", "flip:metadata.json",
                                    "delete:label_map.json"])
def test_corrupt_package_is_refused_naming_the_file(packaged, damage):
    how, name = damage.split(":")
    path = packaged.path / name
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    with pytest.raises(PackageError, match=rf"{packaged.path / name}: (sha256 mismatch|missing)"):
        ModelPackage.open(packaged.path)


def test_crash_during_export_leaves_no_visible_version(checkpoints, tmp_path):
    """SIGKILL the exporting process after ONNX export; the registry shows nothing, and the next export
    takes version 1 and sweeps the dead process's staging directory."""
    code = (
        "import os, signal, sys; import model_registry.export as e\n"
        "e.quantize_int8 = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"e.export(e.ExportJob(checkpoint={str(checkpoints['cnn'])!r}, name='cnn', registry={str(tmp_path)!r}, "
        "quantize='int8'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    reg = Registry(str(tmp_path))
    staging = tmp_path / ".staging" / socket.gethostname()
    assert reg.versions("cnn") == [] and [p.name for p in staging.iterdir()]  # the dead export's leftovers
    with pytest.raises(RegistryError, match="cnn: no such model"):
        reg.open("cnn")
    export(ExportJob(checkpoint=str(checkpoints["cnn"]), name="cnn", registry=str(tmp_path)), log=lambda *_: None)
    assert reg.versions("cnn") == ["1"] and list(staging.iterdir()) == []


def test_int8_drop_over_the_bound_is_refused_and_nothing_published(checkpoints, weak_cnn, tmp_path, monkeypatch):
    import model_registry.export as export_module

    def quantize_to_a_bad_model(src, dst):  # stands in for a quantization that wrecks accuracy
        export(ExportJob(checkpoint=str(weak_cnn), name="scratch", registry=str(tmp_path / "scratch")), log=lambda *_: None)
        dst.write_bytes((tmp_path / "scratch" / "scratch" / "1" / "model.onnx").read_bytes())

    monkeypatch.setattr(export_module, "quantize_int8", quantize_to_a_bad_model)
    with pytest.raises(ExportError, match=r"int8: validation accuracy drops \d+\.\d\d points .* max_int8_drop 1\.00"):
        export(ExportJob(checkpoint=str(checkpoints["cnn"]), name="cnn", registry=str(tmp_path), quantize="int8"),
               log=lambda *_: None)
    assert Registry(str(tmp_path)).versions("cnn") == []


def test_parity_failure_is_refused(checkpoints, tmp_path, monkeypatch):
    import model_registry.export as export_module

    real = export_module.export_onnx

    def export_perturbed(model, *args):
        with torch.no_grad():
            model.net[-1].bias.add_(1e-3)  # the graph's logits move by 1e-3; torch's do not
        real(model, *args)
        with torch.no_grad():
            model.net[-1].bias.sub_(1e-3)

    monkeypatch.setattr(export_module, "export_onnx", export_perturbed)
    with pytest.raises(ExportError, match=r"parity: ONNX logits differ from torch by 0\.001 \(> 0\.0001\)"):
        export(ExportJob(checkpoint=str(checkpoints["mlp"]), name="mlp", registry=str(tmp_path)), log=lambda *_: None)
    assert Registry(str(tmp_path)).versions("mlp") == []


def test_gate_accepts_better_refuses_worse_force_is_recorded_and_rollback_restores(checkpoints, weak_cnn, tmp_path):
    reg = Registry(str(tmp_path))
    quiet = {"log": lambda *_: None}
    export(ExportJob(checkpoint=str(weak_cnn), name="cnn", registry=str(tmp_path)), **quiet)  # v1 weak
    export(ExportJob(checkpoint=str(checkpoints["cnn"]), name="cnn", registry=str(tmp_path)), **quiet)  # v2 strong
    export(ExportJob(checkpoint=str(weak_cnn), name="cnn", registry=str(tmp_path)), **quiet)  # v3 weak again
    assert reg.promote("cnn:1", "champion").gate is None  # first champion: nothing to beat
    better = reg.promote("cnn:2", "champion")
    assert better.gate.passed and better.gate.measured.startswith("recorded on the same")
    assert better.gate.candidate > better.gate.champion
    with pytest.raises(GateRefused, match=r"cnn:3 not promoted to champion: val_accuracy 0\.\d+ vs champion cnn:2"):
        reg.promote("cnn:3", "champion")
    assert reg.resolve("cnn@champion") == ("cnn", "2")
    forced = reg.promote("cnn:3", "champion", force=True, reason="incident 42 drill")
    assert forced.forced and forced.reason == "incident 42 drill" and not forced.gate.passed
    assert reg.state("cnn").history[-1] == forced
    assert reg.rollback("cnn").version == "2" and reg.resolve("cnn@champion") == ("cnn", "2")
    assert reg.rollback("cnn").version == "1"
    with pytest.raises(RegistryError, match="no earlier version to roll back to"):
        reg.rollback("cnn")
    reg.promote("cnn:3", "challenger")  # other aliases are not gated
    assert reg.resolve("cnn@challenger") == ("cnn", "3") and reg.resolve("cnn") == ("cnn", "1")


def test_gate_rescores_both_packages_when_validation_data_differs(checkpoints, tmp_path):
    reg = Registry(str(tmp_path))
    export(ExportJob(checkpoint=str(checkpoints["mlp"]), name="mlp", registry=str(tmp_path)), log=lambda *_: None)
    reg.promote("mlp:1", "champion")
    meta_path = tmp_path / "mlp" / "1" / "metadata.json"
    meta = reg.metadata("mlp", "1")
    meta.validation.fingerprint = "measured-elsewhere"  # as if v1 was scored on other rows
    from model_registry.package import write_metadata

    write_metadata(meta_path.parent, meta)
    export(ExportJob(checkpoint=str(checkpoints["mlp"]), name="mlp", registry=str(tmp_path)), log=lambda *_: None)
    event = reg.promote("mlp:2", "champion")
    assert event.gate.measured.startswith("re-measured on sklearn:breast_cancer")
    assert event.gate.candidate == event.gate.champion  # the same model, re-scored on the same rows


def test_object_store_registry_uploads_marker_last_and_verifies_downloads(checkpoints, tmp_path, monkeypatch):
    """A non-local root (here a SubTreeFileSystem standing in for S3/GCS): no rename, the commit
    marker last, downloads verified in a local cache."""
    import pyarrow.fs as pafs

    store = tmp_path / "bucket"
    store.mkdir()
    monkeypatch.setenv("RAYFOUNDRY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("model_registry.registry.filesystem_for",
                        lambda uri: (pafs.SubTreeFileSystem(str(store), pafs.LocalFileSystem()), "models"))
    reg_uri = "s3://bucket/models"
    export(ExportJob(checkpoint=str(checkpoints["mlp"]), name="mlp", registry=reg_uri), log=lambda *_: None)
    reg = Registry(reg_uri)
    assert not reg.local and reg.versions("mlp") == ["1"]
    pkg = reg.open("mlp")
    assert pkg.path.is_relative_to(tmp_path / "cache") and pkg.metadata.version == "1"
    (store / "models" / "mlp" / "1" / "metadata.json.sha256").unlink()  # an upload cut short before its marker
    assert reg.versions("mlp") == []


def test_cli_registry_list_show_promote_rollback_and_errors(checkpoints, tmp_path, capsys):
    from ray_apps.__main__ import main

    reg = ["registry", "--registry", str(tmp_path)]
    assert main(["export", "--checkpoint", str(checkpoints["cnn"]), "--name", "digits", "--registry", str(tmp_path),
                 "--promote", "champion"]) == 0
    assert "promoted: digits:1 is now digits@champion" in capsys.readouterr().out
    assert main(reg + ["list"]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "champion" in out and "val_accuracy" in out
    assert main(reg + ["show", "digits@champion"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# digits:1") and "promote champion -> 1 (was None)" in out
    assert main(reg + ["show", "digits:9"]) == 2
    assert "digits:9: no version 9 of digits (versions: 1)" in capsys.readouterr().err
    assert main(reg + ["promote", "digits", "--to", "champion"]) == 2
    assert "promote takes NAME:VERSION" in capsys.readouterr().err
    assert main(reg + ["rollback", "digits"]) == 2
    assert "no earlier version to roll back to" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--name", "x", "--registry", str(tmp_path)]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(checkpoints["cnn"]), "--name", "bad name", "--registry", str(tmp_path)]) == 2
    assert "--name: String should match pattern" in capsys.readouterr().err


def test_cli_serve_refuses_an_unknown_model_before_starting_ray(checkpoints, tmp_path, capsys):
    from ray_apps.__main__ import main

    export(ExportJob(checkpoint=str(checkpoints["cnn"]), name="digits", registry=str(tmp_path)), log=lambda *_: None)
    assert main(["serve", "--model", "digits@champion", "--registry", str(tmp_path)]) == 2
    assert "digits@champion: no alias 'champion' (aliases: none)" in capsys.readouterr().err
    assert main(["serve", "--model", "nope", "--registry", str(tmp_path)]) == 2
    assert "nope: no such model" in capsys.readouterr().err
