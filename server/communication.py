"""Communication accounting: bytes of LoRA tensors sent down to and up from each client.

Counts what Flower's LLM leaderboard counts: the arrays each message carries (the global adapter
down, each client's tensors up), per client and per round, and the cumulative total over the
run. A record's size is Flower's ``ArrayRecord.count_bytes()``: the serialised payload plus
keys, dtypes and shapes. Metric and config records (a few bytes) are left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.app import Message


def array_bytes(message: Message) -> int:
    """Bytes of all arrays a message carries (0 for an error reply)."""
    if message.has_error():
        return 0
    return sum(record.count_bytes() for record in message.content.array_records.values())


def bytes_by_node(messages: Iterable[Message], *, outgoing: bool) -> dict[str, int]:
    """Array bytes per node id (as a string, for JSON): destination when ``outgoing``."""
    totals: dict[str, int] = {}
    for message in messages:
        node = message.metadata.dst_node_id if outgoing else message.metadata.src_node_id
        totals[str(node)] = totals.get(str(node), 0) + array_bytes(message)
    return totals


def round_communication(
    *,
    uplink: str,
    train_down: Mapping[str, int],
    train_up: Mapping[str, int],
    evaluate_down: Mapping[str, int] | None = None,
    evaluate_up: Mapping[str, int] | None = None,
    history: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The ``communication`` entry of one round of metrics.json.

    ``history`` holds the earlier rounds' entries; the cumulative total continues from the
    last one that has a ``communication`` entry (so a resumed run keeps counting).
    """
    down = sum(train_down.values()) + sum((evaluate_down or {}).values())
    up = sum(train_up.values()) + sum((evaluate_up or {}).values())
    previous = 0
    for entry in reversed(history):
        if "communication" in entry:
            previous = int(entry["communication"]["cumulative-bytes"])
            break
    return {
        "uplink": uplink,
        "train-down-bytes": dict(train_down),
        "train-up-bytes": dict(train_up),
        "evaluate-down-bytes": dict(evaluate_down or {}),
        "evaluate-up-bytes": dict(evaluate_up or {}),
        "down-bytes": down,
        "up-bytes": up,
        "round-bytes": down + up,
        "cumulative-bytes": previous + down + up,
    }
