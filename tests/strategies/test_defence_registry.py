"""Robust defences are registered ``Stage``s that declare what they do (issue 24, item 4), and the
round runs what the defence declares, never its name: docs/development.md, "Add a robust
defence"."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from server.config import ConfigError, ServerSettings
from strategies.combinations import robust_refusal
from strategies.fed_robustmerge import FedRobustMerge
from strategies.robust import (
    Deltas,
    Rewrite,
    Rewrites,
    RobustSettings,
    Stage,
    available_defences,
    get_defence,
    register_defence,
)
from strategies.robust.stage import _DEFENCES
from tests.strategies.test_fed_robustmerge import make_global, reply, start_round, trained

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class _Halve(Stage):
    """A rewrite from the test file alone: every client's delta scaled by 0.5, after the norm
    screen."""

    rewrites_coordinates = True

    def rewrite(self, deltas: Deltas, settings: RobustSettings) -> Rewrites:
        return Rewrites((Rewrite(scale=0.5),) * deltas.count, 1.0)

    def clause(self, settings: RobustSettings) -> str:
        return "every delta halved"


class _DropLargest(Stage):
    """A selection from the test file alone, with no norm screen: the largest update leaves."""

    screens = False
    selects = True

    def select(self, deltas: Deltas, settings: RobustSettings) -> list[int]:
        squared = sum(
            piece.flatten(1).square().sum(dim=1)
            for key in deltas.keys
            for piece in deltas.stacks(key)
        )
        assert isinstance(squared, torch.Tensor)
        largest = int(squared.argmax())
        return [position for position in range(deltas.count) if position != largest]

    def dropped_reason(self, kept: int, total: int) -> str:
        return f"the largest of {total} updates"


@pytest.fixture
def halve() -> Iterator[str]:
    name = "test-halve"
    register_defence(name)(_Halve)
    try:
        yield name
    finally:
        _DEFENCES.pop(name, None)


@pytest.fixture
def drop_largest() -> Iterator[str]:
    name = "test-drop-largest"
    register_defence(name)(_DropLargest)
    try:
        yield name
    finally:
        _DEFENCES.pop(name, None)


def test_recipe_a_defence_registered_from_a_test_file_rewrites_a_real_round(halve: str) -> None:
    """Registered here, nowhere else, its rewrite reaches the merge: FedAvg of the halved
    deltas is half the mean delta, and the report takes its clamped fraction."""
    base = make_global()
    strategy = FedRobustMerge(
        device="cpu", merge_method="fedavg", robust=RobustSettings(halve), server_lr=1.0
    )
    start_round(strategy, base)
    clients = [trained(base, seed) for seed in (1, 2, 3)]
    record, metrics = strategy.aggregate_train(
        1, [reply(node, tensors) for node, tensors in enumerate(clients, start=1)]
    )
    assert record is not None and metrics is not None
    merged = record.to_torch_state_dict()
    for key, value in base.items():
        mean_delta = sum(client[key] - value for client in clients) / len(clients)
        torch.testing.assert_close(merged[key], value + 0.5 * mean_delta, rtol=1e-5, atol=1e-6)
    assert metrics["robust-clamped-fraction"] == 1.0
    report = strategy.round_report(1)
    assert report.accepted_nodes == [1, 2, 3] and report.norm_bound is not None  # it screens
    assert strategy.settings.robust.describe() == (
        "test-halve: norm screen 10 x median, reject; every delta halved"
    )


def test_a_registered_selection_runs_by_its_declaration(drop_largest: str) -> None:
    base = make_global()
    strategy = FedRobustMerge(
        device="cpu", merge_method="fedavg", robust=RobustSettings(drop_largest), server_lr=1.0
    )
    start_round(strategy, base)
    clients = [trained(base, seed) for seed in (1, 2)]
    big = {key: base[key] + 3.0 * (clients[0][key] - base[key]) for key in base}
    record, metrics = strategy.aggregate_train(
        1, [reply(1, clients[0]), reply(2, big), reply(3, clients[1])]
    )
    assert record is not None and metrics is not None
    report = strategy.round_report(1)
    assert report.accepted_nodes == [1, 3]
    assert report.rejected == {2: "the largest of 3 updates"}
    assert report.norm_bound is None and "robust-screened" not in metrics  # no screen declared
    assert metrics["robust-krum-dropped"] == 1
    merged = record.to_torch_state_dict()
    for key, value in base.items():
        mean_delta = sum(client[key] - value for client in clients) / len(clients)
        torch.testing.assert_close(merged[key], value + mean_delta, rtol=1e-5, atol=1e-6)


def test_the_run_config_and_the_refusals_follow_the_declaration(halve: str) -> None:
    settings = ServerSettings.from_run_config({"robust-aggregation": halve})
    assert settings.robust.defence is get_defence(halve)
    refusal = robust_refusal(settings.robust, "sparse")
    assert refusal is not None and f"robust-aggregation {halve!r} rewrites" in refusal


def test_a_second_registration_of_a_name_is_refused(halve: str) -> None:
    with pytest.raises(ValueError, match="robust defence 'test-halve' is already registered"):
        register_defence(halve)(_DropLargest)
    with pytest.raises(ValueError, match="'krum' is already registered"):
        register_defence("krum")(_Halve)
    assert isinstance(get_defence(halve), _Halve)


def test_an_unknown_name_is_refused_with_the_registered_names(halve: str) -> None:
    known = "auto, norm, none, krum, trimmed-mean, median, centered-clip, test-halve"
    with pytest.raises(ValueError) as refused:
        RobustSettings("bulyan")
    assert str(refused.value) == f"robust-aggregation must be one of {known}; got 'bulyan'"
    with pytest.raises(ConfigError, match=f"one of {known}"):
        ServerSettings.from_run_config({"robust-aggregation": "bulyan"})
    with pytest.raises(ValueError, match="unknown robust defence 'bulyan'; known: norm, none"):
        get_defence("bulyan")


def test_every_built_in_declares_what_it_does() -> None:
    assert available_defences()[:6] == (
        "norm",
        "none",
        "krum",
        "trimmed-mean",
        "median",
        "centered-clip",
    )
    declared = {
        name: (
            get_defence(name).screens,
            get_defence(name).selects,
            get_defence(name).rewrites_coordinates,
            get_defence(name).clips_to_center,
        )
        for name in available_defences()[:6]
    }
    assert declared == {
        "norm": (True, False, False, False),
        "none": (False, False, False, False),
        "krum": (True, True, False, False),
        "trimmed-mean": (True, False, True, False),
        "median": (True, False, True, False),
        "centered-clip": (True, False, True, True),
    }
    lines = {name: RobustSettings(name).describe() for name in available_defences()[:6]}
    assert lines == {
        "norm": "norm: norm screen 10 x median, reject",
        "none": "none (no norm screen, no robust stage)",
        "krum": "krum: norm screen 10 x median, reject; multi-Krum f=1 m=T - f",
        "trimmed-mean": "trimmed-mean: norm screen 10 x median, reject; "
        "coordinate-wise clamp (trim 0.25)",
        "median": "median: norm screen 10 x median, reject; coordinate-wise clamp (median)",
        "centered-clip": "centered-clip: norm screen 10 x median, reject; "
        "centered clip (2 x median distance to the median)",
    }
    assert RobustSettings("median").trim_fraction_or_median is None
    assert RobustSettings("trimmed-mean", trim_fraction=0.1).trim_fraction_or_median == 0.1
    assert get_defence("krum").dropped_reason(3, 4) == (
        "multi-Krum kept the 3 of 4 updates closest to the others (robust-aggregation 'krum')"
    )
