"""The model card of every adapter folder: Hugging Face's format (read back with
``huggingface_hub.ModelCard.load``, offline), the run's facts in its body, and checkpoints that
still verify and resume with a card inside them."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import ModelCard

from client.app import train
from server.checkpoints import STATE_FILE, CheckpointStore
from server.model_card import CARD_FILE, DEFAULT_BASE_MODEL, DEFENCE_KEY, model_card
from strategies.adapter_io.config import adapter_config_for
from strategies.audit import verify_run
from tests.server.test_run_loop import ThreadGrid, run
from tests.workload.tiny_model import save_tiny_bert, tiny_run_config

AUDIT_HEAD = "ab" * 32


def summary(**run_config: Any) -> dict[str, Any]:
    return {"run-config": {"num-server-rounds": 2, **run_config}}


def history() -> list[dict[str, Any]]:
    """Round 0 and two rounds as the round loop records them (metrics.json's ``rounds``)."""
    return [
        {
            "server-round": 0,
            "server-eval": {
                "mcid-accuracy": 0.25,
                "hwu64-accuracy": 0.125,
                "clinc150-accuracy": 0.5,
                "seen-accuracy": 0.1875,
                "unseen-accuracy": 0.5,
            },
        },
        {
            "server-round": 1,
            "clients-sampled": 4,
            "clients-timed-out": 1,
            "train": {
                "clients-accepted": 2,
                "clients-rejected": 1,
                "num-examples": 1024,
                "train-loss": 1.5,
                "dp-epsilon": 3.25,
            },
            "merge": {
                "rejected": {"4": "update norm 9 exceeds robust-norm-factor 10 x ..."},
                "robust": {"screened": [4], "clipped": [], "krum-dropped": []},
            },
            "server-eval": {"mcid-accuracy": 0.5, "seen-accuracy": 0.375},
        },
        {
            "server-round": 2,
            "clients-sampled": 4,
            "clients-timed-out": 0,
            "train": {
                "clients-accepted": 4,
                "clients-rejected": 0,
                "num-examples": 2048,
                "train-loss": 0.75,
                "dp-epsilon": 4.5,
            },
            "merge": {"rejected": {}, "robust": {"screened": [], "clipped": [2]}},
            "server-eval": {
                "mcid-accuracy": 0.75,
                "hwu64-accuracy": 0.625,
                "clinc150-accuracy": 0.5,
                "seen-accuracy": 0.6875,
                "unseen-accuracy": 0.5,
            },
        },
    ]


def load(text: str, folder: Path) -> ModelCard:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CARD_FILE).write_text(text)
    return ModelCard.load(folder / CARD_FILE)


def test_the_card_has_the_hub_header_and_the_runs_facts(tmp_path: Path) -> None:
    text = model_card(
        summary(**{"dp": "server-clipping", "dp-delta": 1e-5, "merge-method": "ties"}),
        history(),
        audit_head=AUDIT_HEAD,
        seen_tasks=("mcid", "hwu64"),
        unseen_tasks=("clinc150",),
    )
    card = load(text, tmp_path)
    assert card.data.base_model == DEFAULT_BASE_MODEL
    assert card.data.library_name == "peft"
    assert card.data.license == "apache-2.0"
    tags = card.data.tags
    assert tags is not None
    assert {"lora", "federated-learning", "ties", "differential-privacy"} <= set(tags)
    body = card.text
    assert "final adapter" in body
    assert "2 of 2 server rounds" in body
    # the per-task table: round 0 and the last round, seen then unseen, then the averages
    assert "| mcid | seen | 25.0 % | 75.0 % |" in body
    assert "| hwu64 | seen | 12.5 % | 62.5 % |" in body
    assert "| clinc150 | unseen | 50.0 % | 50.0 % |" in body
    assert "| **seen average** | | 18.8 % | 68.8 % |" in body
    # the curve and the rounds: sampled, accepted, rejected, timed out, examples, loss, averages
    assert "| 1 | 4 | 2 | 1 | 1 | 1024 | 1.5 | 37.5 % | - |" in body
    assert "| 2 | 4 | 4 | 0 | 0 | 2048 | 0.75 | 68.8 % | 50.0 % |" in body
    assert "accuracy.png" in body
    # settings, privacy, robustness, audit
    assert "| `merge-method` | ties |" in body
    assert "| `keep-ratio` | 0.2 |" in body  # absent from the run config: the schema default
    assert "epsilon 4.5 at delta 1e-05" in body
    assert "Secure aggregation: off." in body
    assert "Replies rejected over the rounds above: 1 (of them screened out" in body
    assert "replies clipped to the bound: 1" in body
    assert "| `robust-aggregation` | auto |" in body  # the schema default, as configured
    assert "The defence that ran" not in body  # a summary without the resolved defence
    described = {**summary(), DEFENCE_KEY: "centered-clip (chosen by 'auto': ...)"}
    resolved = model_card(described, history(), audit_head=AUDIT_HEAD)
    assert "The defence that ran: centered-clip (chosen by 'auto': ...)." in resolved
    assert AUDIT_HEAD in body


def test_a_checkpoint_card_names_its_round_and_a_custom_model(tmp_path: Path) -> None:
    text = model_card(
        summary(model="Qwen/Qwen2.5-0.5B", task="causal-lm", **{"secure-aggregation": True}),
        history()[:2],
        audit_head=None,
        server_round=1,
    )
    card = load(text, tmp_path)
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B"
    assert card.data.license == "other"
    assert "secure-aggregation" in (card.data.tags or [])
    assert "checkpoint after round 1" in card.text
    assert "1 of 2 server rounds" in card.text
    assert "Secure aggregation: on" in card.text
    assert "| `secagg-num-shares` | 3 |" in card.text
    assert "Differential privacy: off" in card.text
    assert "not recorded" in card.text


def test_a_card_without_server_evaluation_says_so(tmp_path: Path) -> None:
    rounds = [{k: v for k, v in e.items() if k != "server-eval"} for e in history()[1:]]
    card = load(model_card(summary(), rounds, audit_head=AUDIT_HEAD), tmp_path)
    assert "No server-side evaluation" in card.text


def adapter(value: float) -> dict[str, torch.Tensor]:
    return {"base_model.model.q.lora_A.weight": torch.full((2, 4), value)}


def test_a_checkpoint_with_a_card_still_verifies_and_a_changed_card_is_only_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path, adapter_config_for("tiny", 2, 4, ["q"]))
    card = model_card(summary(), history()[:2], audit_head=AUDIT_HEAD, server_round=1)
    path = store.save(1, adapter(1.0), {"history": ["one"]}, card=card)
    assert (path / CARD_FILE).read_text() == card
    assert "model-card-sha256" in json.loads((path / STATE_FILE).read_text())
    assert store.load(1).state["history"] == ["one"]

    (path / CARD_FILE).write_text(card + "edited\n")
    with caplog.at_level(logging.WARNING):
        latest = store.latest_valid()
    assert latest is not None and latest.server_round == 1
    assert "does not match the digest" in caplog.text


@pytest.mark.usefixtures("flower_task_identity")
def test_a_resumed_run_writes_cards_that_load_and_still_verifies(tmp_path: Path) -> None:
    run_config = tiny_run_config(save_tiny_bert(tmp_path / "tiny-bert"))
    out = tmp_path / "run"
    out.mkdir()
    run(out, ThreadGrid({1: train, 2: train}, run_config), 1, run_config)
    first_card = ModelCard.load(out / "final" / CARD_FILE)
    assert first_card.data.library_name == "peft"
    run(out, ThreadGrid({1: train, 2: train}, run_config), 2, run_config, resume=True)

    audit = verify_run(out)  # chain, checkpoints (with their cards) and final/ agree
    assert (audit.rounds, audit.resumes, audit.checkpoints) == (2, 1, [1, 2])
    final = ModelCard.load(out / "final" / CARD_FILE)
    assert final.data.library_name == "peft"
    assert f"`{audit.head}`" in final.text  # the head `audit verify` prints
    assert "| 2 | 2 | 2 | 0 | 0 |" in final.text
    for server_round in (1, 2):
        folder = out / "checkpoints" / f"round-{server_round:04d}"
        card = ModelCard.load(folder / CARD_FILE)
        assert f"checkpoint after round {server_round}" in card.text
    store = CheckpointStore(out, {})
    latest = store.latest_valid()
    assert latest is not None and latest.server_round == 2
