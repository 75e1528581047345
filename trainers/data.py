"""Parse, check and encode training rows; no Ray here, so all of it runs and tests in one process.

Every parsed row carries its provenance: `_file` (path), `_line` (1-based physical line, or row
number for Parquet and built-ins) and `_error` (null, or what is wrong with the row). Errors name
file, line and column so a user can open the file at the fault. `ray_data.py` wires these functions
into a streaming Ray Data pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

PROVENANCE = ("_file", "_line", "_error")
_MAX_COLUMNS = 4096  # CSV columns forced to string; wider files are not a classification input
_BATCH_ROWS = 8192


class DataError(ValueError):
    """Bad input data; the message names file, line and column."""


def where(file: str, line: int, column: str | None = None) -> str:
    return f"{file}, line {line}" + (f", column '{column}'" if column else "")


def _with_provenance(table: pa.Table, path: str, lines: np.ndarray, errors: list | None = None) -> pa.Table:
    n = table.num_rows
    table = table.append_column("_file", pa.array([path] * n, pa.string()))
    table = table.append_column("_line", pa.array(lines, pa.int64()))
    return table.append_column("_error", pa.array(errors if errors is not None else [None] * n, pa.string()))


def _bad_rows(names: list[str], path: str, bad: list[tuple[int, str]]) -> pa.Table:
    empty = {name: pa.nulls(len(bad), pa.string()) for name in names}
    return _with_provenance(pa.table(empty), path, np.array([b[0] for b in bad]), [b[1] for b in bad])


def _open_csv(f, delimiter: str, on_invalid):
    return pacsv.open_csv(
        f,
        read_options=pacsv.ReadOptions(autogenerate_column_names=True, use_threads=False, block_size=1 << 22),
        parse_options=pacsv.ParseOptions(
            delimiter=delimiter, quote_char=False if delimiter == "\t" else '"',
            ignore_empty_lines=False, invalid_row_handler=on_invalid,
        ),
        # Every column as string, so one odd value is a bad row, not a failed type inference.
        convert_options=pacsv.ConvertOptions(
            column_types={f"f{i}": pa.string() for i in range(_MAX_COLUMNS)}, strings_can_be_null=False,
        ),
    )


def parse_delimited(f, path: str, delimiter: str, header: bool, columns: list[str] | None) -> Iterator[pa.Table]:
    """Stream a CSV/TSV file as all-string tables. TSV is read with quoting off, as GLUE files need."""
    bad: list[tuple[int, str]] = []
    skipped_lines: list[int] = []

    def on_invalid(row) -> str:
        bad.append((row.number, f"expected {row.expected_columns} columns, got {row.actual_columns}"))
        skipped_lines.append(row.number)
        return "skip"

    try:
        reader = _open_csv(f, delimiter, on_invalid)
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):
            return  # no rows; the caller reports the empty source
        raise DataError(f"{path}: cannot parse as {'TSV' if delimiter == chr(9) else 'CSV'}: {e}") from None
    names, next_line, newlines_before = list(columns or []), 1, 0
    for batch in reader:
        table = pa.Table.from_batches([batch])
        if header and not names:
            names = [str(v) for v in table.slice(0, 1).to_pylist()[0].values()]
            table, next_line = table.slice(1), 2
        if len(names) != table.num_columns:
            raise DataError(f"{path}: {table.num_columns} columns in the file but {len(names)} names: {names}")
        table = table.rename_columns(names)
        # pyarrow numbers records; skipped (invalid) records leave gaps in that numbering.
        gaps = sorted(n for n in skipped_lines if n >= next_line)
        span = np.arange(next_line, next_line + table.num_rows + len(gaps))
        records = span[~np.isin(span, gaps)][: table.num_rows]
        next_line = int(records[-1]) + 1 if len(records) else next_line
        skipped_lines[:] = [n for n in skipped_lines if n >= next_line]
        # Quoted CSV values may hold newlines: shift later rows to their physical line.
        inner = np.zeros(table.num_rows, dtype=np.int64)
        for col in table.columns:
            inner += pc.fill_null(pc.count_substring(col, "\n"), 0).to_numpy(zero_copy_only=False)
        before = newlines_before + np.concatenate([[0], np.cumsum(inner)[:-1]]).astype(np.int64)
        lines = records + before
        for i, (record, problem) in enumerate(bad):
            bad[i] = (record + newlines_before + int(inner[records < record].sum()), problem)
        newlines_before += int(inner.sum())
        # A blank line arrives as a row of empty strings; it is not a row.
        blank = np.ones(table.num_rows, dtype=bool)
        for col in table.columns:
            blank &= pc.equal(col, "").to_numpy(zero_copy_only=False)
        if blank.any():
            table, lines = table.filter(pa.array(~blank)), lines[~blank]
        yield _with_provenance(table, path, lines)
        if bad:
            yield _bad_rows(names, path, bad)
            bad.clear()
    if bad:
        yield _bad_rows(names, path, bad)


def parse_jsonl(f, path: str) -> Iterator[pa.Table]:
    """Stream JSON Lines; an unparseable line becomes a bad row instead of failing the file."""
    rows, lines, errors, names = [], [], [], {}
    for number, raw in enumerate(f, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            error = None
        except ValueError as e:
            obj, error = {}, f"invalid JSON: {e}"
        names.update(dict.fromkeys(obj))
        rows.append({k: None if v is None else (v if isinstance(v, str) else json.dumps(v)) for k, v in obj.items()})
        lines.append(number)
        errors.append(error)
        if len(rows) == _BATCH_ROWS:
            yield _jsonl_table(rows, list(names), path, lines, errors)
            rows, lines, errors = [], [], []
    if rows:
        yield _jsonl_table(rows, list(names), path, lines, errors)


def _jsonl_table(rows, names, path, lines, errors) -> pa.Table:
    cols = {n: pa.array([r.get(n) for r in rows], pa.string()) for n in names}
    return _with_provenance(pa.table(cols), path, np.array(lines), errors)


def parse_parquet(f, path: str) -> Iterator[pa.Table]:
    if not f.seekable():  # Ray Data hands a sequential stream; Parquet's footer needs random access
        f = pa.BufferReader(f.read())
    offset = 1
    for batch in pq.ParquetFile(f).iter_batches(batch_size=_BATCH_ROWS):
        table = pa.Table.from_batches([batch])
        yield _with_provenance(table, path, np.arange(offset, offset + table.num_rows))
        offset += table.num_rows


def parse_stream(f, path: str, fmt: str, header: bool = True, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Dispatch on format; `f` is a binary file object (a pyarrow NativeFile in Ray Data)."""
    if fmt in ("csv", "tsv"):
        yield from parse_delimited(f, path, "\t" if fmt == "tsv" else ",", header, columns)
    elif fmt == "jsonl":
        import io
        yield from parse_jsonl(io.TextIOWrapper(f, encoding="utf-8", errors="replace"), path)
    elif fmt == "parquet":
        yield from parse_parquet(f, path)
    else:
        raise DataError(f"{path}: unsupported format {fmt!r}")


def load_builtin(name: str) -> pa.Table:
    """The scikit-learn data sets that ship with the package: features as float, label 'target'."""
    from sklearn import datasets

    loader = {"sklearn:digits": datasets.load_digits, "sklearn:breast_cancer": datasets.load_breast_cancer}[name]
    bunch = loader()
    names = [str(n) for n in bunch.feature_names]
    cols = {n: pa.array(bunch.data[:, i].astype(np.float32)) for i, n in enumerate(names)}
    cols["target"] = pa.array([str(int(t)) for t in bunch.target])
    return _with_provenance(pa.table(cols), name, np.arange(1, len(bunch.target) + 1))


@dataclass(frozen=True)
class FieldSpec:
    """Which columns feed the model; built from the data config at the edge."""

    label_column: str
    text_column: str | None = None
    feature_columns: tuple[str, ...] | None = None
    on_bad_row: str = "error"

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
        errors = enc["_error"]
        ok = np.array([e is None for e in errors], dtype=bool)
        self.rows += len(errors)
        self.bad_rows += int((~ok).sum())
        if self.first_error is None and not ok.all():
            self.first_error = errors[int(np.argmin(ok))]
        labels, counts = np.unique(enc["_label_raw"][ok].astype(str), return_counts=True)
        for label, count in zip(labels.tolist(), counts.tolist()):
            self.label_counts[label] = self.label_counts.get(label, 0) + count
        if "features" in enc:
            feats = enc["features"][ok].astype(np.float64)
            s, ss = feats.sum(0), (feats**2).sum(0)
            self.feature_sum = s if self.feature_sum is None else self.feature_sum + s
            self.feature_sumsq = ss if self.feature_sumsq is None else self.feature_sumsq + ss

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
        n = max(self.rows - self.bad_rows, 1)
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
    out: dict[str, np.ndarray] = {"label": labels, "_label_raw": np.array([_normalize_label(r) for r in raw_labels], dtype=object)}

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

    file_hash = np.array([zlib.crc32(str(f).encode()) for f in files], dtype=np.uint64)
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
