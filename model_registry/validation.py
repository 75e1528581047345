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

from rayfoundry import storage
from rayfoundry.errors import DataError
from trainers.config import TrainJob
from trainers.data import FieldSpec, collate, encode_batch, split_mask
from trainers.sources import load_builtin, parse_stream


@dataclass
class ValidationSet:
    """Encoded validation rows: `label` [N] and either `input_ids` (N token arrays) or `features` [N, F]."""

    label: np.ndarray
    input_ids: np.ndarray | None
    features: np.ndarray | None
    source: str
    fingerprint: str
    texts: list[str] | None = None  # text models: the raw texts, for sample requests

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


def read_rows(path: str, job: TrainJob) -> pa.Table:
    """Raw rows of one source with provenance, limited to data.max_rows like the Ray pipeline."""
    cfg = job.data
    if path.startswith("sklearn:"):
        table = load_builtin(path)
    else:
        tables = []
        try:
            files = storage.list_files(path)
        except FileNotFoundError as e:
            raise DataError(str(e)) from None
        for fs, file in files:
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
    texts = None
    if spec.text_column:
        texts = list(np.asarray(raw.column(spec.text_column).to_pylist(), dtype=object)[keep])
        for text in texts:
            h.update(text.encode() + b"\0")
        input_ids, features = (enc["input_ids"][keep] if tokenizer is not None else None), None
    else:
        input_ids, features = None, enc["features"][keep]
        h.update(features.tobytes())
    split = "" if cfg.validation_path else f" (validation_fraction {cfg.validation_fraction}, seed {job.run.seed})"
    return ValidationSet(label, input_ids, features, f"{path}{split}", h.hexdigest(), texts)


def sample_instances(validation: ValidationSet, n: int = 2) -> list:
    """The first `n` validation instances as a request carries them: texts, or rows of numbers (whole
    numbers as ints, so sample requests stay short)."""
    if validation.texts is not None:
        return [t for t in validation.texts if t.strip()][:n]
    rows = validation.features[:n].tolist()
    return [[int(x) if float(x).is_integer() else x for x in row] for row in rows]
