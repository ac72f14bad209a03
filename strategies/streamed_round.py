"""A training round folded one reply at a time: each is checked, screened, folded into running
sums and dropped, so the server holds a bounded number of adapters whatever the number of
clients (docs/strategy.md, "Streaming rounds").

The new global does not depend on the arrival order (exact sums); accepted nodes are listed in
node order. Without a norm history (the first round) the first ``robust.pool`` checked replies
are held back and screened against their own median (and what history there is), then folded,
and every later reply is screened against that pool's bound on arrival. Which replies are
accepted then depends on the arrival order only through which replies formed the pool; the new
global is the same bit for bit for any order that accepts the same set. A round of at most
``robust.pool`` replies is merged buffered instead (``StreamedRound.collect`` hands its pool
back).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from logging import INFO

import torch
from flwr.app import Message, RecordDict
from flwr.supercore import log

from strategies.merging.rounds import DeltaView, global_change_norm
from strategies.merging.streaming import RobustMergeFold, RoundFold
from strategies.reply_admission import ReplyAdmission, content_order
from strategies.reply_checks import AcceptedReply
from strategies.reply_tensors import ReplyTensors
from strategies.robust import pool_label
from strategies.robust_stages import RobustStages
from strategies.round_diagnostics import DiagnosticsSample
from strategies.round_metrics import metrics_only
from strategies.round_report import RoundReport, RoundState
from strategies.sparse_uplink import SparseDeltaView, SparseReply
from strategies.strategy_settings import MergeSettings


@dataclass
class FoldedReplies:
    """What a streamed round kept of its replies: the running sums, the diagnostics' sample and
    each accepted reply's (num-examples, metrics)."""

    fold: RoundFold
    sample: DiagnosticsSample
    sources: list[tuple[int, RecordDict]] = field(default_factory=list)


class StreamedRound:
    """Streams rounds' replies into a merge method's fold."""

    def __init__(
        self, settings: MergeSettings, admission: ReplyAdmission, stages: RobustStages
    ) -> None:
        self.settings = settings
        self.admission = admission
        self.stages = stages

    def collect(
        self, state: RoundState, replies: Iterable[Message], fold: RoundFold
    ) -> FoldedReplies | list[AcceptedReply]:
        """Fold every admitted reply of ``replies`` into ``fold``; or, when the stream ended
        before a first round's pool filled, the pool's screened replies (in content order) for
        a buffered merge."""
        report = state.report
        seen: set[int] = set()
        stream: Iterator[Message] = iter(replies)
        pool: list[AcceptedReply] = []
        robust = self.settings.robust
        if robust.screens and self.stages.history_bound() is None:
            pool, following = self._hold_back_pool(state, stream, seen)
            if following is None:
                pool.sort(key=content_order)
                return self.stages.screen(pool, report, state.global_tensors)
            stream = itertools.chain([following], stream)
            report.streamed = True
            report.norm_pool = pool_label(streamed=True, pool_size=len(pool))
            pool = self.stages.screen(pool, report, state.global_tensors)
        elif robust.screens:
            report.norm_pool = pool_label(streamed=True, pool_size=None)
            report.norm_bound = self.stages.history_bound()
        report.streamed = True
        folded = self._folded(state, fold)
        while pool:
            self._fold(state, pool.pop(), folded)
        for message in stream:
            node = message.metadata.src_node_id
            if node in seen:
                report.reject(node, "node sent a second reply in one round")
                continue
            seen.add(node)
            reply = self.admission.admit(
                message, state, report, self.settings.other_ranks_refused, self.stages.judge
            )
            if reply is not None:
                self._fold(state, reply, folded)
        report.accepted_nodes.sort()
        return folded

    def fold_buffered(
        self, state: RoundState, accepted: list[AcceptedReply], fold: RoundFold
    ) -> dict[str, torch.Tensor] | None:
        """A buffered round's end when its method folds: the screened replies rewritten by the
        defence (centered clipping, the coordinate-wise clamp; all of them needed at once),
        then folded one at a time, so the merge holds one reply's tensors instead of every
        reply's copy of a module; the new global is what a streamed round of the same replies
        gives, in any order. None when too few to merge. Closes the round."""
        report = state.report
        if not report.enough(len(accepted), self.settings.min_merge_replies):
            state.closed = True
            return None
        rewritten = self.stages.rewrite(accepted, report, state.global_tensors)
        folded = self._folded(state, fold, by_reference=True)  # scored below, replies held
        for reply in rewritten:
            self._fold_rewritten(state, reply, folded)
        new_global = self.finish(state, folded)
        state.closed_report()  # the direction scores now, as in every buffered round's metrics
        return new_global

    def _folded(
        self, state: RoundState, fold: RoundFold, *, by_reference: bool = False
    ) -> FoldedReplies:
        """An empty fold of ``state``'s round with its diagnostics' seeded sample (holding the
        sampled replies themselves, ``by_reference``, when they outlive the scoring)."""
        sample = DiagnosticsSample(
            list(state.global_tensors),
            self.settings.diagnostics_modules,
            self.settings.seed,
            state.report.server_round,
            by_reference=by_reference,
        )
        return FoldedReplies(fold, sample)

    def _fold(self, state: RoundState, reply: AcceptedReply, folded: FoldedReplies) -> None:
        """One accepted reply (clipped to the bound in clip mode) into the running sums."""
        reply = self.stages.clipped(reply, state.report, state.global_tensors)
        self._fold_rewritten(state, reply, folded)

    def _fold_rewritten(
        self, state: RoundState, reply: AcceptedReply, folded: FoldedReplies
    ) -> None:
        """One reply, as the stages left it (clipped, rewritten), into the running sums."""
        report = state.report
        base = state.global_tensors
        began = time.perf_counter()
        weight = float(reply.num_examples) if self.settings.weight_by_examples else 1.0
        fold = folded.fold
        if isinstance(reply, SparseReply) and isinstance(fold, RobustMergeFold):
            fold.add_pruned(SparseDeltaView(reply), reply.scales, weight)
        elif self.settings.merge_target == "delta":
            fold.add(DeltaView(ReplyTensors(reply), base), weight)
        else:
            fold.add(ReplyTensors(reply), weight)
        folded.sample.offer(reply, weight)
        report.fold_seconds += time.perf_counter() - began
        folded.sources.append((reply.num_examples, metrics_only(reply.content)))

    def _hold_back_pool(
        self, state: RoundState, replies: Iterator[Message], seen: set[int]
    ) -> tuple[list[AcceptedReply], Message | None]:
        """A first round's pool: the first ``robust.pool`` replies that pass the per-reply
        checks (rejected ones are dropped on arrival), and the next reply, or None when the
        stream ended first (the round is then buffered). The bound is in held adapters: at most
        pool + 1 replies at once, whatever the number of clients.

        A node that replies twice while its first reply is held has both rejected, as a
        buffered round does."""
        report = state.report
        pool: list[AcceptedReply] = []
        senders: Counter[int] = Counter()
        for message in replies:
            node = message.metadata.src_node_id
            if len(pool) >= self.settings.robust.pool and node not in seen:
                return pool, message
            senders[node] += 1
            if node in seen:
                _release(report, [reply for reply in pool if reply.node_id == node])
                pool = [reply for reply in pool if reply.node_id != node]
                report.reject(node, f"node sent {senders[node]} replies in one round")
                continue
            seen.add(node)
            reply = self.admission.admit(message, state, report, self.settings.other_ranks_refused)
            if reply is not None:
                pool.append(reply)
        return pool, None

    def finish(self, state: RoundState, folded: FoldedReplies) -> dict[str, torch.Tensor] | None:
        """Close the round: the new global from the running sums (the division, then the server
        step), or None when too few replies were folded (the round is skipped). The direction
        diagnostics are deferred to when the report is asked for."""
        report = state.report
        base = state.global_tensors
        settings = self.settings
        state.closed = True
        if not report.enough(folded.fold.count, settings.min_merge_replies):
            return None
        self.stages.remember(state)
        began = time.perf_counter()
        new_global = folded.fold.finish()
        settings.server_step.apply(base, new_global)
        report.merge_seconds = time.perf_counter() - began
        report.merged_update_norm = global_change_norm(base, new_global)
        state.deferred = partial(
            folded.sample.score, base, new_global, settings.weight_by_examples, report
        )
        log(
            INFO,
            "round %d: %s %d replies into the merge (%d rejected); %.3fs from the last "
            "reply to the new global, |update| = %.4g",
            report.server_round,
            "streamed" if report.streamed else "folded the buffered",
            folded.fold.count,
            len(report.rejected),
            report.merge_seconds,
            report.merged_update_norm,
        )
        return new_global


def _release(report: RoundReport, held: list[AcceptedReply]) -> None:
    """Take held replies back out of the report's accepted count (their node is rejected)."""
    for reply in held:
        report.bytes_received -= reply.num_bytes
        report.accepted_nodes.remove(reply.node_id)
        report.update_norms.pop(reply.node_id, None)
