"""The record of one training round, on every aggregation path (plain, DP, sparse, SecAgg+).

``RoundReport`` is what metrics.json's ``merge`` entry, the train metrics and the audit record
are made from. ``RoundState`` is the round the strategy has open: Flower's
``Strategy.aggregate_train`` returns only (ArrayRecord, MetricRecord), and wrappers (Flower's
DP strategies) sit between the round loop and FedRobustMerge, so the loop asks the strategy for
a closed round's report by its number (``FedRobustMerge.round_report``) instead of receiving it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import torch
from flwr.supercore import log

from strategies.merging.ranks import SiteAdapter, adapter_at_rank
from strategies.reply_checks import AcceptedReply, global_rank, reply_rank
from strategies.robust import NormBound


@dataclass
class RoundReport:
    """What one training round did, kept for metrics.json, the audit log and checkpoints.

    Under secure aggregation there are no individual replies: ``accepted_nodes`` are the nodes
    whose terms were summed, and ``secure_status`` says how the SecAgg+ round ended.
    """

    server_round: int
    accepted_nodes: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    merge_seconds: float = 0.0
    bytes_received: int = 0
    merged_update_norm: float = 0.0
    relative_error: float | None = None
    update_relative_error: float | None = None
    factorwise_gap: float | None = None
    direction_scores: dict[int, dict[str, float]] = field(default_factory=dict)
    skipped: bool = False
    update_norms: dict[int, float] = field(default_factory=dict)
    norm_bound: NormBound | None = None
    screened: list[int] = field(default_factory=list)
    clipped: list[int] = field(default_factory=list)
    krum_dropped: list[int] = field(default_factory=list)
    clamped_fraction: float | None = None
    # Which pool of norms set ``norm_bound`` (``strategies.robust.pool_label``; issue 25).
    norm_pool: str | None = None
    secure_status: str | None = None
    # Streamed rounds (issue 15): replies folded into running sums as they arrived;
    # ``fold_seconds`` is the time spent folding, ``merge_seconds`` then only the final
    # division and server step.
    streamed: bool = False
    fold_seconds: float = 0.0
    # Buffered rounds: accepted replies past buffer-replies written to disk as they arrived
    # (``strategies.reply_spill``); 0 when the round held every reply in memory or streamed.
    spilled: int = 0
    # Mixed ranks (issue 16): each accepted site's LoRA rank and the relative truncation error
    # of the global it started from, ||B_G A_G - B_k A_k||_F / ||B_G A_G||_F over every module
    # (0 at the global's rank).
    site_ranks: dict[int, int] = field(default_factory=dict)
    site_truncation_errors: dict[int, float] = field(default_factory=dict)

    def reject(self, node: int, reason: str, *, privacy: bool = False) -> None:
        """Record and log one rejected reply (PRIVACY-flagged when it carried non-LoRA
        tensors)."""
        self.rejected[node] = reason
        log(
            WARNING,
            "%sround %d: rejected reply from node %d: %s",
            "PRIVACY: " if privacy else "",
            self.server_round,
            node,
            reason,
        )

    def enough(self, usable: int, minimum: int) -> bool:
        """Whether ``usable`` replies reach ``minimum``; if not, the round is marked skipped
        (the global stays) and the log says why."""
        if usable >= minimum:
            return True
        self.skipped = True
        log(
            WARNING,
            "round %d: %d usable replies (< min %d): round skipped, global unchanged",
            self.server_round,
            usable,
            minimum,
        )
        return False

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready copy (node ids as strings)."""
        record: dict[str, Any] = {
            "server-round": self.server_round,
            "accepted-nodes": list(self.accepted_nodes),
            "rejected": {str(node): reason for node, reason in self.rejected.items()},
            "merge-seconds": self.merge_seconds,
            "streamed": self.streamed,
            "fold-seconds": self.fold_seconds,
            "spilled-replies": self.spilled,
            "bytes-received": self.bytes_received,
            "merged-update-norm": self.merged_update_norm,
            "relative-error": self.relative_error,
            "update-relative-error": self.update_relative_error,
            "factorwise-gap": self.factorwise_gap,
            "direction-scores": {str(n): s for n, s in self.direction_scores.items()},
            "skipped": self.skipped,
            "update-norms": {str(node): norm for node, norm in self.update_norms.items()},
            "robust": {
                "norm-reference": self.norm_bound.reference if self.norm_bound else None,
                "norm-bound": self.norm_bound.bound if self.norm_bound else None,
                "norm-pool": self.norm_pool if self.norm_bound else None,
                "screened": list(self.screened),
                "clipped": list(self.clipped),
                "krum-dropped": list(self.krum_dropped),
                "clamped-fraction": self.clamped_fraction,
            },
        }
        if self.site_ranks:
            record["site-ranks"] = {str(node): rank for node, rank in self.site_ranks.items()}
            record["site-truncation-errors"] = {
                str(node): error for node, error in self.site_truncation_errors.items()
            }
        if self.secure_status is not None:
            record["secure-aggregation"] = self.secure_status
            record["clients-summed"] = len(self.accepted_nodes)
        return record


@dataclass
class RoundState:
    """The training round a strategy has open, from ``configure_train`` to its aggregation.

    ``prescreen`` holds what a wrapper's ``screen_train_replies`` found on the raw replies
    (before DP clipping rewrote them); ``closed`` turns true once the round is aggregated or
    skipped, and only then is ``report`` final.
    """

    server_round: int
    global_tensors: dict[str, torch.Tensor]
    report: RoundReport
    prescreen: RoundReport | None = None
    closed: bool = False
    # The adapter a site of each rank below the global's started from (mixed ranks; computed
    # on first use, the same ``ranks.adapter_at_rank`` the clients run).
    site_starts: dict[int, SiteAdapter] = field(default_factory=dict)
    # Work on the closed round that the new global does not wait for (a streamed round's
    # direction diagnostics): run once, when the report is first asked for.
    deferred: Callable[[], None] | None = None

    @classmethod
    def open(cls, server_round: int, global_tensors: dict[str, torch.Tensor]) -> RoundState:
        """A fresh round on ``global_tensors`` (the adapter sent to the clients)."""
        return cls(server_round, global_tensors, RoundReport(server_round=server_round))

    def closed_report(self) -> RoundReport:
        """The closed round's final report (its deferred work run first); RuntimeError while
        the round is still open."""
        if not self.closed:
            raise RuntimeError(f"round {self.server_round} is still open (not aggregated)")
        if self.deferred is not None:
            deferred, self.deferred = self.deferred, None
            deferred()
        return self.report

    def global_rank(self) -> int | None:
        """The LoRA rank of the global adapter sent this round."""
        return global_rank({key: tuple(value.shape) for key, value in self.global_tensors.items()})

    def site_start(self, rank: int) -> SiteAdapter:
        """What a site of LoRA rank ``rank`` started this round from: the global truncated to
        its rank (``ranks.adapter_at_rank``, what the client computes on receipt; cached)."""
        if rank not in self.site_starts:
            self.site_starts[rank] = adapter_at_rank(self.global_tensors, rank)
        return self.site_starts[rank]

    def start_of(self, reply: AcceptedReply) -> Mapping[str, torch.Tensor]:
        """The adapter ``reply``'s site started from: the global, or its truncation to the
        reply's rank."""
        rank = reply_rank(reply)
        if rank is None or rank == self.global_rank():
            return self.global_tensors
        return self.site_start(rank).tensors


def open_state(state: RoundState | None, server_round: int) -> RoundState:
    """``state`` when it is round ``server_round`` and still open; RuntimeError otherwise."""
    if state is None or state.server_round != server_round or state.closed:
        raise RuntimeError(
            f"round {server_round} was not opened by configure_train (or is already closed)"
        )
    return state
