"""Local training: settings, the loss goes down, determinism, only LoRA factors change, and
with train-factors = "b" (FFA-LoRA) only the lora_B ones."""

from __future__ import annotations

import math
import random
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

from workload.kinds import get_task_kind
from workload.kinds.base import ServerWorkload
from workload.model import (
    LoraSettings,
    build_lora_model,
    get_lora_state,
    set_lora_state,
    trainable_parameters,
)
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
    assert TrainSettings.from_run_config({"train-factors": " b "}).train_factors == "b"
    assert TrainSettings().train_factors == "ab"


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
        ("train-factors", "a", r"run config key 'train-factors' must be one of ab, b; got 'a'"),
        ("train-factors", "ba", r"'train-factors' must be one of ab, b; got 'ba' \(str\)"),
        ("train-factors", 1, r"'train-factors' must be one of ab, b; got 1 \(int\)"),
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


# ----------------------------------------------------------------------------- train-factors


def _split_factors(state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    a_keys = [key for key in state if ".lora_A." in key]
    b_keys = [key for key in state if ".lora_B." in key]
    assert a_keys and len(a_keys) == len(b_keys)
    return a_keys, b_keys


@pytest.mark.parametrize("train_factors", ["ab", "b"])
def test_train_factors_b_keeps_every_lora_a_bit_identical(
    model: PeftModel, train_factors: str
) -> None:
    # B nonzero from the start, so with "ab" the A factors get a gradient from the first step
    start = {
        key: value + 0.01 if ".lora_B." in key else value
        for key, value in get_lora_state(model).items()
    }
    set_lora_state(model, start)
    settings = TrainSettings(
        learning_rate=2e-2, local_epochs=2, batch_size=8, max_length=16, train_factors=train_factors
    )
    train_lora(model, toy_data(16, seed=6), settings, seed=0)
    trained = get_lora_state(model)
    a_keys, b_keys = _split_factors(trained)
    assert all(not torch.equal(trained[key], start[key]) for key in b_keys)
    if train_factors == "b":
        assert all(torch.equal(trained[key], start[key]) for key in a_keys)
    else:
        assert all(not torch.equal(trained[key], start[key]) for key in a_keys)
    # the frozen A factors are trainable again afterwards (the model is shared across rounds)
    assert all(p.requires_grad for name, p in model.named_parameters() if "lora_" in name)


def test_train_factors_b_leaves_lora_a_out_of_the_optimizer(model: PeftModel) -> None:
    names = {id(p): name for name, p in model.named_parameters()}
    with trainable_parameters(model, "b") as parameters:
        trained = sorted(names[id(p)] for p in parameters)
        a_factors = {n: p for n, p in model.named_parameters() if ".lora_A." in n}
        assert a_factors and not any(p.requires_grad for p in a_factors.values())
        frozen = list(a_factors)
    assert trained and all(".lora_B." in name for name in trained)
    with trainable_parameters(model, "ab") as parameters:
        both = sorted(names[id(p)] for p in parameters)
    assert both == sorted(trained + frozen)
    with pytest.raises(ValueError, match="'train-factors' must be one of ab, b; got 'a'"):
        trainable_parameters(model, "a").__enter__()


def test_the_server_refuses_a_bad_train_factors_at_start() -> None:
    workload = ServerWorkload(("banking77",), ("mcid",), 8, 0, False)
    for kind in ("classification", "causal-lm"):
        get_task_kind(kind).check_server_workload(workload, {"train-factors": "b"})
        with pytest.raises(ValueError, match="'train-factors' must be one of ab, b"):
            get_task_kind(kind).check_server_workload(workload, {"train-factors": "A"})
