"""Refused combinations of round settings: each refusal names the keys and what to set."""

from __future__ import annotations

import pytest

from server.config import ConfigError, ServerSettings
from strategies.combinations import combination_refusal, round_method
from strategies.merging import available_methods

REFUSED = [
    ({"merge-method": "task_arithmetic"}, "Use merge-method 'fedavg'"),
    ({"merge-method": "fedavg", "merge-mode": "paper-equation"}, "is a form of RobustMerge"),
    ({"uplink": "sparse", "merge-method": "svd"}, "needs merge-method 'robustmerge'"),
    ({"uplink": "sparse", "merge-target": "adapter"}, "merge-target 'delta'"),
    ({"uplink": "sparse", "merge-mode": "paper-equation"}, "whole A_t"),
    ({"uplink": "sparse", "dp": "server-clipping"}, "needs uplink = 'dense'"),
]


@pytest.mark.parametrize(("overrides", "reason"), REFUSED)
def test_meaningless_combinations_are_refused_at_start_up(
    overrides: dict[str, str], reason: str
) -> None:
    with pytest.raises(ConfigError, match=reason):
        ServerSettings.from_run_config({"merge-device": "cpu", **overrides})


@pytest.mark.parametrize("method", sorted(set(available_methods()) - {"task_arithmetic"}))
@pytest.mark.parametrize("target", ["delta", "adapter"])
def test_every_round_method_runs_with_either_target(method: str, target: str) -> None:
    assert combination_refusal(method, "paper-exact", target, "dense") is None
    settings = ServerSettings.from_run_config(
        {"merge-method": method, "merge-target": target, "merge-device": "cpu"}
    )
    assert settings.merge_method == method


def test_round_method_keeps_the_one_shot_sum_only_for_paper_exact_adapters() -> None:
    adapter = round_method("robustmerge", "adapter", {"mode": "paper-exact"})
    delta = round_method("robustmerge", "delta", {"mode": "paper-exact"})
    equation = round_method("robustmerge", "adapter", {"mode": "paper-equation"})
    assert adapter.describe()["form"] == "one-shot"
    assert delta.describe()["form"] == "round"
    assert equation.describe()["form"] == "round"
    assert round_method("dare", "adapter", {}).describe()["form"] == "round"
