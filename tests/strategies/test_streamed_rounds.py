"""FedRobustMerge streams a round when it can: replies folded in as they arrive and dropped,
the same global in any arrival order, screens and diagnostics kept (issue 15)."""

from __future__ import annotations

import gc
import random
import weakref
from collections.abc import Iterator

import pytest
import torch
from flwr.app import Message

from strategies import FedRobustMerge
from strategies.merging import create_method
from strategies.merging.rounds import merge_round
from strategies.robust import RobustSettings
from tests.strategies.test_fed_robustmerge import (
    as_tensors,
    make_global,
    reply,
    start_round,
    trained,
)

NORM_SCREEN = RobustSettings("norm")  # the streamed norm screen ("auto" picks centered clipping)

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def replies_for(
    base: dict[str, torch.Tensor],
    server_round: int,
    nodes: range,
    boost: dict[int, float] | None = None,
) -> list[Message]:
    """Honest replies of ``nodes`` (num-examples = node id), some updates scaled by ``boost``."""
    out = []
    for node in nodes:
        client = trained(base, 1000 * server_round + node)
        factor = (boost or {}).get(node, 1.0)
        out.append(reply(node, {k: base[k] + factor * (client[k] - base[k]) for k in base}, node))
    return out


def warmed(strategy: FedRobustMerge, nodes: range, streams: bool = True) -> dict[str, torch.Tensor]:
    """Round 1 (no history yet: buffered up to the first-round pool, streamed after it when
    the method ``streams``); returns the global after it."""
    base = make_global()
    start_round(strategy, base, nodes=len(nodes), server_round=1)
    record, _ = strategy.aggregate_train(1, replies_for(base, 1, nodes))
    assert strategy.round_report(1).streamed == (
        streams and len(nodes) > strategy.settings.robust.pool
    )
    return as_tensors(record)


def test_round_two_streams_once_the_screen_has_a_history() -> None:
    strategy = FedRobustMerge(robust=NORM_SCREEN, device="cpu", server_lr=1.0)
    base = warmed(strategy, range(1, 5))
    start_round(strategy, base, nodes=4, server_round=2)
    record, metrics = strategy.aggregate_train(2, iter(replies_for(base, 2, range(1, 5))))
    report = strategy.round_report(2)
    assert report.streamed and report.to_json()["streamed"] is True
    assert report.accepted_nodes == [1, 2, 3, 4]
    assert report.norm_bound is not None and report.norm_bound.pool == 4  # round 1's norms
    assert record is not None and metrics is not None
    assert int(metrics["num-examples"]) == 1 + 2 + 3 + 4


def test_without_a_screen_the_first_round_streams_too() -> None:
    strategy = FedRobustMerge(
        device="cpu", robust=RobustSettings(aggregation="none"), server_lr=1.0
    )
    base = make_global()
    start_round(strategy, base, nodes=3)
    strategy.aggregate_train(1, replies_for(base, 1, range(1, 4)))
    assert strategy.round_report(1).streamed


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("method", ["robustmerge", "fedavg", "ties"])
def test_streamed_round_equals_the_batch_merge(method: str, weighted: bool) -> None:
    strategy = FedRobustMerge(
        robust=NORM_SCREEN,
        device="cpu",
        merge_method=method,
        weight_by_examples=weighted,
        server_lr=0.7,
    )
    base = warmed(strategy, range(1, 6))
    start_round(strategy, base, nodes=5, server_round=2)
    replies = replies_for(base, 2, range(1, 6))
    record, _ = strategy.aggregate_train(2, iter(replies))
    assert strategy.round_report(2).streamed
    clients = [
        {k: v.float() for k, v in m.content["arrays"].to_torch_state_dict().items()}
        for m in replies
    ]
    weights = [float(n) for n in range(1, 6)] if strategy.settings.weight_by_examples else None
    merge = create_method(method, **strategy.settings.hyperparameters).round_form()
    expected = merge_round(base, clients, merge, weights, server_lr=0.7).tensors
    got = as_tensors(record)
    for key in base:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_any_arrival_order_gives_the_same_global_and_history_bit_for_bit() -> None:
    results = []
    for seed in range(4):
        strategy = FedRobustMerge(
            robust=NORM_SCREEN, device="cpu", weight_by_examples=True, server_lr=1.0
        )
        base = warmed(strategy, range(1, 9))
        start_round(strategy, base, nodes=8, server_round=2)
        replies = replies_for(base, 2, range(1, 9))
        random.Random(seed).shuffle(replies)
        record, _ = strategy.aggregate_train(2, iter(replies))
        report = strategy.round_report(2)
        assert report.streamed
        results.append(
            (as_tensors(record), report.accepted_nodes, list(strategy.stages.norm_history))
        )
    first, nodes, history = results[0]
    for other, other_nodes, other_history in results[1:]:
        assert all(torch.equal(first[k], other[k]) for k in first)
        assert other_nodes == nodes and other_history == history


class LiveReplies:
    """Replies made only when asked for; counts how many are still alive (not collected)."""

    def __init__(self, base: dict[str, torch.Tensor], server_round: int, count: int) -> None:
        self.base = base
        self.server_round = server_round
        self.count = count
        self.alive = 0
        self.most_alive = 0

    def _gone(self) -> None:
        self.alive -= 1

    def __iter__(self) -> Iterator[Message]:
        for node in range(1, self.count + 1):
            gc.collect()
            (message,) = replies_for(self.base, self.server_round, range(node, node + 1))
            weakref.finalize(message.content["arrays"], self._gone)
            self.alive += 1
            self.most_alive = max(self.most_alive, self.alive)
            yield message
            del message


def test_a_streamed_round_holds_one_reply_at_a_time_and_a_buffered_one_all() -> None:
    # A first-round pool larger than the round: round 1 buffers (tests/strategies/
    # test_round1_pool.py covers the default pool of 8).
    strategy = FedRobustMerge(device="cpu", robust=RobustSettings("norm", pool=16), server_lr=1.0)
    base = make_global()
    start_round(strategy, base, nodes=12)
    buffered = LiveReplies(base, 1, 12)
    record, _ = strategy.aggregate_train(1, buffered)
    assert not strategy.round_report(1).streamed
    assert buffered.most_alive == 12
    base = as_tensors(record)
    start_round(strategy, base, nodes=12, server_round=2)
    streamed = LiveReplies(base, 2, 12)
    strategy.aggregate_train(2, streamed)
    assert strategy.round_report(2).streamed
    assert streamed.most_alive <= 2  # the one being folded, and the next being made
    gc.collect()
    assert streamed.alive == 0


def test_the_screen_rejects_an_outsized_update_against_earlier_rounds_norms() -> None:
    strategy = FedRobustMerge(robust=NORM_SCREEN, device="cpu", server_lr=1.0)
    base = warmed(strategy, range(1, 5))
    start_round(strategy, base, nodes=4, server_round=2)
    strategy.aggregate_train(2, iter(replies_for(base, 2, range(1, 5), boost={3: 1000.0})))
    report = strategy.round_report(2)
    assert report.streamed
    assert report.screened == [3] and report.accepted_nodes == [1, 2, 4]
    assert "earlier rounds'" in report.rejected[3]


def test_clip_mode_scales_an_outsized_update_to_the_bound_in_a_streamed_round() -> None:
    strategy = FedRobustMerge(device="cpu", robust=RobustSettings("norm", clip=True), server_lr=1.0)
    base = warmed(strategy, range(1, 4))
    start_round(strategy, base, nodes=3, server_round=2)
    replies = replies_for(base, 2, range(1, 4), boost={2: 50.0})
    record, _ = strategy.aggregate_train(2, iter(replies))
    report = strategy.round_report(2)
    assert report.streamed and report.clipped == [2] and report.accepted_nodes == [1, 2, 3]
    assert report.norm_bound is not None
    clients = []
    for message in replies:
        tensors = {k: v.float() for k, v in message.content["arrays"].to_torch_state_dict().items()}
        norm = report.update_norms[message.metadata.src_node_id]
        factor = min(1.0, report.norm_bound.bound / norm)
        clients.append({k: base[k] + factor * (tensors[k] - base[k]) for k in base})
    expected = merge_round(
        base, clients, create_method("robustmerge").round_form(), server_lr=1.0
    ).tensors
    got = as_tensors(record)
    for key in base:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_a_second_reply_from_one_node_is_rejected_and_the_first_kept() -> None:
    strategy = FedRobustMerge(robust=NORM_SCREEN, device="cpu", server_lr=1.0)
    base = warmed(strategy, range(1, 4))
    start_round(strategy, base, nodes=3, server_round=2)
    replies = replies_for(base, 2, range(1, 4))
    strategy.aggregate_train(2, iter([*replies, replies_for(base, 3, range(2, 3))[0]]))
    report = strategy.round_report(2)
    assert report.streamed and report.accepted_nodes == [1, 2, 3]
    assert "second reply" in report.rejected[2]


@pytest.mark.parametrize("options", [{}, {"merge_method": "svd"}], ids=["streamed", "buffered"])
def test_diagnostics_score_a_seeded_sample_of_eight_whatever_the_order(
    options: dict[str, object],
) -> None:
    """Streamed and buffered rounds alike: scoring every client would hold ~16 x T x one
    module in float64 at merge time, so at most 8 are scored, picked by node, not order."""
    picks = []
    for seed in range(2):
        strategy = FedRobustMerge(
            device="cpu",
            server_lr=1.0,
            robust=NORM_SCREEN,
            **options,  # type: ignore[arg-type]
        )
        base = warmed(strategy, range(1, 13), streams=not options)
        start_round(strategy, base, nodes=12, server_round=2)
        replies = replies_for(base, 2, range(1, 13))
        random.Random(seed).shuffle(replies)
        strategy.aggregate_train(2, iter(replies))
        report = strategy.round_report(2)
        assert report.streamed == (not options) and report.factorwise_gap is not None
        picks.append(sorted(report.direction_scores))
    assert len(picks[0]) == 8 and picks[0] == picks[1]


def test_too_few_streamed_replies_skip_the_round() -> None:
    strategy = FedRobustMerge(robust=NORM_SCREEN, device="cpu", min_merge_replies=3, server_lr=1.0)
    base = warmed(strategy, range(1, 4))
    start_round(strategy, base, nodes=3, server_round=2)
    record, _ = strategy.aggregate_train(2, iter(replies_for(base, 2, range(1, 3))))
    assert record is None and strategy.round_report(2).skipped


@pytest.mark.parametrize(
    "options",
    [
        {"robust": RobustSettings(aggregation="krum", krum_malicious=1)},
        {"merge_method": "svd"},
    ],
)
def test_stages_and_methods_that_need_every_reply_buffer(options: dict[str, object]) -> None:
    strategy = FedRobustMerge(device="cpu", **options)  # type: ignore[arg-type]
    base = warmed(strategy, range(1, 6))
    start_round(strategy, base, nodes=5, server_round=2)
    strategy.aggregate_train(2, iter(replies_for(base, 2, range(1, 6))))
    assert not strategy.round_report(2).streamed


def test_the_new_global_does_not_wait_for_the_diagnostics() -> None:
    """A streamed round returns the new global after the division and the server step; the
    direction diagnostics run once, when the report is first asked for."""
    strategy = FedRobustMerge(robust=NORM_SCREEN, device="cpu", server_lr=1.0)
    base = warmed(strategy, range(1, 4))
    start_round(strategy, base, nodes=3, server_round=2)
    strategy.aggregate_train(2, iter(replies_for(base, 2, range(1, 4))))
    assert strategy.round is not None
    assert strategy.round.report.direction_scores == {}
    assert strategy.round.report.factorwise_gap is None
    report = strategy.round_report(2)
    assert sorted(report.direction_scores) == [1, 2, 3] and report.factorwise_gap is not None
    assert strategy.round_report(2).direction_scores == report.direction_scores
