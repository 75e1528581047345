"""A run's validation set, read in one process without Ray: the rows training scored, in order.

Export and the registry's promotion gate score models on exactly the rows a TrainJob validated on:
`data.validation_path` when set, else the `validation_fraction` of train rows that `split_mask`
holds out for `run.seed`, after the same `max_rows` limit. Bad rows are skipped or fail as in
training. `fingerprint` identifies the rows (labels and raw inputs), so two packages' numbers compare only when
they were measured on the same data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from trainers.config import TrainJob
from trainers.data import DataError, FieldSpec, collate, encode_batch, split_mask
from trainers.sources import load_builtin, parse_stream


@dataclass
class ValidationSet:
    """Encoded validation rows: `label` [N] and either `input_ids` (N token arrays) or `features` [N, F]."""

    label: np.ndarray
    input_ids: np.ndarray | None
    features: np.ndarray | None
    source: str
    fingerprint: str

    def __len__(self) -> int:
        return len(self.label)

    def batches(self, batch_size: int, pad_id: int = 0, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Model inputs as numpy (text padded to each batch's longest row) plus `labels`."""
        n = len(self) if limit is None else min(limit, len(self))
        for start in range(0, n, batch_size):
            end = min(start + batch_size, n)
            part = {"label": self.label[start:end]}
            if self.input_ids is not None:
                part["input_ids"] = self.input_ids[start:end]
            else:
                part["features"] = self.features[start:end]
            yield {k: v.numpy() for k, v in collate(part, pad_id).items()}


def _files(path: str) -> list[tuple[object, str]]:
    """(filesystem, path) of each data file under `path` (a file, a directory or a URI), sorted."""
    import os

    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(path if "://" in path else os.path.abspath(path))
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{path}: no such file or directory")
    if info.type == pafs.FileType.File:
        return [(fs, root)]
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return [(fs, f.path) for f in sorted(found, key=lambda f: f.path)
            if f.type == pafs.FileType.File and not f.base_name.startswith((".", "_"))]


def read_rows(path: str, job: TrainJob) -> pa.Table:
    """Raw rows of one source with provenance, limited to data.max_rows like the Ray pipeline."""
    cfg = job.data
    if path.startswith("sklearn:"):
        table = load_builtin(path)
    else:
        tables = []
        for fs, file in _files(path):
            with fs.open_input_file(file) as f:
                tables += list(parse_stream(f, file, cfg.resolved_format(file), cfg.header, cfg.columns))
        if not tables:
            raise DataError(f"{path}: no rows (empty file?)")
        table = pa.concat_tables(tables, promote_options="permissive")
    return table.slice(0, cfg.max_rows) if cfg.max_rows else table


def load_validation(job: TrainJob, labels: list[str], tokenizer=None) -> ValidationSet:
    cfg = job.data
    path = cfg.validation_path or cfg.train_path
    raw = read_rows(path, job)
    spec = FieldSpec.from_config(cfg)
    spec = spec.resolve(raw.column_names, path)
    enc = encode_batch(raw, spec, {label: i for i, label in enumerate(labels)}, tokenizer, cfg.max_length)
    keep = np.array([e is None for e in enc["_error"]], dtype=bool)
    if cfg.on_bad_row == "error" and not keep.all():
        raise DataError(f"{enc['_error'][~keep][0]}; fix the data or set data.on_bad_row=skip")
    if not cfg.validation_path:
        keep &= split_mask(enc["_file"], enc["_line"], job.run.seed, cfg.validation_fraction)
    if not keep.any():
        raise DataError(f"{path}: no validation rows")
    label = enc["label"][keep]
    # The fingerprint covers labels and raw inputs (not token ids): packages with other tokenizers
    # scored on the same rows share it.
    h = hashlib.sha256(label.tobytes())
    if spec.text_column:
        for text in np.asarray(raw.column(spec.text_column).to_pylist(), dtype=object)[keep]:
            h.update(text.encode() + b"\0")
        input_ids, features = (enc["input_ids"][keep] if tokenizer is not None else None), None
    else:
        input_ids, features = None, enc["features"][keep]
        h.update(features.tobytes())
    split = "" if cfg.validation_path else f" (validation_fraction {cfg.validation_fraction}, seed {job.run.seed})"
    return ValidationSet(label, input_ids, features, f"{path}{split}", h.hexdigest())
