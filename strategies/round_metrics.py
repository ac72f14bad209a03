"""The train metrics of one round: the clients' example-weighted metrics and the round report's."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING

from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore import log

from protocol import wire
from strategies.reply_checks import ReplyRejectedError, check_num_examples
from strategies.robust import RobustSettings
from strategies.round_report import RoundReport

MetricValue = int | float | list[int] | list[float]


def report_metrics(report: RoundReport, robust: RobustSettings) -> dict[str, MetricValue]:
    """What the round report adds to the round's train metrics (metrics.json ``train``)."""
    metrics: dict[str, MetricValue] = {}
    metrics["clients-accepted"] = len(report.accepted_nodes)
    metrics["clients-rejected"] = len(report.rejected)
    metrics["round-skipped"] = int(report.skipped)
    metrics["merge-seconds"] = report.merge_seconds
    metrics["bytes-received"] = report.bytes_received
    metrics["merged-update-norm"] = report.merged_update_norm
    if robust.screens:
        metrics["robust-screened"] = len(report.screened)
        metrics["robust-clipped"] = len(report.clipped)
        if report.norm_bound is not None:
            metrics["robust-norm-reference"] = report.norm_bound.reference
            metrics["robust-norm-bound"] = report.norm_bound.bound
    if robust.selects:
        metrics["robust-krum-dropped"] = len(report.krum_dropped)
    if report.clamped_fraction is not None:
        metrics["robust-clamped-fraction"] = report.clamped_fraction
    if report.relative_error is not None:
        metrics["rank-truncation-error"] = report.relative_error
    if report.update_relative_error is not None:
        metrics["update-truncation-error"] = report.update_relative_error
    if len(set(report.site_ranks.values())) > 1 or any(report.site_truncation_errors.values()):
        errors = list(report.site_truncation_errors.values())
        metrics["site-truncation-error-max"] = max(errors)
        metrics["site-rank-min"] = min(report.site_ranks.values())
    metrics.update(diagnostics_metrics(report))
    return metrics


def diagnostics_metrics(report: RoundReport) -> dict[str, MetricValue]:
    """The direction diagnostics' summary: the factor-wise gap and the clients' direction
    cosines and retained fractions (mean and min). A streamed round computes them only when its
    report is asked for, after ``aggregate_train`` returned its metrics, so the round loop adds
    them to the history entry from the report."""
    metrics: dict[str, MetricValue] = {}
    if report.factorwise_gap is not None:
        metrics["factorwise-gap"] = report.factorwise_gap
    if report.direction_scores:
        cosines = [s["cosine"] for s in report.direction_scores.values()]
        retained = [s["retained"] for s in report.direction_scores.values()]
        metrics["direction-cosine-mean"] = sum(cosines) / len(cosines)
        metrics["direction-cosine-min"] = min(cosines)
        metrics["singular-retained-mean"] = sum(retained) / len(retained)
        metrics["singular-retained-min"] = min(retained)
    return metrics


def metrics_only(content: RecordDict) -> RecordDict:
    """A reply's metric records without its arrays: what a streamed round keeps of a merged
    reply for the round's train metrics once the reply itself is dropped."""
    return RecordDict(dict(content.metric_records.items()))


def weighted_metrics(
    replies: list[tuple[int, RecordDict]],
) -> dict[str, int | float | list[int] | list[float]]:
    """Example-weighted mean of each numeric metric, over the replies that report it.

    Unlike Flower's ``aggregate_metricrecords`` it tolerates clients reporting different keys,
    since replies come from sites we do not control. ``num-examples`` becomes the total.
    """
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for count, content in replies:
        for record in content.metric_records.values():
            for key, value in record.items():
                if key in (wire.NUM_EXAMPLES, wire.LORA_RANK) or isinstance(value, (list, bool)):
                    continue
                number = float(value)
                if not math.isfinite(number):
                    continue
                totals[key] = totals.get(key, 0.0) + number * count
                weights[key] = weights.get(key, 0.0) + count
    result: dict[str, int | float | list[int] | list[float]] = {
        key: totals[key] / weights[key] for key in totals
    }
    result[wire.NUM_EXAMPLES] = sum(count for count, _ in replies)
    return result


def evaluation_metrics(
    server_round: int,
    replies: Iterable[Message],
    weighted_by_key: str,
    max_num_examples: int,
    sites: dict[int, dict[str, float]] | None = None,
) -> dict[str, MetricValue] | None:
    """The evaluation replies' example-weighted metrics (None: no usable reply); a reply with
    an error or a bad example count is logged and left out. ``sites``, when given, receives each
    usable reply's global and personalised scores by node (``personal_scores``)."""
    usable: list[tuple[int, RecordDict]] = []
    for message in replies:
        node = message.metadata.src_node_id
        try:
            if message.has_error():
                raise ReplyRejectedError(f"client reported an error: {message.error.reason}")
            count = check_num_examples(
                message.content.metric_records, weighted_by_key, max_num_examples
            )
        except ReplyRejectedError as rejection:
            log(
                WARNING,
                "round %d: evaluation reply of node %d ignored: %s",
                server_round,
                node,
                rejection.reason,
            )
            continue
        usable.append((count, message.content))
        numbers = numeric_metrics(message.content)
        log_personal_scores(server_round, f"node {node}", numbers)
        own = personal_scores(numbers)
        if sites is not None and own:
            sites[node] = own
    if not usable:
        return None
    metrics = weighted_metrics(usable)
    log_personal_scores(server_round, "mean over the sites", metrics)
    return metrics


def numeric_metrics(content: RecordDict) -> dict[str, float]:
    """A reply's numeric metrics, every metric record merged (bools and lists left out)."""
    return {
        key: float(value)
        for record in content.metric_records.values()
        for key, value in record.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def personal_pairs(scores: Mapping[str, object]) -> list[tuple[str, str]]:
    """The (global, personalised) score keys of ``wire.PERSONALIZED_SCORES`` that ``scores``
    (an evaluate reply's metrics, or the sites' mean) holds both of; empty without
    personalisation."""
    return [
        (key, personal)
        for key, personal in wire.PERSONALIZED_SCORES
        if key in scores and personal in scores
    ]


def personal_scores(scores: Mapping[str, float]) -> dict[str, float]:
    """The global and personalised scores of one evaluate reply's metrics (``personal_pairs``)."""
    return {name: scores[name] for pair in personal_pairs(scores) for name in pair}


def log_personal_scores(server_round: int, who: str, scores: Mapping[str, object]) -> None:
    """One line comparing ``who``'s personalised scores with the global's, when ``scores`` has
    them (run-config ``personalization``; issue 27)."""
    pairs = [
        f"{key} {scores[key]:.4f} global -> {scores[personal]:.4f} personalised"
        for key, personal in personal_pairs(scores)
    ]
    if pairs:
        log(INFO, "round %d: %s: %s", server_round, who, ", ".join(pairs))


def train_metrics(
    report: RoundReport,
    accepted: list[tuple[int, RecordDict]],
    robust: RobustSettings,
    weighted_by_key: str,
    custom: Callable[[list[RecordDict], str], MetricRecord] | None = None,
) -> MetricRecord:
    """A round's train metrics: the merged clients' example-weighted metrics (or the custom
    aggregation's) from their (num-examples, content), and the report's."""
    if custom is not None and accepted:
        metrics = custom([content for _, content in accepted], weighted_by_key)
    else:
        metrics = MetricRecord(weighted_metrics(accepted))
    metrics.update(report_metrics(report, robust))
    return metrics
