"""Models from their config sections: output shapes, and safetensors save/load that gives identical logits.

Run: .venv/bin/python -m pytest tests/unit/test_models.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_BERT
from trainers.config import CNNModel, MLPModel, TextModel
from trainers.models import (
    DigitsCNN,
    TabularMLP,
    build_model,
    default_text_model_dir,
    load_model,
    load_tokenizer,
    model_config,
    save_model,
)

DIGITS = [str(i) for i in range(10)]
TINY_TEXT = TextModel(type="text", from_config=TINY_BERT)



def pixels(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 17, (batch, 64), generator=g).float()  # [B, 64] digits intensities 0..16


def assert_no_pickles(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    assert files, f"nothing written to {directory}"
    assert {p.suffix for p in files} <= {".json", ".safetensors"}, [p.name for p in files]
    for p in files:
        head = p.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{p.name} looks like a pickle / torch.save archive"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_TEXT)


@pytest.fixture(scope="module")
def tiny_bert():
    torch.manual_seed(0)
    return build_model(TINY_TEXT, ["neg", "pos"]).eval()


@pytest.fixture(scope="module")
def text_batch(tokenizer):
    return tokenizer(["a fine film", "the plot is thin but the acting is very good indeed"], padding=True,
                     return_tensors="pt")


# --- shapes ---------------------------------------------------------------------------------------


def test_cnn_maps_64_pixels_to_10_logits():
    model = build_model(CNNModel(type="cnn"), DIGITS)
    assert isinstance(model, DigitsCNN)
    assert model(features=pixels(5)).shape == (5, 10)
    assert model.eval()(features=pixels(1)).shape == (1, 10)


def test_mlp_maps_features_to_one_logit_per_label():
    model = build_model(MLPModel(type="mlp", hidden=[16, 8]), ["a", "b", "c"], num_features=7)
    assert isinstance(model, TabularMLP)
    assert model(features=torch.randn(4, 7)).shape == (4, 3)
    assert model.mean.shape == model.std.shape == (7,)


def test_mlp_standardizes_with_its_mean_and_std_buffers():
    torch.manual_seed(0)
    model = build_model(MLPModel(type="mlp", hidden=[8]), ["a", "b"], num_features=3).eval()
    x, mean, std = torch.randn(4, 3) * 5 + 2, torch.tensor([1.0, -2.0, 3.0]), torch.tensor([2.0, 0.5, 4.0])
    plain = model(features=(x - mean) / std)
    model.mean.copy_(mean), model.std.copy_(std)
    torch.testing.assert_close(model(features=x), plain)


def test_tiny_bert_gives_logits_per_label_on_padded_ids(tiny_bert, text_batch, tokenizer):
    ids, mask = text_batch["input_ids"], text_batch["attention_mask"]
    assert ids.shape[0] == 2 and mask[0].sum() < ids.shape[1]  # row 0 is padded
    out = tiny_bert(input_ids=ids, attention_mask=mask)
    assert out.logits.shape == (2, 2)
    assert tiny_bert.config.id2label == {0: "neg", 1: "pos"}
    assert tiny_bert.config.hidden_size == 32 and tiny_bert.config.num_hidden_layers == 2
    assert tiny_bert.config.vocab_size == tokenizer.vocab_size  # MiniLM's vocabulary
    # Padding must not change a row's prediction.
    alone = tokenizer(["a fine film"], return_tensors="pt")
    torch.testing.assert_close(tiny_bert(**alone).logits[0], out.logits[0], atol=1e-5, rtol=1e-5)


def test_text_dropout_override_reaches_the_transformers_config():
    model = build_model(TextModel(type="text", from_config=TINY_BERT, dropout=0.3), ["a", "b", "c"])
    assert model.config.hidden_dropout_prob == 0.3 and model.config.num_labels == 3


def test_default_text_model_dir_is_a_local_hugging_face_directory():
    d = Path(default_text_model_dir())
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
    assert json.loads((d / "config.json").read_text())["model_type"] == "bert"


# --- save_model / load_model ----------------------------------------------------------------------


def test_cnn_round_trip_gives_identical_logits(tmp_path):
    cfg = CNNModel(type="cnn", channels=[8, 16], hidden=32)
    torch.manual_seed(0)
    model = build_model(cfg, DIGITS)
    model.train()(features=pixels(32, seed=1))  # move BatchNorm running stats off their defaults
    model.eval()
    save_model(model, tmp_path, model_config(cfg, 10, None, DIGITS))

    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "rayfoundry-cnn" and config["channels"] == [8, 16] and config["hidden"] == 32
    assert config["id2label"] == {str(i): str(i) for i in range(10)}

    loaded = load_model(tmp_path).eval()
    assert isinstance(loaded, DigitsCNN)
    x = pixels(6, seed=2)
    assert torch.equal(loaded(features=x), model(features=x))
    assert_no_pickles(tmp_path)


def test_cnn_convs_have_no_bias_and_older_weights_with_one_load_to_the_same_outputs():
    """A conv bias before BatchNorm only drifts the running mean (its gradient is float noise that Adam
    amplifies); the convs have none, and weights saved with one load with it folded into the mean."""
    cfg = CNNModel(type="cnn", channels=[8, 16], hidden=32)
    torch.manual_seed(0)
    model = build_model(cfg, DIGITS)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    model.train()(features=pixels(32, seed=1))
    model.eval()
    older = build_model(cfg, DIGITS)
    older._load_state_dict_pre_hooks.clear()
    for i in (0, 3):  # the layout before: Conv2d(..., bias=True)
        conv = older.body[i]
        older.body[i] = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1)
    older.load_state_dict(model.state_dict(), strict=False)
    torch.manual_seed(3)
    for i in (0, 3):
        torch.nn.init.normal_(older.body[i].bias)
    older.train()(features=pixels(32, seed=4))  # running means now carry the biases
    older.eval()
    saved = {k: v.clone() for k, v in older.state_dict().items()}
    assert "body.0.bias" in saved and "body.3.bias" in saved
    upgraded = build_model(cfg, DIGITS)
    upgraded.load_state_dict(saved)
    x = pixels(6, seed=2)
    assert torch.allclose(upgraded.eval()(features=x), older(features=x), atol=1e-5)


def test_mlp_round_trip_keeps_mean_and_std_buffers(tmp_path):
    cfg = MLPModel(type="mlp", hidden=[16])
    torch.manual_seed(0)
    model = build_model(cfg, ["a", "b", "c"], num_features=5).eval()
    model.mean.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])), model.std.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0]))
    save_model(model, tmp_path, model_config(cfg, 3, 5, ["a", "b", "c"]))

    loaded = load_model(tmp_path).eval()
    assert isinstance(loaded, TabularMLP)
    assert torch.equal(loaded.mean, model.mean) and torch.equal(loaded.std, model.std)
    x = torch.randn(4, 5) * 3
    assert torch.equal(loaded(features=x), model(features=x))
    assert json.loads((tmp_path / "config.json").read_text())["num_features"] == 5
    assert_no_pickles(tmp_path)


def test_tiny_bert_round_trip_loads_with_plain_transformers(tmp_path, tiny_bert, text_batch):
    from transformers import AutoModelForSequenceClassification

    save_model(tiny_bert, tmp_path, None)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    assert_no_pickles(tmp_path)

    expected = tiny_bert(**text_batch).logits
    ours = load_model(tmp_path).eval()
    assert torch.equal(ours(**text_batch).logits, expected)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch.equal(plain(**text_batch).logits, expected)
    assert plain.config.id2label == {0: "neg", 1: "pos"}


def test_text_models_have_no_rayfoundry_config():
    with pytest.raises(ValueError, match="text models keep their transformers config"):
        model_config(TINY_TEXT, 2, None, ["a", "b"])
