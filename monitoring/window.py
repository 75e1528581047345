"""Window counts: what a replica saw of one version since its last report, in the reference's bins.

Counts over fixed bins add up, so the controller merges every replica's reports into one window for
the deployment. Softmax rows are kept as a bounded uniform sample (for the KS tests); merging keeps
each replica's rows in proportion to the instances they stand for.
"""

from __future__ import annotations

import threading

import numpy as np
from pydantic import BaseModel, ConfigDict

from monitoring.profile import BatchStats, ReferenceProfile

MAX_BUFFERED = 50_000  # rows a replica keeps uncounted at most


class WindowCounts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: int = 0
    classes: list[int]
    confidence: list[int]
    lengths: list[int] | None = None
    unknown_rows: int | None = None
    features: list[list[int]] | None = None
    sample: list[list[float]] = []  # softmax rows, then embedding_dims projected embedding columns
    sampled_from: int = 0  # instances the sample was drawn from
    embedding_dims: int = 0

    @classmethod
    def empty(cls, profile: ReferenceProfile) -> WindowCounts:
        return cls(classes=[0] * len(profile.class_shares), confidence=[0] * len(profile.confidence.shares),
                   lengths=[0] * len(profile.text_length.shares) if profile.text_length else None,
                   unknown_rows=0 if profile.unknown_share is not None else None,
                   features=[[0] * len(b.shares) for b in profile.features] if profile.features else None)

    def fits(self, profile: ReferenceProfile) -> bool:
        """Same bins as `profile` (a report made against another profile is dropped, not mis-added)."""
        other = WindowCounts.empty(profile)
        return (len(self.classes), len(self.confidence), _shape(self.lengths), _shape(self.features)) == \
            (len(other.classes), len(other.confidence), _shape(other.lengths), _shape(other.features))

    def merge(self, other: WindowCounts, cap: int, rng: np.random.Generator) -> WindowCounts:
        """The two windows as one; at most `cap` sample rows, each side's rows weighted by what they stand for."""
        add = lambda a, b: None if a is None else [x + y for x, y in zip(a, b)]  # noqa: E731
        dims = self.embedding_dims if self.embedding_dims == other.embedding_dims else 0
        if dims != self.embedding_dims or dims != other.embedding_dims:  # one side lacks embeddings: drop them
            k = len(self.classes)
            self, other = (w.model_copy(update={"sample": [r[:k] for r in w.sample], "embedding_dims": 0})
                           for w in (self, other))
        rows = self.sample + other.sample
        if len(rows) > cap:  # how many of a uniform sample of both windows' instances fall on this side
            mine = int(rng.hypergeometric(self.sampled_from, other.sampled_from, cap))
            mine = min(len(self.sample), max(cap - len(other.sample), mine))
            pick = lambda s, k: [s.sample[i] for i in np.sort(rng.choice(len(s.sample), size=k, replace=False))]  # noqa: E731
            rows = pick(self, mine) + pick(other, cap - mine)
        return WindowCounts(
            instances=self.instances + other.instances, classes=add(self.classes, other.classes),
            confidence=add(self.confidence, other.confidence), lengths=add(self.lengths, other.lengths),
            unknown_rows=None if self.unknown_rows is None else self.unknown_rows + (other.unknown_rows or 0),
            features=None if self.features is None else [add(a, b) for a, b in zip(self.features, other.features)],
            sample=rows, sampled_from=self.sampled_from + other.sampled_from, embedding_dims=dims)


def _shape(x: list | None) -> tuple:
    if x is None:
        return ()
    return (len(x),) + ((tuple(len(r) for r in x)) if x and isinstance(x[0], list) else ())


class Observer:
    """A replica's counts for one version since its last report. `observe` runs on the engine thread and
    only keeps the batch; `take`, on the event loop once a second, counts them all at once. A lock keeps
    the two apart."""

    def __init__(self, profile: ReferenceProfile, sample: int, seed: int | None = None, embedding: bool = False):
        """embedding: the lane's engine outputs the pooled embedding and the profile has its components."""
        self.profile, self.cap = profile, sample
        self.embedding = profile.embedding if embedding else None
        self.embedding_dims = len(self.embedding.components) if self.embedding else 0
        self.rng = np.random.default_rng(seed)
        self.conf_edges = np.asarray(profile.confidence.edges)
        self.len_edges = np.asarray(profile.text_length.edges) if profile.text_length else None
        if profile.features:  # every feature's edges in one matrix, padded with +inf: one comparison per batch
            widest = max(len(b.edges) for b in profile.features)
            self.feat_edges = np.full((len(profile.features), widest), np.inf)
            for j, b in enumerate(profile.features):
                self.feat_edges[j, :len(b.edges)] = b.edges
            self.feat_bins = widest + 1
            self.feat_sizes = [len(b.shares) for b in profile.features]
        self.lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        p = self.profile
        self.instances = 0
        self.classes = np.zeros(len(p.class_shares), dtype=np.int64)
        self.confidence = np.zeros(len(p.confidence.shares), dtype=np.int64)
        self.lengths = np.zeros(len(p.text_length.shares), dtype=np.int64) if p.text_length else None
        self.unknown = 0
        self.features = np.zeros((len(p.features), self.feat_bins), dtype=np.int64) if p.features else None
        self.sample = np.empty((0, len(p.class_shares) + self.embedding_dims))
        self.sampled_from = 0
        self.pending: list[BatchStats] = []
        self.buffered = 0

    def observe(self, stats: BatchStats) -> None:
        """Keep the batch for counting: the engine thread only appends (binning it here, between engine calls,
        would hold the GIL the replica's event loop needs); `take` counts a report's batches at once."""
        if stats.probs.ndim != 2 or stats.probs.shape[1] != len(self.classes) or not len(stats.probs):
            return
        with self.lock:
            self.pending.append(stats)
            self.buffered += len(stats.probs)
            if self.buffered >= MAX_BUFFERED:  # reports stalled (a controller restarting): count now, bounded
                self._fold()

    def _fold(self) -> None:
        """Count the kept batches in one vectorized pass (under the lock)."""
        if not self.pending:
            return
        parts, self.pending, self.buffered = self.pending, [], 0
        joined = BatchStats(np.concatenate([p.probs for p in parts]))
        for name in ("lengths", "unknown", "features", "embedding"):
            values = [getattr(p, name) for p in parts]
            if all(v is not None for v in values):
                setattr(joined, name, np.concatenate(values))
        self._count(joined)

    def _count(self, stats: BatchStats) -> None:
        probs = stats.probs
        k = len(self.classes)
        classes = np.bincount(probs.argmax(axis=1), minlength=k)
        conf = np.bincount(np.searchsorted(self.conf_edges, probs.max(axis=1), side="right"),
                           minlength=len(self.confidence))
        lengths = feats = None
        if self.lengths is not None and stats.lengths is not None:
            lengths = np.bincount(np.searchsorted(self.len_edges, stats.lengths, side="right"),
                                  minlength=len(self.lengths))
        if self.features is not None and stats.features is not None and stats.features.shape[1] == len(self.features):
            # bin of x = number of edges <= x (searchsorted side="right"), for every row and feature at once
            bins = (stats.features[:, :, None] >= self.feat_edges[None]).sum(axis=2)
            flat = bins + self.feat_bins * np.arange(len(self.features))
            feats = np.bincount(flat.ravel(), minlength=self.features.size).reshape(self.features.shape)
        rows = probs
        if self.embedding is not None:
            projected = self.embedding.project(stats.embedding) if stats.embedding is not None else \
                np.full((len(probs), self.embedding_dims), np.nan)
            rows = np.concatenate([probs, projected], axis=1)
        self.instances += len(probs)
        self.classes += classes
        self.confidence += conf
        if lengths is not None:
            self.lengths += lengths
            self.unknown += int(stats.unknown.sum())
        if feats is not None:
            self.features += feats
        self._sample(rows)

    def _sample(self, probs: np.ndarray) -> None:
        """Reservoir sampling (Vitter's R), vectorized over the batch."""
        room = self.cap - len(self.sample)
        if room > 0:
            self.sample = np.concatenate([self.sample, probs[:room]])
        rest = probs[max(0, room):]
        if len(rest):
            seen = self.sampled_from + max(0, room) + np.arange(1, len(rest) + 1)
            slot = (self.rng.random(len(rest)) * seen).astype(np.int64)
            hit = slot < self.cap
            self.sample[slot[hit]] = rest[hit]  # later rows of the batch win ties, as in the sequential form
        self.sampled_from += len(probs)

    def take(self) -> WindowCounts | None:
        with self.lock:
            self._fold()
            if not self.instances:
                return None
            out = WindowCounts(
                instances=self.instances, classes=self.classes.tolist(), confidence=self.confidence.tolist(),
                lengths=self.lengths.tolist() if self.lengths is not None else None,
                unknown_rows=self.unknown if self.lengths is not None else None,
                features=[row[:n].tolist() for row, n in zip(self.features, self.feat_sizes)]
                if self.features is not None else None,
                sample=np.round(self.sample, 5).tolist(), sampled_from=self.sampled_from,
                embedding_dims=self.embedding_dims)
            self._reset()
        return out
