"""The defaults check (benchmarks.defaults_check): the app's run read from the schema, the server
lrs it tries, and its table."""

from __future__ import annotations

from benchmarks.defaults_check import app_config, candidate_lrs, markdown
from workload.config import SCHEMA


def test_app_config_is_the_schemas_default_run() -> None:
    config = app_config(dev_examples=10, eval_examples=20)
    assert ",".join(config.seen) == SCHEMA["seen-tasks"].default
    assert ",".join(config.unseen) == SCHEMA["unseen-tasks"].default
    assert config.train_examples == SCHEMA["train-examples"].default
    assert config.batch_size == SCHEMA["batch-size"].default
    assert config.learning_rate == SCHEMA["learning-rate"].default
    assert (config.dev_examples, config.eval_examples) == (10, 20)


def test_candidate_lrs_by_hand() -> None:
    assert candidate_lrs(16.0) == [1.0, 4.0, 16.0]
    assert candidate_lrs(8.0) == [1.0, 2.0, 8.0]
    assert candidate_lrs(2.0) == [1.0, 2.0]
    assert candidate_lrs(1.0) == [1.0]
    assert candidate_lrs(0.5) == [0.5, 1.0]


def test_markdown_lists_every_lr_and_round() -> None:
    out = {
        "winner": {"row": "fedavg (FedIT)", "dev": 0.6, "chosen": {"server_lr": 4.0}},
        "config": {
            "seen": ["a", "b"],
            "unseen": ["u"],
            "train_examples": 512,
            "batch_size": 32,
            "learning_rate": 0.0005,
            "rounds": 2,
            "dev_examples": 10,
            "eval_examples": 20,
            "seed": 0,
        },
        "machine": "test",
        "date": "today",
        "runs": {
            "1": {"dev_curve": [{"seen-avg": 0.5}, {"seen-avg": 0.55}], "unseen_test": {"u": 0.7}},
            "4": {"dev_curve": [{"seen-avg": 0.6}, {"seen-avg": 0.4}], "unseen_test": {"u": 0.6}},
        },
    }
    text = markdown(out)
    assert "fedavg (FedIT) at server_lr 4" in text
    assert "| 1 | 50.0 | 55.0 | 70.0 |" in text
    assert "| 4 | 60.0 | 40.0 | 60.0 |" in text
    assert "| server lr | round 1 seen dev | round 2 seen dev | unseen test |" in text
