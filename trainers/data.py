"""Check and encode training rows, gather source statistics, collate batches; no Ray here.

Rows come from `sources.py` with their provenance (`_file`, `_line`, `_error`). Errors name file,
line and column so a user can open the file at the fault. `ray_data.py` wires these functions into
a streaming Ray Data pipeline.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from rayfoundry.errors import DataError

__all__ = ["DataError", "FieldSpec", "SourceStats", "collate", "encode_batch", "length_grouped", "split_mask", "where"]

PROVENANCE = ("_file", "_line", "_error")


def where(file: str, line: int, column: str | None = None) -> str:
    return f"{file}, line {line}" + (f", column '{column}'" if column else "")


@dataclass(frozen=True)
class FieldSpec:
    """Which columns feed the model; built from the data config at the edge."""

    label_column: str
    text_column: str | None = None
    feature_columns: tuple[str, ...] | None = None
    on_bad_row: str = "error"

    @classmethod
    def from_config(cls, data_cfg) -> FieldSpec:
        """From a config's data section (duck-typed: this module does not import the config)."""
        columns = tuple(data_cfg.feature_columns) if data_cfg.feature_columns else None
        return cls(data_cfg.label_column, data_cfg.text_column, columns, data_cfg.on_bad_row)

    def required(self) -> list[str]:
        cols = [self.label_column] + ([self.text_column] if self.text_column else [])
        return cols + list(self.feature_columns if self.feature_columns is not None else [])

    def resolve(self, available: list[str] | None, source: str) -> FieldSpec:
        """Fill in default feature columns and check every named column exists."""
        if not available:
            raise DataError(f"{source}: no rows (empty file?)")
        spec = self
        if self.text_column is None and self.feature_columns is None:
            feats = tuple(c for c in available if c != self.label_column and c not in PROVENANCE)
            spec = FieldSpec(self.label_column, None, feats, self.on_bad_row)
        missing = [c for c in spec.required() if c not in available]
        if missing:
            shown = [c for c in available if c not in PROVENANCE]
            raise DataError(f"{source}: missing column '{missing[0]}' (columns are: {', '.join(shown)})")
        return spec


@dataclass
class SourceStats:
    """What a full pass over a source found: labels, bad rows, feature moments."""

    label_counts: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    bad_rows: int = 0
    first_error: str | None = None
    feature_sum: np.ndarray | None = None
    feature_sumsq: np.ndarray | None = None

    def add(self, enc: dict[str, np.ndarray]) -> None:
        """Count one encoded batch (see `encode_batch`)."""
        errors = enc["_error"]
        ok = np.array([e is None for e in errors], dtype=bool)
        labels, counts = np.unique(enc["_label_raw"][ok].astype(str), return_counts=True)
        feats = enc["features"][ok].astype(np.float64) if "features" in enc else None
        self.merge(SourceStats(
            label_counts=dict(zip(labels.tolist(), counts.tolist(), strict=True)),
            rows=len(errors), bad_rows=int((~ok).sum()),
            first_error=None if ok.all() else errors[int(np.argmin(ok))],
            feature_sum=None if feats is None else feats.sum(0),
            feature_sumsq=None if feats is None else (feats**2).sum(0),
        ))

    def sorted_labels(self) -> list[str]:
        labels = list(self.label_counts)
        try:
            return sorted(labels, key=lambda s: float(s))
        except ValueError:
            return sorted(labels)

    @property
    def good_rows(self) -> int:
        return self.rows - self.bad_rows

    def merge(self, other: SourceStats) -> None:
        for label, count in other.label_counts.items():
            self.label_counts[label] = self.label_counts.get(label, 0) + count
        self.rows += other.rows
        self.bad_rows += other.bad_rows
        self.first_error = self.first_error or other.first_error
        if other.feature_sum is not None:
            self.feature_sum = other.feature_sum if self.feature_sum is None else self.feature_sum + other.feature_sum
            self.feature_sumsq = other.feature_sumsq if self.feature_sumsq is None else self.feature_sumsq + other.feature_sumsq

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        for k in ("feature_sum", "feature_sumsq"):
            d[k] = None if d[k] is None else d[k].tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SourceStats:
        s = cls(**d)
        for k in ("feature_sum", "feature_sumsq"):
            if getattr(s, k) is not None:
                setattr(s, k, np.asarray(getattr(s, k), dtype=np.float64))
        return s

    def feature_moments(self) -> tuple[list[float], list[float]]:
        n = max(self.good_rows, 1)
        mean = self.feature_sum / n
        std = np.sqrt(np.maximum(self.feature_sumsq / n - mean**2, 0.0))
        return mean.tolist(), np.where(std < 1e-8, 1.0, std).tolist()


def encode_batch(
    batch: pa.Table, spec: FieldSpec, label_ids: dict[str, int] | None = None, tokenizer=None, max_length: int = 128
) -> dict[str, np.ndarray]:
    """Check and encode one batch. Bad rows keep flowing with `_error` set and label -1.

    Output: `label` int64 [B]; `features` float32 [B, F] or `input_ids` object [B] of int arrays;
    plus provenance and `_label_raw`.
    """
    files = batch.column("_file").to_numpy(zero_copy_only=False)
    lines = batch.column("_line").to_numpy(zero_copy_only=False)
    errors = list(batch.column("_error").to_pylist())

    def flag(i: int, column: str | None, problem: str) -> None:
        if errors[i] is None:
            errors[i] = f"{where(files[i], int(lines[i]), column)}: {problem}"

    for i, e in enumerate(errors):  # parse errors carry no location yet
        if e is not None and not e.startswith(str(files[i])):
            errors[i] = f"{where(files[i], int(lines[i]))}: {e}"

    raw_labels = batch.column(spec.label_column).cast(pa.string()).to_pylist()
    labels = np.full(len(raw_labels), -1, dtype=np.int64)
    for i, raw in enumerate(raw_labels):
        if raw is None or raw.strip() == "":
            flag(i, spec.label_column, "empty label")
        elif label_ids is not None:
            key = _normalize_label(raw)
            if key not in label_ids:
                known = ", ".join(list(label_ids)[:10])
                flag(i, spec.label_column, f"unknown label {raw!r} (known: {known})")
            else:
                labels[i] = label_ids[key]
    normalized = np.array([_normalize_label(r) for r in raw_labels], dtype=object)
    out: dict[str, np.ndarray] = {"label": labels, "_label_raw": normalized}

    if spec.text_column:
        texts = batch.column(spec.text_column).to_pylist()
        for i, t in enumerate(texts):
            if t is None or not t.strip():
                flag(i, spec.text_column, "empty text")
        if tokenizer is not None:
            ids = tokenizer([t or "" for t in texts], truncation=True, max_length=max_length)["input_ids"]
            out["input_ids"] = np.array([np.asarray(x, dtype=np.int64) for x in ids] + [None], dtype=object)[:-1]
    else:
        feats = np.zeros((batch.num_rows, len(spec.feature_columns)), dtype=np.float32)
        for j, name in enumerate(spec.feature_columns):
            col = batch.column(name)
            try:
                feats[:, j] = pc.cast(col, pa.float32()).to_numpy(zero_copy_only=False)
                if col.null_count:
                    raise ValueError
            except (pa.ArrowInvalid, ValueError):
                for i, v in enumerate(col.to_pylist()):
                    try:
                        feats[i, j] = float(v)
                    except (TypeError, ValueError):
                        flag(i, name, f"not a number: {v!r}")
                        feats[i, j] = 0.0
        bad = ~np.isfinite(feats).all(axis=1)
        for i in np.flatnonzero(bad):
            flag(int(i), None, "non-finite feature value")
            feats[i] = 0.0
        out["features"] = feats

    for i, e in enumerate(errors):
        if e is not None:
            labels[i] = -1
    out["_error"] = np.array(errors + [None], dtype=object)[:-1]
    out["_file"], out["_line"] = files.astype(object), lines.astype(np.int64)
    return out


def _normalize_label(raw: str | None) -> str | None:
    """'1', '1.0' and ' 1 ' are the same class; other strings are kept as written."""
    if raw is None:
        return None
    s = raw.strip()
    try:
        f = float(s)
        return str(int(f)) if f.is_integer() else s
    except ValueError:
        return s


def split_mask(files: np.ndarray, lines: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """True for validation rows: a stable hash of (file, line, seed), independent of block layout."""
    import zlib

    names, index = np.unique(np.asarray(files, dtype=str), return_inverse=True)  # a batch holds few files
    file_hash = np.array([zlib.crc32(n.encode()) for n in names], dtype=np.uint64)[index]
    x = (lines.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (file_hash << np.uint64(17)) ^ np.uint64(seed)
    x ^= x >> np.uint64(33)  # splitmix64 finalizer
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    return (x % np.uint64(1_000_000)).astype(np.float64) / 1e6 < fraction


def collate(batch: dict[str, np.ndarray], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Numpy batch -> model tensors. Text is padded to the longest row of this batch, not max_length."""
    out = {"labels": torch.tensor(np.asarray(batch["label"]), dtype=torch.int64)}  # copy: Ray's arrays are read-only
    if "input_ids" in batch:
        seqs = batch["input_ids"]
        longest = max((len(s) for s in seqs), default=1)
        ids = np.full((len(seqs), longest), pad_id, dtype=np.int64)  # [B, T_longest]
        mask = np.zeros((len(seqs), longest), dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        out["input_ids"], out["attention_mask"] = torch.from_numpy(ids), torch.from_numpy(mask)
    else:
        out["features"] = torch.tensor(np.asarray(batch["features"]), dtype=torch.float32)
    return out


def length_grouped(windows: Iterable[dict[str, np.ndarray]], batch_size: int, pad_id: int = 0,
                   seed: Sequence[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of rows of similar token length (data.group_by_length): each window of rows (several
    batches' worth, already shuffled) is sorted by length, cut into batches, and the batches are put
    in an order drawn from `seed` (window by window), so each batch pads little and no run of batches
    is all short or all long. A pure function of the windows and the seed: the same epoch gives the
    same batches again, which is what resuming from an epoch's start relies on. seed None keeps the
    sorted order (validation, where order does not matter)."""
    for w, window in enumerate(windows):
        order = np.argsort(np.fromiter((len(s) for s in window["input_ids"]), dtype=np.int64), kind="stable")
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if seed is not None:
            rng = np.random.default_rng([*seed, w])
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        for rows in chunks:
            yield collate({k: np.asarray(v)[rows] for k, v in window.items()}, pad_id)
