"""Builders shared by tests: small real checkpoints written by the training code's own
`save_checkpoint`, from models trained in this process for a few epochs (no Ray), and packages
exported from them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from model_registry.validation import load_validation
from tests.conftest import TINY_BERT
from trainers.checkpoint import save_checkpoint
from trainers.config import parse_job
from trainers.loop import train_epoch
from trainers.models import build_model, load_tokenizer, model_config
from trainers.strategy import DDPEngine

CPU = torch.device("cpu")
WORDS = {"pos": ["great", "lovely", "superb", "moving", "fun"], "neg": ["awful", "dull", "boring", "weak", "bad"]}


def write_reviews(path: Path, rows: int = 240) -> Path:
    """A small synthetic sentiment TSV: the label follows the adjective."""
    lines = ["sentence\tlabel"]
    for i in range(rows):
        label = ("pos", "neg")[i % 2]
        lines.append(f"a {WORDS[label][i % 5]} film number {i}\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def job_for(kind: str, tmp: Path) -> dict:
    if kind == "cnn":
        return {"data": {"train_path": "sklearn:digits", "label_column": "target", "validation_fraction": 0.2},
                "model": {"type": "cnn", "channels": [8, 16], "hidden": 32}, "optim": {"lr": 3e-3, "batch_size": 32}}
    if kind == "mlp":
        return {"data": {"train_path": "sklearn:breast_cancer", "label_column": "target", "validation_fraction": 0.25},
                "model": {"type": "mlp", "hidden": [32]}, "optim": {"lr": 3e-3, "batch_size": 32}}
    tsv = write_reviews(tmp / "reviews.tsv")
    return {"data": {"train_path": str(tsv), "text_column": "sentence", "label_column": "label",
                     "validation_fraction": 0.25, "max_length": 32},
            "model": {"type": "text", "from_config": TINY_BERT}, "optim": {"lr": 2e-3, "batch_size": 16}}


def make_checkpoint(directory: Path, raw_job: dict, epochs: int, seed: int = 0, labels: list[str] | None = None) -> Path:
    """Train in this process for a few epochs and write a checkpoint exactly as a Train worker does."""
    raw_job = raw_job | {"scaling": {"num_workers": 1}, "run": {"name": directory.name, "seed": 0}}
    job = parse_job(raw_job)
    labels = labels or (["0", "1"] if job.data.train_path.endswith("cancer") else
                        [str(i) for i in range(10)] if job.model.type == "cnn" else ["neg", "pos"])
    tokenizer = load_tokenizer(job.model) if job.model.type == "text" else None
    everything = parse_job(raw_job | {"data": raw_job["data"] | {"validation_path": raw_job["data"]["train_path"]}})
    rows = load_validation(everything, labels, tokenizer)  # every row, encoded: the training set here
    num_features = None if rows.features is None else rows.features.shape[1]
    torch.manual_seed(seed)
    model = build_model(job.model, labels, num_features)
    if job.model.type == "mlp":
        model.mean.copy_(torch.from_numpy(rows.features.mean(0))), model.std.copy_(torch.from_numpy(rows.features.std(0) + 1e-6))
    steps = epochs * -(-len(rows) // job.optim.batch_size)
    engine = DDPEngine(model, job.optim, job.strategy, total_steps=steps, distributed=False, device=CPU)
    for _ in range(epochs):
        batches = ({k: torch.from_numpy(v) for k, v in b.items()} for b in rows.batches(job.optim.batch_size))
        train_epoch(engine, batches, accum_steps=1, device=CPU)
    columns = None if job.model.type == "text" else [f"f{i}" for i in range(num_features)]
    save_checkpoint(directory, rank=0, engine=engine,
                    own_config=None if job.model.type == "text" else model_config(job.model, len(labels), num_features, labels),
                    tokenizer=tokenizer, label_map={"labels": labels, "label_column": job.data.label_column,
                                                    "text_column": job.data.text_column, "feature_columns": columns},
                    trainer_state={"epoch": epochs, "world_size": 1, "history": [{"epoch": epochs}]},
                    job_yaml=yaml.safe_dump(json.loads(job.model_dump_json())))
    return directory
