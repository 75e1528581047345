"""Read data sources into pyarrow tables of string columns tagged with provenance; no Ray here.

Every row carries `_file` (path), `_line` (1-based physical line, or row number for Parquet and
built-ins) and `_error` (null, or what is wrong with the row, e.g. a wrong column count). Parsing
never fails a whole file for one bad row: the row flows on with `_error` set and `data.py` decides.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from trainers.data import DataError

_MAX_COLUMNS = 4096  # CSV columns forced to string; wider files are not a classification input
_BATCH_ROWS = 8192


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
