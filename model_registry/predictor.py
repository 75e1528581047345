"""`Predictor`: instances (texts, 8x8 images, feature rows) -> logits with one engine of a package:
onnx, onnx-int8 or torch. Export, the promotion gate and serving all score through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model_registry.package import ENGINE_FILES, Engine, Inputs, PackageError


@dataclass
class PackageDraft:
    """A package being built in staging: what a `Predictor` needs before metadata.json exists."""

    path: Path
    inputs: Inputs
    labels: list[str]
    files: set[str] = field(default_factory=set)

    def engines(self) -> list[str]:
        return [e for e, f in ENGINE_FILES.items() if f in self.files]


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


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


class Predictor:
    """Instances -> logits [B, num_labels] with one engine of a verified `ModelPackage` (or a
    `PackageDraft` during export)."""

    def __init__(self, package, engine: Engine = "onnx", device: str = "auto", intra_op_threads: int = 0,
                 spinning: bool = True):
        if engine not in package.engines():
            raise PackageError(f"{package.path}: no {ENGINE_FILES[engine]} in this package "
                               f"(engines: {', '.join(package.engines())})")
        self.package, self.engine, self.device = package, engine, resolve_device(device)
        self.kind = package.inputs.kind
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
        # Text packages exported with monitoring also output the pooled embedding (ONNX engines only).
        self.has_embedding = engine != "torch" and "embedding" in {o.name for o in self.session.get_outputs()}

    @property
    def pad_id(self) -> int:
        if self.tokenizer is None or self.tokenizer.pad_token_id is None:
            return 0
        return self.tokenizer.pad_token_id

    def encode(self, instances: Sequence[Any]) -> dict[str, np.ndarray]:
        """Texts -> input_ids/attention_mask padded to the longest; rows -> float32 features [B, F]."""
        if self.kind == "text":
            enc = self.tokenizer(list(instances), padding=True, truncation=True,
                                 max_length=self.package.inputs.max_length, return_tensors="np")
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

    def logits_and_embedding(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits, and the pooled embedding [B, D] when the graph has one (else None), from one engine call."""
        if not self.has_embedding:
            return self.logits(feeds), None
        logits, embedding = self.session.run(["logits", "embedding"], {n: feeds[n] for n in self.input_names})
        return logits, embedding


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
