"""Driving a Message-API strategy in-process, the way Flower's ServerApp would drive it.

Benchmarks that time or weigh ``configure_train`` / ``aggregate_train`` without a SuperLink need
the same three stand-ins: a Grid that only lists node ids (all the strategies' sampling asks of
it), the run identity Flower stamps on instruction messages, and train replies shaped like the
ClientApp's (an ArrayRecord under "arrays", a MetricRecord with num-examples under "metrics").
They live here so that the benchmarks share one copy.
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict


class FakeGrid:
    """The one Grid method the strategies' node sampling calls."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        """The connected node ids (a copy: callers may sort or shuffle it)."""
        return list(self.nodes)


def set_task_identity() -> None:
    """Flower stamps instruction messages with the running ServerApp's identity; fake one, so
    that ``configure_train`` can build its messages outside a ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def node_reply(
    node: int, content: RecordDict | Error, message_type: str = MessageType.TRAIN
) -> Message:
    """``content`` (or an ``Error``) as node ``node``'s reply to an instruction reaches the
    server, with the metadata Flower's SuperLink would set."""
    metadata = Metadata(
        run_id=1,
        message_id=f"reply-{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="instruction",
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    # Flower builds replies from metadata internally; its public overloads do not list that form.
    message: Message = Message(content, metadata=metadata)  # type: ignore[call-overload]
    return message


def train_reply(
    node: int, arrays: ArrayRecord, num_examples: int = 512, **metrics: float
) -> Message:
    """A train reply Message from ``node`` as the ClientApp sends it: ``arrays`` (the trained
    LoRA tensors in wire form) and a MetricRecord with ``num-examples`` and any ``metrics``."""
    record = MetricRecord({"num-examples": num_examples, **metrics})
    return node_reply(node, RecordDict({"arrays": arrays, "metrics": record}))
