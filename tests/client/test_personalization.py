"""Run-config personalization = "local-finetune" (issue 27): a site scores the global adapter as
before AND a personal copy, the global fine-tuned for personalization-steps local steps on its
own training data; the global is never changed, and with "none" the reply is today's."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from client.app import evaluate
from client.personalization import (
    PersonalizationSettings,
    finetune_run_config,
    personal_scores,
    personalize,
)
from protocol import wire
from protocol.wire import (
    EVAL_ACCURACY,
    EVAL_LOSS,
    METRICS,
    NUM_EXAMPLES,
    PERSONALIZED_ACCURACY,
    PERSONALIZED_LOSS,
    PERSONALIZED_STEPS,
    SERVER_ROUND,
)
from tests.client.test_app import context, instruction
from tests.workload.tiny_llama import save_tiny_llama, write_echo_jsonl
from tests.workload.tiny_model import tiny_run_config
from workload.config import SCHEMA, ConfigError
from workload.kinds import get_task_kind
from workload.kinds.base import LocalRound
from workload.model import LoraSettings, initial_adapter
from workload.training import TrainProgress, reporting_progress

STEPS = 3


@pytest.fixture(scope="module")
def run_config(tiny_model_dir: Path) -> dict[str, Any]:
    return tiny_run_config(tiny_model_dir, **{"eval-examples": 12})


@pytest.fixture(scope="module")
def global_adapter(run_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Round 0's global (every B zero) moved one seeded step away from it, so B is non-zero and
    both factors get gradients."""
    adapter = initial_adapter(LoraSettings.from_run_config(run_config), seed=0)
    generator = torch.Generator().manual_seed(1)
    return {key: t + 0.05 * torch.randn(t.shape, generator=generator) for key, t in adapter.items()}


def finetune(run_config: dict[str, Any], steps: int = STEPS) -> dict[str, Any]:
    return {**run_config, "personalization": "local-finetune", "personalization-steps": steps}


@pytest.fixture
def steps_taken() -> Iterator[list[TrainProgress]]:
    """Every optimiser step train_lora takes within the test."""
    seen: list[TrainProgress] = []
    with reporting_progress(seen.append):
        yield seen


def cloned(adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: tensor.clone() for key, tensor in adapter.items()}


# ----------------------------------------------------------------------------- run config


def test_wire_keys_keep_their_spelling() -> None:
    assert (
        wire.PERSONALIZED_LOSS,
        wire.PERSONALIZED_ACCURACY,
        wire.PERSONALIZED_PERPLEXITY,
        wire.PERSONALIZED_STEPS,
    ) == (
        "personalized-loss",
        "personalized-accuracy",
        "personalized-perplexity",
        "personalized-steps",
    )
    assert wire.PERSONALIZED_SCORES == (
        ("eval-loss", "personalized-loss"),
        ("eval-accuracy", "personalized-accuracy"),
        ("eval-perplexity", "personalized-perplexity"),
    )


def test_schema_keys_and_defaults() -> None:
    mode, steps = SCHEMA["personalization"], SCHEMA["personalization-steps"]
    assert (mode.kind, mode.default) == ("choice", "none")
    assert mode.choices == ("none", "local-finetune", "shared-a")
    assert (steps.kind, steps.default, steps.low) == ("integer", 4, 1)
    settings = PersonalizationSettings.from_run_config({})
    assert (settings.mode, settings.steps, settings.local_finetune) == ("none", 4, False)
    assert PersonalizationSettings() == settings  # the dataclass defaults are the schema's
    read = PersonalizationSettings.from_run_config(
        {"personalization": " local-finetune ", "personalization-steps": 7}
    )
    assert (read.mode, read.steps, read.local_finetune) == ("local-finetune", 7, True)
    shared = PersonalizationSettings.from_run_config({"personalization": "shared-a"})
    assert (shared.shared_a, shared.local_finetune, settings.shared_a) == (True, False, False)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "personalization",
            "shared-b",
            r"run config key 'personalization' must be one of none, local-finetune, shared-a; "
            r"got 'shared-b' \(str\)",
        ),
        ("personalization", 1, r"'personalization' must be one of none, local-finetune"),
        ("personalization-steps", 0, r"'personalization-steps' must be an integer >= 1; got 0"),
        ("personalization-steps", 2.0, r"'personalization-steps' must be an integer >= 1"),
        ("personalization-steps", True, r"'personalization-steps' must be an integer >= 1"),
    ],
)
def test_bad_values_are_refused_naming_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PersonalizationSettings.from_run_config({key: value})


def test_a_bad_value_fails_the_evaluate_handler(
    run_config: dict[str, Any], global_adapter: dict[str, torch.Tensor]
) -> None:
    node = context({**run_config, "personalization-steps": 0}, **{"partition-id": 0})
    with pytest.raises(ConfigError, match="personalization-steps"):
        evaluate(instruction(global_adapter, "evaluate", {SERVER_ROUND: 1}), node)


def test_finetune_run_config_makes_one_pass_of_steps_batches() -> None:
    config = {"batch-size": 8, "local-epochs": 3, "gradient-accumulation": 4, "seed": 2}
    assert finetune_run_config(config, 5) == {
        "batch-size": 8,
        "local-epochs": 1,
        "gradient-accumulation": 1,
        "train-examples": 40,
        "seed": 2,
    }
    assert finetune_run_config({}, 2)["train-examples"] == 64  # schema batch-size 32
    assert config["local-epochs"] == 3  # the caller's config is not changed


def test_personal_scores_renames_only_the_scores() -> None:
    scores = {NUM_EXAMPLES: 12, EVAL_LOSS: 1.5, EVAL_ACCURACY: 0.25, "other": 3.0}
    assert personal_scores(scores) == {PERSONALIZED_LOSS: 1.5, PERSONALIZED_ACCURACY: 0.25}
    assert personal_scores({NUM_EXAMPLES: 3, wire.EVAL_PERPLEXITY: 9.0}) == {
        wire.PERSONALIZED_PERPLEXITY: 9.0
    }


# ----------------------------------------------------------------------------- the handler


def test_none_replies_exactly_as_before_and_trains_nothing(
    run_config: dict[str, Any],
    global_adapter: dict[str, torch.Tensor],
    steps_taken: list[TrainProgress],
) -> None:
    for config in (run_config, {**run_config, "personalization": "none"}):
        reply = evaluate(
            instruction(global_adapter, "evaluate", {SERVER_ROUND: 1}),
            context(config, **{"partition-id": 0}),
        )
        metrics = reply.content.metric_records[METRICS]
        assert set(metrics.keys()) == {NUM_EXAMPLES, EVAL_LOSS, EVAL_ACCURACY}
    assert steps_taken == []


def test_local_finetune_reports_the_personal_copy_next_to_the_unchanged_global(
    run_config: dict[str, Any],
    global_adapter: dict[str, torch.Tensor],
    steps_taken: list[TrainProgress],
) -> None:
    sent = cloned(global_adapter)
    node_config = {"partition-id": 1, "num-partitions": 2}
    plain = evaluate(
        instruction(global_adapter, "evaluate", {SERVER_ROUND: 2}),
        context(run_config, **node_config),
    ).content.metric_records[METRICS]
    assert steps_taken == []

    reply = evaluate(
        instruction(global_adapter, "evaluate", {SERVER_ROUND: 2}),
        context(finetune(run_config), **node_config),
    )
    assert set(reply.content.keys()) == {METRICS}  # still metrics only: no tensors leave
    metrics = reply.content.metric_records[METRICS]
    assert set(metrics.keys()) == {
        NUM_EXAMPLES,
        EVAL_LOSS,
        EVAL_ACCURACY,
        PERSONALIZED_LOSS,
        PERSONALIZED_ACCURACY,
        PERSONALIZED_STEPS,
    }
    # The global's scores are exactly today's: the global was scored before and untouched.
    for key in (NUM_EXAMPLES, EVAL_LOSS, EVAL_ACCURACY):
        assert metrics[key] == plain[key], key
    # Steps respected: exactly STEPS optimiser steps of one local pass, and reported.
    assert metrics[PERSONALIZED_STEPS] == STEPS
    assert [p.step for p in steps_taken] == list(range(1, STEPS + 1))
    assert all(p.steps == STEPS and p.epochs == 1 for p in steps_taken)
    # The personal copy is another adapter: its loss on the same held-out split differs.
    personal_loss = metrics[PERSONALIZED_LOSS]
    assert isinstance(personal_loss, float)
    assert math.isfinite(personal_loss)
    assert personal_loss != plain[EVAL_LOSS]
    accuracy = metrics[PERSONALIZED_ACCURACY]
    assert isinstance(accuracy, float)
    assert 0.0 <= accuracy <= 1.0
    # The instruction's global adapter is unchanged, bit for bit.
    assert all(torch.equal(global_adapter[key], sent[key]) for key in sent)


def test_more_steps_fine_tune_further(
    run_config: dict[str, Any],
    global_adapter: dict[str, torch.Tensor],
    steps_taken: list[TrainProgress],
) -> None:
    losses = {}
    for steps in (1, 2):
        steps_taken.clear()
        reply = evaluate(
            instruction(global_adapter, "evaluate", {SERVER_ROUND: 1}),
            context(finetune(run_config, steps), **{"partition-id": 0}),
        )
        metrics = reply.content.metric_records[METRICS]
        assert metrics[PERSONALIZED_STEPS] == steps
        assert len(steps_taken) == steps
        losses[steps] = metrics[PERSONALIZED_LOSS]
    assert losses[1] != losses[2]


def test_a_site_with_fewer_examples_takes_fewer_steps_and_says_so(
    tmp_path: Path,
    run_config: dict[str, Any],
    global_adapter: dict[str, torch.Tensor],
    steps_taken: list[TrainProgress],
) -> None:
    """30 records, 27 kept for training (10 % held out): 5 steps of 8 would need 40, so one
    pass takes ceil(27 / 8) = 4 steps."""
    path = tmp_path / "site.jsonl"
    records = [{"text": f"record number {i}", "label": f"kind_{i % 3}"} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    node = context(finetune(run_config, 5), **{"data-path": str(path)})
    reply = evaluate(instruction(global_adapter, "evaluate", {SERVER_ROUND: 1}), node)
    metrics = reply.content.metric_records[METRICS]
    assert metrics[NUM_EXAMPLES] == 3  # the held-out split, as for the global
    assert metrics[PERSONALIZED_STEPS] == 4
    assert len(steps_taken) == 4


def test_each_site_logs_one_line_with_global_and_personal_scores(
    run_config: dict[str, Any],
    global_adapter: dict[str, torch.Tensor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="flwr")
    reply = evaluate(
        instruction(global_adapter, "evaluate", {SERVER_ROUND: 3}),
        context(finetune(run_config), **{"partition-id": 0}),
    )
    metrics = reply.content.metric_records[METRICS]
    lines = [r.getMessage() for r in caplog.records if "global vs personalised" in r.getMessage()]
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith(f"client: round 3, global vs personalised ({STEPS} local steps): ")
    assert f"eval-accuracy {metrics[EVAL_ACCURACY]:.4f} -> " in line
    assert f"-> {metrics[PERSONALIZED_ACCURACY]:.4f}" in line
    assert f"eval-loss {metrics[EVAL_LOSS]:.4f} -> {metrics[PERSONALIZED_LOSS]:.4f}" in line


# ----------------------------------------------------------------------------- personalize


@pytest.mark.parametrize("train_factors", ["ab", "b"])
def test_personalize_trains_a_copy_and_leaves_the_start_alone(
    run_config: dict[str, Any], global_adapter: dict[str, torch.Tensor], train_factors: str
) -> None:
    config = {**run_config, "train-factors": train_factors}
    lora = LoraSettings.for_site(config, {"partition-id": 0})
    kind = get_task_kind(lora.task)
    start = cloned(global_adapter)
    run = LocalRound(config, {"partition-id": 0}, server_round=1)
    personal = personalize(kind, lora, run, start, STEPS)

    assert all(torch.equal(start[key], global_adapter[key]) for key in start)  # start unchanged
    assert list(personal.tensors) == list(start)
    for key, tensor in personal.tensors.items():
        assert tensor.shape == start[key].shape, key
        assert tensor.data_ptr() != start[key].data_ptr(), key  # a copy, not the start
    changed = {key: not torch.equal(personal.tensors[key], start[key]) for key in start}
    b_changed = [changed[key] for key in start if ".lora_B." in key]
    a_changed = [changed[key] for key in start if ".lora_A." in key]
    assert b_changed
    assert all(b_changed)
    assert all(a_changed) if train_factors == "ab" else not any(a_changed)
    assert personal.steps == STEPS
    assert personal.metrics[PERSONALIZED_STEPS] == STEPS

    # Its scores are the task kind's own scoring of the copy on the global's held-out split.
    scored = kind.evaluate_local(lora, run, personal.tensors)
    assert personal.metrics[PERSONALIZED_LOSS] == scored[EVAL_LOSS]
    assert personal.metrics[PERSONALIZED_ACCURACY] == scored[EVAL_ACCURACY]


def test_personalize_ignores_an_instructed_learning_rate_and_is_reproducible(
    run_config: dict[str, Any], global_adapter: dict[str, torch.Tensor]
) -> None:
    """The copy trains at run-config learning-rate; the same round gives the same copy."""
    lora = LoraSettings.for_site(run_config, {"partition-id": 0})
    kind = get_task_kind(lora.task)
    run = LocalRound(run_config, {"partition-id": 0}, server_round=1)
    first = personalize(kind, lora, run, global_adapter, STEPS)
    again = personalize(
        kind, lora, LocalRound(run_config, {"partition-id": 0}, 1, 0.5), global_adapter, STEPS
    )
    assert all(torch.equal(first.tensors[k], again.tensors[k]) for k in first.tensors)
    assert first.metrics == again.metrics


def test_causal_lm_reports_personal_perplexity_after_exactly_the_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The causal-lm kind: one optimiser step per batch of 8 even with gradient-accumulation 2
    in the run config (counted on AdamW itself), and the copy's perplexity reported."""
    data = write_echo_jsonl(tmp_path / "site.jsonl", 60, seed=1)
    config: dict[str, Any] = {
        "task": "causal-lm",
        "model": str(save_tiny_llama(tmp_path / "tiny-llama")),
        "lora-r": 4,
        "lora-alpha": 8,
        "target-modules": "auto",
        "batch-size": 8,
        "gradient-accumulation": 2,
        "max-length": 64,
        "learning-rate": 1e-2,
        "seed": 0,
    }
    adapter = initial_adapter(LoraSettings.from_run_config(config), seed=0)
    sent = cloned(adapter)
    node = {"data-path": str(data)}
    plain = evaluate(instruction(adapter, "evaluate", {}), context(config, **node))
    optimizer_steps = []
    original_step = torch.optim.AdamW.step

    def counted_step(self: torch.optim.AdamW, *args: Any, **kwargs: Any) -> Any:
        optimizer_steps.append(1)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted_step)
    reply = evaluate(instruction(adapter, "evaluate", {}), context(finetune(config, 2), **node))
    metrics = reply.content.metric_records[METRICS]
    before = plain.content.metric_records[METRICS]
    assert set(metrics) == {
        NUM_EXAMPLES,
        EVAL_LOSS,
        wire.EVAL_PERPLEXITY,
        PERSONALIZED_LOSS,
        wire.PERSONALIZED_PERPLEXITY,
        PERSONALIZED_STEPS,
    }
    assert len(optimizer_steps) == 2
    assert metrics[PERSONALIZED_STEPS] == 2
    for key in (NUM_EXAMPLES, EVAL_LOSS, wire.EVAL_PERPLEXITY):
        assert metrics[key] == before[key], key
    assert metrics[wire.PERSONALIZED_PERPLEXITY] != metrics[wire.EVAL_PERPLEXITY]
    assert all(torch.equal(adapter[key], sent[key]) for key in sent)
