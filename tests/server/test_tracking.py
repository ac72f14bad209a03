"""Experiment tracking (server.tracking): TensorBoard event files of a real round loop, read
back with TensorBoard's own event reader; the failure-tolerant wrapper; the start-up refusal.

The run is ``server.run_loop.run_federation`` with the real strategy, answered on pull by three
sites (as in ``test_audit_tamper_real``): node 3's update is 1000x an honest one's, so the norm
screen rejects it every round. Each site reports its own train loss (node + round / 10) and
examples (10 x node), so the per-client rows can be told apart and checked against what the
sites sent, and the round scalars against metrics.json, the loop's own record.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from protocol.wire import NUM_EXAMPLES, TRAIN_LOSS
from server.checkpoints import CheckpointStore
from server.config import ServerSettings
from server.round_modes import MessageRounds
from server.run_loop import LoopSettings, run_federation
from server.tracking import GuardedTracker, RunTracking, open_tracking
from server.tracking.base import ClientRow, ParamValue
from server.tracking.mlflow_backend import artifact_location
from server.tracking.scalars import client_rows, round_scalars
from server.tracking.tensorboard_backend import TENSORBOARD_DIR
from strategies import FedRobustMerge
from strategies.audit import AUDIT_FILE
from tests.server.three_sites import HOSTILE, ThreeSites
from tests.strategies.test_fed_robustmerge import make_global
from workload.config import ConfigError

ADAPTER_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query"]}
ROUNDS = 3
RUN_CONFIG: dict[str, ParamValue] = {"num-server-rounds": ROUNDS, "seed": 0, "tracking": "x"}


def site_loss(node: int, server_round: int) -> float:
    return node + server_round / 10


class Sites(ThreeSites):
    """``ThreeSites`` reporting a train loss that says which node and round it came from."""

    def extra_metrics(self, node: int, server_round: int) -> dict[str, float]:
        return {TRAIN_LOSS: site_loss(node, server_round)}


def evaluate(tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """A deterministic stand-in for the server-side evaluation, moving with the adapter."""
    size = float(sum(value.abs().sum() for value in tensors.values()))
    seen = 1.0 / (1.0 + size / 1000)
    return {"banking77-accuracy": seen, "seen-accuracy": seen, "unseen-accuracy": seen / 2}


def run(
    run_dir: Path, tracking: RunTracking, *, rounds: int = ROUNDS, resume: bool = False
) -> None:
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as conftest's
    try:
        run_federation(
            Sites(),  # type: ignore[arg-type]
            MessageRounds(
                FedRobustMerge(
                    device="cpu", min_train_nodes=3, fraction_evaluate=0.0, server_lr=1.0
                )
            ),
            LoopSettings(num_rounds=rounds, round_timeout=60.0, run_dir=run_dir, resume=resume),
            initial=make_global(),
            store=CheckpointStore(run_dir, ADAPTER_CONFIG),
            summary={"run-config": dict(RUN_CONFIG)},
            evaluate=evaluate,
            tracking=tracking,
        )
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def events(log_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalar_series(accumulator: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def texts(accumulator: EventAccumulator, tag: str) -> dict[int, str]:
    return {
        event.step: tensor_util.make_ndarray(event.tensor_proto).item().decode()
        for event in accumulator.Tensors(f"{tag}/text_summary")
    }


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("tensorboard-run")
    run(run_dir, open_tracking("tensorboard", "", run_dir))
    return run_dir


def only_log_dir(run_dir: Path) -> Path:
    folders = list((run_dir / TENSORBOARD_DIR).iterdir())
    assert len(folders) == 1, folders
    return folders[0]


def test_round_scalars_read_back_equal_metrics_json(tensorboard_run: Path) -> None:
    metrics = json.loads((tensorboard_run / "metrics.json").read_text())
    assert metrics["tracking"] == {
        "backend": "tensorboard",
        "failures": 0,
        "failures-by-kind": {},
        "last-error": None,
    }
    rounds = metrics["rounds"]
    accumulator = events(only_log_dir(tensorboard_run))
    expected = {  # tag -> value per round, from the loop's own record
        "eval/seen-accuracy": {
            e["server-round"]: e["server-eval"]["seen-accuracy"] for e in rounds
        },
        "eval/unseen-accuracy": {
            e["server-round"]: e["server-eval"]["unseen-accuracy"] for e in rounds
        },
        "eval/banking77-accuracy": {
            e["server-round"]: e["server-eval"]["banking77-accuracy"] for e in rounds
        },
        "train/train-loss": {e["server-round"]: e["train"]["train-loss"] for e in rounds[1:]},
        "bytes/down": {e["server-round"]: e["communication"]["down-bytes"] for e in rounds[1:]},
        "bytes/up": {e["server-round"]: e["communication"]["up-bytes"] for e in rounds[1:]},
        "merge/update-norm": {
            e["server-round"]: e["merge"]["merged-update-norm"] for e in rounds[1:]
        },
        "time/merge-seconds": {e["server-round"]: e["merge"]["merge-seconds"] for e in rounds[1:]},
        "time/fold-seconds": {e["server-round"]: e["merge"]["fold-seconds"] for e in rounds[1:]},
    }
    for tag, values in expected.items():
        assert scalar_series(accumulator, tag) == pytest.approx(values, rel=1e-6), tag
    for step in range(1, ROUNDS + 1):
        assert scalar_series(accumulator, "replies/accepted")[step] == 2
        assert scalar_series(accumulator, "replies/rejected")[step] == 1
        assert scalar_series(accumulator, "replies/timed-out")[step] == 0
    # The merged clients' example-weighted loss: nodes 1 and 2 with 10 and 20 examples.
    assert scalar_series(accumulator, "train/train-loss")[2] == pytest.approx(
        (10 * site_loss(1, 2) + 20 * site_loss(2, 2)) / 30, rel=1e-6
    )


def test_client_rows_are_tagged_by_node_id_with_what_each_site_sent(tensorboard_run: Path) -> None:
    accumulator = events(only_log_dir(tensorboard_run))
    rounds = range(1, ROUNDS + 1)
    norms = {
        e["server-round"]: e["merge"]["update-norms"]
        for e in json.loads((tensorboard_run / "metrics.json").read_text())["rounds"][1:]
    }
    for node in (1, 2, 3):
        prefix = f"clients/node-{node}"
        assert scalar_series(accumulator, f"{prefix}/train-loss") == pytest.approx(
            {r: site_loss(node, r) for r in rounds}, rel=1e-6
        )
        assert scalar_series(accumulator, f"{prefix}/num-examples") == {
            r: 10 * node for r in rounds
        }
        assert scalar_series(accumulator, f"{prefix}/accepted") == {
            r: float(node != HOSTILE) for r in rounds
        }
        assert scalar_series(accumulator, f"{prefix}/update-norm") == pytest.approx(
            {r: norms[r][str(node)] for r in rounds}, rel=1e-6
        )
    table = texts(accumulator, "clients/verdicts")[2]
    hostile_row = next(line for line in table.splitlines() if line.startswith(f"| {HOSTILE} |"))
    assert "| rejected |" in hostile_row and "norm" in hostile_row
    assert "| 1 | accepted |" in table and "| 2 | accepted |" in table


def test_run_config_final_adapter_and_audit_head_are_written(tensorboard_run: Path) -> None:
    accumulator = events(only_log_dir(tensorboard_run))
    config = texts(accumulator, "run/config")[0]
    assert "| num-server-rounds | 3 |" in config and "| seed | 0 |" in config
    last = json.loads((tensorboard_run / AUDIT_FILE).read_text().splitlines()[-1])
    assert last["event"] == "run-end"
    assert list(texts(accumulator, "run/audit-head").values()) == [last["hash"]]
    assert list(texts(accumulator, "run/final-adapter").values()) == [
        str(tensorboard_run / "final")
    ]
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["num-server-rounds"].number_value == ROUNDS
    assert hparams["tracking"].string_value == "x"


def test_a_resumed_run_appends_to_the_same_tensorboard_run(tmp_path: Path) -> None:
    run(tmp_path, open_tracking("tensorboard", "", tmp_path), rounds=2)
    run(tmp_path, open_tracking("tensorboard", "", tmp_path), rounds=3, resume=True)
    accumulator = events(only_log_dir(tmp_path))
    assert sorted(scalar_series(accumulator, "eval/seen-accuracy")) == [0, 1, 2, 3]
    assert sorted(scalar_series(accumulator, "clients/node-1/train-loss")) == [1, 2, 3]


def test_an_unwritable_tensorboard_folder_never_stops_the_run(
    tmp_path: Path, flower_log: pytest.LogCaptureFixture
) -> None:
    (tmp_path / TENSORBOARD_DIR).write_text("a file where the event folder should be\n")
    run(tmp_path, open_tracking("tensorboard", "", tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [entry["server-round"] for entry in metrics["rounds"]] == [0, 1, 2, 3]
    assert (tmp_path / "final").is_dir()
    by_call: dict[str, int] = {}
    for kind, count in metrics["tracking"]["failures-by-kind"].items():
        by_call[kind.split(":")[0]] = by_call.get(kind.split(":")[0], 0) + count
    # start, rounds 0-3, the clients of rounds 1-3, finish: every call failed and was counted.
    assert by_call == {"start": 1, "log_round": ROUNDS + 1, "log_clients": ROUNDS, "finish": 1}
    assert metrics["tracking"]["failures"] == 2 * ROUNDS + 3
    warnings = [
        r
        for r in flower_log.records
        if r.levelno == logging.WARNING and "tracking" in r.getMessage()
    ]
    assert len(warnings) == len(metrics["tracking"]["failures-by-kind"])


class Flaky:
    """A backend whose ``log_round`` raises for the rounds in ``down`` and records the rest."""

    name = "flaky"

    def __init__(self, down: set[int]) -> None:
        self.down = down
        self.logged: list[int] = []

    def start(self, params: Mapping[str, ParamValue], *, first_round: int) -> None:
        pass

    def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        if server_round in self.down:
            raise ConnectionError(f"server down at round {server_round}")
        self.logged.append(server_round)

    def log_clients(self, server_round: int, rows: Sequence[ClientRow]) -> None:
        raise OSError(28, "No space left on device")

    def finish(self, final_dir: Path, audit_head: str) -> None:
        pass

    def abort(self) -> None:
        pass


def test_guarded_tracker_counts_each_failure_warns_once_per_kind_and_keeps_trying(
    flower_log: pytest.LogCaptureFixture,
) -> None:
    backend = Flaky(down={2, 3})
    guarded = GuardedTracker(backend)
    for server_round in range(1, 6):
        guarded.log_round(server_round, {"eval/seen-accuracy": 0.5})
        guarded.log_clients(server_round, [])
    assert backend.logged == [1, 4, 5]  # the server came back: later rounds are logged
    status = guarded.status()
    assert status["failures"] == 7
    assert status["failures-by-kind"] == {
        "log_clients: OSError": 5,
        "log_round: ConnectionError": 2,
    }
    assert status["last-error"].startswith("log_clients: OSError: [Errno 28] No space left")
    warnings = [r.getMessage() for r in flower_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert any("log_round failed" in w and "server down at round 2" in w for w in warnings)


def test_round_scalars_name_each_number_of_a_hand_built_entry() -> None:
    entry: dict[str, Any] = {
        "server-round": 4,
        "clients-sampled": 5,
        "clients-timed-out": 1,
        "seconds": 12.5,
        "server-eval": {"mcid-accuracy": 0.25, "seen-accuracy": 0.75, "note": "text"},
        "train": {
            "train-loss": 0.5,
            "num-examples": 300,
            "clients-accepted": 3,
            "clients-rejected": 1,
            "merge-seconds": 0.2,
            "merged-update-norm": 2.0,
            "dp-epsilon": 1.5,
            "robust-norm-bound": 9.0,
            "round-skipped": False,
        },
        "merge": {
            "merge-seconds": 0.2,
            "fold-seconds": 0.1,
            "merged-update-norm": 2.0,
            "factorwise-gap": None,
        },
        "communication": {"down-bytes": 100, "up-bytes": 80, "cumulative-bytes": 900},
    }
    assert round_scalars(entry) == {
        "eval/mcid-accuracy": 0.25,
        "eval/seen-accuracy": 0.75,
        "train/train-loss": 0.5,
        "train/num-examples": 300.0,
        "replies/sampled": 5.0,
        "replies/accepted": 3.0,
        "replies/rejected": 1.0,
        "replies/timed-out": 1.0,
        "time/round-seconds": 12.5,
        "time/merge-seconds": 0.2,
        "time/fold-seconds": 0.1,
        "bytes/down": 100.0,
        "bytes/up": 80.0,
        "bytes/cumulative": 900.0,
        "merge/update-norm": 2.0,
        "privacy/dp-epsilon": 1.5,
        "train/robust-norm-bound": 9.0,
    }
    assert round_scalars({"server-round": 0, "server-eval": {"seen-accuracy": 0.1}}) == {
        "eval/seen-accuracy": 0.1
    }


def test_client_rows_join_verdicts_norms_and_reply_metrics_by_node() -> None:
    entry = {
        "merge": {
            "accepted-nodes": [7, 2],
            "rejected": {"9": "update norm 50 above the bound 10"},
            "update-norms": {"7": 1.5, "2": 0.5, "9": 50.0},
        }
    }
    replies = {7: {TRAIN_LOSS: 0.3, NUM_EXAMPLES: 64.0}, 9: {TRAIN_LOSS: 9.0}}
    assert client_rows(entry, replies) == [
        ClientRow(node_id=2, verdict="accepted", update_norm=0.5),
        ClientRow(node_id=7, verdict="accepted", train_loss=0.3, num_examples=64, update_norm=1.5),
        ClientRow(
            node_id=9,
            verdict="rejected",
            reason="update norm 50 above the bound 10",
            train_loss=9.0,
            update_norm=50.0,
        ),
    ]


def test_a_backend_that_is_not_installed_is_refused_at_start_naming_the_key_and_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec

    def without_mlflow(name: str, *args: Any) -> Any:
        return None if name == "mlflow" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_mlflow)
    with pytest.raises(ConfigError) as refused:
        ServerSettings.from_run_config({"tracking": "mlflow"})
    message = str(refused.value)
    assert "'tracking' = 'mlflow'" in message and "mlflow package" in message
    assert "pip install '.[tracking]'" in message
    assert ServerSettings.from_run_config({"tracking": "tensorboard"}).tracking == "tensorboard"


def test_tracking_uri_without_mlflow_is_refused() -> None:
    with pytest.raises(ConfigError, match="'tracking-uri'"):
        ServerSettings.from_run_config({"tracking-uri": "http://127.0.0.1:5000"})
    settings = ServerSettings.from_run_config(
        {"tracking": "mlflow", "tracking-uri": "http://127.0.0.1:5000"}
    )
    assert (settings.tracking, settings.tracking_uri) == ("mlflow", "http://127.0.0.1:5000")


def test_no_tracking_leaves_the_grid_alone_and_reports_no_failures(tmp_path: Path) -> None:
    tracking = open_tracking("none", "", tmp_path)
    grid = Sites()
    assert tracking.grid(grid) is grid  # type: ignore[arg-type,comparison-overlap]
    assert tracking.status()["failures"] == 0


class Recorder(Flaky):
    """A backend that records which calls it got, in order."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__(down=set())
        self.calls: list[str] = []

    def start(self, params: Mapping[str, ParamValue], *, first_round: int) -> None:
        self.calls.append(f"start {first_round}")

    def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        self.calls.append(f"round {server_round}")

    def log_clients(self, server_round: int, rows: Sequence[ClientRow]) -> None:
        self.calls.append(f"clients {server_round}: {[row.node_id for row in rows]}")

    def finish(self, final_dir: Path, audit_head: str) -> None:
        self.calls.append("finish")

    def abort(self) -> None:
        self.calls.append("abort")


class SitesGoneInRound2(Sites):
    """The grid fails when round 2 samples its nodes (the SuperLink went away)."""

    def __init__(self) -> None:
        self.samplings = 0

    def get_node_ids(self) -> list[int]:
        self.samplings += 1
        if self.samplings > 1:
            raise RuntimeError("SuperLink unreachable")
        return super().get_node_ids()


def test_a_run_that_fails_is_closed_as_aborted_after_the_rounds_it_logged(tmp_path: Path) -> None:
    backend = Recorder()
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        with pytest.raises(RuntimeError, match="SuperLink unreachable"):
            run_federation(
                SitesGoneInRound2(),  # type: ignore[arg-type]
                MessageRounds(
                    FedRobustMerge(
                        device="cpu", min_train_nodes=3, fraction_evaluate=0.0, server_lr=1.0
                    )
                ),
                LoopSettings(num_rounds=3, round_timeout=60.0, run_dir=tmp_path, resume=False),
                initial=make_global(),
                store=CheckpointStore(tmp_path, ADAPTER_CONFIG),
                summary={"run-config": dict(RUN_CONFIG)},
                evaluate=evaluate,
                tracking=RunTracking(GuardedTracker(backend)),
            )
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    assert backend.calls == ["start 1", "round 0", "round 1", "clients 1: [1, 2, 3]", "abort"]


def test_mlflow_default_store_is_a_sqlite_file_in_the_run_folder_and_a_resume_continues_its_run(
    tmp_path: Path,
) -> None:
    import mlflow  # the tracking extra, which scripts/setup.sh installs

    run(tmp_path, open_tracking("mlflow", "", tmp_path), rounds=2)
    run(tmp_path, open_tracking("mlflow", "", tmp_path), rounds=3, resume=True)
    assert json.loads((tmp_path / "metrics.json").read_text())["tracking"]["failures"] == 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("robustmerge-fl")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resume reopened the run it continues
    run_id = runs[0].info.run_id
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.params["num-server-rounds"] == str(ROUNDS)
    steps = [metric.step for metric in client.get_metric_history(run_id, "eval/seen-accuracy")]
    assert sorted(steps) == [0, 1, 2, 3]
    losses = client.get_metric_history(run_id, "clients/node-2/train-loss")
    assert {m.step: m.value for m in losses} == pytest.approx(
        {r: site_loss(2, r) for r in (1, 2, 3)}
    )
    artifacts = Path(runs[0].info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(tmp_path / "mlartifacts")
    saved = artifacts / "final-adapter" / "adapter_model.safetensors"
    assert saved.read_bytes() == (tmp_path / "final" / "adapter_model.safetensors").read_bytes()
    rows = json.loads((artifacts / "clients" / "round-0003.json").read_text())["clients"]
    assert [(row["node_id"], row["verdict"]) for row in rows] == [
        (1, "accepted"),
        (2, "accepted"),
        (HOSTILE, "rejected"),
    ]


def test_mlflow_with_a_sqlite_uri_keeps_its_artifacts_beside_the_database(tmp_path: Path) -> None:
    import mlflow

    store = tmp_path / "elsewhere" / "tracking.db"
    store.parent.mkdir()
    uri = f"sqlite:///{store}"
    run(tmp_path, open_tracking("mlflow", uri, tmp_path), rounds=1)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("robustmerge-fl")
    (found,) = client.search_runs([experiment.experiment_id])
    artifacts = Path(found.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(store.parent / "mlartifacts"), artifacts
    assert (artifacts / "final-adapter" / "adapter_model.safetensors").exists()
    assert artifact_location("http://127.0.0.1:5000", tmp_path) is None  # the server decides
    assert artifact_location("postgresql://db/mlflow", tmp_path) == (
        (tmp_path / "mlartifacts").resolve().as_uri()
    )
