"""stream_replies: pushed once, pulled a few ids at a time, each reply handed on on arrival.

Time is a fake clock (``FakeClock``, patched into ``server.reply_stream``): sleeping moves it
on, nothing else does, so what is asserted about when replies arrive holds on any machine,
however loaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace

import pytest
from flwr.app import Message, MessageType, RecordDict

import server.reply_stream
from server.reply_stream import stream_replies
from tests.messages import addressed

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class FakeClock:
    """``time.monotonic`` and ``time.sleep`` for one test: the time moves only by sleeping."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(
        server.reply_stream, "time", SimpleNamespace(monotonic=fake.monotonic, sleep=fake.sleep)
    )
    return fake


def instruction(node: int) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)


class ScheduledGrid:
    """Node n's reply becomes available ``delays[n]`` seconds after the push (None: never)."""

    def __init__(self, delays: dict[int, float | None], clock: FakeClock) -> None:
        self.delays = delays
        self.clock = clock
        self.pushed: dict[str, tuple[Message, float | None]] = {}
        self.pulls: list[list[str]] = []

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        now = self.clock.monotonic()
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
        now = self.clock.monotonic()
        out = []
        for message_id in asked:
            message, ready = self.pushed[message_id]
            if ready is not None and ready <= now:
                del self.pushed[message_id]
                out.append(Message(RecordDict(), reply_to=message))
        return out


def test_replies_are_handed_on_as_they_arrive_not_after_the_last(clock: FakeClock) -> None:
    grid = ScheduledGrid({1: 0.0, 2: 0.0, 3: 1.5}, clock)
    arrivals = []
    for reply in stream_replies(grid, [instruction(n) for n in (1, 2, 3)], 5.0, pause=0.05):
        arrivals.append((reply.metadata.src_node_id, clock.now))
    nodes = [node for node, _ in arrivals]
    assert sorted(nodes) == [1, 2, 3] and nodes[-1] == 3
    assert [seconds for node, seconds in arrivals if node != 3] == [0.0, 0.0]  # at once
    assert 1.5 <= arrivals[-1][1] < 1.5 + 0.05 + 1e-9  # within a pause of its reply
    assert all(pause <= 0.05 for pause in clock.sleeps)


def test_pulls_ask_for_at_most_batch_ids(clock: FakeClock) -> None:
    grid = ScheduledGrid({n: 0.0 for n in range(1, 11)}, clock)
    replies = list(stream_replies(grid, [instruction(n) for n in range(1, 11)], 5.0, batch=3))
    assert len(replies) == 10
    assert all(len(asked) <= 3 for asked in grid.pulls)
    assert clock.sleeps == []  # every reply was there: no pause


def test_a_node_that_never_answers_is_left_out_at_the_timeout(clock: FakeClock) -> None:
    grid = ScheduledGrid({1: 0.0, 2: None}, clock)
    replies = list(stream_replies(grid, [instruction(1), instruction(2)], 0.4, pause=0.05))
    assert [reply.metadata.src_node_id for reply in replies] == [1]
    assert clock.now == pytest.approx(0.4)  # waited out the timeout, not a pause longer
    assert len(clock.sleeps) == pytest.approx(0.4 / 0.05, abs=1)


def test_nothing_pushed_yields_nothing_and_a_bad_batch_is_refused(clock: FakeClock) -> None:
    assert list(stream_replies(ScheduledGrid({}, clock), [], 1.0)) == []
    with pytest.raises(ValueError, match="batch"):
        list(stream_replies(ScheduledGrid({}, clock), [], 1.0, batch=0))
