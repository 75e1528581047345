"""Checkpoint -> verified model package in the registry: ONNX, optional int8, parity, a model card.

    python -m ray_apps export --checkpoint runs/digits_cnn --name digits --quantize int8

Steps: verify the checkpoint's sha256 manifests (and refuse symlinks); copy only the regular files
those manifests list; load the model from safetensors; export ONNX with
dynamic axes; check torch and ONNX Runtime logits agree on a validation sample (max |diff| <=
parity_tolerance, at several batch shapes); score ONNX fp32 (and int8) on the run's whole validation
set; refuse int8 when it loses more than max_int8_drop accuracy; profile the model's outputs and inputs
on the validation set (the reference serving compares live traffic with); keep two validation
instances as sample requests; publish atomically.
"""

from __future__ import annotations

import json
import logging
import shutil
import stat
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import Field

from model_registry.package import (
    ENGINE_FILES,
    PACKAGE_FORMAT,
    ExportInfo,
    Inputs,
    PackageMetadata,
    Parity,
    Quantization,
    Source,
    Task,
    Training,
    TrainingData,
    Validation,
    file_digests,
    write_metadata,
)
from model_registry.predictor import PackageDraft, Predictor, resolve_device, score
from model_registry.registry import NAME_PATTERN, Registry
from model_registry.validation import ValidationSet, load_validation, sample_instances
from monitoring.profile import profile_predictor
from rayfoundry.errors import CheckpointError, ExportError
from tracking.tracker import source_run
from trainers.checkpoint import manifest_files, verify_checksums
from trainers.config import Section, TrainJob, parse_job
from trainers.summary import RESULT_FILE, RunSummary, parse_summary

__all__ = ["ExportError", "ExportJob", "export", "resolve_checkpoint"]

# Training-only files stay behind; anything pickle-based is refused outright.
TRAINING_ONLY = ("optimizer.safetensors", "trainer_state.json", "job.yaml")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
TASKS = {"text": "text-classification", "cnn": "image-classification", "mlp": "tabular-classification"}


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


def resolve_checkpoint(path: str) -> tuple[Path, RunSummary | None]:
    """(checkpoint dir, run summary or None). A run directory resolves to its best checkpoint."""
    p = Path(path)
    summary = _run_summary(p / RESULT_FILE)
    if summary is not None:
        best = summary.best_checkpoint or summary.latest_checkpoint
        if not best:
            raise ExportError(f"{p / RESULT_FILE}: the run recorded no checkpoint")
        p = Path(best)
    else:
        summary = _run_summary(p.parent / RESULT_FILE)
    if not (p / "model.safetensors").is_file():
        raise ExportError(f"{p}: neither a checkpoint (no model.safetensors) nor a run directory (no result.json)")
    return p, summary


def _run_summary(path: Path) -> RunSummary | None:
    """A training run's result.json; None for other files of that name (a Tune trial's is JSON lines)."""
    try:
        return parse_summary(path.read_text())
    except (OSError, UnicodeDecodeError):
        return None


def package_files(ckpt: Path) -> list[Path]:
    """The checkpoint files a package takes: regular files that its checksum manifests list, at its top
    level, minus training-only state. Symlinks anywhere in the checkpoint are refused, named."""
    links = sorted(p for p in ckpt.rglob("*") if p.is_symlink())
    if links:
        raise CheckpointError(f"{links[0]}: a symlink in the checkpoint; export copies regular files only")
    keep = []
    for name in manifest_files(ckpt):
        path = ckpt / name
        if "/" in name or name in TRAINING_ONLY or name.startswith(("rng_rank", "checksums.")):
            continue
        if not stat.S_ISREG(path.lstat().st_mode):
            raise CheckpointError(f"{path}: not a regular file; export copies regular files only")
        keep.append(path)
    return keep


class _Logits(torch.nn.Module):
    """Positional inputs -> logits tensor, the signature the ONNX graph gets. Text models also output
    `embedding`: the last hidden state's mean over the real tokens, for monitoring (computed anyway)."""

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...], embedding: bool = False):
        super().__init__()
        self.model, self.names, self.embedding = model, names, embedding

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from trainers.loop import logits_of

        kwargs = dict(zip(self.names, inputs))
        if not self.embedding:
            return logits_of(self.model(**kwargs))
        out = self.model(**kwargs, output_hidden_states=True)
        last = out.hidden_states[-1]
        mask = kwargs["attention_mask"].unsqueeze(-1).to(last.dtype)
        return out.logits, (last * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def export_onnx(model: torch.nn.Module, kind: str, num_features: int | None, path: Path, opset: int, device: str) -> None:
    # The TorchScript exporter: ORT's attention and layer-norm fusions match its BERT graph (1.4x faster
    # ORT inference than the dynamo exporter's graph, measured here) and ORT's quantizer accepts it.
    outputs = ["logits"]
    if kind == "text":
        names = ("input_ids", "attention_mask")
        example = (torch.ones(2, 16, dtype=torch.int64, device=device),) * 2
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                "embedding": {0: "batch"}}
        outputs.append("embedding")
    else:
        names = ("features",)
        example = (torch.zeros(2, num_features, device=device),)
        axes = {"features": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; parity is checked below
        # eval(): the exporter restores the wrapper's mode afterwards, recursively; a new module is in train mode
        torch.onnx.export(_Logits(model, names, embedding=kind == "text").eval(), example, str(path),
                          input_names=list(names), output_names=outputs, dynamic_axes=axes | {"logits": {0: "batch"}},
                          opset_version=opset, dynamo=False)


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


class _DropRootMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer logs a "consider pre-processing" hint on the root logger (measured: no gain here);
    # drop that one record for the duration of the call, without touching logging for anyone else.
    hint = _DropRootMessage("Please consider to run pre-processing")
    logging.getLogger().addFilter(hint)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        logging.getLogger().removeFilter(hint)


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


def _input_schema(job: TrainJob, label_map: dict) -> Inputs:
    if job.model.type == "text":
        return Inputs(kind="text", max_length=job.data.max_length, text_column=job.data.text_column,
                      onnx_inputs=["input_ids", "attention_mask"])
    kind = "image" if job.model.type == "cnn" else "features"
    num_features = len(label_map["feature_columns"])
    return Inputs(kind=kind, num_features=num_features, feature_columns=label_map.get("feature_columns"),
                  shape=[8, 8] if kind == "image" else [num_features], dtype="float32", onnx_inputs=["features"])


def export(spec: ExportJob, log=print) -> PackageMetadata:
    """Build, check and publish one package; returns its metadata (with name and version)."""
    started = time.time()
    ckpt, summary = resolve_checkpoint(spec.checkpoint)
    verify_checksums(ckpt)
    pickled = [p.name for p in ckpt.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise CheckpointError(f"{ckpt / pickled[0]}: pickle-based file in the checkpoint; packages hold safetensors only")
    files = package_files(ckpt)
    job = parse_job(yaml.safe_load((ckpt / "job.yaml").read_text()), str(ckpt / "job.yaml"))
    label_map = json.loads((ckpt / "label_map.json").read_text())
    state = json.loads((ckpt / "trainer_state.json").read_text())
    labels, device = label_map["labels"], resolve_device(spec.device)
    log(f"export: {ckpt} (epoch {state.get('epoch')}) -> {spec.registry}/{spec.name} on {device}")

    registry = Registry(spec.registry)
    with registry.staging(spec.name) as staging:
        for item in files:
            shutil.copyfile(item, staging / item.name)
        draft = PackageDraft(staging, _input_schema(job, label_map), labels, {ENGINE_FILES["torch"]})
        reference = Predictor(draft, "torch", device)
        validation = load_validation(job, labels, reference.tokenizer)

        export_onnx(reference.model, job.model.type, draft.inputs.num_features, staging / "model.onnx", spec.opset, device)
        draft.files.add(ENGINE_FILES["onnx"])
        onnx = Predictor(draft, "onnx", device)
        measured = check_parity(reference, onnx, validation, spec.parity_rows)
        parity = Parity(**measured, tolerance=spec.parity_tolerance, device=device)
        log(f"  parity: max |torch - onnx| logit diff {parity.max_abs_logit_diff:.2e} over {parity.rows} rows")
        if parity.max_abs_logit_diff > spec.parity_tolerance:
            raise ExportError(f"parity: ONNX logits differ from torch by {parity.max_abs_logit_diff:.3g} "
                              f"(> {spec.parity_tolerance:g}) on {parity.rows} validation rows; export refused")
        metrics = {"onnx": score(onnx, validation)}
        log(f"  onnx fp32: {job.checkpoint.metric} {metrics['onnx'][job.checkpoint.metric]:.4f} on {len(validation)} rows")

        profile = profile_predictor(onnx, validation, "onnx", metrics["onnx"])
        drop = None
        if spec.quantize == "int8":
            quantize_int8(staging / "model.onnx", staging / "model.int8.onnx")
            draft.files.add(ENGINE_FILES["onnx-int8"])
            metrics["onnx-int8"] = score(Predictor(draft, "onnx-int8", "cpu"), validation)
            drop = metrics["onnx"]["val_accuracy"] - metrics["onnx-int8"]["val_accuracy"]
            log(f"  onnx int8: val_accuracy {metrics['onnx-int8']['val_accuracy']:.4f} (drop {drop * 100:+.2f} points, "
                f"bound {spec.max_int8_drop * 100:.2f})")
            if drop > spec.max_int8_drop:
                raise ExportError(f"int8: validation accuracy drops {drop * 100:.2f} points "
                                  f"({metrics['onnx']['val_accuracy']:.4f} -> {metrics['onnx-int8']['val_accuracy']:.4f}), "
                                  f"more than max_int8_drop {spec.max_int8_drop * 100:.2f}; export refused")

        fields: dict[str, Any] = dict(  # noqa: C408 - keyword form reads like the metadata it builds
            format_version=PACKAGE_FORMAT, task=Task(type=TASKS[job.model.type], labels=labels), inputs=draft.inputs,
            samples=sample_instances(validation),
            source=Source(checkpoint=str(ckpt.resolve()), run_dir=summary.run_dir if summary else None,
                          run_id=summary.run_id if summary else None, epoch=state.get("epoch"),
                          global_step=state.get("global_step"), strategy=job.strategy.name),
            training=Training(config=json.loads(job.model_dump_json()),
                              reported_metrics=state["history"][-1] if state.get("history") else {},
                              data=TrainingData(train_path=job.data.train_path,
                                                train_rows=summary.train_rows if summary else None),
                              lineage=state.get("lineage")),
            validation=Validation(source=validation.source, rows=len(validation), fingerprint=validation.fingerprint,
                                  metric=job.checkpoint.metric, mode=job.checkpoint.resolved_mode, metrics=metrics,
                                  int8_accuracy_drop=drop),
            parity=parity,
            export=ExportInfo(exporter="torch.onnx.export (TorchScript)", opset=spec.opset, device=device,
                              quantization=Quantization(method="onnxruntime.quantization.quantize_dynamic",
                                                        weight_type="QInt8", max_accuracy_drop=spec.max_int8_drop)
                              if spec.quantize == "int8" else None,
                              seconds=round(time.time() - started, 2)),
            libraries=library_versions(),
            monitoring=profile,
        )
        published: list[PackageMetadata] = []

        def finalize(directory: Path, name: str, version: str) -> None:
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            card = PackageMetadata(name=name, version=version, created_at=created, files={}, **fields)
            (directory / "README.md").write_text(model_card(card))
            names = [p.name for p in directory.iterdir() if p.is_file() and not p.is_symlink()]
            meta = card.model_copy(update={"files": file_digests(directory, names)})
            write_metadata(directory, meta)
            published.append(meta)

        version = registry.publish(spec.name, staging, finalize)
    log(f"  published {spec.name}:{version} in {time.time() - started:.0f}s")
    track_export(published[0], log)
    return published[0]


def track_export(meta: PackageMetadata, log=print) -> None:
    """Record the package against its source run: version, metrics per engine, parity and the int8 change
    as metrics at step = version, the model card and metadata as artifacts under packages/NAME-VERSION/."""
    lineage = meta.training.lineage
    tracker = source_run(lineage.tracking if lineage else None, log)
    if tracker.off:
        return
    metrics = {f"package_{engine.replace('-', '_')}_{k}": v
               for engine, m in meta.validation.metrics.items() for k, v in m.items()}
    metrics |= {"package_version": int(meta.version), "package_parity_max_abs_logit_diff": meta.parity.max_abs_logit_diff}
    if meta.validation.int8_accuracy_drop is not None:
        metrics["package_int8_accuracy_drop"] = meta.validation.int8_accuracy_drop
    tracker.log_metrics(metrics, step=int(meta.version))
    tracker.set_tags({f"rayfoundry.package.{meta.name}.{meta.version}": meta.created_at,
                      "rayfoundry.latest_package": meta.ref})
    folder = f"packages/{meta.name}-{meta.version}"
    tracker.log_text(model_card(meta), f"{folder}/README.md")
    tracker.log_text(meta.model_dump_json(indent=2), f"{folder}/metadata.json")
    if not tracker.off:
        log(f"  tracked against run {tracker.ref.run_id} ({tracker.ref.uri})")


def model_card(meta: PackageMetadata) -> str:
    v = meta.validation
    rows = [f"| {engine} | {m['val_accuracy']:.4f} | {m['val_macro_f1']:.4f} | {m['val_loss']:.4f} |"
            for engine, m in v.metrics.items()]
    cfg = meta.training.config
    return "\n".join([
        f"# {meta.name}:{meta.version}", "",
        f"{meta.task.type} over {len(meta.task.labels)} labels: {', '.join(meta.task.labels[:20])}.",
        f"Model: `{cfg['model']['type']}`; trained with {meta.source.strategy} to epoch {meta.source.epoch} "
        f"on `{meta.training.data.train_path}` ({meta.training.data.train_rows} rows).", "",
        f"## Validation ({v.rows} rows of {v.source})", "",
        "| engine | accuracy | macro-F1 | loss |", "| --- | --- | --- | --- |", *rows, "",
        f"Parity: max |torch - ONNX| logit difference {meta.parity.max_abs_logit_diff:.2e} on "
        f"{meta.parity.rows} rows (bound {meta.parity.tolerance:g}).", "",
        "## Limits", "",
        "Measured only on the validation rows above; inputs unlike them are untested"
        + (f" (other domains or languages; text beyond {meta.inputs.max_length} tokens is truncated)."
           if meta.inputs.kind == "text" else " (other sources, scales or preprocessing of the features)."),
        "Created by `python -m ray_apps export`; `metadata.json` holds the full record and every file's sha256.", "",
    ])
