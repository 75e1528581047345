"""The reference profile of a package (stored in its metadata at export) and the per-instance statistics
that both export and the serving replicas compute from a batch, with the same code.

A profile describes what the model did on its validation rows: the predicted-class shares, the
top-class confidence, a fixed sample of softmax rows (for black-box shift detection), and its inputs:
token length and the share of texts with an unknown token for text models, per-feature quantile bins
for numeric inputs, and for text the model's pooled embedding in its first principal components.
Bins are quantiles of the reference, so each holds about a tenth of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

BINS = 10  # quantile bins per distribution
REFERENCE_SAMPLE = 500  # softmax rows kept in a profile
PROFILE_SEED = 0
EMBEDDING_COMPONENTS = 8  # principal components of the pooled embedding that are tested


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Bins(Record):
    """A distribution over bins: bin i holds values x with edges[i-1] <= x < edges[i]."""

    edges: list[float] = Field(description="Inner bin edges, increasing.")
    shares: list[float] = Field(description="The reference's share in each bin (len(edges) + 1).")

    def index(self, values: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.asarray(self.edges, dtype=np.float64), values, side="right")


class Embedding(Record):
    """The model's pooled embedding on the reference rows, in its first principal components: live embeddings
    are projected the same way and compared component by component."""

    mean: list[float] = Field(description="The reference embeddings' mean [D].")
    components: list[list[float]] = Field(description="Principal axes [k, D], largest variance first.")
    sample: list[list[float]] = Field(description=f"Up to {REFERENCE_SAMPLE} reference rows, projected [n, k].")

    def project(self, embedding: np.ndarray) -> np.ndarray:
        return (embedding - np.asarray(self.mean)) @ np.asarray(self.components).T


class ReferenceProfile(Record):
    rows: int = Field(description="Validation rows profiled.")
    source: str = Field(description="Which rows (the package's validation source).")
    engine: str = Field(description="The engine whose outputs were profiled.")
    accuracy: float = Field(description="That engine's validation accuracy: live accuracy's reference.")
    macro_f1: float
    class_shares: list[float] = Field(description="Share of rows predicted as each label, in label order.")
    confidence: Bins = Field(description="Top-class probability.")
    softmax_sample: list[list[float]] = Field(description=f"Up to {REFERENCE_SAMPLE} softmax rows, a fixed sample.")
    text_length: Bins | None = Field(None, description="Text: tokens per instance after truncation.")
    unknown_share: float | None = Field(None, description="Text: share of instances with an unknown token.")
    features: list[Bins] | None = Field(None, description="Numeric inputs: each feature's bins.")
    embedding: Embedding | None = Field(None, description="Text: the pooled embedding's principal components.")


@dataclass
class BatchStats:
    """What monitoring keeps of one batch: softmax rows and, by input kind, token lengths and unknown-token
    flags, or the raw feature rows."""

    probs: np.ndarray  # [n, K]
    lengths: np.ndarray | None = None  # [n]
    unknown: np.ndarray | None = None  # [n] bool
    features: np.ndarray | None = None  # [n, F]
    embedding: np.ndarray | None = None  # [n, D]


def batch_stats(feeds: dict[str, np.ndarray], probs: np.ndarray, unk_id: int | None,
                embedding: np.ndarray | None = None) -> BatchStats:
    """From an engine call's inputs (`Predictor.encode`), its softmax outputs and (text) pooled embedding."""
    if "input_ids" in feeds:
        mask = feeds["attention_mask"].astype(bool)
        unknown = ((feeds["input_ids"] == unk_id) & mask).any(axis=1) if unk_id is not None else \
            np.zeros(len(probs), dtype=bool)
        return BatchStats(probs, lengths=mask.sum(axis=1), unknown=unknown, embedding=embedding)
    return BatchStats(probs, features=feeds["features"])


def quantile_bins(values: np.ndarray, bins: int = BINS) -> Bins:
    values = np.asarray(values, dtype=np.float64)
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    out = Bins(edges=edges.tolist(), shares=[])
    counts = np.bincount(out.index(values), minlength=len(edges) + 1)
    return out.model_copy(update={"shares": (counts / max(1, len(values))).tolist()})


def principal_components(embedding: np.ndarray, keep: np.ndarray, k: int = EMBEDDING_COMPONENTS) -> Embedding:
    mean = embedding.mean(axis=0)
    _, _, axes = np.linalg.svd(embedding - mean, full_matrices=False)
    out = Embedding(mean=np.round(mean, 6).tolist(), components=np.round(axes[:k], 6).tolist(), sample=[])
    return out.model_copy(update={"sample": np.round(out.project(embedding[keep]), 5).tolist()})


def build_profile(stats: BatchStats, labels: np.ndarray, source: str, engine: str, metrics: dict[str, float]
                  ) -> ReferenceProfile:
    """The profile of a model's outputs and inputs on its validation rows (`stats` over all of them)."""
    probs = stats.probs
    n, k = probs.shape
    rng = np.random.default_rng(PROFILE_SEED)
    keep = np.sort(rng.choice(n, size=min(n, REFERENCE_SAMPLE), replace=False))
    return ReferenceProfile(
        rows=n, source=source, engine=engine, accuracy=metrics["val_accuracy"], macro_f1=metrics["val_macro_f1"],
        class_shares=(np.bincount(probs.argmax(axis=1), minlength=k) / n).tolist(),
        confidence=quantile_bins(probs.max(axis=1)),
        softmax_sample=np.round(probs[keep], 5).tolist(),
        text_length=quantile_bins(stats.lengths) if stats.lengths is not None else None,
        unknown_share=float(stats.unknown.mean()) if stats.unknown is not None else None,
        features=[quantile_bins(stats.features[:, j]) for j in range(stats.features.shape[1])]
        if stats.features is not None else None,
        embedding=principal_components(stats.embedding.astype(np.float64), keep)
        if stats.embedding is not None else None,
    )


def profile_predictor(predictor, validation, engine: str, metrics: dict[str, float], batch_size: int = 64
                      ) -> ReferenceProfile:
    """Run `predictor` over a ValidationSet and profile it (export calls this on the ONNX fp32 engine)."""
    from model_registry.predictor import softmax

    unk_id = predictor.tokenizer.unk_token_id if predictor.tokenizer is not None else None
    parts: list[BatchStats] = []
    for batch in validation.batches(batch_size, predictor.pad_id):
        feeds = {k: v for k, v in batch.items() if k != "labels"}
        logits, embedding = predictor.logits_and_embedding(feeds)
        parts.append(batch_stats(feeds, softmax(logits.astype(np.float64)), unk_id, embedding))
    joined = BatchStats(np.concatenate([p.probs for p in parts]))
    for field in ("lengths", "unknown", "features", "embedding"):
        if getattr(parts[0], field) is not None:
            setattr(joined, field, np.concatenate([getattr(p, field) for p in parts]))
    return build_profile(joined, validation.label, validation.source, engine, metrics)
