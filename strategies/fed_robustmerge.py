"""FedRobustMerge: Flower's FedAvg sampling and messaging, RobustMerge (or any registered method)
as the aggregation, each reply judged on its own.

Paper: Zeng et al., "RobustMerge: Parameter-Efficient Model Merging for MLLMs with Direction
Robustness", NeurIPS 2025 (https://arxiv.org/abs/2502.17159).
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from strategies import wire
from strategies.combinations import (
    combination_refusal,
    mixed_rank_refusal,
    robust_refusal,
    round_method,
)
from strategies.merging import (
    accepted_hyperparameters,
    available_methods,
    resolve_device,
)
from strategies.merging.decomposed import finish_from_sums
from strategies.merging.errors import MergeInputError
from strategies.merging.ranks import SiteAdapter, adapter_at_rank
from strategies.merging.robustmerge import RobustMerge
from strategies.merging.rounds import (
    TARGETS,
    DeltaView,
    apply_server_step,
    global_change_norm,
    merge_round,
)
from strategies.merging.streaming import RobustMergeFold, RoundFold, round_fold
from strategies.reply_checks import (
    DEFAULT_MAX_NUM_EXAMPLES,
    AcceptedReply,
    ReplyRejectedError,
    check_num_examples,
    check_train_reply,
    global_rank,
    reply_rank,
    state_dict_to_record,
)
from strategies.robust import (
    DEFAULT_CENTER_RADIUS,
    NormBound,
    RobustSettings,
    clip_scale,
    norm_bound,
    pool_label,
)
from strategies.robust_replies import (
    RewrittenReply,
    clamp_coordinates,
    clip_to_center,
    krum_keep,
    update_norm,
)
from strategies.round_diagnostics import DiagnosticsSample, score_directions
from strategies.round_metrics import metrics_only, report_metrics, weighted_metrics
from strategies.round_report import RoundReport, RoundState
from strategies.sparse_uplink import (
    SparseDeltaView,
    SparseReply,
    check_sparse_train_reply,
    merge_settings,
    merge_sparse_replies,
)

EXAMPLE_WEIGHTED_METHODS = frozenset({"fedavg", "svd", "exact-mean"})


def seeded_sample(node_ids: Iterable[int], wanted: int, seed: int, server_round: int) -> list[int]:
    """``wanted`` of ``node_ids``, ascending; the same ones for the same seed and round, so a
    resumed run asks the nodes an uninterrupted one would."""
    population = sorted(node_ids)
    return sorted(random.Random(seed * 1_000_003 + server_round).sample(population, wanted))


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

    Sites may train lower LoRA ranks than the global's (issue 16, docs/strategy.md "Mixed
    ranks"): a reply's ``lora-rank`` sets the shapes it must have, each site is taken to have
    started from the global truncated to its rank (``ranks.adapter_at_rank``, as the client
    computes it), and product-space methods merge them (``ranks.merge_mixed_ranks``); settings
    that cannot (``combinations.mixed_rank_refusal``) reject such replies with the reason.

    Parameters
    ----------
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        As in ``flwr.serverapp.strategy.FedAvg``.
    merge_method : str (default: "robustmerge")
        Any registered merge method (``strategies.available_methods()``).
    mode : str (default: "paper-exact")
        RobustMerge's mode ("paper-exact" or "paper-equation").
    keep_ratio : float (default: 0.2)
    scale_quantile : float (default: 0.2)
    fuse_weight : float (default: 2.0)
        Passed to the method when it takes them.
    merge_options : dict, optional
        Further method hyperparameters (e.g. ``{"drop_rate": 0.3}`` for dare).
    merge_target : str (default: "delta")
        "delta" or "adapter", see above.
    server_lr : float (default: 1.0)
        eta in the server step.
    weight_by_examples : bool (default: False)
        Weight clients by num-examples in RobustMerge (lambda_t = lambda T n_t / sum n); fedavg,
        svd and exact-mean always weight by examples.
    device : str, optional
        Merge device; None picks CUDA when available.
    min_merge_replies : int (default: 1)
        Fewer accepted replies than this skip the round; the global stays as it was.
    max_update_norm : float, optional
        Replies whose update (delta) Frobenius norm exceeds this are rejected.
    robust : RobustSettings, optional (default: the norm screen, factor 10, reject)
        Byzantine-robust stages (``strategies.robust``): every option but "none" screens each
        update norm against ``norm_factor`` x the lower median of this round's norms and the
        last ``history`` accepted norms, rejecting (or, with ``clip``, clipping) outsized ones;
        "krum" then keeps the multi-Krum selection, "trimmed-mean" and "median" clamp each
        client's delta coordinate-wise before the merge. A lone first reply (no history yet)
        is accepted and its norm recorded.
    max_num_examples : int (default: 1e9)
        Upper bound on a reply's num-examples (it weights the merge).
    diagnostics_modules : int (default: 8)
        Modules sampled (evenly spaced) for the direction-robustness diagnostics; 0 disables.
    seed : int (default: 0)
        Seeds node sampling (round r samples with seed + r) so runs and resumes repeat.
    uplink : str (default: "dense")
        "dense": replies carry the trained LoRA tensors. "sparse": each client sends its own
        pruned delta and scale vectors (``strategies.sparse_uplink``); needs merge_method
        "robustmerge" and merge_target "delta"; the merged global equals the dense one.
    """

    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = wire.NUM_EXAMPLES,
        arrayrecord_key: str = wire.ARRAYS,
        configrecord_key: str = wire.CONFIG,
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        merge_method: str = "robustmerge",
        mode: str = "paper-exact",
        keep_ratio: float = 0.2,
        scale_quantile: float = 0.2,
        fuse_weight: float = 2.0,
        merge_options: Mapping[str, Any] | None = None,
        merge_target: str = "delta",
        server_lr: float = 1.0,
        weight_by_examples: bool = False,
        device: str | None = None,
        min_merge_replies: int = 1,
        max_update_norm: float | None = None,
        max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES,
        diagnostics_modules: int = 8,
        seed: int = 0,
        uplink: str = "dense",
        robust: RobustSettings | None = None,
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
        if merge_method not in available_methods():
            raise ValueError(
                f"unknown merge method {merge_method!r}; known methods: "
                f"{', '.join(available_methods())}"
            )
        if merge_target not in TARGETS:
            raise ValueError(f"merge_target must be one of {TARGETS}, got {merge_target!r}")
        if min_merge_replies < 1:
            raise ValueError(f"min_merge_replies must be >= 1, got {min_merge_replies}")
        if uplink not in wire.UPLINKS:
            raise ValueError(f"uplink must be one of {wire.UPLINKS}, got {uplink!r}")
        refusal = combination_refusal(merge_method, mode, merge_target, uplink)
        if refusal is not None:
            raise ValueError(refusal)
        self.robust = robust if robust is not None else RobustSettings()
        refusal = robust_refusal(self.robust, uplink)
        if refusal is not None:
            raise ValueError(refusal)
        if max_update_norm is not None and not max_update_norm > 0:
            raise ValueError(f"max_update_norm must be > 0, got {max_update_norm}")
        self.merge_method = merge_method
        offered = {
            "mode": mode,
            "keep_ratio": keep_ratio,
            "scale_quantile": scale_quantile,
            "fuse_weight": fuse_weight,
            **(merge_options or {}),
        }
        accepted = accepted_hyperparameters(merge_method)
        unknown = sorted(set(merge_options or {}) - set(accepted))
        if unknown:
            raise ValueError(
                f"merge method {merge_method!r} does not take {', '.join(unknown)}; "
                f"it takes: {', '.join(accepted) or 'no hyperparameters'}"
            )
        self.merge_hyperparameters = {k: v for k, v in offered.items() if k in accepted}
        self.merge_target = merge_target
        self.uplink = uplink
        self.method = round_method(merge_method, merge_target, self.merge_hyperparameters)
        self.sparse_method = (
            self.method if uplink == "sparse" and isinstance(self.method, RobustMerge) else None
        )
        self.server_lr = float(server_lr)
        self.weight_by_examples = weight_by_examples or merge_method in EXAMPLE_WEIGHTED_METHODS
        self.device = str(resolve_device(device))
        self.min_merge_replies = min_merge_replies
        self.max_update_norm = max_update_norm
        self.max_num_examples = max_num_examples
        self.diagnostics_modules = diagnostics_modules
        self.seed = seed
        self.custom_train_metrics_aggr_fn = train_metrics_aggr_fn
        # Why a reply of another LoRA rank than the global's is refused (None: accepted).
        self.other_ranks_refused = mixed_rank_refusal(
            merge_method, mode, merge_target, uplink, self.robust
        )
        # The training round in progress (or the last one closed); see ``round_report``.
        self.round: RoundState | None = None
        # The accepted update norms of earlier rounds (the screen's history; checkpointed).
        self.norm_history: deque[float] = deque(maxlen=self.robust.history)
        # Each node's LoRA rank, from its first checked reply (checkpointed with the screen's
        # history): a later reply of another rank is rejected.
        self.node_ranks: dict[int, int] = {}

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
        if not state.closed:
            raise RuntimeError(f"round {state.server_round} is still open (not aggregated)")
        if state.deferred is not None:
            deferred, state.deferred = state.deferred, None
            deferred()
        return state.report

    def open_round(self, server_round: int, global_tensors: Mapping[str, torch.Tensor]) -> None:
        """Start round ``server_round`` on the global adapter that goes out to the clients (its
        float32 tensors are held, not copied: nothing here changes them in place)."""
        self.round = RoundState.open(
            server_round, {key: value.to(torch.float32) for key, value in global_tensors.items()}
        )

    def _open(self, server_round: int) -> RoundState:
        """The open round, which must be ``server_round``."""
        state = self.round
        if state is None or state.server_round != server_round or state.closed:
            raise RuntimeError(
                f"round {server_round} was not opened by configure_train (or is already closed)"
            )
        return state

    def summary(self) -> None:
        """Log the configuration, FedAvg's and the merge's."""
        # FedAvg's summary prints "Weighted by: '<weighted_by_key>'", true of its evaluation
        # metrics but not of the merge when weight-by-examples is false: say what is weighted
        # while it prints, then restore the key (every reply is still read by it).
        key = self.weighted_by_key
        if not self.weight_by_examples:
            self.weighted_by_key = (
                f"equal in the merge (weight-by-examples = false); {key} in metrics"
            )
        try:
            super().summary()
        finally:
            self.weighted_by_key = key
        log(
            INFO,
            "\t└──> Merge: %s %s on %s",
            self.merge_method,
            self.merge_hyperparameters,
            self.device,
        )
        log(
            INFO,
            "\t\t target=%s server_lr=%s weight_by_examples=%s min_merge_replies=%d uplink=%s",
            self.merge_target,
            self.server_lr,
            self.weight_by_examples,
            self.min_merge_replies,
            self.uplink,
        )
        log(INFO, "\t\t robust aggregation: %s", self.robust.describe())
        if self.merge_target == "adapter" and getattr(self.method, "form", "") == "one-shot":
            log(
                WARNING,
                "merge-target 'adapter' with %s keeps the one-shot sum of lambda * A over clients "
                "that share the global A: the merged A is about lambda x clients times one "
                "client's, so the step grows with the federation (the quality benchmark fell "
                "below zero-shot at lambda 2); prefer merge-target 'delta' (size-invariant), "
                "fuse-weight 1 or merge-mode 'paper-equation'",
                self.merge_method,
            )

    def _sample(self, grid: Grid, fraction: float, minimum: int, server_round: int) -> list[int]:
        return self.sample_nodes(grid.get_node_ids, fraction, minimum, server_round)

    def sample_nodes(
        self,
        connected: Callable[[], Iterable[int]],
        fraction: float,
        minimum: int,
        server_round: int,
    ) -> list[int]:
        """Seeded sampling of the ``connected()`` node ids (waiting until enough are there), so a
        resumed run asks the same nodes as an uninterrupted one, on every aggregation path."""
        nodes = sorted(connected())
        wanted = max(int(len(nodes) * fraction), minimum)
        needed = max(self.min_available_nodes, wanted)
        while len(nodes) < needed:
            log(INFO, "Waiting for nodes to connect: %d connected (need %d).", len(nodes), needed)
            time.sleep(1)
            nodes = sorted(connected())
        return seeded_sample(nodes, wanted, self.seed, server_round)

    def train_instruction(self, server_round: int) -> dict[str, int | float | str]:
        """What a client needs from the server to train round ``server_round``
        (``strategies.wire``): the round, the uplink, and the merge settings when the client
        prunes (sparse uplink) or computes merge terms (secure aggregation)."""
        instruction: dict[str, int | float | str] = {
            wire.SERVER_ROUND: server_round,
            wire.UPLINK: self.uplink,
        }
        if self.sparse_method is not None:
            instruction.update(merge_settings(self.sparse_method))
        return instruction

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Snapshot the global adapter and send it to the sampled nodes.

        The config carries what a client needs from the server (``strategies.wire``): the round,
        the uplink, and for the sparse uplink the merge settings to prune with.
        """
        self.open_round(server_round, arrays.to_torch_state_dict())
        if self.fraction_train == 0.0:
            return []
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes, server_round)
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
        node_ids = self._sample(
            grid, self.fraction_evaluate, self.min_evaluate_nodes, server_round + 500_009
        )
        config[wire.SERVER_ROUND] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted client metrics; malformed replies are logged and left out."""
        usable: list[tuple[int, RecordDict]] = []
        for message in replies:
            node = message.metadata.src_node_id
            try:
                if message.has_error():
                    raise ReplyRejectedError(f"client reported an error: {message.error.reason}")
                count = check_num_examples(
                    message.content.metric_records, self.weighted_by_key, self.max_num_examples
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
        if not usable:
            return None
        return MetricRecord(weighted_metrics(usable))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply, merge the accepted ones, apply the server step; closes the round
        (its report: ``round_report``)."""
        state = self._open(server_round)
        report = state.report
        if state.prescreen is not None:
            report.rejected.update(state.prescreen.rejected)
        fold = self._stream_fold(state)
        if fold is not None:
            return self._aggregate_streamed(state, replies, fold)
        return self._finish_buffered(state, self._accept(list(replies), report))

    def _finish_buffered(
        self, state: RoundState, accepted: list[AcceptedReply]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The buffered round's end: the accepted (screened) replies merged at once."""
        report = state.report
        server_round = report.server_round
        state.closed = True
        if len(accepted) < self.min_merge_replies:
            return self._skip(report, len(accepted))
        self._remember_norms(state)
        new_global = self._merge(self._rewrite(accepted, report), report)
        log(
            INFO,
            "round %d: merged %d replies (%d rejected) in %.3fs, |update| = %.4g",
            server_round,
            len(accepted),
            len(report.rejected),
            report.merge_seconds,
            report.merged_update_norm,
        )
        return state_dict_to_record(new_global), self._round_metrics(
            report, [(reply.num_examples, reply.content) for reply in accepted]
        )

    def _skip(self, report: RoundReport, usable: int) -> tuple[None, MetricRecord]:
        """Too few usable replies: the round is skipped, the global stays."""
        report.skipped = True
        log(
            WARNING,
            "round %d: %d usable replies (< min %d): round skipped, global unchanged",
            report.server_round,
            usable,
            self.min_merge_replies,
        )
        return None, self._round_metrics(report, [])

    def _stream_fold(self, state: RoundState) -> RoundFold | None:
        """The running sums this round folds replies into as they arrive, when it can stream:
        the method has a fold (``merging.streaming``), no stage needs every reply at once
        (multi-Krum, the coordinate-wise clamps, a DP wrapper's pre-screen), and when the norm
        screen is on, its bound is known before the first reply (from the accepted norms of
        earlier rounds, or from a pool of this round's first replies held back,
        ``_hold_back_pool``). None: the round buffers its replies (docs/strategy.md, "Streaming
        rounds")."""
        if state.prescreen is not None or self.robust.selects or self.robust.rewrites_coordinates:
            return None
        return round_fold(self.method, list(state.global_tensors), self.device)

    def _history_bound(self) -> NormBound | None:
        """The norm screen's bound from earlier rounds' accepted norms alone (None: < 2)."""
        return norm_bound([], self.norm_history, self.robust.norm_factor)

    def _hold_back_pool(
        self, report: RoundReport, replies: Iterator[Message], seen: set[int]
    ) -> tuple[list[AcceptedReply], Message | None]:
        """A first round's pool: the first ``robust.pool`` replies that pass the per-reply
        checks (rejected ones are dropped on arrival), and the next reply, or None when the
        stream ended first (the round is then buffered, as before issue 25). The bound is in
        held adapters: at most pool + 1 replies at once, whatever the number of clients.

        A node that replies twice while its first reply is held has both rejected, as a
        buffered round does."""
        pool: list[AcceptedReply] = []
        senders: Counter[int] = Counter()
        for message in replies:
            node = message.metadata.src_node_id
            if len(pool) >= self.robust.pool and node not in seen:
                return pool, message
            senders[node] += 1
            if node in seen:
                held = [reply for reply in pool if reply.node_id == node]
                pool = [reply for reply in pool if reply.node_id != node]
                for reply in held:
                    report.bytes_received -= reply.num_bytes
                    report.accepted_nodes.remove(node)
                    report.update_norms.pop(node, None)
                _reject(report, node, f"node sent {senders[node]} replies in one round")
                continue
            seen.add(node)
            try:
                reply = self._check_reply(message, report, self.other_ranks_refused)
            except ReplyRejectedError as rejection:
                _reject(report, node, rejection.reason, privacy=rejection.privacy)
                continue
            report.bytes_received += reply.num_bytes
            report.accepted_nodes.append(node)
            pool.append(reply)
        return pool, None

    def _aggregate_streamed(
        self, state: RoundState, replies: Iterable[Message], fold: RoundFold
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """``aggregate_train`` one reply at a time: each is checked, screened against the
        history's bound, folded into the running sums and dropped; the last reply leaves only
        the division and the server step. The new global does not depend on the arrival order
        (exact sums); accepted nodes are listed in node order.

        Without a history (the first round), the first ``robust.pool`` checked replies are
        held back and screened against their own median (and what history there is), then
        folded, and every later reply is screened against that pool's bound on arrival. Which
        replies are accepted then depends on the arrival order only through which replies
        formed the pool; the new global is the same bit for bit for any order that accepts the
        same set. A round of at most ``robust.pool`` replies is buffered, as before."""
        report = state.report
        base = state.global_tensors
        seen: set[int] = set()
        stream: Iterator[Message] = iter(replies)
        pool: list[AcceptedReply] = []
        if self.robust.screens and self._history_bound() is None:
            pool, following = self._hold_back_pool(report, stream, seen)
            if following is None:
                pool.sort(key=lambda reply: (reply.arrays.object_id, reply.num_examples))
                return self._finish_buffered(state, self._screen(pool, report))
            stream = itertools.chain([following], stream)
            report.streamed = True
            report.norm_pool = pool_label(streamed=True, pool_size=len(pool))
            pool = self._screen(pool, report)
        elif self.robust.screens:
            report.norm_pool = pool_label(streamed=True, pool_size=None)
            report.norm_bound = self._history_bound()
        report.streamed = True
        sample = DiagnosticsSample(
            list(base), self.diagnostics_modules, self.seed, report.server_round
        )
        metric_sources: list[tuple[int, RecordDict]] = []

        def arrivals() -> Iterator[tuple[AcceptedReply, bool]]:
            """(reply, already counted): the pool's screened replies, then the stream's."""
            while pool:
                yield pool.pop(), True
            for message in stream:
                node = message.metadata.src_node_id
                try:
                    if node in seen:
                        raise ReplyRejectedError("node sent a second reply in one round")
                    seen.add(node)
                    reply = self._check_reply(message, report, self.other_ranks_refused)
                    self._screen_one(reply, report)
                except ReplyRejectedError as rejection:
                    _reject(report, node, rejection.reason, privacy=rejection.privacy)
                    continue
                yield reply, False

        for reply, counted in arrivals():
            node = reply.node_id
            reply = self._clipped(reply, report)
            began = time.perf_counter()
            weight = float(reply.num_examples) if self.weight_by_examples else 1.0
            if isinstance(reply, SparseReply) and isinstance(fold, RobustMergeFold):
                fold.add_pruned(SparseDeltaView(reply), reply.scales, weight)
            elif self.merge_target == "delta":
                fold.add(DeltaView(ReplyTensors(reply), base), weight)
            else:
                fold.add(ReplyTensors(reply), weight)
            sample.offer(reply, weight)
            report.fold_seconds += time.perf_counter() - began
            if not counted:
                report.bytes_received += reply.num_bytes
                report.accepted_nodes.append(node)
            metric_sources.append((reply.num_examples, metrics_only(reply.content)))
            del reply
        state.closed = True
        report.accepted_nodes.sort()
        if fold.count < self.min_merge_replies:
            return self._skip(report, fold.count)
        self._remember_norms(state)
        began = time.perf_counter()
        new_global = fold.finish()
        apply_server_step(base, new_global, self.server_lr, self.merge_target)
        report.merge_seconds = time.perf_counter() - began
        report.merged_update_norm = global_change_norm(base, new_global)
        # The diagnostics need the new global but the next round does not need them: they run
        # when the report is asked for (``round_report``), not between the last reply and the
        # new global.
        state.deferred = partial(sample.score, base, new_global, self.weight_by_examples, report)
        log(
            INFO,
            "round %d: streamed %d replies into the merge (%d rejected); %.3fs from the last "
            "reply to the new global, |update| = %.4g",
            report.server_round,
            fold.count,
            len(report.rejected),
            report.merge_seconds,
            report.merged_update_norm,
        )
        return state_dict_to_record(new_global), self._round_metrics(report, metric_sources)

    def _clipped(self, reply: AcceptedReply, report: RoundReport) -> AcceptedReply:
        """``reply`` with its update scaled down to the screen's bound, when clip mode is on and
        its norm is above the bound (what ``_screen_one`` marks as clipped)."""
        bound = report.norm_bound
        norm = report.update_norms.get(reply.node_id)
        if not self.robust.clip or bound is None or norm is None or norm <= bound.bound:
            return reply
        assert self.current_global is not None
        return RewrittenReply.of(reply, self.current_global, scale=clip_scale(norm, bound.bound))

    def aggregate_sums(
        self,
        server_round: int,
        sums: Mapping[str, torch.Tensor],
        summed_nodes: list[int],
        extra_metrics: Mapping[str, float] | None = None,
        bytes_received: int = 0,
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """Secure aggregation's ``aggregate_train``: finish RobustMerge paper-exact from the sums
        over ``summed_nodes`` of their per-client terms (``strategies.merging.decomposed``), then
        the same server step as every other path; closes the round.

        Only the sums are ever seen, so there is no per-reply check, screen or diagnostic; the
        clients are weighted equally. Unusable sums skip the round (the global stays).
        """
        state = self._open(server_round)
        report = state.report
        report.accepted_nodes[:] = list(summed_nodes)
        report.bytes_received = bytes_received
        state.closed = True
        if len(summed_nodes) < max(self.min_merge_replies, 2):
            return self.skip_secure_round(
                server_round, f"{len(summed_nodes)} clients summed", extra_metrics
            )
        started = time.perf_counter()
        try:
            merged = finish_from_sums(sums, len(summed_nodes), form=self.method_form())
        except MergeInputError as error:
            return self.skip_secure_round(server_round, f"unusable sums: {error}", extra_metrics)
        apply_server_step(state.global_tensors, merged, self.server_lr, self.merge_target)
        report.merge_seconds = time.perf_counter() - started
        report.merged_update_norm = global_change_norm(state.global_tensors, merged)
        report.secure_status = "completed"
        log(
            INFO,
            "round %d: merged the secure sum of %d clients, |update| = %.4g",
            server_round,
            len(summed_nodes),
            report.merged_update_norm,
        )
        metrics = self._round_metrics(report, [])
        metrics.update(dict(extra_metrics or {}))
        return state_dict_to_record(merged), metrics

    def skip_secure_round(
        self, server_round: int, reason: str, extra_metrics: Mapping[str, float] | None = None
    ) -> tuple[None, MetricRecord]:
        """Close secure round ``server_round`` without a merge (the global stays), saying why
        (e.g. SecAgg+ halted before any sum reached the strategy)."""
        state = self.round
        if state is None or state.server_round != server_round:
            raise RuntimeError(f"round {server_round} was not opened")
        state.closed = True
        state.report.skipped = True
        state.report.secure_status = reason
        log(WARNING, "round %d: %s: round skipped, global unchanged", server_round, reason)
        metrics = self._round_metrics(state.report, [])
        metrics.update(dict(extra_metrics or {}))
        return None, metrics

    def method_form(self) -> str:
        """The form the merge method runs in (``strategies.merging.method.FORMS``)."""
        return str(getattr(self.method, "form", "round"))

    def _accept(
        self, replies: list[Message], report: RoundReport, *, wrapped: bool = False
    ) -> list[AcceptedReply]:
        """The replies that pass every check, in content order, screened; ``wrapped``: a DP
        wrapper will clip them against the global, so only the global's rank is accepted."""
        assert self.current_global is not None
        other_ranks_refused = self.other_ranks_refused
        if wrapped and other_ranks_refused is None:
            other_ranks_refused = (
                "Flower's DP wrappers clip each update against the global adapter, which needs "
                "its shapes (dp with mixed ranks is refused)"
            )
        senders = Counter(msg.metadata.src_node_id for msg in replies)
        accepted: list[AcceptedReply] = []
        for message in replies:
            node = message.metadata.src_node_id
            try:
                if senders[node] > 1:
                    raise ReplyRejectedError(f"node sent {senders[node]} replies in one round")
                reply = self._check_reply(message, report, other_ranks_refused)
            except ReplyRejectedError as rejection:
                _reject(report, node, rejection.reason, privacy=rejection.privacy)
                continue
            report.bytes_received += reply.num_bytes
            report.accepted_nodes.append(node)
            accepted.append(reply)
        # Arrival order varies run to run; a content order makes the float sums, and so a
        # resumed run, bit-identical to an uninterrupted one.
        accepted.sort(key=lambda reply: (reply.arrays.object_id, reply.num_examples))
        return self._screen(accepted, report)

    def _check_reply(
        self, message: Message, report: RoundReport, other_ranks_refused: str | None
    ) -> AcceptedReply:
        """One reply through every per-reply check (shapes, values, examples, rank, update
        norm); its norm and rank go into ``report``. ReplyRejectedError says why not."""
        assert self.current_global is not None
        reply: AcceptedReply
        if self.sparse_method is not None:
            reply = check_sparse_train_reply(
                message,
                self.current_global,
                self.sparse_method,
                arrayrecord_key=self.arrayrecord_key,
                configrecord_key=self.configrecord_key,
                weighted_by_key=self.weighted_by_key,
                max_num_examples=self.max_num_examples,
            )
        else:
            reply = check_train_reply(
                message,
                {key: tuple(value.shape) for key, value in self.current_global.items()},
                arrayrecord_key=self.arrayrecord_key,
                weighted_by_key=self.weighted_by_key,
                max_num_examples=self.max_num_examples,
                other_ranks_refused=other_ranks_refused,
            )
        self._check_site_rank(reply)
        self._check_update_norm(reply, report)
        self._record_rank(reply, report)
        return reply

    def _screen(self, accepted: list[AcceptedReply], report: RoundReport) -> list[AcceptedReply]:
        """The robust screen and selection: outsized updates rejected (or marked for clipping,
        see ``_rewrite``), then multi-Krum's pick.

        After a wrapper's ``screen_train_replies`` (DP) this round's replies are already
        screened and selected on their raw updates, and the wrapper has clipped them since: the
        pre-screen's bound is kept (reject mode then rejects nothing more), nothing is selected
        again.
        """
        if not self.robust.screens:
            return accepted
        assert self.round is not None
        prescreen = self.round.prescreen if report is self.round.report else None
        if prescreen is not None:
            report.norm_bound = prescreen.norm_bound
            report.norm_pool = prescreen.norm_pool
            report.screened = list(prescreen.screened)
            report.krum_dropped = list(prescreen.krum_dropped)
        else:
            norms = [report.update_norms[reply.node_id] for reply in accepted]
            if report.norm_pool is None:
                report.norm_pool = pool_label(streamed=False, pool_size=None)
            report.norm_bound = norm_bound(norms, self.norm_history, self.robust.norm_factor)
        kept: list[AcceptedReply] = []
        for reply in accepted:
            try:
                self._screen_one(reply, report)
            except ReplyRejectedError as rejection:
                _reject(report, reply.node_id, rejection.reason)
                continue
            kept.append(reply)
        if self.robust.selects and prescreen is None:
            assert self.current_global is not None
            picked = set(
                krum_keep(
                    kept, self.current_global, self.robust.krum_malicious, self.robust.krum_select
                )
            )
            for position, reply in enumerate(kept):
                if position not in picked:
                    report.krum_dropped.append(reply.node_id)
                    _reject(
                        report,
                        reply.node_id,
                        f"multi-Krum kept the {len(picked)} of {len(kept)} updates closest to "
                        "the others (robust-aggregation 'krum')",
                    )
            kept = [reply for position, reply in enumerate(kept) if position in picked]
        report.accepted_nodes[:] = [n for n in report.accepted_nodes if n not in report.rejected]
        return kept

    def _screen_one(self, reply: AcceptedReply, report: RoundReport) -> None:
        """Judge one reply's update norm against ``report.norm_bound``: above it, the reply is
        marked clipped (clip mode; ``_clipped`` scales it) or rejected (ReplyRejectedError)."""
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

    def _rewrite(self, accepted: list[AcceptedReply], report: RoundReport) -> list[AcceptedReply]:
        """Clip the replies the screen marked (clip mode) to the bound, then the coordinate-wise
        stage (trimmed-mean, median) or centered clipping."""
        assert self.current_global is not None
        accepted = [self._clipped(reply, report) for reply in accepted]
        if self.robust.clips_to_center:
            centered = clip_to_center(accepted, self.current_global, DEFAULT_CENTER_RADIUS)
            report.clamped_fraction = centered.clamped_fraction
            accepted = centered.replies
        elif self.robust.rewrites_coordinates:
            clamped = clamp_coordinates(
                accepted, self.current_global, self.robust.trim_fraction_or_median
            )
            report.clamped_fraction = clamped.clamped_fraction
            accepted = clamped.replies
        return accepted

    def _remember_norms(self, state: RoundState) -> None:
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

    def robust_state(self) -> dict[str, Any]:
        """The screen's history and each node's rank, for checkpoints (restored by
        ``restore_robust_state``)."""
        return {
            "norm-history": list(self.norm_history),
            "node-ranks": {str(node): rank for node, rank in self.node_ranks.items()},
        }

    def restore_robust_state(self, state: Mapping[str, Any]) -> None:
        """Resume the screen's history and the nodes' ranks from a checkpoint's
        ``robust_state``."""
        self.norm_history.clear()
        self.norm_history.extend(float(norm) for norm in state.get("norm-history", []))
        self.node_ranks = {
            int(node): int(rank) for node, rank in state.get("node-ranks", {}).items()
        }

    def screen_train_replies(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[list[Message], dict[int, str]]:
        """The replies that pass the per-reply checks, and the rejected ones' reasons.

        For wrappers that must touch replies before ``aggregate_train`` (DP clipping): they
        hand on only what would be accepted, and the rejections reach this round's report.
        """
        state = self._open(server_round)
        messages = list(replies)
        scratch = RoundReport(server_round=server_round)
        state.prescreen = None
        self._accept(messages, scratch, wrapped=True)
        state.prescreen = scratch
        kept_nodes = set(scratch.accepted_nodes)
        return [m for m in messages if m.metadata.src_node_id in kept_nodes], scratch.rejected

    def _check_update_norm(self, reply: AcceptedReply, report: RoundReport) -> None:
        """Record the reply's update norm (for the screen) and apply max-update-norm."""
        if self.max_update_norm is None and not self.robust.screens:
            return
        norm = update_norm(reply, self.start_of(reply))
        if self.max_update_norm is not None and norm > self.max_update_norm:
            raise ReplyRejectedError(
                f"update norm {norm:.4g} exceeds max-update-norm {self.max_update_norm:.4g}"
            )
        report.update_norms[reply.node_id] = norm

    def site_start(self, rank: int) -> SiteAdapter:
        """What a site of LoRA rank ``rank`` started this round from: the global truncated to
        its rank (``ranks.adapter_at_rank``, what the client computes on receipt; cached for the
        round)."""
        state = self.round
        assert state is not None
        if rank not in state.site_starts:
            state.site_starts[rank] = adapter_at_rank(state.global_tensors, rank)
        return state.site_starts[rank]

    def start_of(self, reply: AcceptedReply) -> Mapping[str, torch.Tensor]:
        """The adapter ``reply``'s site started from: the global, or its truncation to the
        reply's rank."""
        assert self.current_global is not None
        rank = reply_rank(reply)
        if rank is None or rank == self.global_rank():
            return self.current_global
        return self.site_start(rank).tensors

    def global_rank(self) -> int | None:
        """The open round's global LoRA rank."""
        assert self.current_global is not None
        return global_rank({k: tuple(v.shape) for k, v in self.current_global.items()})

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

    def _record_rank(self, reply: AcceptedReply, report: RoundReport) -> None:
        """Each site's rank and the truncation error of what it started from (metrics.json)."""
        rank = reply_rank(reply)
        if rank is None:
            return
        report.site_ranks[reply.node_id] = rank
        report.site_truncation_errors[reply.node_id] = (
            0.0 if rank == self.global_rank() else self.site_start(rank).relative_error
        )

    def _merge(self, accepted: list[AcceptedReply], report: RoundReport) -> dict[str, torch.Tensor]:
        assert self.current_global is not None
        base = self.current_global
        weights = (
            [float(reply.num_examples) for reply in accepted] if self.weight_by_examples else None
        )
        if self.sparse_method is not None:
            sparse = [reply for reply in accepted if isinstance(reply, SparseReply)]
            result = merge_sparse_replies(sparse, self.sparse_method, weights, self.device)
            apply_server_step(base, result.tensors, self.server_lr, self.merge_target)
        else:
            ranks = {reply_rank(reply) for reply in accepted} - {self.global_rank()}
            result = merge_round(
                base,
                [ReplyTensors(reply) for reply in accepted],
                self.method,
                weights,
                server_lr=self.server_lr,
                target=self.merge_target,
                device=self.device,
                labels=[f"node {reply.node_id}" for reply in accepted],
                sent={rank: self.site_start(rank).tensors for rank in ranks if rank is not None},
            )
        report.merge_seconds = result.report.seconds
        report.relative_error = result.report.relative_error
        report.update_relative_error = result.report.update_relative_error
        new_global = result.tensors
        report.merged_update_norm = global_change_norm(base, new_global)
        if all(reply_rank(reply) == self.global_rank() for reply in accepted):
            # The diagnostics compare factors with the global's: equal ranks only.
            self._score_directions(accepted, new_global, report, weights)
        return new_global

    def _score_directions(
        self,
        accepted: list[AcceptedReply],
        new_global: dict[str, torch.Tensor],
        report: RoundReport,
        weights: list[float] | None,
    ) -> None:
        """Direction scores per client and the factor-wise gap (``round_diagnostics``)."""
        assert self.current_global is not None
        score_directions(
            accepted, self.current_global, new_global, weights, self.diagnostics_modules, report
        )

    def _round_metrics(
        self, report: RoundReport, accepted: list[tuple[int, RecordDict]]
    ) -> MetricRecord:
        """The merged clients' example-weighted metrics (or the custom aggregation's) from
        their (num-examples, content) and the report's (``round_metrics.report_metrics``)."""
        if self.custom_train_metrics_aggr_fn is not None and accepted:
            metrics = self.custom_train_metrics_aggr_fn(
                [content for _, content in accepted], self.weighted_by_key
            )
        else:
            metrics = MetricRecord(weighted_metrics(accepted))
        metrics.update(report_metrics(report, self.robust))
        return metrics


def _reject(report: RoundReport, node: int, reason: str, *, privacy: bool = False) -> None:
    """Record and log one rejected reply (PRIVACY-flagged when it carried non-LoRA tensors)."""
    report.rejected[node] = reason
    log(
        WARNING,
        "%sround %d: rejected reply from node %d: %s",
        "PRIVACY: " if privacy else "",
        report.server_round,
        node,
        reason,
    )


class ReplyTensors(Mapping[str, torch.Tensor]):
    """A reply's tensors, decoded key by key when the merge asks for them.

    The merge engine works module by module, so it never holds more than one module of every
    reply at once; decoding every reply first would double the round's memory.
    """

    def __init__(self, reply: AcceptedReply) -> None:
        self.reply = reply
        self.keys_in_order = list(reply.arrays.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.reply.tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_in_order)

    def __len__(self) -> int:
        return len(self.keys_in_order)
