"""What every tracking backend implements, and the backend that records nothing.

A ``Tracker`` is told four things over a run: the run config when the run starts, each round's
scalars (``server.tracking.scalars.round_scalars``), each round's per-client rows, and at the
end where the final adapter is and the audit chain's head digest. It may raise on any of them;
``server.tracking.guard.GuardedTracker`` keeps such a failure from reaching the federation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# A run-config value as Flower hands it over (``context.run_config``).
ParamValue = bool | int | float | str


@dataclass(frozen=True)
class ClientRow:
    """One client's part in one training round, tagged by its Flower node id.

    ``verdict`` is "accepted" (merged) or "rejected" (``reason`` says why); ``train_loss`` and
    ``num_examples`` are what its reply's metrics said (None when the reply carried none, e.g.
    under SecAgg+); ``update_norm`` the norm of its update the strategy measured (None when
    it measured none).
    """

    node_id: int
    verdict: str
    reason: str = ""
    train_loss: float | None = None
    num_examples: int | None = None
    update_norm: float | None = None

    def scalars(self) -> dict[str, float]:
        """The row's numbers, by name (``accepted`` 1.0 or 0.0), the ones it has."""
        values: dict[str, float | int | None] = {
            "train-loss": self.train_loss,
            "num-examples": self.num_examples,
            "update-norm": self.update_norm,
            "accepted": 1.0 if self.verdict == "accepted" else 0.0,
        }
        return {key: float(value) for key, value in values.items() if value is not None}


class Tracker(Protocol):
    """An experiment-tracking backend (TensorBoard, MLflow, or none)."""

    @property
    def name(self) -> str:
        """The run-config value that chose it (``tracking``)."""
        ...

    def start(self, params: Mapping[str, ParamValue], *, first_round: int) -> None:
        """The run starts (or resumes after ``first_round`` - 1 rounds) with config ``params``."""
        ...

    def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """Round ``server_round``'s scalars (round 0: the initial adapter's evaluation)."""
        ...

    def log_clients(self, server_round: int, rows: Sequence[ClientRow]) -> None:
        """Round ``server_round``'s per-client rows."""
        ...

    def finish(self, final_dir: Path, audit_head: str) -> None:
        """The run ended normally: the final adapter is in ``final_dir``, the audit chain's
        last record hashes to ``audit_head``."""
        ...

    def abort(self) -> None:
        """The run ended with an error: close what is open, marked as failed."""
        ...


class NoTracker:
    """``tracking = "none"``: every call does nothing."""

    name = "none"

    def start(self, params: Mapping[str, ParamValue], *, first_round: int) -> None:
        pass

    def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        pass

    def log_clients(self, server_round: int, rows: Sequence[ClientRow]) -> None:
        pass

    def finish(self, final_dir: Path, audit_head: str) -> None:
        pass

    def abort(self) -> None:
        pass
