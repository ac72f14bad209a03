"""A streamed round's memory, measured: flat from 16 to 128 clients (issue 29).

The round goes through the real loop's path (``server.round_modes.MessageRounds``: the strategy's
configure_train, ``server.reply_stream.stream_replies`` over a grid's push/pull, aggregate_train)
with a fake grid that builds each node's reply only when it is pulled. Each time the grid is
pulled, the test measures what the server holds at that moment:

- live tensor bytes: every torch tensor the garbage collector can reach, each storage once;
- Python heap bytes (``tracemalloc``): the replies' ArrayRecords hold their tensors as bytes.

Their peaks over a round of 128 replies must stay within one adapter (tensors) and a few
adapters (heap: per-reply bookkeeping such as digests and metrics) of a round of 16: a fold or a
strategy that kept a copy of each reply would add 112 adapters.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Iterable

import pytest
import torch
from flwr.app import Message

from server.round_modes import MessageRounds
from strategies import FedRobustMerge
from strategies.robust import RobustSettings
from tests.messages import addressed
from tests.strategies.test_fed_robustmerge import reply

RANK, WIDTH = 16, 1024
MODULES = ("base_model.model.layer.0.query", "base_model.model.layer.1.value")
ADAPTER_BYTES = len(MODULES) * 2 * RANK * WIDTH * 4  # 256 KiB

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def global_adapter() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out = {}
    for name in MODULES:
        out[f"{name}.lora_A.weight"] = torch.randn(RANK, WIDTH, generator=generator)
        out[f"{name}.lora_B.weight"] = torch.randn(WIDTH, RANK, generator=generator)
    return out


def live_tensor_bytes() -> int:
    """Bytes of every storage a reachable CPU tensor uses, each storage counted once."""
    # type() is, not isinstance(): cheaper over ~200k objects, and isinstance reads __class__,
    # which some lazy module attributes answer with a deprecation warning
    kinds = (torch.Tensor, torch.nn.Parameter)
    tensors = [obj for obj in gc.get_objects() if type(obj) in kinds]
    storages = {
        storage.data_ptr(): storage.nbytes()
        for storage in (
            tensor.untyped_storage() for tensor in tensors if tensor.device.type == "cpu"
        )
    }
    return sum(storages.values())


class LazyGrid:
    """Nodes 1..count; a node's reply (its own small change of the global) is built when the
    instruction's id is pulled, and nothing of it is kept here. Each pull first measures."""

    def __init__(self, count: int, base: dict[str, torch.Tensor]) -> None:
        self.count = count
        self.base = base
        self.pending: dict[str, Message] = {}
        self.peak_tensors = 0
        self.peak_heap = 0

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.count + 1))

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message_id = f"m-{message.metadata.dst_node_id}"
            self.pending[message_id] = addressed(message, message_id)
            ids.append(message_id)
        return ids

    def measure(self) -> None:
        gc.collect(1)  # the young generations: cheap, and enough for the heap to settle
        self.peak_tensors = max(self.peak_tensors, live_tensor_bytes())
        self.peak_heap = max(self.peak_heap, tracemalloc.get_traced_memory()[0])

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.measure()
        replies = []
        for message_id in message_ids:
            instruction = self.pending.pop(message_id)
            node = instruction.metadata.dst_node_id
            generator = torch.Generator().manual_seed(node)
            tensors = {
                key: value + 0.01 * torch.randn(value.shape, generator=generator)
                for key, value in self.base.items()
            }
            answer = reply(node, tensors, 100)
            replies.append(Message(answer.content, reply_to=instruction))
        return replies


def peaks(count: int) -> tuple[int, int]:
    """Peak live tensor bytes and peak traced heap bytes over one streamed round of ``count``."""
    base = global_adapter()
    strategy = FedRobustMerge(
        device="cpu",
        min_train_nodes=count,
        min_available_nodes=count,
        fraction_evaluate=0.0,
        robust=RobustSettings(aggregation="none"),
    )
    grid = measured_round(strategy, count, base)
    report = strategy.round_report(1)
    assert report.streamed and len(report.accepted_nodes) == count
    return grid.peak_tensors, grid.peak_heap


def measured_round(strategy: FedRobustMerge, count: int, base: dict[str, torch.Tensor]) -> LazyGrid:
    """Round 1 of ``strategy`` over ``count`` lazily built replies through the real loop's path,
    with the grid's peaks measured at every pull (and once at the end); it must merge."""
    grid = LazyGrid(count, base)
    gc.collect()
    tracemalloc.start()
    try:
        outcome = MessageRounds(strategy).train(grid, 1, base, timeout=600.0)  # type: ignore[arg-type]
        grid.measure()
    finally:
        tracemalloc.stop()
    assert outcome.merged is not None
    return grid


def test_a_streamed_round_of_128_holds_what_a_round_of_16_holds() -> None:
    small_tensors, small_heap = peaks(16)
    large_tensors, large_heap = peaks(128)
    # the fold's own sums (float64 bins) are there in both; the replies come and go
    assert small_tensors >= 4 * ADAPTER_BYTES
    assert large_tensors - small_tensors < ADAPTER_BYTES, (small_tensors, large_tensors)
    assert large_heap - small_heap < 4 * ADAPTER_BYTES, (small_heap, large_heap)
