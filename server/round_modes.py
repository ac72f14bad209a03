"""How one round's training and evaluation reach the clients: the modes of the one round loop.

The loop (``server.run_loop``) owns everything a round shares on every path: resume, the
server-side evaluation, the history entry, communication accounting, checkpoints, metrics.json
and the audit log. A mode owns only how the global adapter goes out and the merged one comes
back:

- ``MessageRounds``: Flower's Message API, one train message per sampled node, the replies
  handed to the strategy, FedRobustMerge or a wrapper around it (Flower's DP strategies). Plain,
  sparse-uplink and DP runs are this mode.
- ``server.secure_rounds.SecureRounds``: Flower's SecAgg+ workflow (only available through its
  legacy API), which hands the core the securely summed merge terms.

Both sample, build the train instruction, apply the server step and write the round report
through the same FedRobustMerge core, so modes wrap it; they do not fork it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from server.audit_log import reply_digests, train_round_fields
from server.communication import bytes_by_node
from server.privacy import core_strategy, restore_privacy_ledger
from server.reply_stream import stream_replies
from strategies.fed_robustmerge import FedRobustMerge
from strategies.reply_checks import state_dict_to_record
from strategies.round_metrics import diagnostics_metrics
from strategies.round_report import RoundReport

Traffic = tuple[dict[str, int], dict[str, int]]
NO_TRAFFIC: Traffic = ({}, {})


@dataclass(frozen=True)
class TrainOutcome:
    """One training round as the loop records it: the history entry's train part, the new
    global (None: unchanged), bytes down/up per node, and the audit record's fields."""

    entry: dict[str, Any]
    merged: dict[str, torch.Tensor] | None
    traffic: Traffic
    audit: dict[str, Any]


class RoundMode(Protocol):
    """A way of running one round's training and evaluation against the FedRobustMerge core."""

    @property
    def core(self) -> FedRobustMerge:
        """The FedRobustMerge every mode merges with."""
        ...

    @property
    def uplink(self) -> str:
        """What the clients send up (``communication.uplink`` in metrics.json)."""
        ...

    def train(
        self,
        grid: Grid,
        server_round: int,
        global_tensors: Mapping[str, torch.Tensor],
        timeout: float,
    ) -> TrainOutcome:
        """Send the global adapter, gather what comes back, merge: one training round."""
        ...

    def evaluate(
        self,
        grid: Grid,
        server_round: int,
        global_tensors: Mapping[str, torch.Tensor],
        timeout: float,
    ) -> tuple[dict[str, Any] | None, Traffic]:
        """Client-side evaluation of the global adapter (None: none this round)."""
        ...

    def checkpoint_state(self) -> dict[str, Any]:
        """The settings and state saved with every checkpoint."""
        ...

    def restore(self, saved: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
        """Resume from a checkpoint's saved state and history."""
        ...

    def close(self) -> None:
        """Release what the mode holds (threads), after the last round."""
        ...


def round_entry(
    server_round: int,
    sampled: int,
    answered: int,
    metrics: MetricRecord | None,
    report: RoundReport,
) -> dict[str, Any]:
    """The train part of a round's history entry, the same on every path."""
    return {
        "server-round": server_round,
        "clients-sampled": sampled,
        "clients-timed-out": max(sampled - answered, 0),
        "train": {**(dict(metrics) if metrics is not None else {}), **diagnostics_metrics(report)},
        "merge": report.to_json(),
    }


def as_tensors(arrays: ArrayRecord | None) -> dict[str, torch.Tensor] | None:
    """A merged ArrayRecord as float32 tensors (None stays None: the global is unchanged)."""
    if arrays is None:
        return None
    return {key: value.to(torch.float32) for key, value in arrays.to_torch_state_dict().items()}


def strategy_settings(strategy: FedRobustMerge) -> dict[str, Any]:
    """The strategy's merge settings, stored with each checkpoint to detect a changed config,
    and the robust screen's state (its norm history), restored on resume."""
    return {
        "merge-method": strategy.settings.merge_method,
        "merge-hyperparameters": {
            k: _plain(v) for k, v in strategy.settings.hyperparameters.items()
        },
        "merge-target": strategy.settings.merge_target,
        "server-lr": strategy.settings.server_lr,
        "weight-by-examples": strategy.settings.weight_by_examples,
        "seed": strategy.settings.seed,
        "robust-aggregation": strategy.settings.robust.describe(),
        "robust": strategy.robust_state(),
    }


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class ArrivalLog:
    """What the loop records of each reply as it streams past: bytes per node and the digest
    of its arrays, taken before aggregation (a DP wrapper replaces reply contents with clipped
    copies), without keeping the reply."""

    def __init__(self) -> None:
        self.count = 0
        self.received: dict[str, int] = {}
        self.digests: list[tuple[int, str | None]] = []

    def observe(self, replies: Iterator[Message]) -> Iterator[Message]:
        """``replies``, unchanged, each recorded as it passes."""
        for reply in replies:
            self.count += 1
            for node, size in bytes_by_node([reply], outgoing=False).items():
                self.received[node] = self.received.get(node, 0) + size
            self.digests.extend(reply_digests([reply]))
            yield reply


class MessageRounds:
    """Rounds over Flower's Message API: ``strategy`` is FedRobustMerge or a wrapper (DP)."""

    def __init__(self, strategy: Strategy, uplink: str = "dense") -> None:
        self.strategy = strategy
        self._core = core_strategy(strategy)
        self._uplink = uplink

    @property
    def core(self) -> FedRobustMerge:
        """The FedRobustMerge inside the wrappers."""
        return self._core

    @property
    def uplink(self) -> str:
        """The run's uplink ("dense" or "sparse")."""
        return self._uplink

    def train(
        self,
        grid: Grid,
        server_round: int,
        global_tensors: Mapping[str, torch.Tensor],
        timeout: float,
    ) -> TrainOutcome:
        """configure_train, then the replies streamed into aggregate_train as they arrive
        (``server.reply_stream``), each one counted and digested on its way; the report from
        the core."""
        messages = list(
            self.strategy.configure_train(
                server_round, state_dict_to_record(global_tensors), ConfigRecord(), grid
            )
        )
        sent = bytes_by_node(messages, outgoing=True)
        sampled = [message.metadata.dst_node_id for message in messages]
        seen = ArrivalLog()
        replies = seen.observe(stream_replies(grid, messages, timeout)) if messages else iter(())
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        state = self._core.round
        report = self._core.round_report(server_round)
        log(
            INFO,
            "round %d: %d sampled, %d replied, %d accepted, %d rejected%s",
            server_round,
            len(sampled),
            seen.count,
            len(report.accepted_nodes),
            len(report.rejected),
            " (skipped: global unchanged)" if arrays is None else "",
        )
        prescreen = state.prescreen if state is not None else None
        return TrainOutcome(
            entry=round_entry(server_round, len(sampled), seen.count, metrics, report),
            merged=as_tensors(arrays),
            traffic=(sent, seen.received),
            audit=train_round_fields(
                sampled, seen.digests, report, prescreen, skipped=arrays is None
            ),
        )

    def evaluate(
        self,
        grid: Grid,
        server_round: int,
        global_tensors: Mapping[str, torch.Tensor],
        timeout: float,
    ) -> tuple[dict[str, Any] | None, Traffic]:
        """configure_evaluate, send and receive, aggregate_evaluate."""
        messages = list(
            self.strategy.configure_evaluate(
                server_round, state_dict_to_record(global_tensors), ConfigRecord(), grid
            )
        )
        if not messages:
            return None, NO_TRAFFIC
        replies = list(grid.send_and_receive(messages=messages, timeout=timeout))
        traffic = (bytes_by_node(messages, outgoing=True), bytes_by_node(replies, outgoing=False))
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        if metrics is None:
            return None, traffic
        client_eval: dict[str, Any] = dict(metrics)
        sites = self._core.site_scores(server_round)
        if sites:  # personalisation: each site's own scores beside the mean
            client_eval["sites"] = {str(node): sites[node] for node in sorted(sites)}
        return client_eval, traffic

    def checkpoint_state(self) -> dict[str, Any]:
        """The core's merge settings and robust state."""
        return strategy_settings(self._core)

    def restore(self, saved: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
        """The robust screen's history, and a DP wrapper's privacy ledger."""
        self._core.restore_robust_state(saved.get("robust", {}))
        if restore_privacy_ledger(self.strategy, history):
            log(INFO, "DP: privacy ledger restored from the history")

    def close(self) -> None:
        """Nothing held."""
