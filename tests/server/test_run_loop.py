"""The round loop with clients that vanish or crash, driven by a grid that runs real ClientApp
handlers in threads and waits for them only until the round timeout, as Flower's Grid does.

No wall clock decides who is late: a late client waits on an event until the round is over, and
once every punctual client's reply is in, the grid ends the round by moving the reply stream's
clock past its deadline (``ThreadGrid.round_over``). The timeout itself is long, so punctual
clients that train slowly on a loaded machine still make it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict

import server.reply_stream
from client.app import train
from server.checkpoints import CheckpointStore
from server.round_modes import MessageRounds
from server.run_loop import LoopSettings, run_federation
from strategies import FedRobustMerge, merge_lora
from strategies.adapter_io.config import adapter_config_for
from strategies.adapter_io.digest import tensors_checksum
from strategies.adapter_io.reading import read_adapter_dir
from strategies.audit import AUDIT_FILE, verify_run
from strategies.reply_checks import state_dict_to_record
from tests.messages import addressed
from tests.workload.tiny_model import save_tiny_bert, tiny_run_config
from workload.model import LoraSettings, initial_adapter

Handler = Callable[[Message, Context], Message]
# Long, so that punctual clients make it even on a loaded machine; late ones never do, since
# the grid ends the round as soon as every punctual reply is in (see ``ThreadGrid``).
ROUND_TIMEOUT = 600.0


pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture(scope="module")
def run_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return tiny_run_config(save_tiny_bert(tmp_path_factory.mktemp("tiny-bert")))


RELEASE_LATE_CLIENTS = threading.Event()
LATE = "late"  # attribute of a handler that answers only after the round


def slow(handler: Handler) -> Handler:
    """A client that answers only after the round is over (released by ``join_all``)."""

    def run(message: Message, context: Context) -> Message:
        RELEASE_LATE_CLIENTS.wait(timeout=900)
        return handler(message, context)

    setattr(run, LATE, True)
    return run


class StreamClock:
    """``server.reply_stream``'s clock: the real one, moved past any deadline once the grid
    says the round is over (every punctual reply in)."""

    def __init__(self) -> None:
        self.round_over = threading.Event()

    def monotonic(self) -> float:
        return time.monotonic() + (1e9 if self.round_over.is_set() else 0.0)

    def sleep(self, seconds: float) -> None:
        self.round_over.wait(timeout=seconds)


STREAM_CLOCK = StreamClock()


@pytest.fixture(autouse=True)
def stream_clock(monkeypatch: pytest.MonkeyPatch) -> StreamClock:
    monkeypatch.setattr(server.reply_stream, "time", STREAM_CLOCK)
    return STREAM_CLOCK


def crashing(message: Message, context: Context) -> Message:
    raise RuntimeError("site disk full")


class ThreadGrid:
    """Runs each node's handler in a thread; replies not in by ``timeout`` are left out."""

    def __init__(self, handlers: dict[int, Handler], run_config: dict[str, Any]) -> None:
        self.handlers = handlers
        self.run_config = run_config
        self.replies: dict[tuple[int, int], Message] = {}
        self.threads: list[threading.Thread] = []
        self.inbox: dict[str, Message] = {}
        self.lock = threading.Lock()
        self.pushes = 0
        self.punctual: set[str] = set()  # message ids of this push whose reply is not in yet

    def join_all(self) -> None:
        """Let late handlers finish, so no thread outlives the test."""
        RELEASE_LATE_CLIENTS.set()
        for thread in self.threads:
            thread.join()

    def get_node_ids(self) -> list[int]:
        return sorted(self.handlers)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Start each node's handler in its own thread; its reply lands in the inbox."""
        STREAM_CLOCK.round_over.clear()
        ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.pushes += 1
            message_id = f"m-{self.pushes}"
            delivered = addressed(message, message_id)
            context = Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": len(self.handlers)},
                state=RecordDict(),
                run_config=self.run_config,
            )

            def work(node: int = node, msg: Message = delivered, ctx: Context = context) -> None:
                try:
                    reply = self.handlers[node](msg, ctx)
                except Exception as error:  # Flower turns a ClientApp exception into an error reply
                    reply = Message(Error(code=0, reason=repr(error)), reply_to=msg)
                with self.lock:
                    self.inbox[msg.metadata.message_id] = reply
                    server_round = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
                    self.replies[(server_round, node)] = reply

            if not getattr(self.handlers[node], LATE, False):
                self.punctual.add(message_id)
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            self.threads.append(thread)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies already in for ``message_ids`` (never waits); the round is over when
        every punctual client's reply has been pulled."""
        with self.lock:
            replies = [self.inbox.pop(i) for i in list(message_ids) if i in self.inbox]
            self.punctual -= {reply.metadata.reply_to_message_id for reply in replies}
            if not self.punctual:
                STREAM_CLOCK.round_over.set()
            return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float) -> list[Message]:
        """Push, then wait for every reply or the timeout (Flower's blocking call)."""
        ids = self.push_messages(messages)
        deadline = time.monotonic() + timeout
        replies: list[Message] = []
        while ids and time.monotonic() < deadline:
            replies += self.pull_messages(ids)
            answered = {reply.metadata.reply_to_message_id for reply in replies}
            ids = [i for i in ids if i not in answered]
            time.sleep(0.01)
        return replies


def run(
    tmp_path: Path,
    grid: ThreadGrid,
    rounds: int,
    run_config: dict[str, Any],
    *,
    resume: bool = False,
) -> dict[str, Any]:
    RELEASE_LATE_CLIENTS.clear()
    lora = LoraSettings.from_run_config(run_config)
    strategy = FedRobustMerge(
        device="cpu", min_train_nodes=len(grid.handlers), fraction_evaluate=0.0, server_lr=1.0
    )
    store = CheckpointStore(
        tmp_path, adapter_config_for(lora.model, lora.r, lora.alpha, lora.target_modules)
    )
    try:
        run_federation(
            grid,  # type: ignore[arg-type]
            MessageRounds(strategy),
            LoopSettings(
                num_rounds=rounds, round_timeout=ROUND_TIMEOUT, run_dir=tmp_path, resume=resume
            ),
            initial=initial_adapter(lora, seed=0),
            store=store,
            summary={},
        )
    finally:
        grid.join_all()
    result: dict[str, Any] = json.loads((tmp_path / "metrics.json").read_text())
    return result


def test_late_and_crashing_clients_are_left_out_and_the_round_merges_the_rest(
    tmp_path: Path, run_config: dict[str, Any]
) -> None:
    grid = ThreadGrid({1: train, 2: train, 3: slow(train), 4: crashing}, run_config)
    metrics = run(tmp_path, grid, 1, run_config)
    (entry,) = metrics["rounds"]
    assert entry["clients-sampled"] == 4
    assert entry["clients-timed-out"] == 1
    assert entry["train"]["clients-accepted"] == 2
    assert entry["train"]["clients-rejected"] == 1
    assert any("site disk full" in reason for reason in entry["merge"]["rejected"].values())

    lora = LoraSettings.from_run_config(run_config)
    start = initial_adapter(lora, seed=0)
    # Serialised size of the arrays: fp32 payload plus keys, dtypes and shapes.
    adapter_bytes = state_dict_to_record(start).count_bytes()
    assert adapter_bytes > sum(value.numel() * 4 for value in start.values())
    traffic = entry["communication"]
    assert traffic["uplink"] == "dense"
    assert traffic["train-down-bytes"] == {str(node): adapter_bytes for node in (1, 2, 3, 4)}
    # node 3 was late (its reply never counted), node 4 answered with an error (no arrays)
    assert traffic["train-up-bytes"] == {"1": adapter_bytes, "2": adapter_bytes, "4": 0}
    assert traffic["round-bytes"] == traffic["cumulative-bytes"] == 6 * adapter_bytes
    good = [
        grid.replies[(1, node)].content.array_records["arrays"].to_torch_state_dict()
        for node in (1, 2)
    ]
    deltas = [{key: reply[key] - start[key] for key in start} for reply in good]
    merged = merge_lora(deltas, device="cpu", form="round")  # rounds: A averaged, not summed
    final = read_adapter_dir(tmp_path / "final").tensors
    for key in start:
        torch.testing.assert_close(final[key], start[key] + merged[key], rtol=1e-6, atol=1e-7)

    # The audit log: who replied with what, and what became of it.
    assert verify_run(tmp_path).rounds == 1
    record = json.loads((tmp_path / AUDIT_FILE).read_text().splitlines()[1])
    assert record["sampled"] == [1, 2, 3, 4] and record["timed-out"] == [3]
    replies = {reply["node"]: reply for reply in record["replies"]}
    for node, tensors in zip((1, 2), good, strict=True):
        digest = tensors_checksum({f"arrays/{key}": value for key, value in tensors.items()})
        assert replies[node]["arrays-sha256"] == digest
        assert replies[node]["status"] == "accepted"
        assert replies[node]["update-norm"] > 0
    assert replies[4]["status"] == "rejected" and "site disk full" in replies[4]["reason"]
    assert replies[4]["arrays-sha256"] is None
    assert record["global-before"] == tensors_checksum(start)
    assert record["global-after"] == tensors_checksum(final)


def test_a_resumed_run_continues_the_audit_chain(
    tmp_path: Path, run_config: dict[str, Any]
) -> None:
    run(tmp_path, ThreadGrid({1: train, 2: train}, run_config), 1, run_config)
    run(tmp_path, ThreadGrid({1: train, 2: train}, run_config), 2, run_config, resume=True)
    records = [json.loads(line) for line in (tmp_path / AUDIT_FILE).read_text().splitlines()]
    events = [record["event"] for record in records]
    assert events == ["run-start", "round", "run-end", "resume", "round", "run-end"]
    assert records[3]["from-round"] == 1
    assert records[3]["checkpoint-sha256"] == records[1]["global-after"]
    summary = verify_run(tmp_path)
    assert (summary.rounds, summary.resumes, summary.checkpoints) == (2, 1, [1, 2])


def test_round_with_no_usable_reply_keeps_the_global_and_the_run_goes_on(
    tmp_path: Path, run_config: dict[str, Any]
) -> None:
    handlers: dict[int, Handler] = {1: crashing, 2: crashing}
    grid = ThreadGrid(handlers, run_config)
    metrics = run(tmp_path, grid, 2, run_config)
    assert [entry["train"]["round-skipped"] for entry in metrics["rounds"]] == [1, 1]
    totals = [entry["communication"]["cumulative-bytes"] for entry in metrics["rounds"]]
    assert totals[1] == 2 * totals[0] > 0
    lora = LoraSettings.from_run_config(run_config)
    final = read_adapter_dir(tmp_path / "final").tensors
    for key, value in initial_adapter(lora, seed=0).items():
        assert torch.equal(final[key], value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "round-0001",
        "round-0002",
    ]
