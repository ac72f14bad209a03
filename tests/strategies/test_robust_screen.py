"""FedRobustMerge's robust stages on mock replies: the default norm screen at T = 1, 2 and 8, clip
mode, its history across rounds (and a restored one), multi-Krum, the coordinate-wise stages, and
every merge method with every option."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from strategies import FedRobustMerge, available_methods
from strategies.robust import ROBUST_AGGREGATIONS, RobustSettings
from tests.strategies.test_fed_robustmerge import (
    A0,
    FakeGrid,
    as_tensors,
    expected_global,
    make_global,
    reply,
    trained,
)
from tests.strategies.test_sparse_uplink import client_wire, sparse_reply

pytestmark = pytest.mark.usefixtures("flower_task_identity")

Tensors = dict[str, torch.Tensor]
ROUND_METHODS = [m for m in available_methods() if m != "task_arithmetic"]


def begin(strategy: FedRobustMerge, base: Tensors, server_round: int = 1, nodes: int = 8) -> None:
    list(
        strategy.configure_train(
            server_round,
            ArrayRecord(dict(base)),
            ConfigRecord(),
            # at least the strategy's min-available-nodes (2), or sampling waits for more
            FakeGrid(list(range(1, max(nodes, 2) + 1))),  # type: ignore[arg-type]
        )
    )


def outsized(base: Tensors, client: Tensors, factor: float = 1e6) -> Tensors:
    """The client's update times ``factor``: finite, right keys and shapes."""
    return {k: base[k] + factor * (client[k] - base[k]) for k in base}


def distance(a: Tensors, b: Tensors) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).square().sum()) for k in a))


def run_round(
    strategy: FedRobustMerge, base: Tensors, clients: list[Tensors], server_round: int = 1
) -> tuple[Tensors, dict[str, object]]:
    begin(strategy, base, server_round, len(clients))
    arrays, metrics = strategy.aggregate_train(
        server_round, [reply(i + 1, c) for i, c in enumerate(clients)]
    )
    assert metrics is not None
    return (as_tensors(arrays) if arrays is not None else dict(base)), dict(metrics)


def moved_ratio(
    strategy: FedRobustMerge, base: Tensors, good: list[Tensors], bad: list[Tensors]
) -> float:
    """How far the global moves with the bad replies, against the good clients alone."""
    reference = FedRobustMerge(device="cpu", robust=RobustSettings("none"), server_lr=1.0)
    alone, _ = run_round(reference, base, good)
    attacked, _ = run_round(strategy, base, [*good, *bad])
    return distance(attacked, base) / distance(alone, base)


def test_without_a_screen_an_outsized_update_wrecks_the_global() -> None:
    """The issue's finding, kept as the contrast: with robust-aggregation 'none' a x1e6 update
    moves the global hundreds of thousands of times as far."""
    base = make_global()
    good = [trained(base, seed) for seed in (1, 2, 3)]
    strategy = FedRobustMerge(device="cpu", robust=RobustSettings("none"), server_lr=1.0)
    assert moved_ratio(strategy, base, good, [outsized(base, trained(base, 4))]) > 1e4


@pytest.mark.parametrize("honest", [1, 3, 7])
def test_default_screen_rejects_a_x1e6_update_at_two_four_and_eight(honest: int) -> None:
    base = make_global()
    good = [trained(base, seed) for seed in range(1, honest + 1)]
    bad = outsized(base, trained(base, 99))
    strategy = FedRobustMerge(device="cpu", server_lr=1.0)
    attacked, metrics = run_round(strategy, base, [*good, bad])
    assert metrics["robust-screened"] == 1 and metrics["clients-rejected"] == 1
    assert metrics["clients-accepted"] == honest
    assert "robust-norm-factor" in strategy.round_report().rejected[honest + 1]
    want = expected_global(base, good)
    torch.testing.assert_close(attacked[A0], want[A0], rtol=1e-6, atol=1e-7)
    # the done-criterion: no more than 10 times as far as the good clients alone
    assert moved_ratio(FedRobustMerge(device="cpu", server_lr=1.0), base, good, [bad]) <= 10.0


def test_t1_first_round_is_accepted_and_later_rounds_are_bounded_by_history() -> None:
    """T = 1: the first reply has nothing to compare with (accepted, norm recorded, no bound);
    from then on the history bounds a lone reply."""
    base = make_global()
    strategy = FedRobustMerge(device="cpu", server_lr=1.0)
    _, first = run_round(strategy, base, [trained(base, 1)])
    assert first["clients-accepted"] == 1 and "robust-norm-bound" not in first
    assert len(strategy.stages.norm_history) == 1
    _, second = run_round(strategy, base, [outsized(base, trained(base, 2))], server_round=2)
    assert second["robust-screened"] == 1 and second["round-skipped"] == 1
    assert second["robust-norm-bound"] == pytest.approx(10.0 * strategy.stages.norm_history[0])
    _, third = run_round(strategy, base, [trained(base, 3)], server_round=3)
    assert third["clients-accepted"] == 1 and len(strategy.stages.norm_history) == 2


def test_t2_first_round_judges_against_the_smaller_norm() -> None:
    base = make_global()
    honest = [trained(base, 1), trained(base, 2)]
    strategy = FedRobustMerge(device="cpu", server_lr=1.0)
    _, metrics = run_round(strategy, base, honest)
    assert metrics["clients-accepted"] == 2 and metrics["robust-screened"] == 0
    report = strategy.round_report()
    assert report is not None and report.norm_bound is not None
    assert report.norm_bound.reference == min(report.update_norms.values())


def test_t8_with_three_outsized_replies_is_still_bounded() -> None:
    base = make_global()
    good = [trained(base, seed) for seed in range(1, 6)]
    bad = [outsized(base, trained(base, seed), 1e3) for seed in (7, 8, 9)]
    strategy = FedRobustMerge(device="cpu", server_lr=1.0)
    _, metrics = run_round(strategy, base, [*good, *bad])
    assert metrics["robust-screened"] == 3 and metrics["clients-accepted"] == 5


def test_honest_clients_of_different_size_are_not_screened() -> None:
    """Every client a different task: norms a few times apart are within the default factor."""
    base = make_global()
    clients = [outsized(base, trained(base, s), f) for s, f in ((1, 1.0), (2, 3.0), (3, 0.4))]
    _, metrics = run_round(FedRobustMerge(device="cpu", server_lr=1.0), base, clients)
    assert metrics["robust-screened"] == 0 and metrics["clients-accepted"] == 3


@pytest.mark.parametrize("method", ROUND_METHODS)
def test_clip_mode_keeps_the_update_at_the_bound_for_every_method(method: str) -> None:
    base = make_global()
    good = [trained(base, seed) for seed in (1, 2, 3)]
    bad = outsized(base, trained(base, 4))
    strategy = FedRobustMerge(
        device="cpu", merge_method=method, robust=RobustSettings("norm", clip=True), server_lr=1.0
    )
    begin(strategy, base, 1, 4)
    _, metrics = strategy.aggregate_train(1, [reply(i + 1, c) for i, c in enumerate([*good, bad])])
    assert metrics is not None
    assert metrics["robust-clipped"] == 1 and metrics["robust-screened"] == 0
    assert metrics["clients-accepted"] == 4
    assert strategy.stages.norm_history[-1] <= metrics["robust-norm-bound"]  # recorded clipped
    reference = FedRobustMerge(
        device="cpu", merge_method=method, robust=RobustSettings("none"), server_lr=1.0
    )
    alone, _ = run_round(reference, base, good)
    clipped = FedRobustMerge(
        device="cpu", merge_method=method, robust=RobustSettings("norm", clip=True), server_lr=1.0
    )
    attacked, _ = run_round(clipped, base, [*good, bad])
    assert distance(attacked, base) <= 10.0 * distance(alone, base)


def test_clip_mode_at_t2_is_within_ten_times() -> None:
    base = make_global()
    good = [trained(base, 1)]
    bad = outsized(base, trained(base, 2))
    strategy = FedRobustMerge(device="cpu", robust=RobustSettings("norm", clip=True), server_lr=1.0)
    assert moved_ratio(strategy, base, good, [bad]) <= 10.0


def test_history_is_bounded_and_restored_bit_identically() -> None:
    base = make_global()
    settings = RobustSettings("norm", history=5)
    first = FedRobustMerge(device="cpu", robust=settings, server_lr=1.0)
    global_tensors = base
    for server_round in (1, 2):
        clients = [trained(global_tensors, 10 * server_round + s) for s in range(3)]
        global_tensors, _ = run_round(first, global_tensors, clients, server_round)
    assert len(first.stages.norm_history) == 5  # 6 accepted norms, the oldest dropped
    state = first.robust_state()
    resumed = FedRobustMerge(device="cpu", robust=settings, server_lr=1.0)
    resumed.restore_robust_state(state)
    assert list(resumed.stages.norm_history) == list(first.stages.norm_history)
    clients = [trained(global_tensors, 30 + s) for s in range(2)]
    clients.append(outsized(global_tensors, trained(global_tensors, 40), 50.0))
    want, want_metrics = run_round(first, global_tensors, clients, 3)
    got, got_metrics = run_round(resumed, global_tensors, clients, 3)
    assert got_metrics["robust-norm-bound"] == want_metrics["robust-norm-bound"]
    assert got_metrics["robust-screened"] == want_metrics["robust-screened"] == 1
    for key in want:
        assert torch.equal(got[key], want[key])
    assert list(resumed.stages.norm_history) == list(first.stages.norm_history)


def test_krum_drops_the_update_farthest_from_the_others() -> None:
    """An update of ordinary size pointing elsewhere passes the norm screen; multi-Krum drops
    it."""
    base = make_global()
    good = [trained(base, seed) for seed in range(1, 5)]
    far = {k: base[k] + 2.0 * (base[k] - good[0][k]) + 0.3 for k in base}
    strategy = FedRobustMerge(
        device="cpu", robust=RobustSettings("krum", krum_select=4), server_lr=1.0
    )
    attacked, metrics = run_round(strategy, base, [*good, far])
    assert metrics["robust-screened"] == 0 and metrics["robust-krum-dropped"] == 1
    assert "multi-Krum" in strategy.round_report().rejected[5]
    want = expected_global(base, good)
    torch.testing.assert_close(attacked[A0], want[A0], rtol=1e-6, atol=1e-7)


def test_median_option_with_fedavg_is_the_coordinate_wise_median() -> None:
    base = make_global()
    clients = [trained(base, seed) for seed in range(1, 6)]
    strategy = FedRobustMerge(
        device="cpu", merge_method="fedavg", robust=RobustSettings("median"), server_lr=1.0
    )
    got, metrics = run_round(strategy, base, clients)
    assert 0.0 < metrics["robust-clamped-fraction"] < 1.0
    for key in base:
        deltas = torch.stack([c[key] - base[key] for c in clients])
        torch.testing.assert_close(
            got[key], base[key] + deltas.median(dim=0).values, rtol=1e-5, atol=1e-6
        )


def test_trimmed_mean_option_clamps_a_coordinate_outlier_within_the_honest_range() -> None:
    base = make_global()
    good = [trained(base, seed) for seed in range(1, 4)]
    spiky = dict(trained(base, 4))
    spiky[A0] = spiky[A0].clone()
    spiky[A0][0, 0] += 5.0  # one coordinate far out; the norm stays ordinary
    strategy = FedRobustMerge(
        device="cpu", merge_method="fedavg", robust=RobustSettings("trimmed-mean"), server_lr=1.0
    )
    got, metrics = run_round(strategy, base, [*good, spiky])
    assert metrics["robust-screened"] == 0 and metrics["robust-clamped-fraction"] > 0
    honest = torch.stack([c[A0][0, 0] - base[A0][0, 0] for c in good])
    step = got[A0][0, 0] - base[A0][0, 0]
    assert float(honest.min()) - 1e-6 <= float(step) <= float(honest.max()) + 1e-6


@pytest.mark.parametrize("option", ROBUST_AGGREGATIONS)
@pytest.mark.parametrize("method", ROUND_METHODS)
def test_every_merge_method_composes_with_every_option(method: str, option: str) -> None:
    base = make_global()
    clients = [trained(base, seed) for seed in range(1, 6)]
    bad = outsized(base, trained(base, 9))
    strategy = FedRobustMerge(
        device="cpu", merge_method=method, robust=RobustSettings(option), server_lr=1.0
    )
    got, metrics = run_round(strategy, base, [*clients, bad])
    assert all(torch.isfinite(v).all() for v in got.values())
    if option == "none":
        return
    assert metrics["robust-screened"] == 1
    reference = FedRobustMerge(
        device="cpu", merge_method=method, robust=RobustSettings("none"), server_lr=1.0
    )
    alone, _ = run_round(reference, base, clients)
    assert distance(got, base) <= 10.0 * distance(alone, base)


def test_sparse_uplink_replies_are_screened() -> None:
    base = make_global()
    clients = [trained(base, seed) for seed in (1, 2, 3)]
    clients.append(outsized(base, trained(base, 4)))
    strategy = FedRobustMerge(device="cpu", uplink="sparse", server_lr=1.0)
    begin(strategy, base, 1, 4)
    _, metrics = strategy.aggregate_train(
        1, [sparse_reply(i + 1, client_wire(base, c)) for i, c in enumerate(clients)]
    )
    assert metrics is not None and metrics["robust-screened"] == 1
    assert metrics["clients-accepted"] == 3


def test_sparse_uplink_refuses_rewriting_options() -> None:
    for robust in (RobustSettings("norm", clip=True), RobustSettings("median")):
        with pytest.raises(ValueError, match="uplink 'sparse'"):
            FedRobustMerge(device="cpu", uplink="sparse", robust=robust, server_lr=1.0)
    FedRobustMerge(device="cpu", uplink="sparse", robust=RobustSettings("krum"), server_lr=1.0)
