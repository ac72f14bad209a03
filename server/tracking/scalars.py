"""A round's history entry (what metrics.json holds) turned into the scalars a tracker logs.

Pure functions over the plain dicts the round loop keeps: no backend, no I/O. The names are the
ones docs/tracking.md lists; a slash groups them (TensorBoard and the MLflow UI both fold
``eval/...`` into one section).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from server.tracking.base import ClientRow

# (tracked name, path in the history entry) of the named per-round scalars.
NAMED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("train/train-loss", ("train", "train-loss")),
    ("train/num-examples", ("train", "num-examples")),
    ("replies/sampled", ("clients-sampled",)),
    ("replies/accepted", ("train", "clients-accepted")),
    ("replies/rejected", ("train", "clients-rejected")),
    ("replies/timed-out", ("clients-timed-out",)),
    ("time/round-seconds", ("seconds",)),
    ("time/merge-seconds", ("merge", "merge-seconds")),
    ("time/fold-seconds", ("merge", "fold-seconds")),
    ("bytes/down", ("communication", "down-bytes")),
    ("bytes/up", ("communication", "up-bytes")),
    ("bytes/cumulative", ("communication", "cumulative-bytes")),
    ("merge/update-norm", ("merge", "merged-update-norm")),
    ("merge/factorwise-gap", ("merge", "factorwise-gap")),
    ("privacy/dp-epsilon", ("train", "dp-epsilon")),
)
# Train metrics that a named scalar above already carries (or that are not per-round numbers).
COVERED_TRAIN_KEYS = frozenset(
    {
        "train-loss",
        "num-examples",
        "clients-accepted",
        "clients-rejected",
        "merge-seconds",
        "merged-update-norm",
        "factorwise-gap",
        "dp-epsilon",
    }
)


def _number(value: Any) -> float | None:
    """``value`` as a finite float; None for anything else (bools, strings, lists, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _at(entry: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = entry
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def round_scalars(entry: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one history entry: the server-side evaluation (``eval/<key>``: accuracy
    per task, the seen and unseen averages, the loss), the client-side one (``client-eval/``),
    the named scalars of ``NAMED`` it has, and the round's other numeric train metrics
    (``train/<key>``, e.g. the robust screen's bound). Round 0 has only ``eval/``."""
    scalars: dict[str, float] = {}
    for prefix, block in (("eval", "server-eval"), ("client-eval", "client-eval")):
        for key, value in (entry.get(block) or {}).items():
            number = _number(value)
            if number is not None:
                scalars[f"{prefix}/{key}"] = number
    for name, path in NAMED:
        number = _number(_at(entry, path))
        if number is not None:
            scalars[name] = number
    for key, value in (entry.get("train") or {}).items():
        number = _number(value)
        if number is not None and key not in COVERED_TRAIN_KEYS:
            scalars[f"train/{key}"] = number
    return scalars


def client_rows(
    entry: Mapping[str, Any], replies: Mapping[int, Mapping[str, float]]
) -> list[ClientRow]:
    """One row per client the round judged, by node id: its verdict from the entry's merge
    report (accepted nodes, rejected ones with their reason), its update norm from the report,
    its train loss and examples from ``replies`` (node id -> that reply's metrics, as
    ``server.tracking.replies.ReplyTap`` saw them)."""
    merge = entry.get("merge") or {}
    norms = {int(node): norm for node, norm in (merge.get("update-norms") or {}).items()}
    verdicts: dict[int, tuple[str, str]] = {
        int(node): ("accepted", "") for node in merge.get("accepted-nodes") or ()
    }
    for node, reason in (merge.get("rejected") or {}).items():
        verdicts[int(node)] = ("rejected", str(reason))
    rows = []
    for node in sorted(verdicts):
        verdict, reason = verdicts[node]
        metrics = replies.get(node, {})
        examples = _number(metrics.get("num-examples"))
        rows.append(
            ClientRow(
                node_id=node,
                verdict=verdict,
                reason=reason,
                train_loss=_number(metrics.get("train-loss")),
                num_examples=int(examples) if examples is not None else None,
                update_norm=_number(norms.get(node)),
            )
        )
    return rows
