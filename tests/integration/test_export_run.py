"""Export of a real Ray Train DDP run through the CLI: the package scores the run's validation rows
exactly as the workers did, int8 stays within its bound, and the version becomes champion."""

from __future__ import annotations

import pytest

from model_registry.package import PackageMetadata
from model_registry.registry import Registry
from ray_apps.__main__ import main


def test_cli_exports_the_best_checkpoint_of_a_ddp_run_and_promotes_it(digits_run, tmp_path, capsys):
    _, summary, _ = digits_run
    registry, out = tmp_path / "registry", tmp_path / "package.json"
    code = main(["export", "--checkpoint", summary.run_dir, "--name", "digits", "--registry", str(registry),
                 "--quantize", "int8", "--promote", "champion", "--json-out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "promoted: digits:1 is now digits@champion" in printed
    meta = PackageMetadata.model_validate_json(out.read_text())  # --json-out writes the typed record
    assert meta.source.checkpoint == summary.best_checkpoint
    assert meta.parity.max_abs_logit_diff <= 1e-4
    onnx, best = meta.validation.metrics["onnx"], summary.best_metrics
    # The Ray Data validation split and the exporter's single-process reader are the same rows.
    assert onnx["val_rows"] == best["val_rows"] == summary.val_rows
    assert onnx["val_accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-9)
    assert onnx["val_loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert meta.validation.int8_accuracy_drop <= 0.01
    assert Registry(str(registry)).open("digits@champion").metadata == meta
