"""A tracking backend that fails never stops the federation.

``GuardedTracker`` hands every call to the backend and catches what it raises (an MLflow server
gone, a full disk under the TensorBoard folder): one warning per kind of failure (the call and
the exception's type), every failure counted, the count written to metrics.json's ``tracking``
entry (``status``), and the run goes on. Later calls are still tried: a server that comes back
gets the rounds after it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.supercore import log

from server.tracking.base import ClientRow, ParamValue, Tracker


class GuardedTracker:
    """``backend`` with its failures caught, warned about once per kind, and counted."""

    def __init__(self, backend: Tracker) -> None:
        self.backend = backend
        self.failures: dict[str, int] = {}  # "<call>: <exception type>" -> count
        self.last_error: str | None = None

    @property
    def name(self) -> str:
        """The backend's name."""
        return self.backend.name

    @property
    def failure_count(self) -> int:
        """Failed backend calls so far."""
        return sum(self.failures.values())

    def status(self) -> dict[str, Any]:
        """metrics.json's ``tracking`` entry: the backend, the failed calls (total and by
        kind) and the last failure's message."""
        return {
            "backend": self.name,
            "failures": self.failure_count,
            "failures-by-kind": dict(sorted(self.failures.items())),
            "last-error": self.last_error,
        }

    def _failed(self, call: str, error: Exception) -> None:
        kind = f"{call}: {type(error).__name__}"
        first = kind not in self.failures
        self.failures[kind] = self.failures.get(kind, 0) + 1
        self.last_error = f"{kind}: {error}"[:500]
        if first:
            log(
                WARNING,
                "tracking (%s): %s failed, the run goes on without it (%s: %s); "
                "further failures of this kind are only counted (metrics.json 'tracking')",
                self.name,
                call,
                type(error).__name__,
                str(error)[:300],
            )

    def start(self, params: Mapping[str, ParamValue], *, first_round: int) -> None:
        """The backend's ``start``, guarded."""
        try:
            self.backend.start(params, first_round=first_round)
        except Exception as error:
            self._failed("start", error)

    def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """The backend's ``log_round``, guarded."""
        try:
            self.backend.log_round(server_round, metrics)
        except Exception as error:
            self._failed("log_round", error)

    def log_clients(self, server_round: int, rows: Sequence[ClientRow]) -> None:
        """The backend's ``log_clients``, guarded."""
        try:
            self.backend.log_clients(server_round, rows)
        except Exception as error:
            self._failed("log_clients", error)

    def finish(self, final_dir: Path, audit_head: str) -> None:
        """The backend's ``finish``, guarded."""
        try:
            self.backend.finish(final_dir, audit_head)
        except Exception as error:
            self._failed("finish", error)

    def abort(self) -> None:
        """The backend's ``abort``, guarded."""
        try:
            self.backend.abort()
        except Exception as error:
            self._failed("abort", error)
