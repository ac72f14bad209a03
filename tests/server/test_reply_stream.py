"""stream_replies: pushed once, pulled a few ids at a time, each reply handed on on arrival."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest
from flwr.app import Message, MessageType, RecordDict

from server.reply_stream import stream_replies
from tests.messages import addressed

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def instruction(node: int) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)


class ScheduledGrid:
    """Node n's reply becomes available ``delays[n]`` seconds after the push (None: never)."""

    def __init__(self, delays: dict[int, float | None]) -> None:
        self.delays = delays
        self.pushed: dict[str, tuple[Message, float | None]] = {}
        self.pulls: list[list[str]] = []

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        now = time.monotonic()
        ids = []
        for message in messages:
            message_id = f"m-{message.metadata.dst_node_id}"
            delay = self.delays[message.metadata.dst_node_id]
            ready = None if delay is None else now + delay
            self.pushed[message_id] = (addressed(message, message_id), ready)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        asked = list(message_ids)
        self.pulls.append(asked)
        now = time.monotonic()
        out = []
        for message_id in asked:
            message, ready = self.pushed[message_id]
            if ready is not None and ready <= now:
                del self.pushed[message_id]
                out.append(Message(RecordDict(), reply_to=message))
        return out


def test_replies_are_handed_on_as_they_arrive_not_after_the_last() -> None:
    grid = ScheduledGrid({1: 0.0, 2: 0.0, 3: 1.5})
    started = time.monotonic()
    arrivals = []
    for reply in stream_replies(grid, [instruction(n) for n in (1, 2, 3)], 5.0, pause=0.05):
        arrivals.append((reply.metadata.src_node_id, time.monotonic() - started))
    nodes = [node for node, _ in arrivals]
    assert sorted(nodes) == [1, 2, 3] and nodes[-1] == 3
    first_two = [seconds for node, seconds in arrivals if node != 3]
    assert max(first_two) < 1.0  # long before the straggler's 1.5 s
    assert arrivals[-1][1] >= 1.5


def test_pulls_ask_for_at_most_batch_ids() -> None:
    grid = ScheduledGrid({n: 0.0 for n in range(1, 11)})
    replies = list(stream_replies(grid, [instruction(n) for n in range(1, 11)], 5.0, batch=3))
    assert len(replies) == 10
    assert all(len(asked) <= 3 for asked in grid.pulls)


def test_a_node_that_never_answers_is_left_out_at_the_timeout() -> None:
    grid = ScheduledGrid({1: 0.0, 2: None})
    started = time.monotonic()
    replies = list(stream_replies(grid, [instruction(1), instruction(2)], 0.4, pause=0.05))
    assert [reply.metadata.src_node_id for reply in replies] == [1]
    assert 0.35 <= time.monotonic() - started < 2.0


def test_nothing_pushed_yields_nothing_and_a_bad_batch_is_refused() -> None:
    assert list(stream_replies(ScheduledGrid({}), [], 1.0)) == []
    with pytest.raises(ValueError, match="batch"):
        list(stream_replies(ScheduledGrid({}), [], 1.0, batch=0))
