"""The one round loop: train, merge, evaluate, checkpoint; resumable after a crash.

Flower's ``Strategy.start`` has no start round, so the loop is ours. Every aggregation path runs
through it: a ``server.round_modes.RoundMode`` does one round's training and evaluation (over
the Message API, or SecAgg+), and the loop does what every round shares: the server-side
evaluation, the history entry, communication accounting, the checkpoint (global adapter,
history, strategy settings, model card), metrics.json, the plot and the audit record.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.serverapp import Grid
from flwr.supercore import log

from server.audit_log import AuditLog
from server.checkpoints import CheckpointStore
from server.communication import round_communication
from server.metrics_log import METRICS_FILE, PLOT_FILE, plot_accuracy, write_metrics
from server.model_card import model_card
from server.progress import RoundWatch, renderer_for, watching
from server.round_modes import RoundMode
from server.tracking import RunTracking, open_tracking
from strategies.audit import AUDIT_FILE

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
    mode: RoundMode,
    settings: LoopSettings,
    *,
    initial: Mapping[str, torch.Tensor],
    store: CheckpointStore,
    summary: dict[str, Any],
    evaluate: Evaluate | None = None,
    tracking: RunTracking | None = None,
) -> dict[str, torch.Tensor]:
    """Run (or resume) the federation in ``mode``; returns the final global adapter.
    ``tracking`` (default none) is told the run config, each round and the end
    (``server.tracking``); its failures never stop the run, they are counted in metrics.json."""
    tracking = tracking if tracking is not None else open_tracking("none", "", settings.run_dir)
    files = RunFiles(
        settings.run_dir,
        summary,
        settings.seen_tasks,
        settings.unseen_tasks,
        tracking=tracking.status,
    )
    global_tensors = {key: value.to(torch.float32) for key, value in initial.items()}
    start, resumed, history, saved_strategy = resume_or_archive(
        store, settings.run_dir, settings.resume
    )
    tracking.started(summary.get("run-config", {}), start + 1)
    try:
        if resumed is not None:
            global_tensors = resumed
            mode.restore(saved_strategy, history)
        elif evaluate is not None:
            history.append({"server-round": 0, "server-eval": evaluate(global_tensors)})
            log_server_eval(0, history[-1]["server-eval"])
            tracking.round_done(history[-1])
            files.write(history)
        audit = open_audit(settings.run_dir, summary, start, global_tensors)
        round_grid = tracking.grid(grid)  # notes each client's train metrics when tracking is on
        for server_round in range(start + 1, settings.num_rounds + 1):
            global_tensors = run_round(
                round_grid, mode, settings, server_round, global_tensors, history, evaluate, audit
            )
            tracking.round_done(history[-1])
            save_round(
                store,
                files,
                server_round,
                history,
                global_tensors,
                mode.checkpoint_state(),
                audit_head=audit.prev,
            )
    except BaseException:
        tracking.aborted()
        raise
    finally:
        mode.close()
    final = finish_run(store, files, history, global_tensors, audit)
    tracking.finished(final, audit.prev)
    files.write(history, plot=False)  # the tracking's last failure count
    return global_tensors


def run_round(
    grid: Grid,
    mode: RoundMode,
    settings: LoopSettings,
    server_round: int,
    global_tensors: dict[str, torch.Tensor],
    history: list[dict[str, Any]],
    evaluate: Evaluate | None,
    audit: AuditLog,
) -> dict[str, torch.Tensor]:
    """One round in ``mode``: train and merge, audit, evaluate, account; appends the round's
    history entry and returns the new global adapter."""
    started = time.perf_counter()
    log(INFO, "[ROUND %d/%d]", server_round, settings.num_rounds)
    watch = RoundWatch(server_round, renderer_for(), verdicts=lambda: strategy_verdicts(mode))
    with watching(watch):  # live progress while the replies come in (server.progress)
        outcome = mode.train(grid, server_round, global_tensors, settings.round_timeout)
    if outcome.merged is not None:
        global_tensors = outcome.merged
    audit.round(server_round, global_tensors, outcome.audit)
    entry = dict(outcome.entry)
    client_eval, eval_traffic = mode.evaluate(
        grid, server_round, global_tensors, settings.round_timeout
    )
    if client_eval is not None:
        entry["client-eval"] = client_eval
    entry["communication"] = round_communication(
        uplink=mode.uplink,
        train_down=outcome.traffic[0],
        train_up=outcome.traffic[1],
        evaluate_down=eval_traffic[0],
        evaluate_up=eval_traffic[1],
        history=history,
    )
    if evaluate is not None:
        entry["server-eval"] = evaluate(global_tensors)
        log_server_eval(server_round, entry["server-eval"])
    entry["seconds"] = time.perf_counter() - started
    history.append(entry)
    return global_tensors


def strategy_verdicts(mode: RoundMode) -> tuple[int, int]:
    """(accepted, rejected) replies of the strategy's open or last round, so far."""
    state = mode.core.round
    if state is None:
        return 0, 0
    return len(state.report.accepted_nodes), len(state.report.rejected)


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
    # metrics.json's ``tracking`` entry, read at each write (``RunTracking.status``).
    tracking: Callable[[], Mapping[str, Any]] | None = None

    def write(self, history: Sequence[dict[str, Any]], *, plot: bool = True) -> None:
        """metrics.json and (``plot``) the plot, from the history so far."""
        tracking = self.tracking() if self.tracking is not None else None
        write_metrics(self.run_dir, dict(self.summary), list(history), tracking=tracking)
        if plot:
            plot_accuracy(self.run_dir, history, self.seen_tasks, self.unseen_tasks)

    def card(
        self, history: Sequence[dict[str, Any]], audit_head: str, server_round: int | None = None
    ) -> str:
        """The model card of the adapter after ``server_round`` (None: the final one)."""
        return model_card(
            self.summary,
            history,
            audit_head=audit_head,
            server_round=server_round,
            seen_tasks=self.seen_tasks,
            unseen_tasks=self.unseen_tasks,
        )


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
        if not isinstance(saved, dict):
            log(
                WARNING,
                "%s holds no strategy state (%s): the strategy starts afresh (its screen history "
                "and round settings are not restored)",
                checkpoint.path,
                type(saved).__name__,
            )
            saved = {}
        return checkpoint.server_round, dict(checkpoint.tensors), history, dict(saved)
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
    *,
    audit_head: str,
) -> None:
    """After a round: its checkpoint (adapter, history, merge settings, model card naming the
    audit head ``audit_head``), metrics.json, plot."""
    store.save(
        server_round,
        tensors,
        {"history": list(history), "strategy": dict(strategy_state)},
        card=files.card(history, audit_head, server_round),
    )
    files.write(history)


def finish_run(
    store: CheckpointStore,
    files: RunFiles,
    history: Sequence[dict[str, Any]],
    tensors: Mapping[str, torch.Tensor],
    audit: AuditLog,
) -> Path:
    """The run's last metrics.json and plot, the run-end record, then the final adapter folder
    with its model card (which names the run-end record's hash, the head ``audit verify``
    prints)."""
    files.write(history)
    audit.end()
    final = store.save_final(
        tensors,
        {"run": dict(files.summary), "rounds": len(history)},
        card=files.card(history, audit.prev),
    )
    log(INFO, "Final adapter: %s", final)
    return final


def log_server_eval(server_round: int, metrics: Mapping[str, float]) -> None:
    """One log line with the server-side evaluation's headline numbers."""
    averages = {
        k: round(v, 4)
        for k, v in metrics.items()
        if k in ("seen-accuracy", "unseen-accuracy", "eval-loss")
    }
    log(INFO, "round %d server-side evaluation: %s", server_round, averages)
