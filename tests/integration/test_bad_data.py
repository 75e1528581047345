"""Bad data fails before training with the file, line and column named; skip mode counts what it drops."""

from __future__ import annotations

import pytest

from trainers.config import parse_job
from trainers.data import DataError
from trainers.run import train

GOOD = "".join(f"{'good' if i % 2 else 'bad'} movie number {i}\t{i % 2}\n" for i in range(40))


def _job(tmp_path, train_text, val_text=None, **data):
    (tmp_path / "train.tsv").write_text(train_text)
    cfg = {"train_path": str(tmp_path / "train.tsv"), "text_column": "sentence", "label_column": "label"}
    if val_text is not None:
        (tmp_path / "val.tsv").write_text(val_text)
        cfg["validation_path"] = str(tmp_path / "val.tsv")
    return parse_job({
        "data": cfg | data,
        "model": {"type": "text", "from_config": {"hidden_size": 16, "num_hidden_layers": 1,
                                                  "num_attention_heads": 1, "intermediate_size": 16}},
        "optim": {"batch_size": 8}, "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "run": {"name": "bad", "storage_path": str(tmp_path / "runs"), "epochs": 1},
        "tracking": {"backend": "none"},  # tracking has its own tests; these are about data
    })


HEADER = "sentence\tlabel\n"


@pytest.mark.parametrize("train_text, val_text, expected", [
    (HEADER + GOOD + "too\tmany\tcolumns\n", None, "train.tsv, line 42: expected 2 columns, got 3"),
    (HEADER + GOOD, "sentence\tlabel\nfine\t1\nodd one\tmaybe\n",
     "val.tsv, line 3, column 'label': unknown label 'maybe' (known: 0, 1)"),
    (HEADER + GOOD[:40] + "no label here\t\n" + GOOD, None, "column 'label': empty label"),
    ("text\tlabel\n" + GOOD, None, "train.tsv: missing column 'sentence' (columns are: text, label)"),
    ("", None, "train.tsv: no rows (empty file?)"),
])
def test_bad_rows_stop_the_run_with_location(ray_cluster, tmp_path, train_text, val_text, expected):
    with pytest.raises(DataError) as err:
        train(_job(tmp_path, train_text, val_text))
    assert expected in str(err.value)
    assert not (tmp_path / "runs").exists()  # failed before any worker started


def test_skip_mode_drops_and_counts_bad_rows(ray_cluster, tmp_path):
    """The counts the driver reports are the rows the Ray Data pipelines then hand to the workers."""
    from trainers.models import default_text_model_dir
    from trainers.ray_data import prepare_data

    text = HEADER + GOOD + "too\tmany\tcolumns\n" + "  \t1\n" + "fine\t\n" + GOOD
    data = prepare_data(_job(tmp_path, text, on_bad_row="skip", validation_fraction=0.25), default_text_model_dir())
    assert data.skipped_rows == 3
    assert data.train_rows + data.val_rows == 80 and data.labels == ["0", "1"]
    assert data.train.count() == data.train_rows and data.val.count() == data.val_rows
