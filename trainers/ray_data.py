"""Ray Data pipelines for a TrainJob: read with provenance, check every row once, then stream
encoded (tokenized) train and validation rows to the Train workers.

The pre-flight scan runs before any worker starts: it finds the label set, the feature moments,
the row counts of each split and every bad row, so a bad file fails in seconds with the file, line
and column named, instead of after the cluster has been allocated.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.datasource import FileBasedDatasource

from rayfoundry import storage
from rayfoundry.errors import DataError
from rayfoundry.ray_env import find_cause
from trainers.config import DataSection, TrainJob
from trainers.data import FieldSpec, SourceStats, collate, encode_batch, split_mask
from trainers.sources import load_builtin, parse_stream


class ProvenanceFileSource(FileBasedDatasource):
    """CSV/TSV/JSONL/Parquet files (local or any pyarrow filesystem), rows tagged with file and line."""

    def __init__(self, paths, fmt: str, header: bool, columns: list[str] | None, **kwargs):
        super().__init__(paths, **kwargs)
        self._fmt, self._header, self._columns = fmt, header, columns

    def _read_stream(self, f, path: str):
        yield from parse_stream(f, path, self._fmt, self._header, self._columns)


def check_local_paths(cfg: DataSection) -> None:
    """Fail before Ray starts when a local data path does not exist (URIs are checked by the read)."""
    for field in ("train_path", "validation_path"):
        path = getattr(cfg, field)
        if path and not storage.is_uri(path) and not path.startswith("sklearn:") and not Path(path).exists():
            raise DataError(f"data.{field}: no such file or directory: '{path}'")


def read_source(path: str, cfg: DataSection, field: str) -> ray.data.Dataset:
    """Raw rows (strings for text formats) plus `_file`, `_line`, `_error`."""
    if path.startswith("sklearn:"):
        ds = ray.data.from_arrow(load_builtin(path))
    else:
        source = ProvenanceFileSource(
            storage.resolve(path), cfg.resolved_format(path), cfg.header, cfg.columns,
        )
        ds = ray.data.read_datasource(source)
    return ds.limit(cfg.max_rows) if cfg.max_rows else ds


class PadCollate(NumpyBatchCollateFn):
    """`data.collate` as the collate_fn of iter_torch_batches (pads text to the batch's longest row)."""

    def __init__(self, pad_id: int = 0):
        self.pad_id = pad_id

    def __call__(self, batch):
        return collate(batch, self.pad_id)


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _scan(batch: pa.Table, spec: FieldSpec, label_ids, seed: int, fraction: float | None) -> dict:
    enc = encode_batch(batch, spec, label_ids)
    stats = {"all": SourceStats(), "val": SourceStats()}
    stats["all"].add(enc)
    if fraction is not None:
        val = split_mask(enc["_file"], enc["_line"], seed, fraction)
        stats["val"].add({k: v[val] for k, v in enc.items()})
    return {"stats": [json.dumps({k: s.to_dict() for k, s in stats.items()})]}


def scan_source(ds: ray.data.Dataset, spec: FieldSpec, label_ids, seed: int, fraction: float | None):
    """One distributed pass over a source; returns (all rows, validation-split rows) statistics."""
    parts = ds.map_batches(_scan, fn_args=(spec, label_ids, seed, fraction), batch_format="pyarrow", batch_size=4096)
    total, val = SourceStats(), SourceStats()
    try:
        for row in parts.iter_rows():
            d = json.loads(row["stats"])
            total.merge(SourceStats.from_dict(d["all"]))
            val.merge(SourceStats.from_dict(d["val"]))
    except Exception as e:  # a DataError raised in a read task arrives wrapped by Ray
        cause = find_cause(e, (DataError,))
        if cause is None:
            raise
        raise DataError(str(cause)) from None
    return total, val


def _encode(batch: pa.Table, spec: FieldSpec, label_ids, tokenizer_path, max_length, keep: str, seed, fraction):
    tok = _tokenizer(tokenizer_path) if tokenizer_path else None
    enc = encode_batch(batch, spec, label_ids, tok, max_length)
    ok = np.array([e is None for e in enc["_error"]], dtype=bool)  # bad rows were counted by the scan
    if fraction is not None:
        val = split_mask(enc["_file"], enc["_line"], seed, fraction)
        ok &= val if keep == "val" else ~val
    return {k: v[ok] for k, v in enc.items() if k in ("label", "input_ids", "features")}


@dataclass
class PreparedData:
    """Everything the driver learns about the data before training starts."""

    train: ray.data.Dataset
    val: ray.data.Dataset
    labels: list[str]
    train_rows: int
    val_rows: int
    skipped_rows: int
    num_features: int | None
    feature_columns: tuple[str, ...] | None
    feature_moments: tuple[list[float], list[float]] | None


def prepare_data(job: TrainJob, tokenizer_path: str | None) -> PreparedData:
    cfg, seed = job.data, job.run.seed
    train_raw = read_source(cfg.train_path, cfg, "train_path")
    spec = FieldSpec.from_config(cfg)
    spec = spec.resolve(train_raw.columns(), cfg.train_path)
    fraction = None if cfg.validation_path else cfg.validation_fraction

    label_ids = {label: i for i, label in enumerate(cfg.labels)} if cfg.labels else None
    total, val_part = scan_source(train_raw, spec, label_ids, seed, fraction)
    labels = list(cfg.labels) if cfg.labels else total.sorted_labels()
    label_ids = {label: i for i, label in enumerate(labels)}
    skipped = _check_bad_rows(total, cfg, cfg.train_path)
    if len(labels) < 2:
        raise DataError(f"{cfg.train_path}: column '{cfg.label_column}' has {len(labels)} distinct label(s); need 2+")

    if cfg.validation_path:
        val_raw = read_source(cfg.validation_path, cfg, "validation_path")
        spec.resolve(val_raw.columns(), cfg.validation_path)
        val_part, _ = scan_source(val_raw, spec, label_ids, seed, None)
        skipped += _check_bad_rows(val_part, cfg, cfg.validation_path)
        train_rows, val_rows = total.good_rows, val_part.good_rows
    else:
        val_raw = train_raw
        train_rows, val_rows = total.good_rows - val_part.good_rows, val_part.good_rows
    if train_rows == 0 or val_rows == 0:
        raise DataError(f"{cfg.train_path}: {train_rows} train and {val_rows} validation rows; both must be non-empty")

    def pipeline(raw, keep):
        return raw.map_batches(
            _encode, fn_args=(spec, label_ids, tokenizer_path, cfg.max_length, keep, seed, fraction),
            batch_format="pyarrow", batch_size=1024,
        )

    num_features = len(spec.feature_columns) if spec.feature_columns is not None else None
    return PreparedData(
        train=pipeline(train_raw, "train"), val=pipeline(val_raw, "val"), labels=labels,
        train_rows=train_rows, val_rows=val_rows, skipped_rows=skipped, num_features=num_features,
        feature_columns=spec.feature_columns,
        feature_moments=total.feature_moments() if num_features else None,
    )


def _check_bad_rows(stats: SourceStats, cfg: DataSection, source: str) -> int:
    if stats.bad_rows and cfg.on_bad_row == "error":
        more = f" ({stats.bad_rows - 1} more bad rows)" if stats.bad_rows > 1 else ""
        raise DataError(f"{stats.first_error}{more}; fix the data or set data.on_bad_row=skip")
    if stats.rows == 0:
        raise DataError(f"{source}: no rows (empty file?)")
    return stats.bad_rows


def quiet_ray_data() -> None:
    """This driver's Ray Data context: deterministic order, no per-dataset banners. Non-interactive runs
    log progress at INFO, which ray_data_logging.yaml keeps off the console, so the per-epoch lines
    stay readable."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic limit/split/shuffle for a given seed
    ctx.print_on_execution_start = False
    ctx.use_ray_tqdm = False  # in Train workers, log progress (filtered) instead of drawing tqdm bars
