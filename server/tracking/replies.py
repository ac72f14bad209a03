"""The clients' own train metrics (loss, examples), read off their replies as they stream past.

The strategy keeps only the example-weighted mean of the clients' metrics (metrics.json's
``train``); per-client rows need each reply's. The training round pulls its replies through
``Grid.pull_messages`` (``server.reply_stream``), so a Grid that hands every call to the real
one, and notes each train reply's metrics on the way, sees all of them without the round modes
or the strategy carrying anything new. The reply itself is passed on untouched and not kept.
Evaluation (``send_and_receive``) goes to the real grid directly and is not noted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from protocol import wire

NOTED_KEYS = (wire.TRAIN_LOSS, wire.NUM_EXAMPLES)


def reply_metrics(reply: Message) -> dict[str, float] | None:
    """A train reply's ``train-loss`` and ``num-examples`` (those it has, as floats); None for
    an error reply or another message type."""
    if reply.has_error() or reply.metadata.message_type != MessageType.TRAIN:
        return None
    noted: dict[str, float] = {}
    for record in reply.content.metric_records.values():
        for key in NOTED_KEYS:
            value = record.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                noted[key] = float(value)
    return noted


class ReplyTap(Grid):
    """``grid`` with every call handed on; the train replies pulled are noted by node id until
    ``take`` collects them."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self._noted: dict[int, dict[str, float]] = {}

    def take(self) -> dict[int, dict[str, float]]:
        """The noted replies' metrics since the last ``take`` (node id -> metrics)."""
        noted, self._noted = self._noted, {}
        return noted

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The real grid's pull, each train reply's metrics noted."""
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            metrics = reply_metrics(reply)
            if metrics is not None:
                self._noted[reply.metadata.src_node_id] = metrics
        return replies

    # The rest of Grid's interface: handed to the real grid unchanged.

    @property
    def run(self) -> Run:
        return self.grid.run

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        """Anything else a workflow reads off a grid comes from the real one."""
        if name == "grid":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.grid, name)
