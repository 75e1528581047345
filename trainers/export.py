"""Checkpoint -> verified model package in the registry: ONNX, optional int8, parity, a model card.

    python -m ray_apps export --checkpoint runs/digits_cnn --name digits --quantize int8

Steps: verify the checkpoint's sha256 manifests; load the model from safetensors; export ONNX with
dynamic axes; check torch and ONNX Runtime logits agree on a validation sample (max |diff| <=
parity_tolerance, at several batch shapes); score ONNX fp32 (and int8) on the run's whole validation
set; refuse int8 when it loses more than max_int8_drop accuracy; publish atomically.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import Field

from trainers.checkpoint import CheckpointError, verify_checksums
from trainers.config import Section, TrainJob, parse_job
from trainers.package import PACKAGE_FORMAT, ModelPackage, Predictor, file_digests, resolve_device, score, write_metadata
from trainers.registry import NAME_PATTERN, Registry
from trainers.validation import ValidationSet, load_validation

# Training-only files stay behind; anything pickle-based is refused outright.
TRAINING_ONLY = ("optimizer.safetensors", "trainer_state.json", "job.yaml")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
TASKS = {"text": "text-classification", "cnn": "image-classification", "mlp": "tabular-classification"}


class ExportError(ValueError):
    """The export was refused; the message says which check failed and by how much."""


class ExportJob(Section):
    checkpoint: str = Field(description="A checkpoint directory, or a run directory (its result.json names the best).")
    name: str = Field(pattern=NAME_PATTERN, description="Model name in the registry, e.g. sst2.")
    registry: str = Field("registry", description="Registry root: a local path or a URI pyarrow reaches.")
    quantize: Literal["none", "int8"] = Field("none", description="Also ship model.int8.onnx (dynamic quantization).")
    max_int8_drop: float = Field(0.01, ge=0, le=1, description="Refuse int8 when validation accuracy drops more.")
    parity_rows: int = Field(64, ge=1, description="Validation rows compared between torch and ONNX Runtime.")
    parity_tolerance: float = Field(1e-4, gt=0, description="Largest allowed |torch - ONNX| logit difference.")
    opset: int = Field(17, ge=14, le=20, description="ONNX opset of the exported graph.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when torch sees a GPU.")


def resolve_checkpoint(path: str) -> tuple[Path, dict | None]:
    """(checkpoint dir, run summary or None). A run directory resolves to its best checkpoint."""
    p = Path(path)
    summary = _run_summary(p / "result.json")
    if summary is not None:
        best = summary.get("best_checkpoint") or summary.get("latest_checkpoint")
        if not best:
            raise ExportError(f"{p / 'result.json'}: the run recorded no checkpoint")
        p = Path(best)
    else:
        summary = _run_summary(p.parent / "result.json")
    if not (p / "model.safetensors").is_file():
        raise ExportError(f"{p}: neither a checkpoint (no model.safetensors) nor a run directory (no result.json)")
    return p, summary


def _run_summary(path: Path) -> dict | None:
    """A training run's result.json; None for other files of that name (a Tune trial's is JSON lines)."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and "run_dir" in summary else None


class _Logits(torch.nn.Module):
    """Positional inputs -> logits tensor, the signature the ONNX graph gets."""

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        from trainers.loop import logits_of

        return logits_of(self.model(**dict(zip(self.names, inputs))))


def export_onnx(model: torch.nn.Module, kind: str, num_features: int | None, path: Path, opset: int, device: str) -> None:
    # The TorchScript exporter: ORT's attention and layer-norm fusions match its BERT graph (1.4x faster
    # ORT inference than the dynamo exporter's graph, measured here) and ORT's quantizer accepts it.
    if kind == "text":
        names = ("input_ids", "attention_mask")
        example = (torch.ones(2, 16, dtype=torch.int64, device=device),) * 2
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    else:
        names = ("features",)
        example = (torch.zeros(2, num_features, device=device),)
        axes = {"features": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; parity is checked below
        # eval(): the exporter restores the wrapper's mode afterwards, recursively; a new module is in train mode
        torch.onnx.export(_Logits(model, names).eval(), example, str(path), input_names=list(names), output_names=["logits"],
                          dynamic_axes=axes | {"logits": {0: "batch"}}, opset_version=opset, dynamo=False)


def check_parity(reference: Predictor, onnx: Predictor, validation: ValidationSet, rows: int) -> dict[str, Any]:
    """Max |logit difference| over the first `rows` validation rows at batch sizes 1, 7 and 32, so the
    dynamic batch and sequence axes are exercised with several shapes."""
    worst, shapes = 0.0, set()
    for batch_size in (1, 7, 32):
        for batch in validation.batches(batch_size, reference.pad_id, limit=rows if batch_size > 1 else min(rows, 8)):
            diff = np.abs(reference.logits(batch) - onnx.logits(batch)).max()
            worst = max(worst, float(diff))
            shapes.add(tuple(next(v for k, v in batch.items() if k != "labels").shape))
    return {"rows": min(rows, len(validation)), "max_abs_logit_diff": worst, "shapes": [list(s) for s in sorted(shapes)]}


def quantize_int8(src: Path, dst: Path) -> None:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" hint: measured, no gain here
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def library_versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("rayfoundry", "torch", "transformers", "onnx", "onnxruntime-gpu", "ray", "numpy", "safetensors"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def _input_schema(job: TrainJob, label_map: dict) -> dict[str, Any]:
    if job.model.type == "text":
        return {"kind": "text", "max_length": job.data.max_length, "text_column": job.data.text_column,
                "onnx_inputs": ["input_ids", "attention_mask"]}
    kind = "image" if job.model.type == "cnn" else "features"
    num_features = len(label_map["feature_columns"])
    return {"kind": kind, "num_features": num_features, "feature_columns": label_map.get("feature_columns"),
            "shape": [8, 8] if kind == "image" else [num_features], "dtype": "float32", "onnx_inputs": ["features"]}


def export(spec: ExportJob, log=print) -> dict[str, Any]:
    """Build, check and publish one package; returns its metadata (with name and version)."""
    started = time.time()
    ckpt, summary = resolve_checkpoint(spec.checkpoint)
    verify_checksums(ckpt)
    pickled = [p.name for p in ckpt.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise CheckpointError(f"{ckpt / pickled[0]}: pickle-based file in the checkpoint; packages hold safetensors only")
    job = parse_job(yaml.safe_load((ckpt / "job.yaml").read_text()), str(ckpt / "job.yaml"))
    label_map = json.loads((ckpt / "label_map.json").read_text())
    state = json.loads((ckpt / "trainer_state.json").read_text())
    labels, device = label_map["labels"], resolve_device(spec.device)
    log(f"export: {ckpt} (epoch {state.get('epoch')}) -> {spec.registry}/{spec.name} on {device}")

    registry = Registry(spec.registry)
    with registry.staging(spec.name) as staging:
        for item in ckpt.iterdir():
            if item.is_file() and item.name not in TRAINING_ONLY and not item.name.startswith(("rng_rank", "checksums.")):
                shutil.copy2(item, staging / item.name)
        meta: dict[str, Any] = {"format_version": PACKAGE_FORMAT, "task": {"type": TASKS[job.model.type], "labels": labels},
                                "inputs": _input_schema(job, label_map), "files": {"model.safetensors": {}}}
        draft = ModelPackage(staging, meta)  # unverified while it is being built; `files` names its engines
        reference = Predictor(draft, "torch", device)
        validation = load_validation(job, labels, reference.tokenizer)
        num_features = meta["inputs"].get("num_features")

        export_onnx(reference.model, job.model.type, num_features, staging / "model.onnx", spec.opset, device)
        meta["files"]["model.onnx"] = {}
        onnx = Predictor(draft, "onnx", device)
        parity = check_parity(reference, onnx, validation, spec.parity_rows) | {"tolerance": spec.parity_tolerance,
                                                                              "device": device}
        log(f"  parity: max |torch - onnx| logit diff {parity['max_abs_logit_diff']:.2e} over {parity['rows']} rows")
        if parity["max_abs_logit_diff"] > spec.parity_tolerance:
            raise ExportError(f"parity: ONNX logits differ from torch by {parity['max_abs_logit_diff']:.3g} "
                              f"(> {spec.parity_tolerance:g}) on {parity['rows']} validation rows; export refused")
        metrics = {"onnx": score(onnx, validation)}
        log(f"  onnx fp32: {job.checkpoint.metric} {metrics['onnx'][job.checkpoint.metric]:.4f} on {len(validation)} rows")

        if spec.quantize == "int8":
            quantize_int8(staging / "model.onnx", staging / "model.int8.onnx")
            meta["files"]["model.int8.onnx"] = {}
            metrics["onnx-int8"] = score(Predictor(draft, "onnx-int8", "cpu"), validation)
            drop = metrics["onnx"]["val_accuracy"] - metrics["onnx-int8"]["val_accuracy"]
            metrics["int8_accuracy_drop"] = drop
            log(f"  onnx int8: val_accuracy {metrics['onnx-int8']['val_accuracy']:.4f} (drop {drop * 100:+.2f} points, "
                f"bound {spec.max_int8_drop * 100:.2f})")
            if drop > spec.max_int8_drop:
                raise ExportError(f"int8: validation accuracy drops {drop * 100:.2f} points "
                                  f"({metrics['onnx']['val_accuracy']:.4f} -> {metrics['onnx-int8']['val_accuracy']:.4f}), "
                                  f"more than max_int8_drop {spec.max_int8_drop * 100:.2f}; export refused")

        reported = state["history"][-1] if state.get("history") else {}
        meta |= {
            "source": {"checkpoint": str(ckpt.resolve()), "run_dir": summary.get("run_dir") if summary else None,
                       "run_id": summary.get("run_id") if summary else None, "epoch": state.get("epoch"),
                       "global_step": state.get("global_step"), "strategy": job.strategy.name},
            "training": {"config": json.loads(job.model_dump_json()), "reported_metrics": reported,
                         "data": {"train_path": job.data.train_path, "train_rows": summary.get("train_rows") if summary else None}},
            "validation": {"source": validation.source, "rows": len(validation), "fingerprint": validation.fingerprint,
                           "metric": job.checkpoint.metric, "mode": job.checkpoint.resolved_mode, "metrics": metrics},
            "parity": parity,
            "export": {"exporter": "torch.onnx.export (TorchScript)", "opset": spec.opset, "device": device,
                       "quantization": {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8",
                                        "max_accuracy_drop": spec.max_int8_drop} if spec.quantize == "int8" else None,
                       "seconds": round(time.time() - started, 2)},
            "libraries": library_versions(),
        }

        def finalize(directory: Path, name: str, version: str) -> None:
            meta.update(name=name, version=version, created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            (directory / "README.md").write_text(model_card(meta))
            meta["files"] = file_digests(directory, [p.name for p in directory.iterdir() if p.is_file()])
            write_metadata(directory, meta)

        version = registry.publish(spec.name, staging, finalize)
    log(f"  published {spec.name}:{version} in {time.time() - started:.0f}s")
    return meta


def model_card(meta: dict[str, Any]) -> str:
    v = meta["validation"]
    rows = [f"| {engine} | {m['val_accuracy']:.4f} | {m['val_macro_f1']:.4f} | {m['val_loss']:.4f} |"
            for engine, m in v["metrics"].items() if isinstance(m, dict)]
    cfg = meta["training"]["config"]
    return "\n".join([
        f"# {meta['name']}:{meta['version']}", "",
        f"{meta['task']['type']} over {len(meta['task']['labels'])} labels: {', '.join(meta['task']['labels'][:20])}.",
        f"Model: `{cfg['model']['type']}`; trained with {meta['source']['strategy']} to epoch {meta['source']['epoch']} "
        f"on `{cfg['data']['train_path']}` ({meta['training']['data']['train_rows']} rows).", "",
        f"## Validation ({v['rows']} rows of {v['source']})", "",
        "| engine | accuracy | macro-F1 | loss |", "| --- | --- | --- | --- |", *rows, "",
        f"Parity: max |torch - ONNX| logit difference {meta['parity']['max_abs_logit_diff']:.2e} on "
        f"{meta['parity']['rows']} rows (bound {meta['parity']['tolerance']:g}).", "",
        "## Limits", "",
        "Measured only on the validation rows above; inputs unlike them are untested"
        + (f" (other domains or languages; text beyond {cfg['data']['max_length']} tokens is truncated)."
           if cfg["model"]["type"] == "text" else " (other sources, scales or preprocessing of the features)."),
        "Created by `python -m ray_apps export`; `metadata.json` holds the full record and every file's sha256.", "",
    ])
