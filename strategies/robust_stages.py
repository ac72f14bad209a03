"""The robust stages as a round applies them to checked replies, and the screen's memory.

``strategies.robust`` holds the math (the norm screen's bound, multi-Krum, the coordinate-wise
clamps, centered clipping) on tensors and floats; this module runs it on a round's replies:
screen each update norm against the bound (reject, or mark for clipping), select (multi-Krum),
then rewrite (clip the marked replies, clamp coordinates or clip to the center). Which of these
run is the registered defence's declaration (``strategies.robust.Stage``), not its name. The
accepted norms of earlier rounds, the screen's history, persist across rounds and go into
checkpoints.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from logging import WARNING
from typing import Any

import torch
from flwr.supercore import log

from strategies.reply_checks import AcceptedReply, ReplyRejectedError
from strategies.robust import (
    NormBound,
    RobustSettings,
    clip_scale,
    norm_bound,
    pool_label,
)
from strategies.robust_replies import ReplyDeltas, RewrittenReply, apply_rewrites
from strategies.round_report import RoundReport, RoundState


class RobustStages:
    """The robust options of a federation applied round by round, with the norm history."""

    def __init__(self, robust: RobustSettings) -> None:
        self.robust = robust
        # The accepted update norms of earlier rounds (the screen's history; checkpointed).
        self.norm_history: deque[float] = deque(maxlen=robust.history)

    def to_state(self) -> dict[str, Any]:
        """The screen's history, for checkpoints (``restore``)."""
        return {"norm-history": list(self.norm_history)}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Resume the screen's history from a checkpoint's ``to_state``."""
        self.norm_history.clear()
        self.norm_history.extend(float(norm) for norm in state.get("norm-history", []))

    def history_bound(self) -> NormBound | None:
        """The norm screen's bound from earlier rounds' accepted norms alone (None: < 2)."""
        return norm_bound([], self.norm_history, self.robust.norm_factor)

    def screen(
        self,
        accepted: list[AcceptedReply],
        report: RoundReport,
        global_tensors: Mapping[str, torch.Tensor],
        prescreen: RoundReport | None = None,
    ) -> list[AcceptedReply]:
        """The robust screen and selection, as the defence declares them: outsized updates
        rejected (or marked for clipping, see ``rewrite``), then its selection (multi-Krum).

        After a wrapper's pre-screen (DP; ``prescreen``) this round's replies are already
        screened and selected on their raw updates, and the wrapper has clipped them since: the
        pre-screen's bound is kept (reject mode then rejects nothing more), nothing is selected
        again.
        """
        defence = self.robust.defence
        if not (defence.screens or defence.selects):
            return accepted
        if prescreen is not None:
            report.norm_bound = prescreen.norm_bound
            report.norm_pool = prescreen.norm_pool
            report.screened = list(prescreen.screened)
            report.krum_dropped = list(prescreen.krum_dropped)
        elif defence.screens:  # else no bound: ``judge`` passes every reply
            norms = [report.update_norms[reply.node_id] for reply in accepted]
            if report.norm_pool is None:
                report.norm_pool = pool_label(streamed=False, pool_size=None)
            report.norm_bound = norm_bound(norms, self.norm_history, self.robust.norm_factor)
        kept: list[AcceptedReply] = []
        for reply in accepted:
            try:
                self.judge(reply, report)
            except ReplyRejectedError as rejection:
                report.reject(reply.node_id, rejection.reason)
                continue
            kept.append(reply)
        if defence.selects and prescreen is None:
            kept = self._select(kept, report, global_tensors)
        report.accepted_nodes[:] = [n for n in report.accepted_nodes if n not in report.rejected]
        return kept

    def _select(
        self,
        kept: list[AcceptedReply],
        report: RoundReport,
        global_tensors: Mapping[str, torch.Tensor],
    ) -> list[AcceptedReply]:
        """The defence's selection (multi-Krum) of ``kept``; the others are rejected with its
        reason (and counted in ``krum_dropped``, the report's selection drops)."""
        defence = self.robust.defence
        picked = set(defence.select(ReplyDeltas(kept, global_tensors), self.robust))
        for position, reply in enumerate(kept):
            if position not in picked:
                report.krum_dropped.append(reply.node_id)
                report.reject(reply.node_id, defence.dropped_reason(len(picked), len(kept)))
        return [reply for position, reply in enumerate(kept) if position in picked]

    def judge(self, reply: AcceptedReply, report: RoundReport) -> None:
        """Judge one reply's update norm against ``report.norm_bound``: above it, the reply is
        marked clipped (clip mode; ``clipped`` scales it) or rejected (ReplyRejectedError)."""
        norm = report.update_norms.get(reply.node_id)
        bound = report.norm_bound
        if bound is None or norm is None or norm <= bound.bound:
            return
        pool = report.norm_pool or pool_label(streamed=report.streamed, pool_size=None)
        reason = (
            f"update norm {norm:.4g} exceeds robust-norm-factor {self.robust.norm_factor:g} x "
            f"the median update norm {bound.reference:.4g} ({pool}, {bound.pool} norms)"
        )
        if self.robust.clip:
            log(
                WARNING, "round %d: clipped node %d: %s", report.server_round, reply.node_id, reason
            )
            report.clipped.append(reply.node_id)
            return
        report.screened.append(reply.node_id)
        raise ReplyRejectedError(reason)

    def clipped(
        self,
        reply: AcceptedReply,
        report: RoundReport,
        global_tensors: Mapping[str, torch.Tensor],
    ) -> AcceptedReply:
        """``reply`` with its update scaled down to the screen's bound, when clip mode is on and
        its norm is above the bound (what ``judge`` marks as clipped)."""
        bound = report.norm_bound
        norm = report.update_norms.get(reply.node_id)
        if not self.robust.clip or bound is None or norm is None or norm <= bound.bound:
            return reply
        return RewrittenReply.of(reply, global_tensors, scale=clip_scale(norm, bound.bound))

    def rewrite(
        self,
        accepted: list[AcceptedReply],
        report: RoundReport,
        global_tensors: Mapping[str, torch.Tensor],
    ) -> list[AcceptedReply]:
        """Clip the replies the screen marked (clip mode) to the bound, then the defence's
        rewrite from all of them (the coordinate-wise clamp, centered clipping), when it
        declares one."""
        accepted = [self.clipped(reply, report, global_tensors) for reply in accepted]
        defence = self.robust.defence
        if not defence.rewrites_coordinates:
            return accepted
        rewrites = defence.rewrite(ReplyDeltas(accepted, global_tensors), self.robust)
        report.clamped_fraction = rewrites.clamped_fraction
        return apply_rewrites(accepted, global_tensors, rewrites)

    def remember(self, state: RoundState) -> None:
        """Add the merged replies' update norms (clipped ones at the bound) to the history; after
        a pre-screen, the norms it saw (before a DP wrapper's clipping)."""
        if not self.robust.screens:
            return
        report = state.report
        seen = state.prescreen.update_norms if state.prescreen is not None else report.update_norms
        bound = report.norm_bound.bound if report.norm_bound is not None else math.inf
        for node in report.accepted_nodes:
            if node in seen:
                self.norm_history.append(min(seen[node], bound))
