"""FedRobustMerge: Flower's FedAvg sampling and messaging, RobustMerge (or any merge) aggregating.

Paper: Zeng et al., "RobustMerge: Parameter-Efficient Model Merging for MLLMs with Direction
Robustness", NeurIPS 2025 (https://arxiv.org/abs/2502.17159).

The strategy keeps Flower's Strategy surface and delegates the round's jobs to small parts:
``strategy_settings`` (the checked settings), ``reply_admission`` (per-reply checks),
``robust_stages`` (screen, select, rewrite), ``buffered_round`` and ``streamed_round`` (the two
aggregation paths), ``summed_round`` (secure aggregation's sums) and ``round_metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from protocol import wire
from strategies.buffered_round import close_buffered
from strategies.merging.streaming import round_fold
from strategies.node_sampling import sample_connected
from strategies.reply_admission import RecordKeys, ReplyAdmission
from strategies.reply_checks import DEFAULT_MAX_NUM_EXAMPLES, state_dict_to_record
from strategies.reply_spill import ReplySpill
from strategies.robust import RobustSettings
from strategies.robust_stages import RobustStages
from strategies.round_metrics import evaluation_metrics, train_metrics
from strategies.round_report import RoundReport, RoundState, open_state
from strategies.strategy_settings import Defaults, MergeSettings
from strategies.streamed_round import StreamedRound
from strategies.summed_round import merge_secure_round, skip_secure_round


class FedRobustMerge(FedAvg):
    """Federated LoRA with RobustMerge aggregation of the clients' updates.

    The server keeps the global adapter it sent (FedOpt's pattern) and merges the accepted
    replies with ``merge_method`` in its round form (``strategies.merging.rounds``; every method
    is size-invariant there): factor-wise methods merge the deltas (trained minus global) and
    apply ``global <- global + server_lr * merged``; product-space methods (svd, exact-mean,
    paper-equation) merge the clients' true weight updates B_t A_t - B_G A_G and factor the new
    global back to rank r. With ``merge_target="adapter"`` the clients' full adapters are merged
    instead (round 1 is then the paper's one-shot merge, bit for bit) and
    ``global <- global + server_lr * (merged - global)``.

    Sites may train lower LoRA ranks than the global's (docs/strategy.md "Mixed ranks").

    Parameters
    ----------
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        As in ``flwr.serverapp.strategy.FedAvg``; the fractions' and minimums' defaults are the
        run config's (fraction-evaluate 0: no client-side evaluation unless asked for).
    merge_method, mode, keep_ratio, scale_quantile, fuse_weight, merge_options, merge_target,
    server_lr, weight_by_examples, device, min_merge_replies, max_update_norm, robust,
    max_num_examples, diagnostics_modules, seed, uplink, personalization, buffer_replies,
    spill_dir
        The merge settings, checked and resolved into ``self.settings``; each is described in
        ``strategies.strategy_settings.MergeSettings.build``.
    """

    def __init__(
        self,
        *,
        fraction_train: float = Defaults.fraction_train,
        fraction_evaluate: float = Defaults.fraction_evaluate,
        min_train_nodes: int = Defaults.min_train_nodes,
        min_evaluate_nodes: int = Defaults.min_evaluate_nodes,
        min_available_nodes: int = 2,
        weighted_by_key: str = wire.NUM_EXAMPLES,
        arrayrecord_key: str = wire.ARRAYS,
        configrecord_key: str = wire.CONFIG,
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        merge_method: str = Defaults.merge_method,
        mode: str = Defaults.mode,
        keep_ratio: float = Defaults.keep_ratio,
        scale_quantile: float = Defaults.scale_quantile,
        fuse_weight: float = Defaults.fuse_weight,
        merge_options: Mapping[str, Any] | None = None,
        merge_target: str = Defaults.merge_target,
        server_lr: float = Defaults.server_lr,
        weight_by_examples: bool = Defaults.weight_by_examples,
        device: str | None = None,
        min_merge_replies: int = Defaults.min_merge_replies,
        max_update_norm: float | None = None,
        max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES,
        diagnostics_modules: int = 8,
        seed: int = Defaults.seed,
        uplink: str = Defaults.uplink,
        robust: RobustSettings | None = None,
        personalization: str = Defaults.personalization,
        buffer_replies: int = Defaults.buffer_replies,
        spill_dir: str | Path | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.settings = MergeSettings.build(
            merge_method=merge_method,
            mode=mode,
            keep_ratio=keep_ratio,
            scale_quantile=scale_quantile,
            fuse_weight=fuse_weight,
            merge_options=merge_options,
            merge_target=merge_target,
            server_lr=server_lr,
            weight_by_examples=weight_by_examples,
            device=device,
            min_merge_replies=min_merge_replies,
            max_update_norm=max_update_norm,
            max_num_examples=max_num_examples,
            diagnostics_modules=diagnostics_modules,
            seed=seed,
            uplink=uplink,
            robust=robust,
            personalization=personalization,
            buffer_replies=buffer_replies,
            spill_dir=spill_dir,
        )
        self.custom_train_metrics_aggr_fn = train_metrics_aggr_fn
        keys = RecordKeys(arrayrecord_key, configrecord_key, weighted_by_key)
        self.admission = ReplyAdmission(self.settings, keys)
        self.stages = RobustStages(self.settings.robust)
        self.streaming = StreamedRound(self.settings, self.admission, self.stages)
        # The training round in progress (or the last one closed); see ``round_report``.
        self.round: RoundState | None = None
        self.evaluated_sites: tuple[int, dict[int, dict[str, float]]] = (0, {})

    @property
    def current_global(self) -> dict[str, torch.Tensor] | None:
        """The global adapter sent in the open round (None before the first round)."""
        return self.round.global_tensors if self.round is not None else None

    def round_report(self, server_round: int | None = None) -> RoundReport:
        """The report of a closed round: ``server_round`` (default: the last one opened).

        Raises RuntimeError when that round is not the strategy's last, or is still open.
        """
        state = self.round
        if state is None or (server_round is not None and state.server_round != server_round):
            raise RuntimeError(f"round {server_round} is not this strategy's last round")
        return state.closed_report()

    def open_round(self, server_round: int, global_tensors: Mapping[str, torch.Tensor]) -> None:
        """Start round ``server_round`` on the global adapter that goes out to the clients (its
        float32 tensors are held, not copied: nothing here changes them in place)."""
        self.round = RoundState.open(
            server_round, {key: value.to(torch.float32) for key, value in global_tensors.items()}
        )

    def summary(self) -> None:
        """Log the configuration, FedAvg's and the merge's."""
        # FedAvg's summary prints "Weighted by: '<weighted_by_key>'", true of its evaluation
        # metrics but not of the merge when weight-by-examples is false: say what is weighted
        # while it prints, then restore the key (every reply is still read by it).
        key = self.weighted_by_key
        if not self.settings.weight_by_examples:
            self.weighted_by_key = (
                f"equal in the merge (weight-by-examples = false); {key} in metrics"
            )
        try:
            super().summary()
        finally:
            self.weighted_by_key = key
        self.settings.log_summary()

    def sample_nodes(
        self,
        connected: Callable[[], Iterable[int]],
        fraction: float,
        minimum: int,
        server_round: int,
    ) -> list[int]:
        """Seeded sampling of the ``connected()`` node ids (waiting until enough are there), so a
        resumed run asks the same nodes as an uninterrupted one, on every aggregation path."""
        return sample_connected(
            connected, fraction, minimum, self.min_available_nodes, self.settings.seed, server_round
        )

    def train_instruction(self, server_round: int) -> dict[str, int | float | str]:
        """What a client needs from the server to train round ``server_round``
        (``MergeSettings.train_instruction``)."""
        return self.settings.train_instruction(server_round)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Snapshot the global adapter and send it, with ``train_instruction``, to the sampled
        nodes."""
        self.open_round(server_round, arrays.to_torch_state_dict())
        if self.fraction_train == 0.0:
            return []
        node_ids = self.sample_nodes(
            grid.get_node_ids, self.fraction_train, self.min_train_nodes, server_round
        )
        log(INFO, "configure_train: sampled %d nodes", len(node_ids))
        config.update(self.train_instruction(server_round))
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global adapter to the sampled nodes for their local evaluation."""
        if self.fraction_evaluate == 0.0:
            return []
        node_ids = self.sample_nodes(
            grid.get_node_ids,
            self.fraction_evaluate,
            self.min_evaluate_nodes,
            server_round + 500_009,
        )
        config[wire.SERVER_ROUND] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted client metrics; malformed replies are logged and left out. Each
        site's global and personalised scores are kept for ``site_scores``."""
        sites: dict[int, dict[str, float]] = {}
        metrics = evaluation_metrics(
            server_round, replies, self.weighted_by_key, self.settings.max_num_examples, sites
        )
        self.evaluated_sites = (server_round, sites)
        return MetricRecord(metrics) if metrics is not None else None

    def site_scores(self, server_round: int) -> dict[int, dict[str, float]]:
        """Round ``server_round``'s evaluation, by node: each site's global and personalised
        scores (run-config ``personalization``); empty without personalisation or that round."""
        scored_round, sites = self.evaluated_sites
        return dict(sites) if scored_round == server_round else {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply, merge the accepted ones, apply the server step; closes the round
        (its report: ``round_report``). The round streams (``streamed_round``) when the method
        has a fold and no stage needs every reply at once (multi-Krum, the coordinate-wise
        clamps, centered clipping, a DP wrapper's pre-screen); otherwise it buffers. Outside a DP
        wrapper's round, a buffered round whose method has a fold folds its replies one at a
        time once the defence has seen them all (``StreamedRound.fold_buffered``); the others
        (svd, exact-mean, paper-equation, ...) are merged at once (``buffered_round``)."""
        state = open_state(self.round, server_round)
        robust = self.settings.robust
        if state.prescreen is not None:
            state.report.rejected.update(state.prescreen.rejected)
        fold = None
        if state.prescreen is None:
            fold = round_fold(
                self.settings.method, list(state.global_tensors), self.settings.device
            )
        if fold is not None and not (robust.selects or robust.rewrites_coordinates):
            folded = self.streaming.collect(state, replies, fold)
            if not isinstance(folded, list):
                return self._result(state, self.streaming.finish(state, folded), folded.sources)
            accepted = folded  # a first round that ended before its pool filled
            merged = close_buffered(self.settings, self.stages, state, accepted)
        else:
            label = f"round-{server_round}"  # past buffer-replies, replies spill to disk
            with ReplySpill(self.settings.buffer_replies, self.settings.spill_dir, label) as spill:
                admitted = self.admission.admit_all(replies, state, state.report, spill=spill)
                accepted = self.stages.screen(
                    admitted, state.report, state.global_tensors, state.prescreen
                )
                if fold is not None:  # a defence needs every reply at once; the merge does not
                    merged = self.streaming.fold_buffered(state, accepted, fold)
                else:
                    merged = close_buffered(self.settings, self.stages, state, accepted)
                state.report.spilled = spill.written
        return self._result(
            state, merged, [(reply.num_examples, reply.content) for reply in accepted]
        )

    def aggregate_sums(
        self,
        server_round: int,
        sums: Mapping[str, torch.Tensor],
        summed_nodes: list[int],
        extra_metrics: Mapping[str, float] | None = None,
        bytes_received: int = 0,
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """Secure aggregation's ``aggregate_train``: the merge finished from the sums over
        ``summed_nodes`` of their per-client terms (``summed_round``); closes the round.
        Unusable sums skip it (the global stays)."""
        state = open_state(self.round, server_round)
        merged = merge_secure_round(self.settings, state, sums, summed_nodes, bytes_received)
        return self._result(state, merged, [], extra_metrics)

    def skip_secure_round(
        self, server_round: int, reason: str, extra_metrics: Mapping[str, float] | None = None
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """Close secure round ``server_round`` without a merge (the global stays), saying why
        (e.g. SecAgg+ halted before any sum reached the strategy)."""
        state = self.round
        if state is None or state.server_round != server_round:
            raise RuntimeError(f"round {server_round} was not opened")
        skip_secure_round(state, reason)
        return self._result(state, None, [], extra_metrics)

    def _result(
        self,
        state: RoundState,
        merged: dict[str, torch.Tensor] | None,
        sources: list[tuple[int, RecordDict]],
        extra_metrics: Mapping[str, float] | None = None,
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """The closed round's new global (None: skipped) and its train metrics, from the merged
        replies' (num-examples, content) and the report."""
        record = state_dict_to_record(merged) if merged is not None else None
        metrics = train_metrics(
            state.report,
            sources if merged is not None else [],
            self.settings.robust,
            self.weighted_by_key,
            self.custom_train_metrics_aggr_fn,
        )
        metrics.update(dict(extra_metrics or {}))
        return record, metrics

    def screen_train_replies(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[list[Message], dict[int, str]]:
        """The replies that pass the per-reply checks, and the rejected ones' reasons.

        For wrappers that must touch replies before ``aggregate_train`` (DP clipping): they
        hand on only what would be accepted, and the rejections reach this round's report.
        """
        state = open_state(self.round, server_round)
        messages = list(replies)
        scratch = RoundReport(server_round=server_round)
        accepted = self.admission.admit_all(messages, state, scratch, wrapped=True)
        self.stages.screen(accepted, scratch, state.global_tensors)
        state.prescreen = scratch
        kept_nodes = set(scratch.accepted_nodes)
        return [m for m in messages if m.metadata.src_node_id in kept_nodes], scratch.rejected

    def robust_state(self) -> dict[str, Any]:
        """The screen's history and each node's rank, for checkpoints."""
        return {**self.stages.to_state(), **self.admission.to_state()}

    def restore_robust_state(self, state: Mapping[str, Any]) -> None:
        """Resume the screen's history and the nodes' ranks from ``robust_state``."""
        self.stages.restore(state)
        self.admission.restore(state)
