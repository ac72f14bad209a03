"""The round loop of ``server.run_loop`` driven directly, in a few seconds: a fake round mode,
grid, clock, tracking and server-side evaluation around a real ``CheckpointStore`` and audit log.

What it holds is the loop's promise, "a crash resumes from the last checkpoint, and nothing is
lost": a resume starts after the newest checkpoint that verifies, with its adapter, history and
strategy state (no round-0 evaluation again); a crash leaves the last finished round's
checkpoint, aborts the tracking, closes the mode, and the resumed run ends exactly where an
uninterrupted one does; a fresh start moves every earlier output (``RUN_FILES``) to
``archive/<UTC stamp>/`` and nothing else; each history entry carries what the round did
(communication, client and server evaluation, seconds), and the checkpoint, ``final/``,
metrics.json, plot and audit records say what their docstrings promise. Exact values throughout
(docs/development.md, "Mutation testing").
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from logging import INFO, WARNING
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from flwr.serverapp import Grid

import server.run_loop as run_loop
from server.audit_log import AuditLog
from server.checkpoints import STATE_FILE, CheckpointStore
from server.metrics_log import METRICS_FILE, PLOT_FILE
from server.model_card import CARD_FILE, model_card
from server.progress import RoundProgress, current_watch
from server.round_modes import NO_TRAFFIC, RoundMode, Traffic, TrainOutcome
from server.run_loop import (
    RUN_FILES,
    LoopSettings,
    RunFiles,
    archive_previous_run,
    finish_run,
    log_server_eval,
    open_audit,
    resume_or_archive,
    run_federation,
    save_round,
    strategy_verdicts,
)
from server.tracking import GuardedTracker, NoTracker, RunTracking
from server.tracking.base import ParamValue
from strategies.adapter_io.config import adapter_config_for
from strategies.adapter_io.digest import tensors_checksum
from strategies.adapter_io.reading import read_adapter_dir
from strategies.audit import AUDIT_FILE, config_digest

TIMEOUT = 12.5
SEEN, UNSEEN = ("sst2", "qnli"), ("rte",)
RUN_CONFIG: dict[str, Any] = {"num-server-rounds": 4, "seed": 7, "merge-method": "ties"}
SUMMARY: dict[str, Any] = {"run-config": RUN_CONFIG, "label": "direct"}
STAMP = "20240102T030405123456Z"  # archive folder name under FixedNow
TRAIN_SECONDS, CLIENT_EVAL_SECONDS, SERVER_EVAL_SECONDS = 2.0, 0.5, 0.25
LogLine = tuple[int, str, tuple[Any, ...]]


class RoundCrashError(RuntimeError):
    """What the fake mode raises in the round it is told to crash in."""


class Interrupted(BaseException):
    """A BaseException that is not an Exception, as KeyboardInterrupt is."""


class Clock:
    """The loop's ``time.perf_counter``: it moves only when the fakes say work took time."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        """The current fake time."""
        return self.now

    def advance(self, seconds: float) -> None:
        """``seconds`` of work done."""
        self.now += seconds


class FixedNow:
    """The loop's ``datetime``: 2024-01-02 03:04:05.123456 in UTC; asked for local time (no
    zone), it answers an hour later (its local zone is UTC+1)."""

    @staticmethod
    def now(tz: tzinfo | None = None) -> datetime:
        """The fixed instant, in UTC only when asked for UTC."""
        instant = datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
        return instant if tz is UTC else instant + timedelta(hours=1)


@dataclass(frozen=True)
class FakeGrid:
    """A grid the fakes only pass around and compare."""

    name: str


class Renderer:
    """Records what the round's progress watch shows."""

    def __init__(self) -> None:
        self.shown: list[tuple[str, RoundProgress]] = []

    def show(self, progress: RoundProgress, now: float) -> None:
        """A progress update."""
        self.shown.append(("show", progress))

    def close(self, progress: RoundProgress, now: float) -> None:
        """The round's closing state."""
        self.shown.append(("close", progress))


@dataclass
class Recorders:
    """What the loop logged and plotted, and the fake clock it read."""

    clock: Clock
    logs: list[LogLine] = field(default_factory=list)
    plots: list[tuple[Path, list[int], tuple[str, ...], tuple[str, ...]]] = field(
        default_factory=list
    )
    renderer: Renderer = field(default_factory=Renderer)

    def log(self, level: int, message: str, *args: Any) -> None:
        """Stands in for Flower's ``log``."""
        self.logs.append((level, message, args))

    def plot(
        self,
        run_dir: Path,
        rounds: Sequence[dict[str, Any]],
        seen: Sequence[str],
        unseen: Sequence[str],
    ) -> None:
        """Stands in for ``plot_accuracy``: notes the rounds plotted and the tasks."""
        self.plots.append(
            (run_dir, [int(r["server-round"]) for r in rounds], tuple(seen), tuple(unseen))
        )


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> Recorders:
    """The loop's clock, stamp, log, plot and progress renderer replaced by recorders."""
    recorders = Recorders(Clock())
    monkeypatch.setattr(
        run_loop, "time", SimpleNamespace(perf_counter=recorders.clock.perf_counter)
    )
    monkeypatch.setattr(run_loop, "datetime", FixedNow)
    monkeypatch.setattr(run_loop, "log", recorders.log)
    monkeypatch.setattr(run_loop, "plot_accuracy", recorders.plot)
    monkeypatch.setattr(run_loop, "renderer_for", lambda: recorders.renderer)
    return recorders


def verdicts_state(accepted: Sequence[int], rejected: Mapping[int, str]) -> Any:
    """A stand-in for the strategy's round state: its report's accepted and rejected nodes."""
    return SimpleNamespace(
        report=SimpleNamespace(accepted_nodes=list(accepted), rejected=dict(rejected))
    )


@dataclass
class FakeMode:
    """A round mode that merges by ``2 * global + round``, reports fixed traffic, moves the
    fake clock, and keeps one piece of state (rounds trained) through its checkpoints."""

    clock: Clock
    crash_at: int | None = None
    crash_with: type[BaseException] = RoundCrashError
    unchanged: tuple[int, ...] = ()
    client_eval: bool = True
    uplink: str = "sparse-top-k"
    core: Any = field(default_factory=lambda: SimpleNamespace(round=None))
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    trained: int = 0
    closed: int = 0

    def train(
        self,
        grid: Grid,
        server_round: int,
        global_tensors: Mapping[str, torch.Tensor],
        timeout: float,
    ) -> TrainOutcome:
        """One round: reports progress to the open watch, then merges (or not)."""
        sent = {key: value.clone() for key, value in global_tensors.items()}
        self.calls.append(("train", grid, server_round, sent, timeout))
        if server_round == self.crash_at:
            raise self.crash_with(f"round {server_round} crashed")
        watch = current_watch()
        watch.opened(3)
        watch.arrived()
        self.core.round = verdicts_state([1, 2], {3: "update norm too large"})
        watch.update()
        self.clock.advance(TRAIN_SECONDS)
        self.trained += 1
        merged = None
        if server_round not in self.unchanged:
            merged = {key: value * 2 + server_round for key, value in global_tensors.items()}
        traffic: Traffic = (
            {"1": 10 * server_round, "2": 20 * server_round},
            {"1": server_round, "2": 2 * server_round},
        )
        return TrainOutcome(
            entry={
                "server-round": server_round,
                "clients-sampled": 3,
                "train": {"train-loss": server_round / 8, "trained-so-far": self.trained},
            },
            merged=merged,
            traffic=traffic,
            audit={"aggregation": "fake", "sampled": [1, 2, 3], "skipped": merged is None},
        )

    def evaluate(
        self,
        grid: Grid,
        server_round: int,
        global_tensors: Mapping[str, torch.Tensor],
        timeout: float,
    ) -> tuple[dict[str, Any] | None, Traffic]:
        """Client-side evaluation: a fixed accuracy and fixed traffic (or none at all)."""
        self.calls.append(("evaluate", grid, server_round, mean(global_tensors), timeout))
        self.clock.advance(CLIENT_EVAL_SECONDS)
        if not self.client_eval:
            return None, NO_TRAFFIC
        return {"client-accuracy": server_round / 4}, ({"1": 7}, {"1": 1, "2": 2})

    def checkpoint_state(self) -> dict[str, Any]:
        """The state saved with each checkpoint."""
        return {"merge-method": "fake", "trained": self.trained}

    def restore(self, saved: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
        """Resume: notes what it was given and takes its rounds-trained count back."""
        self.calls.append(("restore", dict(saved), [dict(entry) for entry in history]))
        self.trained = int(saved["trained"])

    def close(self) -> None:
        """Counts the closes."""
        self.closed += 1


class ServerEval:
    """A server-side evaluation whose numbers follow the adapter (its mean value)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.means: list[float] = []

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Notes the adapter's mean and returns metrics built from it."""
        self.means.append(mean(tensors))
        self.clock.advance(SERVER_EVAL_SECONDS)
        return server_metrics(mean(tensors))


class FakeTracking(RunTracking):
    """Records the loop's calls in order; ``status`` counts how often metrics.json read it."""

    def __init__(self, tapped: FakeGrid) -> None:
        super().__init__(GuardedTracker(NoTracker()))
        self.tapped = tapped
        self.events: list[tuple[Any, ...]] = []
        self.reads = 0

    def grid(self, grid: Grid) -> Grid:
        """The grid the rounds are to use (a different object, to see it is the one used)."""
        self.events.append(("grid", grid))
        return cast(Grid, self.tapped)

    def started(self, params: Mapping[str, ParamValue], first_round: int) -> None:
        """Notes the start."""
        self.events.append(("started", dict(params), first_round))

    def round_done(self, entry: Mapping[str, Any]) -> None:
        """Notes a round's entry."""
        self.events.append(("round", dict(entry)))

    def finished(self, final_dir: Path, audit_head: str) -> None:
        """Notes the normal end."""
        self.events.append(("finished", final_dir, audit_head))

    def aborted(self) -> None:
        """Notes the abort."""
        self.events.append(("aborted",))

    def status(self) -> dict[str, Any]:
        """metrics.json's tracking entry: how many times it has been read."""
        self.reads += 1
        return {"backend": "fake", "reads": self.reads}


def mean(tensors: Mapping[str, torch.Tensor]) -> float:
    """The adapter's one number (every fake adapter is constant)."""
    return float(tensors["a"].mean())


def server_metrics(value: float) -> dict[str, float]:
    """What ``ServerEval`` returns for an adapter of mean ``value``."""
    return {
        "seen-accuracy": value / 64,
        "unseen-accuracy": 0.123456789,
        "eval-loss": 1.0 + value,
        "sst2-accuracy": 0.5,
    }


def adapter(value: float) -> dict[str, torch.Tensor]:
    """A 2x2 float32 adapter filled with ``value``."""
    return {"a": torch.full((2, 2), value, dtype=torch.float32)}


def global_after(server_round: int, unchanged: tuple[int, ...] = ()) -> float:
    """The fake mode's global after ``server_round`` rounds, from the initial ones."""
    value = 1.0
    for done in range(1, server_round + 1):
        if done not in unchanged:
            value = 2 * value + done
    return value


def store_of(run_dir: Path) -> CheckpointStore:
    """The run folder's checkpoint store."""
    return CheckpointStore(run_dir, adapter_config_for("tiny", 4, 8, ["query"]))


def settings_of(run_dir: Path, rounds: int, *, resume: bool = False) -> LoopSettings:
    """Loop settings with the test's timeout and tasks."""
    return LoopSettings(rounds, TIMEOUT, run_dir, resume, SEEN, UNSEEN)


def federate(
    run_dir: Path,
    mode: FakeMode,
    rounds: int,
    *,
    resume: bool = False,
    evaluate: ServerEval | None = None,
    tracking: RunTracking | None = None,
    summary: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """``run_federation`` on a fake grid from an all-ones float64 adapter."""
    return run_federation(
        cast(Grid, FakeGrid("grid")),
        cast(RoundMode, mode),
        settings_of(run_dir, rounds, resume=resume),
        initial={"a": torch.ones(2, 2, dtype=torch.float64)},
        store=store_of(run_dir),
        summary=SUMMARY if summary is None else summary,
        evaluate=evaluate,
        tracking=tracking,
    )


def communication(server_round: int, before: int, *, client_eval: bool = True) -> dict[str, Any]:
    """The communication entry of the fake mode's round ``server_round`` after ``before``
    bytes in earlier rounds."""
    down = 30 * server_round + (7 if client_eval else 0)
    up = 3 * server_round + (3 if client_eval else 0)
    return {
        "uplink": "sparse-top-k",
        "train-down-bytes": {"1": 10 * server_round, "2": 20 * server_round},
        "train-up-bytes": {"1": server_round, "2": 2 * server_round},
        "evaluate-down-bytes": {"1": 7} if client_eval else {},
        "evaluate-up-bytes": {"1": 1, "2": 2} if client_eval else {},
        "down-bytes": down,
        "up-bytes": up,
        "round-bytes": down + up,
        "cumulative-bytes": before + down + up,
    }


def expected_history(
    rounds: int, *, evaluate: bool = True, client_eval: bool = True, unchanged: tuple[int, ...] = ()
) -> list[dict[str, Any]]:
    """The history an uninterrupted run of the fake mode records."""
    history: list[dict[str, Any]] = []
    if evaluate:
        history.append({"server-round": 0, "server-eval": server_metrics(1.0)})
    total = 0
    for server_round in range(1, rounds + 1):
        entry: dict[str, Any] = {
            "server-round": server_round,
            "clients-sampled": 3,
            "train": {"train-loss": server_round / 8, "trained-so-far": server_round},
        }
        if client_eval:
            entry["client-eval"] = {"client-accuracy": server_round / 4}
        entry["communication"] = communication(server_round, total, client_eval=client_eval)
        total = entry["communication"]["cumulative-bytes"]
        seconds = TRAIN_SECONDS + CLIENT_EVAL_SECONDS
        if evaluate:
            entry["server-eval"] = server_metrics(global_after(server_round, unchanged))
            seconds += SERVER_EVAL_SECONDS
        entry["seconds"] = seconds
        history.append(entry)
    return history


def metrics_of(run_dir: Path) -> dict[str, Any]:
    """The run folder's metrics.json."""
    loaded: dict[str, Any] = json.loads((run_dir / METRICS_FILE).read_text())
    return loaded


def audit_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run folder's audit records, in order."""
    lines = (run_dir / AUDIT_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines]


def calls_named(mode: FakeMode, name: str) -> list[tuple[Any, ...]]:
    """The fake mode's calls of one kind, without their name."""
    return [call[1:] for call in mode.calls if call[0] == name]


def train_rounds(mode: FakeMode) -> list[tuple[int, float]]:
    """(round, mean of the global it was sent) of each train call."""
    return [(call[1], mean(call[2])) for call in calls_named(mode, "train")]


def messages(rec: Recorders) -> list[tuple[str, tuple[Any, ...]]]:
    """(message, arguments) of every INFO line logged."""
    return [(message, args) for level, message, args in rec.logs if level == INFO]


# --- a fresh run, end to end


def test_a_fresh_run_trains_each_round_on_the_last_global_and_returns_the_final_one(
    tmp_path: Path, rec: Recorders
) -> None:
    """Rounds 1..N in order, each sent the previous global (float32) on the tracking's grid with
    the timeout; client evaluation sees the merged global; the result is the last global."""
    mode, evaluate = FakeMode(rec.clock), ServerEval(rec.clock)
    tracking = FakeTracking(FakeGrid("tapped"))
    final = federate(tmp_path, mode, 3, evaluate=evaluate, tracking=tracking)
    assert final.keys() == {"a"}
    assert final["a"].dtype == torch.float32
    assert torch.equal(final["a"], adapter(19.0)["a"])
    trains = calls_named(mode, "train")
    assert [call[0] for call in trains] == [FakeGrid("tapped")] * 3
    assert [call[2]["a"].dtype for call in trains] == [torch.float32] * 3
    assert [call[3] for call in trains] == [TIMEOUT] * 3
    assert train_rounds(mode) == [(1, 1.0), (2, 3.0), (3, 8.0)]
    assert calls_named(mode, "evaluate") == [
        (FakeGrid("tapped"), 1, 3.0, TIMEOUT),
        (FakeGrid("tapped"), 2, 8.0, TIMEOUT),
        (FakeGrid("tapped"), 3, 19.0, TIMEOUT),
    ]
    assert evaluate.means == [1.0, 3.0, 8.0, 19.0]  # round 0, then each merged global
    assert calls_named(mode, "restore") == []
    assert mode.closed == 1


def test_a_fresh_run_records_every_round_in_metrics_json_with_its_numbers(
    tmp_path: Path, rec: Recorders
) -> None:
    """metrics.json: the summary, round 0's evaluation and every round's entry (train part,
    client-eval, communication with the cumulative total, server-eval, seconds) and the
    tracking status as read by the last write."""
    tracking = FakeTracking(FakeGrid("tapped"))
    federate(tmp_path, FakeMode(rec.clock), 3, evaluate=ServerEval(rec.clock), tracking=tracking)
    history = expected_history(3)
    # status read by round 0, rounds 1-3, the final write with the plot and the one without
    assert metrics_of(tmp_path) == {
        "run": SUMMARY,
        "rounds": history,
        "tracking": {"backend": "fake", "reads": 6},
    }
    assert rec.plots == [
        (tmp_path, [0], SEEN, UNSEEN),
        (tmp_path, [0, 1], SEEN, UNSEEN),
        (tmp_path, [0, 1, 2], SEEN, UNSEEN),
        (tmp_path, [0, 1, 2, 3], SEEN, UNSEEN),
        (tmp_path, [0, 1, 2, 3], SEEN, UNSEEN),
    ]


def test_a_fresh_run_tells_the_tracking_each_point_in_order(tmp_path: Path, rec: Recorders) -> None:
    """started (run config, first round 1), round 0, the grid, each round's entry, finished
    with final/ and the audit head (the run-end record's hash)."""
    tracking = FakeTracking(FakeGrid("tapped"))
    federate(tmp_path, FakeMode(rec.clock), 2, evaluate=ServerEval(rec.clock), tracking=tracking)
    history = expected_history(2)
    head = audit_records(tmp_path)[-1]
    assert head["event"] == "run-end"
    assert tracking.events == [
        ("started", RUN_CONFIG, 1),
        ("round", history[0]),
        ("grid", FakeGrid("grid")),
        ("round", history[1]),
        ("round", history[2]),
        ("finished", tmp_path / "final", head["hash"]),
    ]


def test_a_fresh_run_writes_checkpoints_final_and_audit_that_match(
    tmp_path: Path, rec: Recorders
) -> None:
    """Each round's checkpoint holds its global, the history so far, the mode's state and a
    card naming that round's audit record; final/ holds the last global, the run report and a
    card naming the run-end record; the audit log chains start, rounds and end."""
    federate(tmp_path, FakeMode(rec.clock), 3, evaluate=ServerEval(rec.clock))
    history = expected_history(3)
    records = audit_records(tmp_path)
    assert [record["event"] for record in records] == [
        "run-start",
        "round",
        "round",
        "round",
        "run-end",
    ]
    assert records[0]["global-initial"] == tensors_checksum(adapter(1.0))
    assert records[0]["config-sha256"] == config_digest(RUN_CONFIG)
    for server_round in (1, 2, 3):
        record = records[server_round]
        assert record["server-round"] == server_round
        assert record["global-before"] == tensors_checksum(adapter(global_after(server_round - 1)))
        assert record["global-after"] == tensors_checksum(adapter(global_after(server_round)))
        assert (record["aggregation"], record["sampled"], record["skipped"]) == (
            "fake",
            [1, 2, 3],
            False,
        )
    assert records[4]["global"] == tensors_checksum(adapter(19.0))
    store = store_of(tmp_path)
    assert store.rounds() == [1, 2, 3]
    for server_round in (1, 2, 3):
        checkpoint = store.load(server_round)
        assert torch.equal(checkpoint.tensors["a"], adapter(global_after(server_round))["a"])
        assert checkpoint.state["history"] == history[: server_round + 1]
        assert checkpoint.state["strategy"] == {"merge-method": "fake", "trained": server_round}
        card = (checkpoint.path / CARD_FILE).read_text()
        assert card == model_card(
            SUMMARY,
            history[: server_round + 1],
            audit_head=records[server_round]["hash"],
            server_round=server_round,
            seen_tasks=SEEN,
            unseen_tasks=UNSEEN,
        )
    final = tmp_path / "final"
    assert torch.equal(read_adapter_dir(final).tensors["a"], adapter(19.0)["a"])
    assert json.loads((final / "run_report.json").read_text()) == {"run": SUMMARY, "rounds": 4}
    assert (final / CARD_FILE).read_text() == model_card(
        SUMMARY, history, audit_head=records[4]["hash"], seen_tasks=SEEN, unseen_tasks=UNSEEN
    )


def test_a_fresh_run_logs_each_round_its_evaluations_and_the_final_folder(
    tmp_path: Path, rec: Recorders
) -> None:
    """The round headers, each server-side evaluation's headline numbers (4 digits) and where
    the final adapter is, in that order."""
    federate(tmp_path, FakeMode(rec.clock), 2, evaluate=ServerEval(rec.clock))

    def headline(value: float) -> dict[str, float]:
        return {
            "seen-accuracy": round(value / 64, 4),
            "unseen-accuracy": 0.1235,
            "eval-loss": round(1.0 + value, 4),
        }

    assert messages(rec) == [
        ("round %d server-side evaluation: %s", (0, headline(1.0))),
        ("[ROUND %d/%d]", (1, 2)),
        ("round %d server-side evaluation: %s", (1, headline(3.0))),
        ("[ROUND %d/%d]", (2, 2)),
        ("round %d server-side evaluation: %s", (2, headline(8.0))),
        ("Final adapter: %s", (tmp_path / "final",)),
    ]


def test_each_round_is_watched_with_the_strategy_verdicts(tmp_path: Path, rec: Recorders) -> None:
    """The progress watch of round r shows the replies and the strategy's verdicts so far, and
    closes with them."""
    federate(tmp_path, FakeMode(rec.clock), 2)
    # (kind, round, sampled, answered, accepted, rejected); the opening time is the watch's own
    assert [
        (kind, p.server_round, p.sampled, p.answered, p.accepted, p.rejected)
        for kind, p in rec.renderer.shown
    ] == [
        ("show", 1, 3, 1, 2, 1),
        ("close", 1, 3, 1, 2, 1),
        ("show", 2, 3, 1, 2, 1),
        ("close", 2, 3, 1, 2, 1),
    ]


def test_without_any_evaluation_entries_carry_no_eval_and_round_0_is_skipped(
    tmp_path: Path, rec: Recorders
) -> None:
    """No server-side evaluation: no round 0, no server-eval, no evaluation log; no client
    evaluation: no client-eval and no evaluation traffic; the default tracking ("none") is
    what metrics.json reports."""
    mode = FakeMode(rec.clock, client_eval=False)
    federate(tmp_path, mode, 2)
    assert metrics_of(tmp_path) == {
        "run": SUMMARY,
        "rounds": expected_history(2, evaluate=False, client_eval=False),
        "tracking": {"backend": "none", "failures": 0, "failures-by-kind": {}, "last-error": None},
    }
    assert [message for message, _ in messages(rec)] == [
        "[ROUND %d/%d]",
        "[ROUND %d/%d]",
        "Final adapter: %s",
    ]
    assert rec.plots == [
        (tmp_path, [1], SEEN, UNSEEN),
        (tmp_path, [1, 2], SEEN, UNSEEN),
        (tmp_path, [1, 2], SEEN, UNSEEN),
    ]


def test_a_round_that_merges_nothing_keeps_the_previous_global(
    tmp_path: Path, rec: Recorders
) -> None:
    """merged None: round 2's checkpoint, audit record, evaluations and round 3's input all hold
    round 1's global."""
    mode, evaluate = FakeMode(rec.clock, unchanged=(2,)), ServerEval(rec.clock)
    final = federate(tmp_path, mode, 3, evaluate=evaluate)
    assert torch.equal(final["a"], adapter(9.0)["a"])
    assert train_rounds(mode) == [(1, 1.0), (2, 3.0), (3, 3.0)]
    assert evaluate.means == [1.0, 3.0, 3.0, 9.0]
    assert [call[2] for call in calls_named(mode, "evaluate")] == [3.0, 3.0, 9.0]
    record = audit_records(tmp_path)[2]
    assert record["global-before"] == record["global-after"] == tensors_checksum(adapter(3.0))
    assert record["skipped"] is True
    assert torch.equal(store_of(tmp_path).load(2).tensors["a"], adapter(3.0)["a"])
    assert metrics_of(tmp_path)["rounds"] == expected_history(3, unchanged=(2,))


def test_a_summary_without_run_config_starts_tracking_and_audit_with_an_empty_one(
    tmp_path: Path, rec: Recorders
) -> None:
    """The tracking is started with {} and the audit's config digest is that of {}."""
    tracking = FakeTracking(FakeGrid("tapped"))
    federate(tmp_path, FakeMode(rec.clock), 1, tracking=tracking, summary={"label": "bare"})
    assert tracking.events[0] == ("started", {}, 1)
    assert audit_records(tmp_path)[0]["config-sha256"] == config_digest({})


# --- crash and resume


def test_a_crash_keeps_the_last_checkpoint_aborts_and_a_resume_ends_as_an_uninterrupted_run(
    tmp_path: Path, rec: Recorders
) -> None:
    """Round 3 raises: rounds 1-2 stay checkpointed, metrics.json holds rounds 0-2, no final/,
    the tracking is aborted (not finished) and the mode closed. The resumed run restores the
    mode from round 2's checkpoint, does not evaluate round 0 again, trains rounds 3-4 from
    round 2's global, and ends with the tensors, history and final/ of a run never
    interrupted."""
    whole_dir, crashed_dir = tmp_path / "whole", tmp_path / "crashed"
    whole = federate(whole_dir, FakeMode(rec.clock), 4, evaluate=ServerEval(rec.clock))
    history = expected_history(4)

    crashing = FakeMode(rec.clock, crash_at=3)
    tracking = FakeTracking(FakeGrid("tapped"))
    with pytest.raises(RoundCrashError, match="round 3 crashed"):
        federate(crashed_dir, crashing, 4, evaluate=ServerEval(rec.clock), tracking=tracking)
    assert crashing.closed == 1
    assert tracking.events[-1] == ("aborted",)
    assert [event[0] for event in tracking.events].count("finished") == 0
    store = store_of(crashed_dir)
    assert store.rounds() == [1, 2]
    latest = store.latest_valid()
    assert latest is not None and latest.server_round == 2
    assert torch.equal(latest.tensors["a"], adapter(8.0)["a"])
    assert metrics_of(crashed_dir)["rounds"] == history[:3]
    assert not (crashed_dir / "final").exists()

    resumed_mode, evaluate = FakeMode(rec.clock), ServerEval(rec.clock)
    resumed_tracking = FakeTracking(FakeGrid("tapped"))
    resumed = federate(
        crashed_dir, resumed_mode, 4, resume=True, evaluate=evaluate, tracking=resumed_tracking
    )
    assert calls_named(resumed_mode, "restore") == [
        ({"merge-method": "fake", "trained": 2}, history[:3])
    ]
    assert train_rounds(resumed_mode) == [(3, 8.0), (4, 19.0)]
    assert evaluate.means == [19.0, 42.0]  # no round-0 evaluation again
    assert resumed_tracking.events[0] == ("started", RUN_CONFIG, 3)
    assert torch.equal(resumed["a"], whole["a"])
    assert metrics_of(crashed_dir)["rounds"] == metrics_of(whole_dir)["rounds"] == history
    report = "run_report.json"
    assert (crashed_dir / "final" / report).read_text() == (
        whole_dir / "final" / report
    ).read_text()
    assert torch.equal(read_adapter_dir(crashed_dir / "final").tensors["a"], whole["a"])
    card_digest = "model-card-sha256"  # the cards name different audit heads (a resume record)
    resumed_state, whole_state = store.load(4).state, store_of(whole_dir).load(4).state
    assert resumed_state.pop(card_digest) != whole_state.pop(card_digest)
    assert resumed_state == whole_state
    assert not (crashed_dir / "archive").exists()
    events = [record["event"] for record in audit_records(crashed_dir)]
    assert events == ["run-start", "round", "round", "resume", "round", "round", "run-end"]
    assert audit_records(crashed_dir)[3]["from-round"] == 2
    assert ("Resuming after round %d from %s", (2, store.round_path(2))) in messages(rec)


def test_an_interrupt_that_is_not_an_exception_still_aborts_and_closes(
    tmp_path: Path, rec: Recorders
) -> None:
    """A BaseException (as KeyboardInterrupt) in round 2 aborts the tracking, closes the mode,
    propagates, and leaves round 1's checkpoint."""
    mode = FakeMode(rec.clock, crash_at=2, crash_with=Interrupted)
    tracking = FakeTracking(FakeGrid("tapped"))
    with pytest.raises(Interrupted):
        federate(tmp_path, mode, 3, tracking=tracking)
    assert mode.closed == 1
    assert [event[0] for event in tracking.events] == ["started", "grid", "round", "aborted"]
    assert store_of(tmp_path).rounds() == [1]


class FailingServerEval(ServerEval):
    """A server-side evaluation that fails (e.g. the evaluation data is unreadable)."""

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Always raises."""
        raise RoundCrashError("evaluation data unreadable")


def test_a_failure_before_round_1_still_aborts_the_tracking_and_closes_the_mode(
    tmp_path: Path, rec: Recorders
) -> None:
    """The round-0 evaluation runs after the tracking was told the run started: its failure
    aborts the tracking and closes the mode like a failed round (no run left open)."""
    mode = FakeMode(rec.clock)
    tracking = FakeTracking(FakeGrid("tapped"))
    with pytest.raises(RoundCrashError, match="evaluation data unreadable"):
        federate(tmp_path, mode, 3, evaluate=FailingServerEval(rec.clock), tracking=tracking)
    assert mode.closed == 1
    assert [event[0] for event in tracking.events] == ["started", "aborted"]
    assert train_rounds(mode) == []


def test_a_crash_in_round_1_leaves_round_0_in_metrics_json(tmp_path: Path, rec: Recorders) -> None:
    """Round 0's evaluation is written (and plotted) before round 1 starts."""
    tracking = FakeTracking(FakeGrid("tapped"))
    with pytest.raises(RoundCrashError):
        federate(
            tmp_path,
            FakeMode(rec.clock, crash_at=1),
            3,
            evaluate=ServerEval(rec.clock),
            tracking=tracking,
        )
    assert metrics_of(tmp_path) == {
        "run": SUMMARY,
        "rounds": expected_history(0),
        "tracking": {"backend": "fake", "reads": 1},
    }
    assert rec.plots == [(tmp_path, [0], SEEN, UNSEEN)]
    assert store_of(tmp_path).rounds() == []
    assert [event[0] for event in tracking.events] == ["started", "round", "grid", "aborted"]


def test_resume_skips_a_corrupt_newest_checkpoint_for_the_one_before(
    tmp_path: Path, rec: Recorders
) -> None:
    """Round 3's checkpoint no longer verifies: the run resumes after round 2 with its global,
    history and state, and still ends as an uninterrupted run."""
    with pytest.raises(RoundCrashError):
        federate(tmp_path, FakeMode(rec.clock, crash_at=4), 4, evaluate=ServerEval(rec.clock))
    state_path = store_of(tmp_path).round_path(3) / STATE_FILE
    state = json.loads(state_path.read_text())
    state["tensors-sha256"] = "0" * 64
    state_path.write_text(json.dumps(state))
    mode = FakeMode(rec.clock)
    final = federate(tmp_path, mode, 4, resume=True, evaluate=ServerEval(rec.clock))
    assert calls_named(mode, "restore") == [
        ({"merge-method": "fake", "trained": 2}, expected_history(2))
    ]
    assert train_rounds(mode) == [(3, 8.0), (4, 19.0)]
    assert torch.equal(final["a"], adapter(42.0)["a"])
    assert metrics_of(tmp_path)["rounds"] == expected_history(4)


def test_resume_without_a_usable_checkpoint_starts_over_and_archives(
    tmp_path: Path, rec: Recorders
) -> None:
    """resume=true over a folder whose only checkpoint is broken: the earlier outputs go to the
    archive, the run starts at round 1 with round 0 evaluated, and the log says why."""
    broken = tmp_path / "checkpoints" / "round-0001"
    broken.mkdir(parents=True)
    (broken / "junk.bin").write_bytes(b"not an adapter")
    (tmp_path / METRICS_FILE).write_text('{"old": true}')
    mode, evaluate = FakeMode(rec.clock), ServerEval(rec.clock)
    tracking = FakeTracking(FakeGrid("tapped"))
    federate(tmp_path, mode, 2, resume=True, evaluate=evaluate, tracking=tracking)
    archived = tmp_path / "archive" / STAMP
    assert sorted(p.name for p in archived.iterdir()) == ["checkpoints", METRICS_FILE]
    assert (archived / "checkpoints" / "round-0001" / "junk.bin").read_bytes() == b"not an adapter"
    assert (archived / METRICS_FILE).read_text() == '{"old": true}'
    assert calls_named(mode, "restore") == []
    assert evaluate.means[0] == 1.0
    assert tracking.events[0] == ("started", RUN_CONFIG, 1)
    assert metrics_of(tmp_path)["rounds"] == expected_history(2)
    assert messages(rec)[:2] == [
        ("resume=true but no usable checkpoint in %s: starting over", (tmp_path / "checkpoints",)),
        ("Earlier outputs moved to %s", (archived,)),
    ]


def test_a_fresh_start_over_a_finished_run_archives_it_and_starts_over(
    tmp_path: Path, rec: Recorders
) -> None:
    """resume=false over valid checkpoints: everything is archived, nothing restored, no
    "resume=true" line."""
    federate(tmp_path, FakeMode(rec.clock), 2)
    metrics_before = (tmp_path / METRICS_FILE).read_text()
    rec.logs.clear()
    mode = FakeMode(rec.clock)
    final = federate(tmp_path, mode, 1)
    archived = tmp_path / "archive" / STAMP
    assert sorted(p.name for p in archived.iterdir()) == sorted(
        ["checkpoints", "final", METRICS_FILE, AUDIT_FILE]
    )
    assert (archived / METRICS_FILE).read_text() == metrics_before
    assert calls_named(mode, "restore") == []
    assert train_rounds(mode) == [(1, 1.0)]
    assert torch.equal(final["a"], adapter(3.0)["a"])
    assert messages(rec)[0] == ("Earlier outputs moved to %s", (archived,))
    assert [record["event"] for record in audit_records(tmp_path)] == [
        "run-start",
        "round",
        "run-end",
    ]


# --- the pieces, one by one


def test_resume_or_archive_returns_the_newest_checkpoint_state(
    tmp_path: Path, rec: Recorders
) -> None:
    """(round, tensors, history, strategy state) of the newest checkpoint; the folder stays."""
    store = store_of(tmp_path)
    store.save(1, adapter(5.0), {"history": [{"server-round": 1}], "strategy": {"k": 1}})
    store.save(
        2,
        adapter(6.0),
        {"history": [{"server-round": 1}, {"server-round": 2}], "strategy": {"k": 2}},
    )
    start, tensors, history, saved = resume_or_archive(store, tmp_path, True)
    assert start == 2
    assert tensors is not None and torch.equal(tensors["a"], adapter(6.0)["a"])
    assert history == [{"server-round": 1}, {"server-round": 2}]
    assert saved == {"k": 2}
    assert not (tmp_path / "archive").exists()


def test_resume_or_archive_defaults_a_missing_history_and_a_strategy_that_is_not_a_dict(
    tmp_path: Path, rec: Recorders
) -> None:
    """No history saved: []; no strategy or one that is not a mapping: {}."""
    store = store_of(tmp_path)
    store.save(1, adapter(5.0), {})
    assert resume_or_archive(store, tmp_path, True)[2:] == ([], {})
    assert not [line for line in rec.logs if line[0] == WARNING]
    store.save(2, adapter(5.0), {"strategy": ["not", "a", "dict"]})
    assert resume_or_archive(store, tmp_path, True)[2:] == ([], {})
    warnings = [line for line in rec.logs if line[0] == WARNING]
    assert [(message % args) for _, message, args in warnings] == [
        f"{store.round_path(2)} holds no strategy state (list): the strategy starts afresh "
        "(its screen history and round settings are not restored)"
    ]


def test_resume_or_archive_without_resume_archives_and_starts_at_zero(
    tmp_path: Path, rec: Recorders
) -> None:
    """resume false: (0, None, [], {}) and the checkpoints moved to the archive."""
    store = store_of(tmp_path)
    store.save(1, adapter(5.0), {"history": [{"server-round": 1}]})
    assert resume_or_archive(store, tmp_path, False) == (0, None, [], {})
    assert (tmp_path / "archive" / STAMP / "checkpoints" / "round-0001").is_dir()
    assert not (tmp_path / "checkpoints").exists()


def test_archive_moves_every_run_file_and_nothing_else(tmp_path: Path, rec: Recorders) -> None:
    """Each of RUN_FILES goes to archive/<UTC stamp>/ with its content; other files and earlier
    archives stay where they are."""
    assert RUN_FILES == ("checkpoints", "final", METRICS_FILE, PLOT_FILE, AUDIT_FILE)
    (tmp_path / "checkpoints" / "round-0002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "round-0002" / "state.json").write_text("two")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "README.md").write_text("card")
    (tmp_path / METRICS_FILE).write_text("metrics")
    (tmp_path / PLOT_FILE).write_bytes(b"png")
    (tmp_path / AUDIT_FILE).write_text("audit")
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "archive" / "older").mkdir(parents=True)
    target = archive_previous_run(tmp_path)
    assert target == tmp_path / "archive" / STAMP
    assert sorted(p.name for p in target.iterdir()) == sorted(RUN_FILES)
    assert (target / "checkpoints" / "round-0002" / "state.json").read_text() == "two"
    assert (target / "final" / "README.md").read_text() == "card"
    assert (target / METRICS_FILE).read_text() == "metrics"
    assert (target / PLOT_FILE).read_bytes() == b"png"
    assert (target / AUDIT_FILE).read_text() == "audit"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive", "notes.txt"]
    assert sorted(p.name for p in (tmp_path / "archive").iterdir()) == [STAMP, "older"]


def test_archive_makes_the_archive_folder_and_moves_only_what_is_there(
    tmp_path: Path, rec: Recorders
) -> None:
    """One earlier output, no archive folder yet: archive/<stamp>/ is made with just it."""
    (tmp_path / PLOT_FILE).write_bytes(b"png")
    target = archive_previous_run(tmp_path)
    assert target == tmp_path / "archive" / STAMP
    assert [p.name for p in target.iterdir()] == [PLOT_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["archive"]


def test_archive_of_a_folder_without_outputs_is_none_and_touches_nothing(
    tmp_path: Path, rec: Recorders
) -> None:
    """Nothing of RUN_FILES present: None, and no archive folder appears."""
    (tmp_path / "notes.txt").write_text("keep me")
    assert archive_previous_run(tmp_path) is None
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_strategy_verdicts_count_the_open_round_report() -> None:
    """(0, 0) before any round; else (accepted, rejected) of the round's report."""
    mode = FakeMode(Clock())
    assert strategy_verdicts(cast(RoundMode, mode)) == (0, 0)
    mode.core.round = verdicts_state([4, 5, 6], {7: "norm"})
    assert strategy_verdicts(cast(RoundMode, mode)) == (3, 1)


def test_run_files_write_metrics_with_tracking_and_plot_only_when_asked(
    tmp_path: Path, rec: Recorders
) -> None:
    """metrics.json has the summary, the rounds and (when a status is given) the tracking entry;
    the plot is drawn with the tasks unless plot=False."""
    history = [{"server-round": 1, "seconds": 1.5}]
    plain = RunFiles(tmp_path, SUMMARY, SEEN, UNSEEN)
    plain.write(history, plot=False)
    assert metrics_of(tmp_path) == {"run": SUMMARY, "rounds": history}
    assert rec.plots == []
    tracked = RunFiles(tmp_path, SUMMARY, SEEN, UNSEEN, tracking=lambda: {"backend": "x"})
    tracked.write(history)
    assert metrics_of(tmp_path) == {"run": SUMMARY, "rounds": history, "tracking": {"backend": "x"}}
    assert rec.plots == [(tmp_path, [1], SEEN, UNSEEN)]


def test_run_files_card_is_the_model_card_of_the_round_or_the_final_adapter(tmp_path: Path) -> None:
    """card() hands the summary, history, audit head, round and tasks to model_card."""
    history: list[dict[str, Any]] = [
        {"server-round": 0, "server-eval": {"sst2-accuracy": 0.5}},
        {"server-round": 1},
    ]
    files = RunFiles(tmp_path, SUMMARY, SEEN, UNSEEN)
    assert files.card(history, "head", 1) == model_card(
        SUMMARY, history, audit_head="head", server_round=1, seen_tasks=SEEN, unseen_tasks=UNSEEN
    )
    assert files.card(history, "head") == model_card(
        SUMMARY, history, audit_head="head", seen_tasks=SEEN, unseen_tasks=UNSEEN
    )
    assert "checkpoint after round 1" in files.card(history, "head", 1)
    assert "final adapter" in files.card(history, "head")


def test_save_round_writes_the_checkpoint_its_card_and_metrics(
    tmp_path: Path, rec: Recorders
) -> None:
    """The checkpoint of the round (tensors, history, strategy state, card with the audit head),
    then metrics.json and the plot."""
    store, files = store_of(tmp_path), RunFiles(tmp_path, SUMMARY, SEEN, UNSEEN)
    history = ({"server-round": 0}, {"server-round": 5, "seconds": 2.0})
    save_round(store, files, 5, history, adapter(4.0), {"k": [1, 2]}, audit_head="abc")
    checkpoint = store.load(5)
    assert torch.equal(checkpoint.tensors["a"], adapter(4.0)["a"])
    assert checkpoint.state["history"] == list(history)
    assert checkpoint.state["strategy"] == {"k": [1, 2]}
    assert (checkpoint.path / CARD_FILE).read_text() == files.card(history, "abc", 5)
    assert metrics_of(tmp_path) == {"run": SUMMARY, "rounds": list(history)}
    assert rec.plots == [(tmp_path, [0, 5], SEEN, UNSEEN)]


def test_finish_run_writes_metrics_ends_the_audit_and_the_final_folder(
    tmp_path: Path, rec: Recorders
) -> None:
    """metrics.json and plot, the run-end record, then final/ with the adapter, the run report
    and a card naming the run-end record; returns final/ and logs it."""
    store, files = store_of(tmp_path), RunFiles(tmp_path, SUMMARY, SEEN, UNSEEN)
    audit = AuditLog.open(tmp_path, RUN_CONFIG, 0, adapter(1.0))
    history = [{"server-round": 0}, {"server-round": 1}]
    final = finish_run(store, files, history, adapter(2.0), audit)
    assert final == tmp_path / "final"
    records = audit_records(tmp_path)
    assert [record["event"] for record in records] == ["run-start", "run-end"]
    assert audit.prev == records[-1]["hash"]
    assert torch.equal(read_adapter_dir(final).tensors["a"], adapter(2.0)["a"])
    assert json.loads((final / "run_report.json").read_text()) == {"run": SUMMARY, "rounds": 2}
    assert (final / CARD_FILE).read_text() == files.card(history, audit.prev)
    assert metrics_of(tmp_path) == {"run": SUMMARY, "rounds": history}
    assert rec.plots == [(tmp_path, [0, 1], SEEN, UNSEEN)]
    assert messages(rec) == [("Final adapter: %s", (final,))]


def test_open_audit_starts_a_log_or_continues_it_with_a_resume_record(tmp_path: Path) -> None:
    """start 0: a run-start record with the run config's digest and the adapter's; start 2 over
    that log: a resume record from round 2 chained to it."""
    fresh = open_audit(tmp_path, SUMMARY, 0, adapter(1.0))
    first = audit_records(tmp_path)
    assert [record["event"] for record in first] == ["run-start"]
    assert first[0]["config-sha256"] == config_digest(RUN_CONFIG)
    assert first[0]["global-initial"] == tensors_checksum(adapter(1.0))
    assert fresh.prev == first[0]["hash"]
    resumed = open_audit(tmp_path, {}, 2, adapter(3.0))
    records = audit_records(tmp_path)
    assert [record["event"] for record in records] == ["run-start", "resume"]
    assert records[1]["from-round"] == 2
    assert records[1]["prev"] == first[0]["hash"]
    assert records[1]["config-sha256"] == config_digest({})
    assert records[1]["checkpoint-sha256"] == tensors_checksum(adapter(3.0))
    assert resumed.prev == records[1]["hash"]


def test_log_server_eval_logs_the_headline_numbers_rounded(rec: Recorders) -> None:
    """Only seen, unseen accuracy and loss, to 4 decimals."""
    log_server_eval(
        7,
        {
            "seen-accuracy": 0.123456,
            "unseen-accuracy": 0.98765,
            "eval-loss": 1.23456789,
            "sst2-accuracy": 0.5,
        },
    )
    assert rec.logs == [
        (
            INFO,
            "round %d server-side evaluation: %s",
            (7, {"seen-accuracy": 0.1235, "unseen-accuracy": 0.9877, "eval-loss": 1.2346}),
        )
    ]
