"""Checkpoints without Ray: exact resume (weights, AdamW, schedule, step, RNG) and refusal of damaged files.

Run: .venv/bin/python -m pytest tests/unit/test_checkpoint.py -q
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers.checkpoint import CheckpointError, load_for_inference, load_trainer_state, save_checkpoint, verify_checksums
from trainers.config import CNNModel, DDPStrategy, OptimSection, TextModel
from trainers.models import build_model, load_tokenizer, model_config
from trainers.strategy import DDPEngine

CPU = torch.device("cpu")
DIGITS = [str(i) for i in range(10)]
CNN = CNNModel(type="cnn", channels=[4, 8], hidden=16, dropout=0.3)  # dropout, so resuming needs the RNG
OPTIM = OptimSection(lr=1e-2, warmup_fraction=0.2)
LABEL_MAP = {"labels": DIGITS, "label_column": "target", "text_column": None, "feature_columns": None}
JOB_YAML = "data:\n  train_path: sklearn:digits\nmodel:\n  type: cnn\n"



def LocalEngine(model: torch.nn.Module, total_steps: int = 10) -> DDPEngine:
    return DDPEngine(model, OPTIM, DDPStrategy(name="ddp"), total_steps, distributed=False, device=CPU)


def cnn_engine(seed: int, cfg: CNNModel = CNN) -> DDPEngine:
    torch.manual_seed(seed)
    return LocalEngine(build_model(cfg, DIGITS))


def train_steps(engine: DDPEngine, steps: int) -> None:
    g = torch.Generator().manual_seed(123)
    x, y = torch.randint(0, 17, (16, 64), generator=g).float(), torch.randint(0, 10, (16,), generator=g)
    engine.model.train()
    for _ in range(steps):
        torch.nn.functional.cross_entropy(engine.model(features=x), y).backward()
        engine.optimizer.step()
        engine.scheduler.step()
        engine.optimizer.zero_grad(set_to_none=True)
        engine.global_step += 1


def save(directory: Path, engine: DDPEngine, rank: int = 0, cfg: CNNModel = CNN, epoch: int = 1) -> None:
    save_checkpoint(directory, rank=rank, engine=engine, own_config=model_config(cfg, 10, None, DIGITS),
                    tokenizer=None, label_map=LABEL_MAP,
                    trainer_state={"epoch": epoch, "history": [{"epoch": epoch, "val_accuracy": 0.5}]},
                    job_yaml=JOB_YAML)


def rng_draws() -> tuple:
    return torch.rand(4).tolist(), np.random.rand(3).tolist(), random.random()


def reseed(seed: int) -> None:
    torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.fixture
def trained():
    """An engine after 3 AdamW steps, and its epoch-1 checkpoint."""
    engine = cnn_engine(seed=0)
    train_steps(engine, 3)
    return engine


@pytest.fixture
def ckpt(tmp_path, trained) -> Path:
    reseed(42)
    save(tmp_path / "epoch_0001", trained)
    return tmp_path / "epoch_0001"


# --- exact resume ---------------------------------------------------------------------------------


def test_checkpoint_files_are_all_checksummed_and_none_is_a_pickle(ckpt):
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["checksums.rank0.json", "config.json", "job.yaml", "label_map.json", "model.safetensors",
                     "optimizer.safetensors", "rng_rank0.safetensors", "trainer_state.json"]
    assert sorted(json.loads((ckpt / "checksums.rank0.json").read_text())) == sorted(set(names) - {"checksums.rank0.json"})
    assert not [p for p in ckpt.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    assert (ckpt / "job.yaml").read_text() == JOB_YAML
    assert json.loads((ckpt / "label_map.json").read_text()) == LABEL_MAP


def test_resume_restores_weights_optimizer_scheduler_step_and_rng(ckpt, trained):
    reseed(42)  # the RNG state the checkpoint captured
    after_save = rng_draws()

    reseed(7)
    fresh = cnn_engine(seed=1)  # different initial weights, empty optimizer
    state = load_trainer_state(ckpt, fresh, rank=0)
    after_restore = rng_draws()

    assert after_restore == after_save
    assert_same_weights(weights(fresh.model), weights(trained.model))
    assert (state["epoch"], state["global_step"], fresh.global_step) == (1, 3, 3)
    assert state["history"] == [{"epoch": 1, "val_accuracy": 0.5}]
    assert fresh.scheduler.last_epoch == trained.scheduler.last_epoch == 3
    assert fresh.scheduler.get_last_lr() == trained.scheduler.get_last_lr()
    assert [g["lr"] for g in fresh.optimizer.param_groups] == [g["lr"] for g in trained.optimizer.param_groups]

    ours, theirs = fresh.optimizer.state_dict()["state"], trained.optimizer.state_dict()["state"]
    assert ours.keys() == theirs.keys() and len(ours) == len(list(trained.model.parameters()))
    for idx in theirs:
        assert torch.equal(ours[idx]["exp_avg"], theirs[idx]["exp_avg"]), idx
        assert torch.equal(ours[idx]["exp_avg_sq"], theirs[idx]["exp_avg_sq"]), idx
        assert float(ours[idx]["step"]) == float(theirs[idx]["step"]) == 3.0


def test_resumed_training_matches_uninterrupted_training(ckpt, trained):
    reseed(42)  # as if the run had continued right after saving
    train_steps(trained, 2)

    reseed(0)
    resumed = cnn_engine(seed=1)
    load_trainer_state(ckpt, resumed, rank=0)
    train_steps(resumed, 2)

    assert resumed.global_step == trained.global_step == 5
    assert resumed.scheduler.get_last_lr() == trained.scheduler.get_last_lr()
    assert_same_weights(weights(resumed.model), weights(trained.model))


def test_each_rank_restores_its_own_rng(tmp_path, trained):
    # Ray Train merges the workers' directories: rank 0 writes everything, rank 1 its RNG and manifest.
    reseed(1)
    save(tmp_path / "rank0", trained, rank=0)
    reseed(2)
    save(tmp_path / "rank1", trained, rank=1)
    assert sorted(p.name for p in (tmp_path / "rank1").iterdir()) == ["checksums.rank1.json", "rng_rank1.safetensors"]
    merged = tmp_path / "merged"
    shutil.copytree(tmp_path / "rank0", merged)
    shutil.copytree(tmp_path / "rank1", merged, dirs_exist_ok=True)
    verify_checksums(merged)

    reseed(2)
    rank1_draws = rng_draws()
    reseed(1)
    load_trainer_state(merged, cnn_engine(seed=3), rank=1)
    assert rng_draws() == rank1_draws


def test_load_for_inference_gives_identical_predictions_and_the_label_map(ckpt, trained):
    model, label_map = load_for_inference(ckpt)
    x = torch.randint(0, 17, (5, 64)).float()
    assert torch.equal(model.eval()(features=x), trained.model.eval()(features=x))
    assert label_map == LABEL_MAP


TINY_TEXT = TextModel(type="text", from_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                                "intermediate_size": 64, "max_position_embeddings": 128})


@pytest.fixture(scope="module")
def tiny_bert_cls():
    """Building the first BERT imports its transformers modules (~3 s, once)."""
    return type(build_model(TINY_TEXT, ["neg", "pos"]))


def test_text_checkpoint_holds_the_tokenizer_and_loads_with_transformers(tmp_path, tiny_bert_cls):
    from transformers import AutoTokenizer

    cfg = TINY_TEXT
    torch.manual_seed(0)
    engine = LocalEngine(build_model(cfg, ["neg", "pos"]))
    tokenizer = load_tokenizer(cfg)
    save_checkpoint(tmp_path, rank=0, engine=engine, own_config=None, tokenizer=tokenizer,
                    label_map={"labels": ["neg", "pos"]}, trainer_state={"epoch": 1, "history": []}, job_yaml="")
    listed = json.loads((tmp_path / "checksums.rank0.json").read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(listed)

    batch = AutoTokenizer.from_pretrained(tmp_path)(["good", "not good at all"], padding=True, return_tensors="pt")
    model, label_map = load_for_inference(tmp_path)
    assert isinstance(model, tiny_bert_cls)
    assert torch.equal(model.eval()(**batch).logits, engine.model.eval()(**batch).logits)
    assert label_map == {"labels": ["neg", "pos"]}

    torch.manual_seed(1)
    fresh = LocalEngine(build_model(cfg, ["neg", "pos"]))
    load_trainer_state(tmp_path, fresh, rank=0)
    assert_same_weights(weights(fresh.model), weights(engine.model))


# --- damaged checkpoints --------------------------------------------------------------------------


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [flip_byte, truncate])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "trainer_state.json"])
def test_altered_or_truncated_file_is_refused_by_name(ckpt, damage, name):
    damage(ckpt / name)
    with pytest.raises(CheckpointError) as e:
        verify_checksums(ckpt)
    assert str(e.value) == f"{ckpt / name}: sha256 mismatch; the file is truncated or altered"


def test_damaged_weights_never_reach_the_engine(ckpt):
    flip_byte(ckpt / "model.safetensors")
    engine = cnn_engine(seed=1)
    before = weights(engine.model)
    with pytest.raises(CheckpointError, match="model.safetensors: sha256 mismatch"):
        load_trainer_state(ckpt, engine, rank=0)
    with pytest.raises(CheckpointError, match="model.safetensors: sha256 mismatch"):
        load_for_inference(ckpt)
    assert_same_weights(weights(engine.model), before)
    assert engine.global_step == 0


def test_missing_file_listed_in_the_manifest_is_named(ckpt):
    (ckpt / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        load_trainer_state(ckpt, cnn_engine(seed=1), rank=0)
    assert str(e.value) == f"{ckpt / 'optimizer.safetensors'}: missing from checkpoint (listed in checksums.rank0.json)"


def test_missing_manifest_is_not_a_checkpoint(ckpt):
    (ckpt / "checksums.rank0.json").unlink()
    with pytest.raises(CheckpointError) as e:
        load_for_inference(ckpt)
    assert str(e.value) == f"{ckpt}: no checksums.rank*.json; not a complete rayfoundry checkpoint"


def test_damaged_manifest_is_a_checkpoint_error_naming_it(ckpt):
    truncate(ckpt / "checksums.rank0.json")
    with pytest.raises(CheckpointError, match="checksums.rank0.json"):
        verify_checksums(ckpt)


def test_checkpoint_of_another_architecture_is_refused(ckpt):
    other = CNNModel(type="cnn", channels=[4, 8, 8], hidden=16)  # an extra conv block: extra keys
    with pytest.raises(CheckpointError) as e:
        load_trainer_state(ckpt, cnn_engine(seed=1, cfg=other), rank=0)
    assert str(e.value).startswith(f"{ckpt / 'model.safetensors'}: does not match the model (missing ['body.6.weight'")


def test_checkpoint_with_other_layer_sizes_is_refused(ckpt):
    wider = CNNModel(type="cnn", channels=[4, 8], hidden=32, dropout=0.3)  # same keys, other shapes
    with pytest.raises(CheckpointError, match=r"model\.safetensors: does not match the model"):
        load_trainer_state(ckpt, cnn_engine(seed=1, cfg=wider), rank=0)


def test_checkpoint_missing_a_ranks_files_is_refused(tmp_path):
    engine = cnn_engine(seed=0)
    save_checkpoint(tmp_path, rank=0, engine=engine, own_config=model_config(CNN, 10, None, DIGITS),
                    tokenizer=None, label_map=LABEL_MAP, trainer_state={"epoch": 1, "history": [], "world_size": 2},
                    job_yaml=JOB_YAML)  # rank 1 never wrote its part
    with pytest.raises(CheckpointError, match=r"checksums\.rank1\.json: missing; rank 1 never finished"):
        load_trainer_state(tmp_path, cnn_engine(seed=1), rank=0)


def test_optimizer_state_of_another_model_layout_is_a_checkpoint_error_naming_the_file(tmp_path):
    """A CNN run saved when the convs had a bias: its weights load (the bias folds into BatchNorm), but
    its optimizer state holds two parameters more, which is refused with the way out, not a crash."""
    from trainers.checkpoint import load_optimizer, save_optimizer
    from trainers.models import build_model
    from trainers.strategy import build_optimizer

    cfg, labels = CNNModel(type="cnn", channels=[8, 16], hidden=32), [str(i) for i in range(10)]
    older = build_model(cfg, labels)
    for i in (0, 3):  # the layout before: Conv2d(..., bias=True)
        conv = older.body[i]
        older.body[i] = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1)
    optimizer = build_optimizer(older, OptimSection())
    older(features=torch.rand(4, 64) * 16).sum().backward()
    optimizer.step()
    save_optimizer(optimizer, tmp_path / "optimizer.safetensors")
    current = build_optimizer(build_model(cfg, labels), OptimSection())
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors: the optimizer state does not fit this model's "
                                              r"parameters .*--restart trains the run again"):
        load_optimizer(current, tmp_path / "optimizer.safetensors")


def test_an_epoch_trained_again_gets_a_checkpoint_name_of_its_own(tmp_path):
    """Resumed from before a corrupt epoch_0008, the run trains epoch 8 again: its checkpoint must not
    reuse that directory, which Ray Train still lists and will delete."""
    from trainers.recovery import checkpoint_name

    assert checkpoint_name(str(tmp_path), 8) == "epoch_0008"
    (tmp_path / "epoch_0008").mkdir()
    assert checkpoint_name(str(tmp_path), 8) == "epoch_0008_1"
    (tmp_path / "epoch_0008_1").mkdir()
    assert checkpoint_name(f"file://{tmp_path}", 8) == "epoch_0008_2"
    assert sorted(["epoch_0009", "epoch_0008_1", "epoch_0008"]) == ["epoch_0008", "epoch_0008_1", "epoch_0009"]
