"""``tracking = "mlflow"``: one MLflow run per federation, written with ``MlflowClient``.

Where: ``tracking-uri`` (an ``http://`` tracking server, a database URI; ``artifact_location``
says where each keeps the artifacts); "" means a SQLite
file in the run folder, ``<output-dir>/mlflow.db``, with artifacts beside it in
``<output-dir>/mlartifacts/`` (MLflow 3 refuses its plain-folder store, so the local default is
its own single-file database). The experiment is ``robustmerge-fl``; the run is named after the
output folder and tagged with its path.

What is written: the run config as parameters; every round scalar under its name (step =
round); each client's scalars as ``clients/node-<id>/<scalar>`` and the round's rows with their
verdicts and reasons as the artifact ``clients/round-<NNNN>.json``; at the end the tag
``audit-head`` and the final adapter folder as the artifact ``final-adapter/``. A resumed run
reopens the run it continues (its id is kept in ``<output-dir>/mlflow-run.json``).

A server that hangs must not stall the rounds: unless the environment says otherwise, each
HTTP request gives up after ``HTTP_TIMEOUT_SECONDS`` and is not retried (MLflow's own default
is 120 s and 7 retries with back-off); ``server.tracking.guard`` turns the failure into a
warning and a count.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from server.tracking.base import ClientRow, ParamValue

if TYPE_CHECKING:
    from mlflow import MlflowClient

T = TypeVar("T")
EXPERIMENT = "robustmerge-fl"
DATABASE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
RUN_ID_FILE = "mlflow-run.json"
HTTP_TIMEOUT_SECONDS = 5
# MLflow's environment variables for its HTTP requests; set only where the user has not.
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": str(HTTP_TIMEOUT_SECONDS),
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
}
# MLflow's limits per log_batch call.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000


def default_uri(run_dir: Path) -> str:
    """The tracking URI when ``tracking-uri`` is "": the SQLite file in the run folder."""
    return f"sqlite:///{(run_dir / DATABASE_FILE).resolve()}"


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def artifact_location(uri: str, run_dir: Path) -> str | None:
    """Where a new experiment at ``uri`` keeps its artifacts: a tracking server decides itself
    (None); a SQLite file keeps them beside it, in ``mlartifacts/`` (the default store: the run
    folder); another database in the run folder of the run that creates the experiment. Never
    MLflow's own default, ``./mlruns`` of the ServerApp's working directory (Flower's app
    cache, which nobody looks in)."""
    if uri.startswith(("http://", "https://")):
        return None
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / ARTIFACT_DIR).resolve().as_uri()
    return (run_dir / ARTIFACT_DIR).resolve().as_uri()


class MlflowTracker:
    """One MLflow run at ``uri`` ("" = ``default_uri``); see the module docstring."""

    name = "mlflow"

    def __init__(self, run_dir: Path, uri: str = "") -> None:
        self.run_dir = run_dir
        self.uri = uri or default_uri(run_dir)
        self.artifact_location = artifact_location(self.uri, run_dir)
        self._client: MlflowClient | None = None
        self.run_id: str | None = None

    @property
    def client(self) -> MlflowClient:
        """The open client (``start`` opens it)."""
        if self._client is None or self.run_id is None:
            raise RuntimeError("MlflowTracker: start() was not called or failed")
        return self._client

    def start(self, params: Mapping[str, ParamValue], *, first_round: int) -> None:
        """Open (or, resuming, reopen) the run; the run config as parameters."""
        for key, value in HTTP_ENV.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient
        from mlflow.entities import Param

        client = MlflowClient(tracking_uri=self.uri)
        self._client = client
        previous = self._previous_run_id() if first_round > 1 else None
        if previous is not None and self._reopen(client, previous):
            return
        experiment = client.get_experiment_by_name(EXPERIMENT)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(EXPERIMENT, artifact_location=self.artifact_location)
        )
        run = client.create_run(
            experiment_id,
            run_name=self.run_dir.name,
            tags={"output-dir": str(self.run_dir)},
        )
        self.run_id = run.info.run_id
        (self.run_dir / RUN_ID_FILE).write_text(
            json.dumps({"tracking-uri": self.uri, "run-id": self.run_id}) + "\n"
        )
        items = [Param(key, str(value)) for key, value in sorted(params.items())]
        for chunk in _chunks(items, MAX_PARAMS_PER_BATCH):
            client.log_batch(self.run_id, params=list(chunk))

    def _reopen(self, client: MlflowClient, run_id: str) -> bool:
        """Mark the earlier run ``run_id`` running again; False when the store does not have
        it (a new database at the same URI): a new run is opened instead."""
        from mlflow.exceptions import MlflowException

        try:
            client.get_run(run_id)
        except MlflowException:
            return False
        client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        return True

    def _previous_run_id(self) -> str | None:
        """The run an earlier start in this folder opened at this URI, if it says so."""
        try:
            saved = json.loads((self.run_dir / RUN_ID_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or saved.get("tracking-uri") != self.uri:
            return None
        run_id = saved.get("run-id")
        return run_id if isinstance(run_id, str) else None

    def _log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(key, value, stamp, step) for key, value in metrics.items()]
        for chunk in _chunks(items, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self._run(), metrics=list(chunk))

    def _run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("MlflowTracker: no open run")
        return self.run_id

    def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """Each scalar at step ``server_round``."""
        self._log_metrics(server_round, metrics)

    def log_clients(self, server_round: int, rows: Sequence[ClientRow]) -> None:
        """``clients/node-<id>/<scalar>`` metrics and the rows as a JSON artifact."""
        self._log_metrics(
            server_round,
            {
                f"clients/node-{row.node_id}/{key}": value
                for row in rows
                for key, value in row.scalars().items()
            },
        )
        self.client.log_dict(
            self._run(),
            {"server-round": server_round, "clients": [asdict(row) for row in rows]},
            f"clients/round-{server_round:04d}.json",
        )

    def finish(self, final_dir: Path, audit_head: str) -> None:
        """The audit head as a tag, the final adapter as an artifact; the run FINISHED."""
        self.client.set_tag(self._run(), "audit-head", audit_head)
        self.client.log_artifacts(self._run(), str(final_dir), "final-adapter")
        self.client.set_terminated(self._run(), status="FINISHED")

    def abort(self) -> None:
        """The run FAILED (when one is open)."""
        if self._client is not None and self.run_id is not None:
            self._client.set_terminated(self.run_id, status="FAILED")
