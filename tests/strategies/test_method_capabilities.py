"""What a merge method can do is declared on the method (issue 24, item 3), and the strategy
reads the declaration instead of the method's name."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from strategies.fed_robustmerge import FedRobustMerge
from strategies.merging import available_methods, create_method
from strategies.merging.fedavg import FedAvg
from strategies.merging.method import RoundFormError
from strategies.merging.registry import _REGISTRY, register_method
from tests.strategies.test_fed_robustmerge import make_global, reply, start_round, trained


def _round_capable() -> list[str]:
    names = []
    for name in available_methods():
        try:
            create_method(name).round_form()
        except RoundFormError:
            continue
        names.append(name)
    return names


@pytest.mark.parametrize("name", _round_capable())
def test_the_strategy_weights_by_examples_exactly_when_the_method_says_so(name: str) -> None:
    method = create_method(name).round_form()
    strategy = FedRobustMerge(device="cpu", merge_method=name, weight_by_examples=False)
    assert strategy.settings.weight_by_examples is method.weights_by_examples()
    assert FedRobustMerge(
        device="cpu", merge_method=name, weight_by_examples=True
    ).settings.weight_by_examples


def test_the_means_declare_example_weighting_and_the_others_do_not() -> None:
    declared = {name for name in _round_capable() if create_method(name).weights_by_examples()}
    assert declared == {"fedavg", "svd", "exact-mean"}


class _EqualMean(FedAvg):
    """FedAvg's math without its example weighting: a method registered from a test file."""

    def weights_by_examples(self) -> bool:
        return False


@pytest.fixture
def equal_mean() -> Iterator[str]:
    name = "test-equal-mean"
    register_method(name)(_EqualMean)
    try:
        yield name
    finally:
        _REGISTRY.pop(name, None)


def test_a_new_method_is_weighted_by_its_own_declaration_not_its_name(equal_mean: str) -> None:
    strategy = FedRobustMerge(device="cpu", merge_method=equal_mean)
    assert not strategy.settings.weight_by_examples


@pytest.mark.usefixtures("flower_task_identity")
def test_recipe_a_method_registered_from_a_test_file_runs_a_real_round(equal_mean: str) -> None:
    """docs/development.md, "Add a merge method": registered here, nowhere else, it merges a
    round through the strategy: the equal-weight mean of the deltas, then the server step."""
    base = make_global()
    strategy = FedRobustMerge(device="cpu", merge_method=equal_mean, server_lr=0.5)
    start_round(strategy, base)
    first, second = trained(base, 1), trained(base, 2)
    record, metrics = strategy.aggregate_train(1, [reply(1, first, 10), reply(2, second, 90)])
    assert record is not None and metrics is not None
    merged = record.to_torch_state_dict()
    for key, value in base.items():
        mean_delta = ((first[key] - value) + (second[key] - value)) / 2
        torch.testing.assert_close(merged[key], value + 0.5 * mean_delta, rtol=1e-5, atol=1e-6)
    assert strategy.round_report(1).accepted_nodes == [1, 2]
