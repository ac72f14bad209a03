"""A training round merged at once from its accepted (screened, rewritten) replies: the merge
engine's round (``merging.rounds.merge_round``), or the sparse uplink's merge of the clients'
pruned deltas, then the server step and the direction diagnostics."""

from __future__ import annotations

from logging import INFO

import torch
from flwr.supercore import log

from strategies.merging.rounds import global_change_norm, merge_round
from strategies.reply_checks import AcceptedReply, reply_rank
from strategies.reply_tensors import ReplyTensors
from strategies.robust_stages import RobustStages
from strategies.round_diagnostics import DiagnosticsSample
from strategies.round_report import RoundState
from strategies.sparse_uplink import SparseReply, merge_sparse_replies
from strategies.strategy_settings import MergeSettings


def close_buffered(
    settings: MergeSettings,
    stages: RobustStages,
    state: RoundState,
    accepted: list[AcceptedReply],
) -> dict[str, torch.Tensor] | None:
    """The buffered round's end: the accepted (screened) replies rewritten and merged at once;
    None when too few to merge (the round is skipped). Closes the round."""
    state.closed = True
    if not state.report.enough(len(accepted), settings.min_merge_replies):
        return None
    stages.remember(state)
    rewritten = stages.rewrite(accepted, state.report, state.global_tensors)
    return merge_buffered(settings, state, rewritten)


def merge_buffered(
    settings: MergeSettings, state: RoundState, accepted: list[AcceptedReply]
) -> dict[str, torch.Tensor]:
    """The new global from ``accepted``; the merge's timing, errors and update norm (and, at
    equal ranks, the direction scores) go into the round's report."""
    report = state.report
    base = state.global_tensors
    weights = (
        [float(reply.num_examples) for reply in accepted] if settings.weight_by_examples else None
    )
    global_rank = state.global_rank()
    if settings.sparse_method is not None:
        sparse = [reply for reply in accepted if isinstance(reply, SparseReply)]
        result = merge_sparse_replies(sparse, settings.sparse_method, weights, settings.device)
        settings.server_step.apply(base, result.tensors)
    else:
        ranks = {reply_rank(reply) for reply in accepted} - {global_rank}
        result = merge_round(
            base,
            [ReplyTensors(reply) for reply in accepted],
            settings.method,
            weights,
            server_lr=settings.server_lr,
            target=settings.merge_target,
            device=settings.device,
            labels=[f"node {reply.node_id}" for reply in accepted],
            sent={rank: state.site_start(rank).tensors for rank in ranks if rank is not None},
        )
    report.merge_seconds = result.report.seconds
    report.relative_error = result.report.relative_error
    report.update_relative_error = result.report.update_relative_error
    new_global = result.tensors
    report.merged_update_norm = global_change_norm(base, new_global)
    if all(reply_rank(reply) == global_rank for reply in accepted):
        # The diagnostics compare factors with the global's: equal ranks only.
        sample = DiagnosticsSample(
            list(base),
            settings.diagnostics_modules,
            settings.seed,
            report.server_round,
            by_reference=True,  # scored now, while the round still holds its replies
        )
        for index, reply in enumerate(accepted):
            sample.offer(reply, weights[index] if weights is not None else 1.0)
        sample.score(base, new_global, weights is not None, report)
    log(
        INFO,
        "round %d: merged %d replies (%d rejected) in %.3fs, |update| = %.4g",
        report.server_round,
        len(accepted),
        len(report.rejected),
        report.merge_seconds,
        report.merged_update_norm,
    )
    return new_global
