"""Local training: settings, the loss goes down, determinism, and only LoRA factors change."""

from __future__ import annotations

import math
import random
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

from workload.model import LoraSettings, build_lora_model, get_lora_state, set_lora_state
from workload.tasks import TaskData
from workload.training import TrainSettings, evaluate_lora, train_lora

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"

# Four classes whose texts share words with their label name: learnable in a few steps even by
# a randomly initialised tiny encoder.
TOPICS = {
    "weather forecast": ["rain", "sunny", "cloudy", "storm", "forecast", "weather"],
    "music playlist": ["song", "album", "playlist", "music", "guitar", "band"],
    "bank transfer": ["money", "transfer", "account", "bank", "payment", "euro"],
    "pizza order": ["pizza", "cheese", "order", "delivery", "pepperoni", "slice"],
}


def toy_data(count: int, seed: int) -> TaskData:
    rng = random.Random(seed)
    names = list(TOPICS)
    texts, labels = [], []
    for i in range(count):
        label = i % len(names)
        words = rng.choices(TOPICS[names[label]], k=4) + rng.choices(["the", "a", "please"], k=2)
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return TaskData("toy", texts, labels, names)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> LoraSettings:
    return LoraSettings(model=str(tiny_model_dir), r=4, alpha=8)


@pytest.fixture
def model(tiny: LoraSettings) -> PeftModel:
    return build_lora_model(tiny, seed=0)


FAST = TrainSettings(learning_rate=2e-2, local_epochs=6, batch_size=8, max_length=16)


def test_settings_from_the_project_run_config() -> None:
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert TrainSettings.from_run_config(config) == TrainSettings()
    assert TrainSettings.from_run_config({}) == TrainSettings()
    assert TrainSettings.from_run_config({"learning-rate": 1, "max-length": 128}) == TrainSettings(
        learning_rate=1.0, max_length=128
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("learning-rate", 0.0, r"'learning-rate' must be a finite number in \(0, inf\); got 0.0"),
        ("learning-rate", math.inf, r"'learning-rate'"),
        ("learning-rate", "1e-3", r"'learning-rate' .* got '1e-3' \(str\)"),
        ("local-epochs", 0, r"'local-epochs' must be an integer >= 1"),
        ("batch-size", 2.0, r"'batch-size' must be an integer >= 1"),
        ("temperature", -1.0, r"'temperature'"),
        ("max-length", 2, r"'max-length' must be an integer in \[4, 8192\]"),
    ],
)
def test_settings_reject_bad_values(key: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainSettings.from_run_config({key: value})


def test_training_reduces_the_loss(model: PeftModel) -> None:
    data = toy_data(48, seed=0)
    before = evaluate_lora(model, data, FAST)
    result = train_lora(model, data, FAST, seed=0)
    after = evaluate_lora(model, data, FAST)
    assert result.num_examples == 48
    assert math.isfinite(result.mean_loss)
    assert after.num_examples == 48
    assert after.loss < 0.7 * before.loss, (before, after)
    assert after.accuracy >= before.accuracy


def test_training_is_deterministic_per_seed(tiny: LoraSettings) -> None:
    data = toy_data(24, seed=1)
    start = get_lora_state(build_lora_model(tiny, seed=5))

    def trained(seed: int) -> dict[str, torch.Tensor]:
        model = build_lora_model(tiny, seed=9)
        set_lora_state(model, start)
        train_lora(model, data, FAST, seed=seed)
        return get_lora_state(model)

    first, again, other = trained(1), trained(1), trained(2)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first)


def test_only_lora_factors_change(model: PeftModel) -> None:
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_lora(model, toy_data(16, seed=2), FAST, seed=0)
    changed = {
        name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])
    }
    assert changed
    assert all(".lora_A." in name or ".lora_B." in name for name in changed)


def test_modes_and_rng_are_restored(model: PeftModel) -> None:
    data = toy_data(8, seed=3)
    rng_state = torch.random.get_rng_state()
    model.eval()
    train_lora(model, data, FAST, seed=0)
    assert not model.training
    model.train()
    evaluate_lora(model, data, FAST)
    assert model.training
    assert torch.equal(torch.random.get_rng_state(), rng_state)


def test_evaluation_does_not_depend_on_batching(model: PeftModel) -> None:
    data = toy_data(20, seed=4)
    whole = evaluate_lora(model, data, TrainSettings(batch_size=64, max_length=16))
    pieces = evaluate_lora(model, data, TrainSettings(batch_size=3, max_length=16))
    assert pieces.accuracy == whole.accuracy
    assert pieces.loss == pytest.approx(whole.loss, rel=1e-5)


def test_bad_data_is_rejected(model: PeftModel) -> None:
    with pytest.raises(ValueError, match="no examples"):
        train_lora(model, TaskData("empty", [], [], ["a"]), FAST, seed=0)
    with pytest.raises(ValueError, match=r"label 2 outside \[0, 2\)"):
        evaluate_lora(model, TaskData("bad", ["x"], [2], ["a", "b"]), FAST)


def test_a_diverging_loss_stops_training(model: PeftModel) -> None:
    settings = TrainSettings(temperature=1e-45, batch_size=8, max_length=16)  # logits overflow
    with pytest.raises(FloatingPointError, match="raise temperature"):
        train_lora(model, toy_data(8, seed=5), settings, seed=0)
