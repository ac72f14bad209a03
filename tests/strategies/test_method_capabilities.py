"""What a merge method can do is declared on the method (issue 24, item 3), and the strategy
reads the declaration instead of the method's name."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import pytest
import torch
from flwr.server.workflow import SecAggPlusWorkflow

from server.config import ConfigError, ServerSettings
from server.privacy import robustmerge_sensitivity_factor, wrap_with_privacy
from server.secure_aggregation import check_secure_aggregation
from strategies.cli_merge_messages import warn_shared_initialisation
from strategies.combinations import combination_refusal, round_method
from strategies.fed_robustmerge import FedRobustMerge
from strategies.merging import available_methods, create_method
from strategies.merging.fedavg import FedAvg
from strategies.merging.method import MergeMethod, RoundFormError
from strategies.merging.registry import _REGISTRY, method_class, register_method
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


# Issue 24, the other sites: what SecAgg+, the sparse uplink, rounds on whole adapters, the CLI's
# shared-A warning, DP's sensitivity and the run config ask of a method is its declaration.


def _declaring(declaration: str) -> set[str]:
    return {name for name in available_methods() if getattr(create_method(name), declaration)()}


def test_only_paper_exact_robustmerge_sums_client_terms_prunes_on_client_and_keeps_one_shot() -> (
    None
):
    for declaration in ("sums_client_terms", "prunes_on_client", "keeps_one_shot_on_adapters"):
        assert _declaring(declaration) == {"robustmerge"}, declaration
        equation = create_method("robustmerge", mode="paper-equation")
        assert not getattr(equation, declaration)(), declaration
        assert getattr(create_method("robustmerge").round_form(), declaration)(), declaration


def test_the_one_shot_sums_of_a_declare_it_and_no_round_form_does() -> None:
    assert _declaring("sums_scaled_a") == {"task_arithmetic", "dare", "robustmerge"}
    assert not create_method("robustmerge", mode="paper-equation").sums_scaled_a()
    assert not any(create_method(name).round_form().sums_scaled_a() for name in _round_capable())


def test_only_fedavg_and_paper_exact_robustmerge_bound_the_dp_sensitivity() -> None:
    factors = {
        name: create_method(name).dp_sensitivity_factor(0.5, 4, 4) for name in available_methods()
    }
    # eta lambda m sqrt(1 + (1 + sqrt(r))^2) with eta 0.5, lambda 2 (the default), m 4, r 4
    assert factors.pop("robustmerge") == pytest.approx(0.5 * 2.0 * 4 * 10**0.5)
    assert factors.pop("fedavg") == 1.0
    assert set(factors.values()) == {None}
    equation = create_method("robustmerge", mode="paper-equation", fuse_weight=(1.0, -3.0))
    assert equation.dp_sensitivity_factor(0.5, 4, 4) is None
    # per-adapter fuse weights: the largest one's magnitude, as before the declaration
    per_adapter = create_method("robustmerge", fuse_weight=(1.0, 3.0))
    assert per_adapter.dp_sensitivity_factor(1.0, 2, 1) == pytest.approx(3.0 * 2 * 5**0.5)
    assert create_method("robustmerge").dp_sensitivity_factor(1e-6, 1, 1) == 1.0  # at least 1


def test_only_dare_takes_a_run_config_option() -> None:
    declared = {name: method_class(name).run_config_options() for name in available_methods()}
    assert {name: keys for name, keys in declared.items() if keys} == {
        "dare": {"dare-drop-rate": "drop_rate"}
    }


@contextmanager
def _registered(cls: type[MergeMethod]) -> Iterator[str]:
    name = f"test-{cls.__name__.strip('_').lower()}"
    register_method(name)(cls)
    try:
        yield name
    finally:
        _REGISTRY.pop(name, None)


class _Pruning(FedAvg):
    """Declares that clients can prune for it (the sparse uplink), nothing else."""

    def prunes_on_client(self) -> bool:
        return True


def test_the_sparse_uplink_follows_prunes_on_client_not_the_name(equal_mean: str) -> None:
    with _registered(_Pruning) as pruning:
        assert combination_refusal(pruning, "paper-exact", "delta", "sparse") is None
        refusal = combination_refusal(pruning, "paper-exact", "adapter", "sparse")
        assert refusal is not None and "merge-target 'delta'" in refusal
    refusal = combination_refusal(equal_mean, "paper-exact", "delta", "sparse")
    assert refusal is not None and f"got {equal_mean!r} and 'delta'" in refusal


class _Summed(FedAvg):
    """Declares a round merge of summed per-client terms (SecAgg+), nothing else."""

    def sums_client_terms(self) -> bool:
        return True


def test_secure_aggregation_follows_sums_client_terms_not_the_name(equal_mean: str) -> None:
    with _registered(_Summed) as summed:
        settings = ServerSettings.from_run_config(
            {"secure-aggregation": True, "merge-method": summed}
        )
        assert isinstance(check_secure_aggregation(settings), SecAggPlusWorkflow)
    refused = ServerSettings.from_run_config(
        {"secure-aggregation": True, "merge-method": equal_mean}
    )
    with pytest.raises(ConfigError, match=f"'merge-method', which is {equal_mean!r}"):
        check_secure_aggregation(refused)


class _Formed(FedAvg):
    """FedAvg with a form, whose round form is a different object (form "round")."""

    keeps = False

    def __init__(self, form: str = "one-shot") -> None:
        self.form = form

    def round_form(self) -> _Formed:
        return type(self)(form="round")

    def keeps_one_shot_on_adapters(self) -> bool:
        return self.keeps


class _KeepsOneShot(_Formed):
    keeps = True


def test_rounds_on_adapters_keep_the_one_shot_form_when_the_method_says_so() -> None:
    with _registered(_Formed) as formed, _registered(_KeepsOneShot) as keeping:
        forms = [
            round_method(keeping, "adapter", {}),
            round_method(keeping, "delta", {}),
            round_method(formed, "adapter", {}),
        ]
        assert [m.form if isinstance(m, _Formed) else m for m in forms] == [
            "one-shot",
            "round",
            "round",
        ]


class _SummedA(FedAvg):
    """Describes a fuse weight and declares a one-shot sum of lambda A (the CLI's warning)."""

    summing = True

    def sums_scaled_a(self) -> bool:
        return self.summing

    def describe(self) -> dict[str, object]:
        return {"method": "test-summed-a", "fuse_weight": 2.0}


class _AveragedA(_SummedA):
    summing = False


def test_the_cli_warns_of_a_shared_a_when_the_method_sums_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    shared = [make_global(), make_global()]  # one A: cosine 1
    warn_shared_initialisation(shared, _AveragedA())
    assert capsys.readouterr().err == ""
    warn_shared_initialisation(shared, _SummedA())
    assert "A factors are nearly the same" in capsys.readouterr().err


class _Bounded(FedAvg):
    """A mean whose declared DP sensitivity is 4 times a mean's (and no bound when off)."""

    factor: float | None = 4.0

    def dp_sensitivity_factor(self, server_lr: float, clients: int, rank: int) -> float | None:
        return self.factor


class _Unbounded(_Bounded):
    factor = None


def test_dp_accounts_with_the_methods_declared_sensitivity() -> None:
    with _registered(_Bounded) as bounded, _registered(_Unbounded) as unbounded:
        strategy = FedRobustMerge(device="cpu", merge_method=bounded)
        assert robustmerge_sensitivity_factor(strategy, 4, 8) == 4.0
        wrapped = wrap_with_privacy(
            strategy, "server-clipping", clipping_norm=1, noise_multiplier=2, num_sampled_clients=4
        )
        assert wrapped.ledger.effective_noise_multiplier == 0.5  # type: ignore[attr-defined]
        loose = wrap_with_privacy(
            FedRobustMerge(device="cpu", merge_method=unbounded),
            "server-clipping",
            clipping_norm=1,
            noise_multiplier=2,
            num_sampled_clients=4,
        )
        assert getattr(loose, "ledger", None) is None


class _Dropping(FedAvg):
    """A mean that takes a drop rate, fed by run config ``dare-drop-rate`` when declared."""

    declared: ClassVar[dict[str, str]] = {"dare-drop-rate": "drop_rate"}

    def __init__(self, drop_rate: float = 0.0) -> None:
        self.drop_rate = drop_rate

    @classmethod
    def run_config_options(cls) -> dict[str, str]:
        return dict(cls.declared)


class _Undeclared(_Dropping):
    declared: ClassVar[dict[str, str]] = {}


def test_run_config_options_reach_the_method_when_declared() -> None:
    with _registered(_Dropping) as dropping, _registered(_Undeclared) as undeclared:
        settings = ServerSettings.from_run_config({"merge-method": dropping, "dare-drop-rate": 0.3})
        assert settings.merge_options() == {"drop_rate": 0.3}
        strategy = FedRobustMerge(
            device="cpu", merge_method=dropping, merge_options=settings.merge_options()
        )
        method = strategy.settings.method
        assert isinstance(method, _Dropping) and method.drop_rate == 0.3
        quiet = ServerSettings.from_run_config({"merge-method": undeclared, "dare-drop-rate": 0.3})
        assert quiet.merge_options() == {}
