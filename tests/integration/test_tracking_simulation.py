"""Real `flwr run` simulations logging to a real MLflow tracking server (``mlflow server`` on
127.0.0.1, SQLite backend in a temp folder), read back with ``MlflowClient``.

1. A 2-round run: its parameters, per-round and per-client metrics, the per-round client rows,
   the final adapter (artifact, byte for byte) and the audit head (tag) are on the server.
2. The server is killed (SIGKILL, no goodbye) once round 1 is in metrics.json: the federation
   finishes normally, the failed calls are counted in metrics.json, and the server's database
   holds the rounds it saw before it died.
3. A server that accepts connections but never answers costs the tracking a bounded wait per
   call (``mlflow_backend.HTTP_TIMEOUT_SECONDS``), not the run.

The tests share one server (starting it is the slow part), restarted when a test killed it;
each finds its own run by the ``output-dir`` tag.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient  # the tracking extra, which scripts/setup.sh installs

from server.tracking import GuardedTracker
from server.tracking.mlflow_backend import EXPERIMENT, HTTP_ENV, MlflowTracker
from tests.integration.simulation import ROOT, WRAPPER, free_port, run_simulation, simulation_env

pytestmark = pytest.mark.integration

OVERRIDES = (
    "num-server-rounds=2 train-examples=32 eval-examples=32 max-length=32 "
    "seen-tasks='banking77,sentiment' unseen-tasks='mcid' tracking='mlflow'"
)
SERVER_START_SECONDS = 180  # a loaded 2-core machine needs ~30 s
RUN_SECONDS = 420


class MlflowServer:
    """``mlflow server`` on a free loopback port, SQLite and artifacts in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.database = folder / "mlflow.db"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = (folder / "server.log").open("w")
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "mlflow", "server"),
                *("--host", "127.0.0.1", "--port", str(self.port)),
                *("--backend-store-uri", f"sqlite:///{self.database}"),
                *("--artifacts-destination", str(folder / "artifacts"), "--workers", "1"),
            ],
            cwd=folder,
            env={
                **os.environ,
                # its workers are started by name: this interpreter's scripts come first
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            },
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends the workers too
        )

    def wait_ready(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        log = (self.folder / "server.log").read_text()[-3000:]
        pytest.fail(f"mlflow server did not answer on {self.uri} within {seconds} s:\n{log}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)
        self.log.close()


class Servers:
    """One MLflow server shared by the module's tests (its start is the slow part); a test that
    stopped it gets a fresh one for the next."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.current: MlflowServer | None = None

    def running(self) -> MlflowServer:
        if self.current is None or self.current.process.poll() is not None:
            folder = self.root / f"mlflow-server-{len(list(self.root.iterdir()))}"
            folder.mkdir()
            self.current = MlflowServer(folder)
            self.current.wait_ready(SERVER_START_SECONDS)
        return self.current


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    servers = Servers(tmp_path_factory.mktemp("mlflow-servers"))
    try:
        yield servers
    finally:
        if servers.current is not None:
            servers.current.stop()


@pytest.fixture
def mlflow_server(servers: Servers) -> MlflowServer:
    return servers.running()


def the_run(client: MlflowClient, out: Path) -> Any:
    """The one MLflow run of the federation whose output folder is ``out``."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`output-dir` = '{out}'"
    )
    assert len(runs) == 1, runs
    return runs[0]


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {metric.step: metric.value for metric in client.get_metric_history(run_id, key)}


def test_a_two_round_run_is_logged_to_the_mlflow_server(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    out = tmp_path / "run"
    code, log = run_simulation(
        tmp_path,
        f"{OVERRIDES} tracking-uri='{mlflow_server.uri}' output-dir='{out}'",
        timeout=RUN_SECONDS,
    )
    assert code == 0, log[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tracking"]["backend"] == "mlflow"
    assert metrics["tracking"]["failures"] == 0, metrics["tracking"]
    rounds = metrics["rounds"]

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = the_run(client, out)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["num-server-rounds"] == "2"
    assert run.data.params["tracking"] == "mlflow"
    assert run.data.params["seen-tasks"] == "banking77,sentiment"
    for key in ("seen-accuracy", "unseen-accuracy", "banking77-accuracy", "mcid-accuracy"):
        assert history(client, run_id, f"eval/{key}") == pytest.approx(
            {e["server-round"]: e["server-eval"][key] for e in rounds}
        ), key
    assert history(client, run_id, "train/train-loss") == pytest.approx(
        {e["server-round"]: e["train"]["train-loss"] for e in rounds[1:]}
    )
    assert history(client, run_id, "replies/accepted") == {1: 2, 2: 2}
    assert history(client, run_id, "replies/rejected") == {1: 0, 2: 0}
    assert history(client, run_id, "bytes/up") == {
        e["server-round"]: e["communication"]["up-bytes"] for e in rounds[1:]
    }
    assert set(history(client, run_id, "time/merge-seconds")) == {1, 2}
    nodes = rounds[1]["merge"]["accepted-nodes"]
    assert len(nodes) == 2
    for node in nodes:
        assert history(client, run_id, f"clients/node-{node}/num-examples") == {1: 32, 2: 32}
        losses = history(client, run_id, f"clients/node-{node}/train-loss")
        assert sorted(losses) == [1, 2] and all(loss > 0 for loss in losses.values())
        assert history(client, run_id, f"clients/node-{node}/update-norm") == pytest.approx(
            {e["server-round"]: e["merge"]["update-norms"][str(node)] for e in rounds[1:]}
        )

    last = json.loads((out / "audit.jsonl").read_text().splitlines()[-1])
    assert run.data.tags["audit-head"] == last["hash"]
    download = Path(client.download_artifacts(run_id, "", str(tmp_path / "download")))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (download / "final-adapter" / name).read_bytes() == (
            out / "final" / name
        ).read_bytes()
    rows = json.loads((download / "clients" / "round-0002.json").read_text())
    assert sorted(row["node_id"] for row in rows["clients"]) == sorted(nodes)
    assert {row["verdict"] for row in rows["clients"]} == {"accepted"}


def test_the_server_dying_mid_run_never_stops_the_federation(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    out = tmp_path / "run"
    overrides = f"{OVERRIDES} tracking-uri='{mlflow_server.uri}' output-dir='{out}'"
    with subprocess.Popen(
        ["bash", str(WRAPPER), "-c", overrides],
        cwd=ROOT,
        env=simulation_env(tmp_path / "flwr-home"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as simulation:
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(simulation.stdout or []))
        reader.start()
        deadline = time.monotonic() + RUN_SECONDS
        while not round_done(out, 1) and time.monotonic() < deadline:
            assert simulation.poll() is None, "".join(output)[-4000:]
            time.sleep(0.2)
        assert round_done(out, 1), "".join(output)[-4000:]
        mlflow_server.stop(signal.SIGKILL)  # gone without a word, as a crashed host is
        try:
            code = simulation.wait(timeout=RUN_SECONDS)
        except subprocess.TimeoutExpired:
            simulation.kill()
            raise
        reader.join(timeout=30)
    log = "".join(output)
    assert code == 0, log[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [entry["server-round"] for entry in metrics["rounds"]] == [0, 1, 2]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    tracking = metrics["tracking"]
    calls = {kind.split(":")[0] for kind in tracking["failures-by-kind"]}
    assert calls == {"log_round", "log_clients", "finish"}, tracking
    assert tracking["failures"] == 3, tracking
    assert "tracking (mlflow): log_round failed, the run goes on" in log

    # What the server stored before it died: rounds 0 and 1, the run never finished.
    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_server.database}")
    run = the_run(client, out)
    assert run.info.status == "RUNNING"
    assert sorted(history(client, run.info.run_id, "eval/seen-accuracy")) == [0, 1]


def round_done(run_dir: Path, server_round: int) -> bool:
    """Whether metrics.json (rewritten atomically after each round) has ``server_round``."""
    try:
        rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return False
    return any(entry.get("server-round") == server_round for entry in rounds)


def test_a_server_that_never_answers_costs_a_bounded_wait_not_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in HTTP_ENV:  # the tracker's own defaults, undone after the test
        monkeypatch.delenv(key, raising=False)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts connections (the kernel does), never answers
        tracker = GuardedTracker(
            MlflowTracker(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}")
        )
        starting = threading.Thread(
            target=tracker.start, args=({"seed": 0},), kwargs={"first_round": 1}
        )
        starting.start()
        starting.join(timeout=120)  # MLflow's own default would wait 120 s x 8 tries
        assert not starting.is_alive()
    assert tracker.failure_count == 1
    assert next(iter(tracker.failures)).startswith("start: ")
