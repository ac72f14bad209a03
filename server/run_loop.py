"""The round loop: train, merge, evaluate, checkpoint; resumable after a crash.

Flower's ``Strategy.start`` has no start round, so the loop is ours: it drives the strategy's
``configure_*`` / ``aggregate_*`` methods exactly as ``start`` does, and checkpoints the global
adapter, the history and the strategy settings after every round.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from server.audit_log import AuditLog, reply_digests, train_round_fields
from server.checkpoints import CheckpointStore
from server.communication import bytes_by_node, round_communication
from server.metrics_log import METRICS_FILE, PLOT_FILE, plot_accuracy, write_metrics
from server.privacy import core_strategy, restore_privacy_ledger
from strategies.audit import AUDIT_FILE
from strategies.fed_robustmerge import FedRobustMerge
from strategies.reply_checks import state_dict_to_record

Evaluate = Callable[[Mapping[str, torch.Tensor]], dict[str, float]]
RUN_FILES = ("checkpoints", "final", METRICS_FILE, PLOT_FILE, AUDIT_FILE)


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs beyond the strategy: rounds, timeout, where to write."""

    num_rounds: int
    round_timeout: float
    run_dir: Path
    resume: bool
    seen_tasks: tuple[str, ...] = ()
    unseen_tasks: tuple[str, ...] = ()
    uplink: str = "dense"


def archive_previous_run(run_dir: Path) -> Path | None:
    """Move an earlier run's outputs to ``archive/<UTC time>/`` so a fresh start loses nothing."""
    present = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if not present:
        return None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = run_dir / "archive" / stamp
    target.mkdir(parents=True)
    for path in present:
        shutil.move(str(path), str(target / path.name))
    return target


def run_federation(
    grid: Grid,
    strategy: Strategy,
    settings: LoopSettings,
    *,
    initial: Mapping[str, torch.Tensor],
    store: CheckpointStore,
    summary: dict[str, Any],
    evaluate: Evaluate | None = None,
) -> dict[str, torch.Tensor]:
    """Run (or resume) the federation; returns the final global adapter.

    ``strategy`` is a FedRobustMerge or a wrapper around one (differential privacy).
    """
    files = RunFiles(settings.run_dir, summary, settings.seen_tasks, settings.unseen_tasks)
    global_tensors = {key: value.to(torch.float32) for key, value in initial.items()}
    start, resumed, history, saved_strategy = resume_or_archive(
        store, settings.run_dir, settings.resume
    )
    if resumed is not None:
        global_tensors = resumed
        core_strategy(strategy).restore_robust_state(saved_strategy.get("robust", {}))
        if restore_privacy_ledger(strategy, history):
            log(INFO, "DP: privacy ledger restored from the history")
    elif evaluate is not None:
        history.append({"server-round": 0, "server-eval": evaluate(global_tensors)})
        log_server_eval(0, history[-1]["server-eval"])
    audit = open_audit(settings.run_dir, summary, start, global_tensors)
    for server_round in range(start + 1, settings.num_rounds + 1):
        started = time.perf_counter()
        log(INFO, "[ROUND %d/%d]", server_round, settings.num_rounds)
        entry, merged, traffic = _train_round(
            grid, strategy, server_round, global_tensors, settings.round_timeout, audit
        )
        if merged is not None:
            global_tensors = merged
        client_eval, eval_traffic = _evaluate_round(
            grid, strategy, server_round, global_tensors, settings
        )
        if client_eval is not None:
            entry["client-eval"] = client_eval
        entry["communication"] = round_communication(
            uplink=settings.uplink,
            train_down=traffic[0],
            train_up=traffic[1],
            evaluate_down=eval_traffic[0],
            evaluate_up=eval_traffic[1],
            history=history,
        )
        if evaluate is not None:
            entry["server-eval"] = evaluate(global_tensors)
            log_server_eval(server_round, entry["server-eval"])
        entry["seconds"] = time.perf_counter() - started
        history.append(entry)
        save_round(
            store,
            files,
            server_round,
            history,
            global_tensors,
            strategy_settings(core_strategy(strategy)),
        )
    finish_run(store, files, history, global_tensors, audit)
    return global_tensors


def open_audit(
    run_dir: Path, summary: Mapping[str, Any], start: int, tensors: Mapping[str, torch.Tensor]
) -> AuditLog:
    """The run's audit log: a fresh one (``start`` 0) or the folder's, continued by a resume
    record (see ``server.audit_log``)."""
    return AuditLog.open(run_dir, summary.get("run-config", {}), start, tensors)


@dataclass(frozen=True)
class RunFiles:
    """Where and how a run's metrics.json and plot are written."""

    run_dir: Path
    summary: Mapping[str, Any]
    seen_tasks: Sequence[str] = ()
    unseen_tasks: Sequence[str] = ()

    def write(self, history: Sequence[dict[str, Any]]) -> None:
        """metrics.json and the plot, from the history so far."""
        write_metrics(self.run_dir, dict(self.summary), list(history))
        plot_accuracy(self.run_dir, history, self.seen_tasks, self.unseen_tasks)


def resume_or_archive(
    store: CheckpointStore, run_dir: Path, resume: bool
) -> tuple[int, dict[str, torch.Tensor] | None, list[dict[str, Any]], dict[str, Any]]:
    """Where a run starts: (rounds done, their global adapter, their history, the strategy state
    saved with them) from the newest valid checkpoint when resuming, else (0, None, [], {})
    after moving earlier outputs aside."""
    checkpoint = store.latest_valid() if resume else None
    if checkpoint is not None:
        log(INFO, "Resuming after round %d from %s", checkpoint.server_round, checkpoint.path)
        history = list(checkpoint.state.get("history", []))
        saved = checkpoint.state.get("strategy", {})
        return (
            checkpoint.server_round,
            dict(checkpoint.tensors),
            history,
            dict(saved) if isinstance(saved, dict) else {},
        )
    if resume:
        log(INFO, "resume=true but no usable checkpoint in %s: starting over", store.checkpoint_dir)
    archived = archive_previous_run(run_dir)
    if archived is not None:
        log(INFO, "Earlier outputs moved to %s", archived)
    return 0, None, [], {}


def save_round(
    store: CheckpointStore,
    files: RunFiles,
    server_round: int,
    history: Sequence[dict[str, Any]],
    tensors: Mapping[str, torch.Tensor],
    strategy_state: Mapping[str, Any],
) -> None:
    """After a round: its checkpoint (adapter, history, merge settings), metrics.json, plot."""
    store.save(server_round, tensors, {"history": list(history), "strategy": dict(strategy_state)})
    files.write(history)


def finish_run(
    store: CheckpointStore,
    files: RunFiles,
    history: Sequence[dict[str, Any]],
    tensors: Mapping[str, torch.Tensor],
    audit: AuditLog,
) -> Path:
    """The run's last metrics.json and plot, the final adapter folder, the run-end record."""
    files.write(history)
    final = store.save_final(tensors, {"run": dict(files.summary), "rounds": len(history)})
    audit.end()
    log(INFO, "Final adapter: %s", final)
    return final


def strategy_settings(strategy: FedRobustMerge) -> dict[str, Any]:
    """The strategy's merge settings, stored with each checkpoint to detect a changed config,
    and the robust screen's state (its norm history), restored on resume."""
    return {
        "merge-method": strategy.merge_method,
        "merge-hyperparameters": {k: _plain(v) for k, v in strategy.merge_hyperparameters.items()},
        "merge-target": strategy.merge_target,
        "server-lr": strategy.server_lr,
        "weight-by-examples": strategy.weight_by_examples,
        "seed": strategy.seed,
        "robust-aggregation": strategy.robust.describe(),
        "robust": strategy.robust_state(),
    }


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


Traffic = tuple[dict[str, int], dict[str, int]]


def _train_round(
    grid: Grid,
    strategy: Strategy,
    server_round: int,
    global_tensors: Mapping[str, torch.Tensor],
    timeout: float,
    audit: AuditLog,
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, Traffic]:
    """One training round: its history entry, the new global (None: unchanged), bytes down/up
    per node; its audit record is written before the loop checkpoints the round."""
    messages = list(
        strategy.configure_train(
            server_round, state_dict_to_record(global_tensors), ConfigRecord(), grid
        )
    )
    replies = list(grid.send_and_receive(messages=messages, timeout=timeout)) if messages else []
    # Counted before aggregation: a DP wrapper replaces reply contents with clipped copies.
    traffic = (bytes_by_node(messages, outgoing=True), bytes_by_node(replies, outgoing=False))
    digests = reply_digests(replies)
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    core = core_strategy(strategy)
    report = core.last_round
    entry: dict[str, Any] = {
        "server-round": server_round,
        "clients-sampled": len(messages),
        "clients-timed-out": max(len(messages) - len(replies), 0),
        "train": dict(metrics) if metrics is not None else {},
        "merge": report.to_json() if report is not None else {},
    }
    log(
        INFO,
        "round %d: %d sampled, %d replied, %d accepted, %d rejected%s",
        server_round,
        len(messages),
        len(replies),
        len(report.accepted_nodes) if report else 0,
        len(report.rejected) if report else 0,
        " (skipped: global unchanged)" if arrays is None else "",
    )
    merged = (
        None
        if arrays is None
        else {key: value.to(torch.float32) for key, value in arrays.to_torch_state_dict().items()}
    )
    sampled = [message.metadata.dst_node_id for message in messages]
    audit.round(
        server_round,
        global_tensors if merged is None else merged,
        train_round_fields(sampled, digests, report, core.prescreen, skipped=merged is None),
    )
    return entry, merged, traffic


def _evaluate_round(
    grid: Grid,
    strategy: Strategy,
    server_round: int,
    global_tensors: Mapping[str, torch.Tensor],
    settings: LoopSettings,
) -> tuple[dict[str, Any] | None, Traffic]:
    messages = list(
        strategy.configure_evaluate(
            server_round, state_dict_to_record(global_tensors), ConfigRecord(), grid
        )
    )
    if not messages:
        return None, ({}, {})
    replies = list(grid.send_and_receive(messages=messages, timeout=settings.round_timeout))
    traffic = (bytes_by_node(messages, outgoing=True), bytes_by_node(replies, outgoing=False))
    metrics = strategy.aggregate_evaluate(server_round, replies)
    return (dict(metrics) if metrics is not None else None), traffic


def log_server_eval(server_round: int, metrics: Mapping[str, float]) -> None:
    """One log line with the server-side evaluation's headline numbers."""
    averages = {
        k: round(v, 4)
        for k, v in metrics.items()
        if k in ("seen-accuracy", "unseen-accuracy", "eval-loss")
    }
    log(INFO, "round %d server-side evaluation: %s", server_round, averages)
