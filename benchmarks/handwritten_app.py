"""Arm (c) of benchmarks/serve_load.py: what engineers write by hand. FastAPI + uvicorn, the torch
model in eager mode, no batching: each request is tokenized and run on its own.

    RAYFOUNDRY_PACKAGE=runs/bench_registry/sst2-bench/1 .venv/bin/python -m uvicorn \\
        benchmarks.handwritten_app:app --host 127.0.0.1 --port 8001
"""

from __future__ import annotations

import os

import torch
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

PACKAGE = os.environ["RAYFOUNDRY_PACKAGE"]
tokenizer = AutoTokenizer.from_pretrained(PACKAGE, local_files_only=True)
model = AutoModelForSequenceClassification.from_pretrained(PACKAGE, local_files_only=True, use_safetensors=True).eval()
labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
app = FastAPI()


class Request(BaseModel):
    instances: list[str]


@app.post("/predict")
def predict(req: Request) -> dict:
    enc = tokenizer(req.instances, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.inference_mode():
        probs = model(**enc).logits.softmax(-1)
    return {"predictions": [{"label": labels[int(p.argmax())], "probabilities": p.tolist()} for p in probs]}
