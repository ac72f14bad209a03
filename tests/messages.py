"""Messages as Flower's SuperLink delivers them, for tests that run handlers without one."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Error, Message, Metadata, RecordDict
from flwr.common import MessageType

from benchmarks.inprocess import node_reply


def addressed(message: Message, message_id: str) -> Message:
    """``message`` (an instruction a strategy built) as its destination node receives it: from
    the server (node 0), with a message id and a creation time."""
    return Message(  # type: ignore[call-overload]
        content=message.content,
        metadata=Metadata(
            run_id=1,
            message_id=message_id,
            src_node_id=0,
            dst_node_id=message.metadata.dst_node_id,
            reply_to_message_id="",
            group_id=message.metadata.group_id,
            created_at=time.time(),
            ttl=3600.0,
            message_type=message.metadata.message_type,
        ),
    )


def from_node(
    node: int, content: RecordDict | Error, message_type: str = MessageType.TRAIN
) -> Message:
    """``content`` (or an ``Error``) as node ``node``'s reply to an instruction reaches the
    server."""
    return node_reply(node, content, message_type)


class AnsweredOnPull:
    """Flower's Grid ``push_messages``/``pull_messages`` for fakes that answer synchronously.

    A push stamps each instruction with a message id (as the SuperLink does) and keeps it; a
    pull of an id delivers that instruction to ``answer``, which returns the node's reply (or
    None: the node never answers). ``send_and_receive`` is the same delivery, all at once.
    """

    def answer(self, message: Message) -> Message | None:
        """The reply of the instruction's destination node to ``message`` (as delivered)."""
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        pushed: dict[str, Message] = self.__dict__.setdefault("_pushed", {})
        ids = []
        for message in messages:
            self.__dict__["_pushes"] = self.__dict__.get("_pushes", 0) + 1
            message_id = f"m-{self.__dict__['_pushes']}"
            pushed[message_id] = addressed(message, message_id)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        pushed: dict[str, Message] = self.__dict__.setdefault("_pushed", {})
        replies = []
        for message_id in message_ids:
            message = pushed.pop(message_id, None)
            reply = self.answer(message) if message is not None else None
            if reply is not None:
                replies.append(reply)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))
