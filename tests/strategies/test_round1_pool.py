"""Round 1 streams after a pool (issue 25, item 1): with no screen history, the first
``robust-pool`` checked replies are held back, screened against their own median and folded;
every later reply streams against that pool's bound.

What is exact: the accepted set depends on the arrival order only through which replies formed
the pool; for the same accepted set the new global is the same bit for bit in any order (exact
sums), and equals the merge of those replies fed as a list.
"""

from __future__ import annotations

import gc
import random
import tracemalloc
from collections.abc import Iterator

import pytest
import torch
from flwr.app import Message

from strategies import FedRobustMerge
from strategies.merging import create_method
from strategies.merging.rounds import merge_round
from strategies.robust import DEFAULT_POOL, RobustSettings
from tests.strategies.test_fed_robustmerge import as_tensors, reply, start_round
from tests.strategies.test_streamed_memory import (
    ADAPTER_BYTES,
    global_adapter,
    live_tensor_bytes,
)
from tests.strategies.test_streamed_rounds import NORM_SCREEN, replies_for
from workload.config import SCHEMA

pytestmark = pytest.mark.usefixtures("flower_task_identity")

POOL_WORDS = "first 8 checked replies' pool"


def honest(base: dict[str, torch.Tensor], node: int, boost: float = 1.0) -> Message:
    generator = torch.Generator().manual_seed(node)
    change = {k: 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
    return reply(node, {k: base[k] + boost * change[k] for k in base}, 100)


def test_the_strategy_default_is_the_schema_default() -> None:
    assert RobustSettings().pool == DEFAULT_POOL == SCHEMA["robust-pool"].default == 8


def test_a_lazy_round_one_of_64_grows_memory_by_less_than_16_adapters() -> None:
    base = global_adapter()
    strategy = FedRobustMerge(
        robust=NORM_SCREEN, device="cpu", min_train_nodes=64, min_available_nodes=64
    )
    start_round(strategy, base, nodes=64)
    gc.collect()
    tracemalloc.start()
    start = live_tensor_bytes() + tracemalloc.get_traced_memory()[0]
    peak = [start]

    def measure() -> None:
        """Live tensor bytes (the sums, the global, decoded tensors) plus the traced heap (a
        held reply's ArrayRecord keeps its tensors as bytes)."""
        gc.collect(1)
        peak[0] = max(peak[0], live_tensor_bytes() + tracemalloc.get_traced_memory()[0])

    def lazy() -> Iterator[Message]:
        for node in range(1, 65):
            measure()
            yield honest(base, node)

    try:
        record, _ = strategy.aggregate_train(1, lazy())
        measure()
    finally:
        tracemalloc.stop()
    report = strategy.round_report(1)
    assert record is not None and report.streamed and len(report.accepted_nodes) == 64
    grown = peak[0] - start
    assert grown < 16 * ADAPTER_BYTES, grown / ADAPTER_BYTES


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_new_global_equals_the_list_fed_merge_of_the_accepted_replies(seed: int) -> None:
    base = global_adapter()
    replies = [honest(base, node, boost=1000.0 if node == 20 else 1.0) for node in range(1, 65)]
    random.Random(seed).shuffle(replies)
    strategy = FedRobustMerge(robust=NORM_SCREEN, device="cpu", weight_by_examples=True)
    start_round(strategy, base, nodes=64)
    record, _ = strategy.aggregate_train(1, iter(replies))
    report = strategy.round_report(1)
    assert report.streamed and 20 in report.rejected and len(report.accepted_nodes) == 63
    accepted = [m for m in replies if m.metadata.src_node_id in set(report.accepted_nodes)]
    for order in range(2):
        again = FedRobustMerge(robust=NORM_SCREEN, device="cpu", weight_by_examples=True)
        start_round(again, base, nodes=64)
        random.Random(100 + order).shuffle(accepted)
        other, _ = again.aggregate_train(1, list(accepted))
        assert again.round_report(1).accepted_nodes == report.accepted_nodes
        got, want = as_tensors(record), as_tensors(other)
        assert all(torch.equal(got[k], want[k]) for k in base)


def test_an_outsized_reply_in_the_pool_and_one_after_it_are_rejected_naming_the_pool() -> None:
    base = global_adapter()
    replies = [
        honest(base, node, boost=1000.0 if node in (3, 40) else 1.0) for node in range(1, 21)
    ]
    strategy = FedRobustMerge(robust=NORM_SCREEN, device="cpu")
    start_round(strategy, base, nodes=20)
    strategy.aggregate_train(1, iter(replies))
    report = strategy.round_report(1)
    assert report.streamed
    assert sorted(report.screened) == [3]  # node 40 is not in a round of 20
    replies.append(honest(base, 40, boost=1000.0))
    strategy = FedRobustMerge(robust=NORM_SCREEN, device="cpu")
    start_round(strategy, base, nodes=21)
    strategy.aggregate_train(1, iter(replies))
    report = strategy.round_report(1)
    assert sorted(report.screened) == [3, 40]
    assert len(report.accepted_nodes) == 19
    for node in (3, 40):
        assert POOL_WORDS in report.rejected[node], report.rejected[node]
    assert report.norm_bound is not None and report.norm_bound.pool == DEFAULT_POOL
    assert POOL_WORDS in report.to_json()["robust"]["norm-pool"]


def test_fewer_replies_than_the_pool_are_a_buffered_round_as_before() -> None:
    base = global_adapter()
    replies = replies_for(base, 1, range(1, 6), boost={4: 1000.0})
    strategy = FedRobustMerge(robust=NORM_SCREEN, device="cpu", server_lr=0.7)
    start_round(strategy, base, nodes=5)
    record, _ = strategy.aggregate_train(1, iter(replies))
    report = strategy.round_report(1)
    assert not report.streamed and report.screened == [4]
    assert report.norm_bound is not None and report.norm_bound.pool == 5
    assert "this round's and earlier rounds'" in report.rejected[4]
    assert sorted(report.direction_scores) == [1, 2, 3, 5]  # everyone scored, as before
    kept = sorted(
        (m for m in replies if m.metadata.src_node_id != 4),
        key=lambda m: (m.content["arrays"].object_id, 0),
    )
    clients = [
        {k: v.float() for k, v in m.content["arrays"].to_torch_state_dict().items()} for m in kept
    ]
    merge = create_method("robustmerge", **strategy.settings.hyperparameters).round_form()
    expected = merge_round(base, clients, merge, None, server_lr=0.7).tensors
    got = as_tensors(record)
    assert all(torch.equal(got[k], expected[k]) for k in base)


def test_the_audit_record_says_which_pool_judged() -> None:
    base = global_adapter()
    strategy = FedRobustMerge(robust=NORM_SCREEN, device="cpu")
    start_round(strategy, base, nodes=12)
    strategy.aggregate_train(1, iter([honest(base, node) for node in range(1, 13)]))
    first = strategy.round_report(1).to_json()["robust"]
    assert POOL_WORDS in first["norm-pool"]
    start_round(strategy, base, nodes=12, server_round=2)
    strategy.aggregate_train(2, iter([honest(base, node) for node in range(1, 13)]))
    assert strategy.round_report(2).to_json()["robust"]["norm-pool"] == "earlier rounds'"
    start_round(strategy, base, nodes=3, server_round=3)
    buffered = FedRobustMerge(robust=NORM_SCREEN, device="cpu")
    start_round(buffered, base, nodes=3)
    buffered.aggregate_train(1, [honest(base, node) for node in range(1, 4)])
    record = buffered.round_report(1).to_json()["robust"]
    assert record["norm-pool"] == "this round's and earlier rounds'"
