"""Every supported file format goes through the real Ray Data read path and yields the same rows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainers.config import parse_job
from trainers.ray_data import prepare_data

ROWS = [(f"text number {i}, with \"quotes\"", ["World", "Sports", "Sci/Tech"][i % 3]) for i in range(60)]


def _write(path, fmt):
    if fmt == "tsv":
        path.write_text("text\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in ROWS))
    elif fmt == "csv":
        quoted = ['"' + t.replace('"', '""') + '"' for t, _ in ROWS]
        path.write_text("text,label\n" + "".join(f"{q},{label}\n" for q, (_, label) in zip(quoted, ROWS)))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in ROWS))
    else:
        pq.write_table(pa.table({"text": [t for t, _ in ROWS], "label": [label for _, label in ROWS]}), path)


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "parquet"])
def test_formats_load_the_same_rows_and_labels(ray_cluster, tmp_path, fmt):
    path = tmp_path / f"train.{fmt}"
    _write(path, fmt)
    job = parse_job({"data": {"train_path": str(path), "text_column": "text", "validation_fraction": 0.2},
                     "model": {"type": "text"}, "scaling": {"num_workers": 1}})
    data = prepare_data(job, tokenizer_path=None)
    assert data.labels == ["Sci/Tech", "Sports", "World"]
    assert data.train_rows + data.val_rows == 60 and data.skipped_rows == 0
    labels = np.concatenate([b["label"] for b in data.train.iter_batches(batch_size=None, batch_format="numpy")])
    assert len(labels) == data.train_rows
    assert sorted(set(labels.tolist())) == [0, 1, 2]


def test_split_is_the_same_for_every_run_and_changes_with_seed(ray_cluster, tmp_path):
    _write(tmp_path / "train.tsv", "tsv")

    def val_rows(seed):
        job = parse_job({"data": {"train_path": str(tmp_path / "train.tsv"), "text_column": "text"},
                         "model": {"type": "text"}, "scaling": {"num_workers": 1}, "run": {"seed": seed}})
        data = prepare_data(job, tokenizer_path=None)
        return sorted(data.val.to_pandas()["label"].tolist()), data.val_rows

    assert val_rows(0) == val_rows(0)
    assert val_rows(0) != val_rows(1)
