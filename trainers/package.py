"""A model package: the directory export writes and serving loads. Verified before use; never unpickled.

Layout (format 1):
  model.safetensors, config.json    the torch model (text: a transformers directory)
  model.onnx                        fp32 graph, dynamic batch (and sequence) axes, output `logits`
  model.int8.onnx                   optional; onnxruntime dynamic int8 quantization
  tokenizer files                   text models
  label_map.json                    labels in id order, the input columns they came from
  README.md                         the model card, for people
  metadata.json                     the model card, for programs: task, inputs, source run, training
                                    config and data, validation metrics, parity, sha256 of each file
  metadata.json.sha256              sha256 of metadata.json itself

`Predictor` turns instances (texts, 8x8 images, feature rows) into logits with one engine:
onnx, onnx-int8 or torch. Export, the promotion gate and serving all score through it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from trainers.checkpoint import sha256

PACKAGE_FORMAT = 1
METADATA = "metadata.json"
ENGINE_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx", "torch": "model.safetensors"}
Engine = Literal["onnx", "onnx-int8", "torch"]


class PackageError(ValueError):
    """A package is missing a file, or a file is truncated or altered; the message names the file."""


def file_digests(directory: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {n: {"sha256": sha256(directory / n), "bytes": (directory / n).stat().st_size} for n in sorted(names)}


def write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    """metadata.json, then its own digest: the last files written, so their presence marks a whole package."""
    (directory / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=False))
    (directory / f"{METADATA}.sha256").write_text(sha256(directory / METADATA) + "\n")


def verify_package(directory: Path) -> dict[str, Any]:
    """Check metadata.json against its digest and every listed file against its sha256 and size."""
    meta_path, digest_path = directory / METADATA, directory / f"{METADATA}.sha256"
    for path in (meta_path, digest_path):
        if not path.is_file():
            raise PackageError(f"{path}: missing; not a complete model package")
    if sha256(meta_path) != digest_path.read_text().strip():
        raise PackageError(f"{meta_path}: sha256 mismatch; the file is truncated or altered")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != PACKAGE_FORMAT:
        raise PackageError(f"{meta_path}: package format {meta.get('format_version')!r}, this code reads {PACKAGE_FORMAT}")
    for name, want in meta["files"].items():
        path = directory / name
        if not path.is_file():
            raise PackageError(f"{path}: missing from package (listed in {METADATA})")
        if path.stat().st_size != want["bytes"] or sha256(path) != want["sha256"]:
            raise PackageError(f"{path}: sha256 mismatch; the file is truncated or altered")
    return meta


@dataclass
class ModelPackage:
    path: Path
    metadata: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> ModelPackage:
        path = Path(path)
        return cls(path, verify_package(path))

    @property
    def ref(self) -> str:
        return f"{self.metadata['name']}:{self.metadata['version']}"

    @property
    def labels(self) -> list[str]:
        return self.metadata["task"]["labels"]

    @property
    def inputs(self) -> dict[str, Any]:
        return self.metadata["inputs"]

    def engines(self) -> list[str]:
        return [e for e, f in ENGINE_FILES.items() if f in self.metadata["files"]]


def resolve_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def onnx_session(path: Path, device: str = "cpu", intra_op_threads: int = 0, spinning: bool = True):
    """An ONNX Runtime session on CUDA (no TF32, so fp32 stays fp32) or CPU; 0 threads = ORT's default.
    spinning=False: idle worker threads sleep instead of spinning, for CPUs shared with other processes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list[Any] = ["CPUExecutionProvider"]
    if device == "cuda":
        providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": 0}))
    return ort.InferenceSession(str(path), opts, providers=providers)


class Predictor:
    """Instances -> logits [B, num_labels] with one engine of a verified package."""

    def __init__(self, package: ModelPackage, engine: Engine = "onnx", device: str = "auto", intra_op_threads: int = 0,
                 spinning: bool = True):
        if engine not in package.engines():
            raise PackageError(f"{package.path}: no {ENGINE_FILES[engine]} in this package "
                               f"(engines: {', '.join(package.engines())})")
        self.package, self.engine, self.device = package, engine, resolve_device(device)
        self.kind = package.inputs["kind"]
        self.tokenizer = None
        if self.kind == "text":
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(package.path, local_files_only=True)
        if engine == "torch":
            import torch

            from trainers.models import load_model

            torch.backends.cuda.matmul.allow_tf32 = False
            self.model = load_model(package.path).eval().to(self.device)
        else:
            self.session = onnx_session(package.path / ENGINE_FILES[engine], self.device, intra_op_threads, spinning)
            self.input_names = [i.name for i in self.session.get_inputs()]

    @property
    def pad_id(self) -> int:
        if self.tokenizer is None or self.tokenizer.pad_token_id is None:
            return 0
        return self.tokenizer.pad_token_id

    def encode(self, instances: Sequence[Any]) -> dict[str, np.ndarray]:
        """Texts -> input_ids/attention_mask padded to the longest; rows -> float32 features [B, F]."""
        if self.kind == "text":
            enc = self.tokenizer(list(instances), padding=True, truncation=True,
                                 max_length=self.package.inputs["max_length"], return_tensors="np")
            return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
        return {"features": np.asarray(instances, dtype=np.float32).reshape(len(instances), -1)}

    def logits(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self.engine == "torch":
            import torch

            from trainers.loop import logits_of

            with torch.inference_mode():
                inputs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in feeds.items()
                          if k != "labels"}
                return logits_of(self.model(**inputs)).float().cpu().numpy()
        return self.session.run(["logits"], {n: feeds[n] for n in self.input_names})[0]


def score(predictor: Predictor, validation, batch_size: int = 64) -> dict[str, float]:
    """val_loss / val_accuracy / val_macro_f1 / val_rows of `predictor` on a ValidationSet."""
    import torch

    from trainers.loop import classification_metrics

    n = len(predictor.package.labels)
    loss_sum, confusion = 0.0, np.zeros((n, n), dtype=np.int64)
    for batch in validation.batches(batch_size, predictor.pad_id):
        logits = torch.from_numpy(predictor.logits(batch)).double()
        labels = torch.from_numpy(batch["labels"])
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        np.add.at(confusion, (batch["labels"], logits.argmax(-1).numpy()), 1)
    return classification_metrics({"loss_sum": torch.tensor(loss_sum), "confusion": torch.from_numpy(confusion)})
