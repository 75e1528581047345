"""Parsing, checking and encoding rows without Ray: provenance, error messages, split and padding.

Run: .venv/bin/python -m pytest tests/unit/test_data.py -q
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest
import torch

from trainers.data import DataError, FieldSpec, SourceStats, collate, encode_batch, split_mask
from trainers.sources import load_builtin, parse_stream

LABELS_01 = {"0": 0, "1": 1}


def parse_tables(data: bytes, fmt: str, path: str | None = None, **kw) -> list[pa.Table]:
    """parse_stream over in-memory bytes, fed the way Ray Data feeds it (a NativeFile; bytes for jsonl)."""
    src = io.BytesIO(data) if fmt == "jsonl" else pa.input_stream(pa.py_buffer(data))
    return list(parse_stream(src, path or f"data/train.{fmt}", fmt, **kw))


def parse_table(data: bytes, fmt: str, path: str | None = None, **kw) -> pa.Table:
    """All parsed rows, good and bad, in file order."""
    table = pa.concat_tables(parse_tables(data, fmt, path, **kw), promote_options="default")
    return table.sort_by("_line")


def parse_rows(data: bytes, fmt: str, path: str | None = None, **kw) -> list[dict]:
    return parse_table(data, fmt, path, **kw).to_pylist()


# --- parse_stream: CSV / TSV -------------------------------------------------------------------


def test_tsv_with_header_keeps_quotes_and_backslashes_verbatim():
    # GLUE TSVs contain unbalanced quotes and backslashes; TSV quoting is off so they survive.
    data = b'sentence\tlabel\nit\'s "great" \\o/\t1\n"unbalanced quote\t0\nback\\\\slash, comma\t1\n'
    table = parse_table(data, "tsv")
    assert table.column_names == ["sentence", "label", "_file", "_line", "_error"]
    assert all(table.schema.field(c).type == pa.string() for c in ("sentence", "label", "_file", "_error"))
    assert table.to_pylist() == [
        {"sentence": 'it\'s "great" \\o/', "label": "1", "_file": "data/train.tsv", "_line": 2, "_error": None},
        {"sentence": '"unbalanced quote', "label": "0", "_file": "data/train.tsv", "_line": 3, "_error": None},
        {"sentence": "back\\\\slash, comma", "label": "1", "_file": "data/train.tsv", "_line": 4, "_error": None},
    ]


def test_numbers_stay_strings_so_one_odd_value_is_not_a_type_error():
    rows = parse_rows(b"x,label\n007,1\n1e3,0\n", "csv")
    assert [(r["x"], r["label"]) for r in rows] == [("007", "1"), ("1e3", "0")]


def test_tsv_without_header_uses_the_given_column_names_from_line_1():
    rows = parse_rows(b"hello there\t1\nworld\t0\n", "tsv", header=False, columns=["sentence", "label"])
    assert [(r["sentence"], r["label"], r["_line"]) for r in rows] == [("hello there", "1", 1), ("world", "0", 2)]


def test_column_names_that_do_not_match_the_file_width_are_a_data_error():
    with pytest.raises(DataError) as e:
        parse_tables(b"a\tb\t1\n", "tsv", header=False, columns=["sentence", "label"])
    assert str(e.value) == "data/train.tsv: 3 columns in the file but 2 names: ['sentence', 'label']"


def test_wrong_column_count_is_a_bad_row_at_its_line_and_later_rows_keep_their_lines():
    data = (b"text\tlabel\n"      # 1
            b"a\t0\n"             # 2
            b"b\textra\t1\n"      # 3: one column too many
            b"c\t1\n"             # 4
            b"d\n"                # 5: one column too few
            b"e\t0\n")            # 6
    rows = parse_rows(data, "tsv")
    assert [(r["text"], r["_line"], r["_error"]) for r in rows] == [
        ("a", 2, None),
        (None, 3, "expected 2 columns, got 3"),
        ("c", 4, None),
        (None, 5, "expected 2 columns, got 1"),
        ("e", 6, None),
    ]
    bad = [r for r in rows if r["_error"]]
    assert all(r["label"] is None and r["_file"] == "data/train.tsv" for r in bad)


def test_good_rows_after_a_blank_line_keep_their_physical_line_numbers():
    data = b"text\tlabel\na\t0\n\nb\t1\nc\tx\t1\nd\t0\n"
    rows = parse_rows(data, "tsv")
    good = {r["text"]: r["_line"] for r in rows if r["_error"] is None and r["text"]}
    assert good == {"a": 2, "b": 4, "d": 6}
    assert [(r["_line"], r["_error"]) for r in rows if r["_error"]] == [(5, "expected 2 columns, got 3")]


def test_blank_lines_are_not_rows():
    rows = parse_rows(b"text\tlabel\na\t0\n\nb\t1\n\n", "tsv")
    assert [(r["text"], r["label"], r["_line"]) for r in rows] == [("a", "0", 2), ("b", "1", 4)]


def test_line_numbers_stay_exact_across_reader_blocks():
    # > 4 MiB, so the reader yields several batches; bad rows and blank lines fall in every block.
    lines, n = [b"text\tlabel"], 70_000
    for i in range(2, n + 1):
        if i % 9973 == 0:
            lines.append(b"bad\trow\textra")
        elif i % 7919 == 0:
            lines.append(b"")
        else:
            lines.append(b"line%d %s\t%d" % (i, b"x" * 60, i % 2))
    tables = parse_tables(b"\n".join(lines) + b"\n", "tsv")
    blank = sum(1 for i in range(2, n + 1) if i % 9973 and i % 7919 == 0)
    assert sum(t.num_rows for t in tables) == n - 1 - blank  # blank lines are not rows
    assert len([t for t in tables if t.num_rows > 0]) >= 3

    rows = pa.concat_tables(tables).to_pylist()
    good = [r for r in rows if r["_error"] is None and r["text"]]
    bad = [r["_line"] for r in rows if r["_error"]]
    mislabelled = [(r["text"].split()[0], r["_line"]) for r in good if r["text"].split()[0] != f"line{r['_line']}"]
    assert mislabelled == []
    assert len(good) == sum(1 for i in range(2, n + 1) if i % 9973 and i % 7919)
    assert bad == [i for i in range(2, n + 1) if i % 9973 == 0]


def test_csv_quoted_fields_keep_commas_and_doubled_quotes():
    rows = parse_rows(b'text,label\n"a, b, c",1\n"say ""hi""",0\nplain,1\n', "csv")
    assert [(r["text"], r["label"], r["_line"]) for r in rows] == [("a, b, c", "1", 2), ('say "hi"', "0", 3),
                                                                   ("plain", "1", 4)]


def test_csv_rows_after_a_multiline_quoted_value_report_their_physical_line():
    rows = parse_rows(b'text,label\n"two\nlines",1\nnext,0\n', "csv")
    assert [(r["text"], r["_line"]) for r in rows] == [("two\nlines", 2), ("next", 4)]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_an_empty_file_yields_no_rows(fmt):
    assert sum(t.num_rows for t in parse_tables(b"", fmt)) == 0


def test_a_header_only_file_yields_no_rows_but_knows_its_columns():
    tables = parse_tables(b"text\tlabel\n", "tsv")
    assert sum(t.num_rows for t in tables) == 0
    assert tables[0].column_names == ["text", "label", "_file", "_line", "_error"]


def test_unknown_format_is_a_data_error_naming_the_file():
    with pytest.raises(DataError, match=r"^data/x\.xml: unsupported format 'xml'$"):
        parse_tables(b"<a/>", "xml", path="data/x.xml")


# --- parse_stream: JSONL and Parquet --------------------------------------------------------------


def test_jsonl_invalid_line_becomes_a_bad_row_at_its_line():
    data = (b'{"text": "a", "label": 1}\n'        # 1
            b'{not json\n'                        # 2
            b'\n'                                 # 3: blank, skipped but counted
            b'{"text": "b", "label": "0"}\n'      # 4
            b'[1, 2]\n'                           # 5
            b'{"text": null, "label": 1.5, "extra": {"k": [1]}}\n')  # 6
    rows = parse_rows(data, "jsonl")
    assert [r["_line"] for r in rows] == [1, 2, 4, 5, 6]
    assert rows[1]["_error"].startswith("invalid JSON: Expecting property name")
    assert rows[1]["text"] is None and rows[1]["label"] is None
    assert rows[3]["_error"] == "invalid JSON: expected a JSON object, got list"
    # Every value is a string (or null), like CSV; nested values stay JSON.
    assert [(r["text"], r["label"], r["extra"]) for r in rows if r["_error"] is None] == [
        ("a", "1", None), ("b", "0", None), (None, "1.5", '{"k": [1]}')]


def test_parquet_rows_are_numbered_from_1_across_batches():
    n = 20_000
    buf = io.BytesIO()
    pq.write_table(pa.table({"x": np.arange(n), "label": [str(i % 3) for i in range(n)]}), buf, row_group_size=5000)
    tables = parse_tables(buf.getvalue(), "parquet", path="data/train.parquet")
    assert len(tables) > 1
    table = pa.concat_tables(tables)
    assert table.num_rows == n
    np.testing.assert_array_equal(table.column("_line").to_numpy(), table.column("x").to_numpy() + 1)
    assert table.column("_line").to_pylist()[:3] == [1, 2, 3]
    assert set(table.column("_file").to_pylist()) == {"data/train.parquet"}
    assert table.column("_error").null_count == n


def test_parquet_reads_from_the_sequential_stream_ray_data_passes(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"x": [1.0, 2.0], "label": ["0", "1"]}), path)
    with pyarrow.fs.LocalFileSystem().open_input_stream(str(path)) as f:  # what FileBasedDatasource hands _read_stream
        table = pa.concat_tables(list(parse_stream(f, str(path), "parquet")))
    assert table.column("_line").to_pylist() == [1, 2]


# --- encode_batch ---------------------------------------------------------------------------------


def test_unknown_label_names_file_line_column_and_label():
    table = parse_table(b"text\tlabel\na\t0\nb\tFoo\nc\t1\n", "tsv")
    enc = encode_batch(table, FieldSpec("label", text_column="text"), LABELS_01)
    assert enc["_error"].tolist() == [
        None, "data/train.tsv, line 3, column 'label': unknown label 'Foo' (known: 0, 1)", None]
    assert enc["label"].tolist() == [0, -1, 1]
    assert enc["_line"].tolist() == [2, 3, 4]


def test_empty_label_is_a_bad_row():
    enc = encode_batch(parse_table(b"text\tlabel\na\t\nb\t1\n", "tsv"), FieldSpec("label", text_column="text"),
                       LABELS_01)
    assert enc["_error"].tolist() == ["data/train.tsv, line 2, column 'label': empty label", None]
    assert enc["label"].tolist() == [-1, 1]


def test_non_numeric_feature_names_the_column_and_value():
    table = parse_table(b"x1,x2,label\n1.5,2,0\n3,abc,1\n4,5,1\n", "csv")
    enc = encode_batch(table, FieldSpec("label", feature_columns=("x1", "x2")), LABELS_01)
    assert enc["_error"].tolist() == [None, "data/train.csv, line 3, column 'x2': not a number: 'abc'", None]
    assert enc["label"].tolist() == [0, -1, 1]  # a good label on a bad row is still -1
    assert enc["features"].dtype == np.float32
    np.testing.assert_array_equal(enc["features"], [[1.5, 2.0], [3.0, 0.0], [4.0, 5.0]])


def test_non_finite_feature_is_a_bad_row():
    table = parse_table(b"x1,x2,label\n1,nan,0\n2,3,1\n", "csv")
    enc = encode_batch(table, FieldSpec("label", feature_columns=("x1", "x2")), LABELS_01)
    assert enc["_error"].tolist() == ["data/train.csv, line 2: non-finite feature value", None]
    assert enc["label"].tolist() == [-1, 1]
    assert np.isfinite(enc["features"]).all()


def test_empty_or_missing_text_names_the_text_column():
    data = b'{"sentence": "fine", "label": 1}\n{"label": 0}\n{"sentence": "  ", "label": 1}\n'
    enc = encode_batch(parse_table(data, "jsonl"), FieldSpec("label", text_column="sentence"), LABELS_01)
    assert enc["_error"].tolist() == [
        None,
        "data/train.jsonl, line 2, column 'sentence': empty text",
        "data/train.jsonl, line 3, column 'sentence': empty text",
    ]
    assert enc["label"].tolist() == [1, -1, -1]


def test_parse_errors_get_file_and_line_prepended():
    data = b'{"sentence": "a", "label": 0}\n{oops\n'
    enc = encode_batch(parse_table(data, "jsonl"), FieldSpec("label", text_column="sentence"), LABELS_01)
    assert enc["_error"][0] is None
    assert enc["_error"][1].startswith("data/train.jsonl, line 2: invalid JSON: ")
    assert enc["label"].tolist() == [0, -1]


def test_labels_1_and_1_point_0_are_the_same_class():
    table = parse_table(b"x,label\n1,1\n2,1.0\n3, 1 \n4,0.0\n5,0\n", "csv")
    enc = encode_batch(table, FieldSpec("label", feature_columns=("x",)), LABELS_01)
    assert enc["_error"].tolist() == [None] * 5
    assert enc["label"].tolist() == [1, 1, 1, 0, 0]
    assert enc["_label_raw"].tolist() == ["1", "1", "1", "0", "0"]
    stats = SourceStats()
    stats.add(enc)
    assert stats.label_counts == {"0": 2, "1": 3}


@pytest.fixture(scope="module")
def tok():
    """The MiniLM tokenizer shipped with rayfoundry (loading transformers costs ~2 s once)."""
    from trainers.config import TextModel
    from trainers.models import load_tokenizer

    return load_tokenizer(TextModel(type="text"))


def test_text_is_tokenized_and_truncated_to_max_length(tok):
    table = parse_table(b"text\tlabel\nhi\t0\n" + b"word " * 100 + b"\t1\n", "tsv")
    enc = encode_batch(table, FieldSpec("label", text_column="text"), LABELS_01, tok, max_length=16)
    short, long = enc["input_ids"]
    assert short.dtype == np.int64 and long.dtype == np.int64
    assert [short[0], short[-1]] == [tok.cls_token_id, tok.sep_token_id] and len(short) == 3
    assert len(long) == 16 and long[-1] == tok.sep_token_id


# --- split_mask -----------------------------------------------------------------------------------

N_SPLIT = 10_000
FILES = np.array(["data/train.tsv"] * N_SPLIT, dtype=object)
LINES = np.arange(2, N_SPLIT + 2, dtype=np.int64)


def test_split_is_deterministic_and_independent_of_batch_layout():
    whole = split_mask(FILES, LINES, 0, 0.1)
    np.testing.assert_array_equal(whole, split_mask(FILES.copy(), LINES.copy(), 0, 0.1))
    pieces = [split_mask(FILES[a:b], LINES[a:b], 0, 0.1) for a, b in ((0, 3), (3, 4100), (4100, N_SPLIT))]
    np.testing.assert_array_equal(whole, np.concatenate(pieces))


@pytest.mark.parametrize("seed", [0, 7, 123_456])
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5])
def test_split_holds_out_about_the_requested_fraction(seed, fraction):
    share = split_mask(FILES, LINES, seed, fraction).mean()
    assert abs(share - fraction) <= 0.02, share


def test_split_changes_with_the_seed_and_the_file():
    base = split_mask(FILES, LINES, 0, 0.1)
    other_seed = split_mask(FILES, LINES, 1, 0.1)
    other_file = split_mask(np.array(["data/other.tsv"] * N_SPLIT, dtype=object), LINES, 0, 0.1)
    # Independent 10% draws disagree on ~18% of rows and share ~1%.
    for mask in (other_seed, other_file):
        assert (mask != base).mean() > 0.12
        assert (mask & base).mean() < 0.03


# --- collate --------------------------------------------------------------------------------------


def _ragged(seqs: list[list[int]]) -> np.ndarray:
    return np.array([np.asarray(s, dtype=np.int64) for s in seqs] + [None], dtype=object)[:-1]


def test_collate_pads_text_to_the_longest_row_of_the_batch():
    batch = {"label": np.array([1, 0, 1]), "input_ids": _ragged([[101, 7, 102], [101, 7, 8, 9, 102], [101, 102]])}
    out = collate(batch, pad_id=0)
    assert out["input_ids"].shape == (3, 5)  # longest row, not max_length
    assert out["input_ids"].tolist() == [[101, 7, 102, 0, 0], [101, 7, 8, 9, 102], [101, 102, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert out["labels"].tolist() == [1, 0, 1]
    assert out["input_ids"].dtype == out["attention_mask"].dtype == out["labels"].dtype == torch.int64
    assert "features" not in out


def test_collate_uses_the_given_pad_id():
    out = collate({"label": np.array([0, 1]), "input_ids": _ragged([[5], [5, 6, 7]])}, pad_id=3)
    assert out["input_ids"].tolist() == [[5, 3, 3], [5, 6, 7]]
    assert out["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]


def test_collate_copies_read_only_feature_batches():
    labels, feats = np.array([0, 1]), np.arange(6, dtype=np.float32).reshape(2, 3)
    labels.setflags(write=False), feats.setflags(write=False)  # Ray hands out read-only arrays
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = collate({"label": labels, "features": feats})
    out["features"][0, 0] = 99.0
    assert feats[0, 0] == 0.0
    assert out["features"].shape == (2, 3) and out["labels"].tolist() == [0, 1]
    assert "input_ids" not in out


# --- SourceStats ----------------------------------------------------------------------------------

FEATURES_CSV = (b"x1,x2,label\n"
                b"1,10,0\n"
                b"2,10,1\n"
                b"oops,10,1\n"  # line 4: bad
                b"3,10,2\n"
                b"4,10,10\n"
                b"5,10,x\n")    # line 7: unknown label when label_ids is given


def _stats(table: pa.Table, label_ids=None) -> SourceStats:
    stats = SourceStats()
    stats.add(encode_batch(table, FieldSpec("label", feature_columns=("x1", "x2")), label_ids))
    return stats


def test_source_stats_counts_labels_rows_and_first_error():
    stats = _stats(parse_table(FEATURES_CSV, "csv"))
    assert (stats.rows, stats.bad_rows, stats.good_rows) == (6, 1, 5)
    assert stats.first_error == "data/train.csv, line 4, column 'x1': not a number: 'oops'"
    assert stats.label_counts == {"0": 1, "1": 1, "2": 1, "10": 1, "x": 1}
    mean, std = stats.feature_moments()
    good = np.array([1, 2, 3, 4, 5], dtype=np.float64)
    np.testing.assert_allclose(mean, [good.mean(), 10.0])
    np.testing.assert_allclose(std, [good.std(), 1.0])  # a constant column gets std 1, not 0


def test_source_stats_merge_of_parts_equals_one_pass_and_survives_json():
    table, label_ids = parse_table(FEATURES_CSV, "csv"), {"0": 0, "1": 1, "2": 2, "10": 3}
    whole = _stats(table, label_ids)
    assert (whole.rows, whole.bad_rows) == (6, 2)  # lines 4 and 7
    merged = SourceStats()
    for part in (table.slice(0, 2), table.slice(2, 3), table.slice(5)):
        merged.merge(SourceStats.from_dict(json.loads(json.dumps(_stats(part, label_ids).to_dict()))))
    assert merged.to_dict() == whole.to_dict()
    assert merged.first_error == "data/train.csv, line 4, column 'x1': not a number: 'oops'"  # earliest part wins

    back = SourceStats.from_dict(json.loads(json.dumps(whole.to_dict())))
    assert back.to_dict() == whole.to_dict()
    assert isinstance(back.feature_sum, np.ndarray) and back.feature_sum.dtype == np.float64
    assert back.feature_moments() == whole.feature_moments()


def test_source_stats_without_features_round_trips():
    stats = SourceStats(label_counts={"pos": 2}, rows=3, bad_rows=1, first_error="f, line 2: bad")
    back = SourceStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert back == stats and back.feature_sum is None


@pytest.mark.parametrize(("labels", "expected"), [
    (["10", "2", "1", "-1", "0"], ["-1", "0", "1", "2", "10"]),
    (["2.5", "10", "1"], ["1", "2.5", "10"]),
    (["pos", "neg", "neutral"], ["neg", "neutral", "pos"]),
    (["10", "b", "2"], ["10", "2", "b"]),  # not all numeric: plain string order
])
def test_sorted_labels_sorts_numeric_labels_numerically(labels, expected):
    assert SourceStats(label_counts=dict.fromkeys(labels, 1)).sorted_labels() == expected


# --- FieldSpec.resolve ----------------------------------------------------------------------------

AVAILABLE = ["text", "label", "_file", "_line", "_error"]


def test_resolve_names_the_missing_column_and_lists_the_real_ones():
    with pytest.raises(DataError) as e:
        FieldSpec("label", text_column="sentence").resolve(AVAILABLE, "data/train.tsv")
    assert str(e.value) == "data/train.tsv: missing column 'sentence' (columns are: text, label)"


def test_resolve_reports_a_missing_label_or_feature_column():
    with pytest.raises(DataError, match=r"^src: missing column 'target' \(columns are: text, label\)$"):
        FieldSpec("target", text_column="text").resolve(AVAILABLE, "src")
    with pytest.raises(DataError, match=r"^src: missing column 'x9' "):
        FieldSpec("label", feature_columns=("x1", "x9")).resolve(["x1", "x2", "label", "_line"], "src")


@pytest.mark.parametrize("available", [[], None])
def test_resolve_on_a_source_without_columns_says_no_rows(available):
    with pytest.raises(DataError) as e:
        FieldSpec("label", text_column="text").resolve(available, "data/empty.tsv")
    assert str(e.value) == "data/empty.tsv: no rows (empty file?)"


def test_resolve_defaults_features_to_every_column_but_label_and_provenance():
    spec = FieldSpec("label", on_bad_row="skip").resolve(["a", "label", "b", "_file", "_line", "_error"], "src")
    assert spec == FieldSpec("label", None, ("a", "b"), "skip")
    explicit = FieldSpec("label", feature_columns=("b",))
    assert explicit.resolve(["a", "label", "b"], "src") is explicit


# --- load_builtin ---------------------------------------------------------------------------------


def test_builtin_digits_has_64_pixel_features_and_ten_string_labels():
    table = load_builtin("sklearn:digits")
    assert table.num_rows == 1797
    assert table.column("_line").to_pylist() == list(range(1, 1798))
    assert set(table.column("_file").to_pylist()) == {"sklearn:digits"}
    spec = FieldSpec("target").resolve(table.column_names, "sklearn:digits")
    assert len(spec.feature_columns) == 64
    enc = encode_batch(table, spec, {str(i): i for i in range(10)})
    assert enc["features"].shape == (1797, 64)
    assert enc["features"].min() == 0.0 and enc["features"].max() == 16.0
    assert all(e is None for e in enc["_error"])
    assert sorted(set(enc["label"].tolist())) == list(range(10))
