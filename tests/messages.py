"""Messages as Flower's SuperLink delivers them, for tests that run handlers without one."""

from __future__ import annotations

import time

from flwr.app import Message, Metadata


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
