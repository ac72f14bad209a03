"""Which training replies enter a round: every per-reply check, on every aggregation path.

A reply is admitted when its shapes, values, num-examples, LoRA rank and update norm pass
(``reply_checks``, ``sparse_uplink``), and a round-specific judge (the streamed norm screen) does
not object; its bytes and node then count in the round's report. A rejected reply is logged with
its reason and the round goes on. The ranks nodes replied with persist across rounds (a site
keeps one rank for the whole run) and go into checkpoints.

Mixed ranks (issue 16): a reply's ``lora-rank`` sets the shapes it must have, each site is taken
to have started from the global truncated to its rank (``ranks.adapter_at_rank``, as the client
computes it), and product-space methods merge them (``rank_rounds.merge_mixed_ranks``);
settings that cannot (``combinations.mixed_rank_refusal``) reject such replies with the reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Message

from protocol import wire
from strategies.reply_checks import (
    AcceptedReply,
    ReplyRejectedError,
    check_train_reply,
    reply_rank,
)
from strategies.reply_spill import ReplySpill
from strategies.robust_replies import update_norm
from strategies.round_report import RoundReport, RoundState
from strategies.sparse_uplink import check_sparse_train_reply
from strategies.strategy_settings import MergeSettings
from workload.config import SHARED_A

# A further judgement of an admitted reply (ReplyRejectedError: rejected after all).
Judge = Callable[[AcceptedReply, RoundReport], None]

# Why a DP wrapper's round refuses replies of another rank than the global's.
WRAPPED_RANKS_REFUSED = (
    "Flower's DP wrappers clip each update against the global adapter, which needs its shapes "
    "(dp with mixed ranks is refused)"
)


@dataclass(frozen=True)
class RecordKeys:
    """Where a reply carries its arrays, config and example count (Flower's strategy keys)."""

    arrays: str = wire.ARRAYS
    config: str = wire.CONFIG
    num_examples: str = wire.NUM_EXAMPLES


class ReplyAdmission:
    """The per-reply checks of a federation, and each node's LoRA rank from its first checked
    reply."""

    def __init__(self, settings: MergeSettings, keys: RecordKeys) -> None:
        self.settings = settings
        self.keys = keys
        self.node_ranks: dict[int, int] = {}

    def to_state(self) -> dict[str, Any]:
        """Each node's rank, for checkpoints (``restore``)."""
        return {"node-ranks": {str(node): rank for node, rank in self.node_ranks.items()}}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Resume the nodes' ranks from a checkpoint's ``to_state``."""
        self.node_ranks = {
            int(node): int(rank) for node, rank in state.get("node-ranks", {}).items()
        }

    def check(
        self,
        message: Message,
        state: RoundState,
        report: RoundReport,
        other_ranks_refused: str | None,
    ) -> AcceptedReply:
        """One reply through every per-reply check (shapes, values, examples, rank, update
        norm); its norm and rank go into ``report``. ReplyRejectedError says why not."""
        settings = self.settings
        reply: AcceptedReply
        if settings.sparse_method is not None:
            reply = check_sparse_train_reply(
                message,
                state.global_tensors,
                settings.sparse_method,
                arrayrecord_key=self.keys.arrays,
                configrecord_key=self.keys.config,
                weighted_by_key=self.keys.num_examples,
                max_num_examples=settings.max_num_examples,
            )
        else:
            reply = check_train_reply(
                message,
                {key: tuple(value.shape) for key, value in state.global_tensors.items()},
                arrayrecord_key=self.keys.arrays,
                weighted_by_key=self.keys.num_examples,
                max_num_examples=settings.max_num_examples,
                other_ranks_refused=other_ranks_refused,
                site_kept=self._site_kept(state),
            )
        self._check_site_rank(reply)
        self._check_update_norm(reply, state, report)
        rank = reply_rank(reply)
        if rank is not None:
            report.site_ranks[reply.node_id] = rank
            report.site_truncation_errors[reply.node_id] = (
                0.0 if rank == state.global_rank() else state.site_start(rank).relative_error
            )
        return reply

    def _site_kept(self, state: RoundState) -> dict[str, torch.Tensor] | None:
        """Under personalization "shared-a", the global's tensors every site keeps as its own
        (each LoRA B), which its reply leaves out; None otherwise."""
        if self.settings.personalization != SHARED_A:
            return None
        return {key: value for key, value in state.global_tensors.items() if wire.site_keeps(key)}

    def admit(
        self,
        message: Message,
        state: RoundState,
        report: RoundReport,
        other_ranks_refused: str | None,
        judge: Judge | None = None,
    ) -> AcceptedReply | None:
        """``message`` checked (and judged): counted in ``report`` and returned, or rejected
        there with its reason (None)."""
        node = message.metadata.src_node_id
        try:
            reply = self.check(message, state, report, other_ranks_refused)
            if judge is not None:
                judge(reply, report)
        except ReplyRejectedError as rejection:
            report.reject(node, rejection.reason, privacy=rejection.privacy)
            return None
        report.bytes_received += reply.num_bytes
        report.accepted_nodes.append(node)
        return reply

    def admit_all(
        self,
        replies: Iterable[Message],
        state: RoundState,
        report: RoundReport,
        *,
        wrapped: bool = False,
        spill: ReplySpill | None = None,
    ) -> list[AcceptedReply]:
        """The replies of a buffered round that pass every check, in content order; a node
        that replied twice has both rejected. ``wrapped``: a DP wrapper will clip them against
        the global, so only the global's rank is accepted.

        The replies are read one at a time and each accepted one is kept as ``spill`` keeps it
        (past its bound: on disk), so the round never holds the stream's messages themselves.
        A node's second reply takes its first back out of the round (and of ``report``)."""
        other_ranks_refused = self.settings.other_ranks_refused
        if wrapped and other_ranks_refused is None:
            other_ranks_refused = WRAPPED_RANKS_REFUSED
        senders: Counter[int] = Counter()
        accepted: dict[int, AcceptedReply] = {}
        ranked: set[int] = set()  # nodes whose first known rank this round's reply set
        for message in replies:
            node = message.metadata.src_node_id
            senders[node] += 1
            if senders[node] > 1:
                held = accepted.pop(node, None)
                if held is not None:
                    _release(report, held)
                    if spill is not None:
                        spill.discard(held)
                if node in ranked:  # as if its first reply had never been checked
                    self.node_ranks.pop(node, None)
                report.reject(node, f"node sent {senders[node]} replies in one round")
                continue
            if node not in self.node_ranks:
                ranked.add(node)
            reply = self.admit(message, state, report, other_ranks_refused)
            if reply is not None:
                accepted[node] = spill.keep(reply) if spill is not None else reply
        # Arrival order varies run to run; a content order makes the float sums, and so a
        # resumed run, bit-identical to an uninterrupted one.
        return sorted(accepted.values(), key=content_order)

    def _check_site_rank(self, reply: AcceptedReply) -> None:
        """A node trains one rank for the whole run: the first rank it replied with is its own,
        and a reply of another rank is rejected (its rank decides what the server takes it to
        have started from)."""
        rank = reply_rank(reply)
        if rank is None:
            return
        own = self.node_ranks.setdefault(reply.node_id, rank)
        if rank != own:
            raise ReplyRejectedError(
                f"{wire.LORA_RANK} {rank}, but this node trained rank {own} in earlier rounds: a "
                "site keeps one rank for the whole run (restart the run to change a node's "
                "node-config 'lora-r')"
            )

    def _check_update_norm(
        self, reply: AcceptedReply, state: RoundState, report: RoundReport
    ) -> None:
        """Record the reply's update norm (for the screen) and apply max-update-norm."""
        limit = self.settings.max_update_norm
        if limit is None and not self.settings.robust.screens:
            return
        norm = update_norm(reply, state.start_of(reply))
        if limit is not None and norm > limit:
            raise ReplyRejectedError(f"update norm {norm:.4g} exceeds max-update-norm {limit:.4g}")
        report.update_norms[reply.node_id] = norm


def content_order(reply: AcceptedReply) -> tuple[str, int]:
    """A reply's place in the order rounds merge buffered replies in (by content, so a resumed
    run sums in the same order as an uninterrupted one)."""
    return (reply.object_id, reply.num_examples)


def _release(report: RoundReport, reply: AcceptedReply) -> None:
    """Take an admitted reply back out of ``report`` (its node replied again)."""
    node = reply.node_id
    report.bytes_received -= reply.num_bytes
    report.accepted_nodes.remove(node)
    report.update_norms.pop(node, None)
    report.site_ranks.pop(node, None)
    report.site_truncation_errors.pop(node, None)
