"""What the round loop tells the tracking, at its four points: start, each round, end, error.

``server.run_loop`` holds one ``RunTracking`` per run and calls it where it already writes
metrics.json: after archiving or resuming (``started``), after each round's history entry
(``round_done``, round 0's evaluation included), after the final adapter is saved
(``finished``), and when the loop raises (``aborted``). The history entry is the one source:
the scalars and per-client rows are computed from it (``server.tracking.scalars``), with the
clients' own train loss and examples noted by the ``ReplyTap`` that ``grid`` puts around the
round's grid. ``status`` is metrics.json's ``tracking`` entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from server.tracking.base import ParamValue
from server.tracking.guard import GuardedTracker
from server.tracking.replies import ReplyTap
from server.tracking.scalars import client_rows, round_scalars


class RunTracking:
    """One run's tracking through ``tracker`` (a guarded backend: no call here raises)."""

    def __init__(self, tracker: GuardedTracker) -> None:
        self.tracker = tracker
        self.tap: ReplyTap | None = None

    @property
    def active(self) -> bool:
        """Whether a backend records anything (``tracking`` is not "none")."""
        return self.tracker.name != "none"

    def grid(self, grid: Grid) -> Grid:
        """``grid`` as the round should use it: inside a ``ReplyTap`` when tracking is on."""
        if not self.active:
            return grid
        if self.tap is None or self.tap.grid is not grid:
            self.tap = ReplyTap(grid)
        return self.tap

    def started(self, params: Mapping[str, ParamValue], first_round: int) -> None:
        """The run starts at round ``first_round`` (> 1: resumed) with config ``params``."""
        self.tracker.start(params, first_round=first_round)

    def round_done(self, entry: Mapping[str, Any]) -> None:
        """Log a finished round's history entry: its scalars, and (a training round) one row
        per client it judged."""
        server_round = int(entry["server-round"])
        self.tracker.log_round(server_round, round_scalars(entry))
        if server_round > 0:
            replies = self.tap.take() if self.tap is not None else {}
            self.tracker.log_clients(server_round, client_rows(entry, replies))

    def finished(self, final_dir: Path, audit_head: str) -> None:
        """The run ended normally with the adapter in ``final_dir``, audit head ``audit_head``."""
        self.tracker.finish(final_dir, audit_head)

    def aborted(self) -> None:
        """The run ended with an error."""
        self.tracker.abort()

    def status(self) -> dict[str, Any]:
        """metrics.json's ``tracking`` entry (``GuardedTracker.status``)."""
        return self.tracker.status()
