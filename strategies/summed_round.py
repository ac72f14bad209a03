"""A secure-aggregation round's merge: RobustMerge paper-exact finished from the sums of the
clients' per-client terms (``merging.decomposed``), then the same server step as every other
path. Only the sums are seen, so there is no per-reply check, screen or diagnostic."""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import INFO, WARNING

import torch
from flwr.supercore import log

from strategies.merging.decomposed import finish_from_sums
from strategies.merging.errors import MergeInputError
from strategies.merging.rounds import global_change_norm
from strategies.round_report import RoundState
from strategies.strategy_settings import MergeSettings


def merge_secure_round(
    settings: MergeSettings,
    state: RoundState,
    sums: Mapping[str, torch.Tensor],
    summed_nodes: list[int],
    bytes_received: int,
) -> dict[str, torch.Tensor] | None:
    """Close ``state``'s round on the sums over ``summed_nodes`` of their terms: the new global
    (equal weights), or None when the round is skipped (fewer than two clients summed, or
    unusable sums; the report says why). The merge's time and update norm go into the report."""
    report = state.report
    report.accepted_nodes[:] = list(summed_nodes)
    report.bytes_received = bytes_received
    state.closed = True
    count = len(summed_nodes)
    if count < max(settings.min_merge_replies, 2):
        skip_secure_round(state, f"{count} clients summed")
        return None
    started = time.perf_counter()
    try:
        merged = finish_from_sums(sums, count, form=settings.method_form)
    except MergeInputError as error:
        skip_secure_round(state, f"unusable sums: {error}")
        return None
    settings.server_step.apply(state.global_tensors, merged)
    report.merge_seconds = time.perf_counter() - started
    report.merged_update_norm = global_change_norm(state.global_tensors, merged)
    report.secure_status = "completed"
    log(
        INFO,
        "round %d: merged the secure sum of %d clients, |update| = %.4g",
        report.server_round,
        count,
        report.merged_update_norm,
    )
    return merged


def skip_secure_round(state: RoundState, reason: str) -> None:
    """Close ``state``'s round without a merge (the global stays), saying why."""
    state.closed = True
    state.report.skipped = True
    state.report.secure_status = reason
    log(WARNING, "round %d: %s: round skipped, global unchanged", state.server_round, reason)
