"""Personalization "shared-a" on the site (issue 27): the site keeps its trained LoRA B across
rounds (in its node state, or a folder that survives a restart), starts each round from the
global A with its own B, sends only A, and scores the global A with its own B."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from client.app import evaluate, train
from client.shared_a import (
    STATE_RECORD,
    SiteBStore,
    own_b_shapes,
    shared_part,
    start_with_own_b,
)
from client.site_state import SITE_STATE_FILE
from protocol.wire import ARRAYS, EVAL_ACCURACY, METRICS, PERSONALIZED_ACCURACY, SERVER_ROUND
from tests.client.test_app import instruction
from tests.workload.tiny_model import tiny_run_config
from workload.model import LoraSettings, initial_adapter

A = "m.lora_A.weight"
B = "m.lora_B.weight"


def node(run_config: dict[str, Any], **node_config: Any) -> Context:
    return Context(
        run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config
    )


def test_the_site_sends_a_and_starts_from_its_own_b() -> None:
    start = {A: torch.ones(2, 3), B: torch.zeros(4, 2)}
    own = {B: torch.full((4, 2), 5.0)}
    assert set(shared_part(start)) == {A}
    assert own_b_shapes(start) == {B: (4, 2)}
    mixed = start_with_own_b(start, own)
    assert torch.equal(mixed[A], start[A]) and torch.equal(mixed[B], own[B])
    assert all(torch.equal(start_with_own_b(start, None)[k], start[k]) for k in start)


def test_the_node_state_keeps_b_and_refuses_one_that_does_not_fit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    context = node({})
    store = SiteBStore(context)
    assert store.load({B: (4, 2)}) is None  # nothing kept yet
    store.save({B: torch.full((4, 2), 3.0)})
    assert STATE_RECORD in context.state.array_records
    loaded = store.load({B: (4, 2)})
    assert loaded is not None and torch.equal(loaded[B], torch.full((4, 2), 3.0))
    with caplog.at_level(logging.WARNING):
        assert store.load({B: (8, 2)}) is None  # lora-r changed: a fresh start, logged
    assert "does not fit" in caplog.text


def test_a_folder_keeps_b_across_a_restart(tmp_path: Path) -> None:
    first = SiteBStore(node({}, **{"site-state-dir": str(tmp_path)}))
    first.save({B: torch.full((4, 2), 2.0)})
    assert (tmp_path / SITE_STATE_FILE).exists()
    restarted = SiteBStore(node({}, **{"site-state-dir": str(tmp_path)}))  # a fresh node state
    loaded = restarted.load({B: (4, 2)})
    assert loaded is not None and torch.equal(loaded[B], torch.full((4, 2), 2.0))


@pytest.fixture(scope="module")
def run_config(tiny_model_dir: Path) -> dict[str, Any]:
    return tiny_run_config(tiny_model_dir, **{"eval-examples": 12, "personalization": "shared-a"})


def test_train_sends_only_a_and_keeps_b_for_the_next_round(run_config: dict[str, Any]) -> None:
    global_adapter = initial_adapter(LoraSettings.from_run_config(run_config), seed=0)
    site = node(run_config, **{"partition-id": 0, "num-partitions": 2})
    first = train(instruction(global_adapter, "train", {SERVER_ROUND: 1}), site)
    sent = first.content.array_records[ARRAYS].to_torch_state_dict()
    assert list(sent) == [k for k in global_adapter if ".lora_B." not in k]  # A, in order
    kept = site.state.array_records[STATE_RECORD].to_torch_state_dict()
    assert set(kept) == {k for k in global_adapter if ".lora_B." in k}
    assert any(not torch.equal(kept[k], global_adapter[k]) for k in kept)  # B trained

    # Round 2 starts from the new global A and this site's own B, not the global's B: the same
    # instruction from a site without a B of its own trains to other A factors.
    new_global = {**global_adapter, **sent}
    again = train(instruction(new_global, "train", {SERVER_ROUND: 2}), site)
    fresh = train(
        instruction(new_global, "train", {SERVER_ROUND: 2}),
        node(run_config, **{"partition-id": 0, "num-partitions": 2}),
    )
    own_a = again.content.array_records[ARRAYS].to_torch_state_dict()
    fresh_a = fresh.content.array_records[ARRAYS].to_torch_state_dict()
    assert any(not torch.equal(own_a[k], fresh_a[k]) for k in own_a)


def test_evaluate_scores_the_global_a_with_the_sites_own_b(run_config: dict[str, Any]) -> None:
    global_adapter = initial_adapter(LoraSettings.from_run_config(run_config), seed=0)
    site = node(run_config, **{"partition-id": 1, "num-partitions": 2})
    before = evaluate(instruction(global_adapter, "evaluate", {}), site)
    scores = before.content.metric_records[METRICS]
    # no B of its own yet: the personalised adapter is the global
    assert scores[PERSONALIZED_ACCURACY] == scores[EVAL_ACCURACY]
    own_b = {k: torch.randn_like(v) for k, v in global_adapter.items() if ".lora_B." in k}
    site.state.array_records[STATE_RECORD] = ArrayRecord(own_b)
    after = evaluate(instruction(global_adapter, "evaluate", {}), site)
    metrics = after.content.metric_records[METRICS]
    assert metrics[EVAL_ACCURACY] == scores[EVAL_ACCURACY]  # the global's score is unchanged
    assert "personalized-loss" in metrics
    assert metrics["personalized-loss"] != scores["personalized-loss"]  # own B scored
