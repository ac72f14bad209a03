"""Replies handed on as they arrive: Flower's Grid push/pull instead of one blocking call.

``Grid.send_and_receive`` pushes the instructions and returns only once every reply is in (or
the timeout passed), holding all of them: T adapters in the server's memory before the merge
sees the first. ``stream_replies`` pushes the same way and then pulls the outstanding message
ids a few at a time (``PULL_BATCH``), yielding each reply as soon as it is pulled, so the
strategy can fold it in and drop it while stragglers are still training. The loop ends when
every instruction is answered or at the timeout, like ``send_and_receive``. The push, each
reply and each pull are reported to the round's progress watch (``server.progress``), if one is
open.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid

from server.progress import current_watch

# Outstanding message ids per pull: the replies one pull can hold at once.
PULL_BATCH = 4
# Pause between pulls that brought nothing new.
IDLE_PAUSE_SECONDS = 0.5


def stream_replies(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    *,
    batch: int = PULL_BATCH,
    pause: float = IDLE_PAUSE_SECONDS,
) -> Iterator[Message]:
    """Push ``messages`` and yield their replies in arrival order, until all are in or
    ``timeout`` seconds have passed (replies still missing then are left out)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    pending = dict.fromkeys(message_id for message_id in grid.push_messages(messages) if message_id)
    deadline = time.monotonic() + timeout
    watch = current_watch()
    watch.opened(len(pending))
    while pending:
        arrived = 0
        outstanding = list(pending)
        for start in range(0, len(outstanding), batch):
            for reply in grid.pull_messages(outstanding[start : start + batch]):
                arrived += 1
                pending.pop(reply.metadata.reply_to_message_id, None)
                watch.arrived()
                yield reply
                watch.update()  # after the consumer's turn: a streamed verdict is in
        watch.update()
        remaining = deadline - time.monotonic()
        if not pending or remaining <= 0:
            return
        if arrived == 0:
            time.sleep(min(pause, remaining))
