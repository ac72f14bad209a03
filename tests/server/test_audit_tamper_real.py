"""Tampering with the audit log of a run folder the round loop wrote (issue 29).

``tests/server/test_audit_log.py`` tampers with folders written record by record; here the
folder comes from ``server.run_loop.run_federation`` (the strategy, its reply checks, the norm
screen rejecting a hostile node, checkpoints, final/, the run-end record) with a grid that
answers on pull. A forger who can rewrite the file is assumed to reseal: after changing a
record they recompute its hash and every later record's ``prev`` and ``hash``, so the chain
alone is intact and only what the records say about each other, the checkpoints and final/
(or a head hash kept elsewhere) can give the change away.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from server.checkpoints import CheckpointStore
from server.round_modes import MessageRounds
from server.run_loop import LoopSettings, run_federation
from strategies import FedRobustMerge
from strategies.audit import AUDIT_FILE, ZERO_HASH, AuditError, record_hash, verify_run
from tests.server.three_sites import HOSTILE, ThreeSites
from tests.strategies.test_fed_robustmerge import make_global

ADAPTER_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query"]}
ROUNDS = 3

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def run(
    run_dir: Path, *, resume: bool = False, start: dict[str, torch.Tensor] | None = None
) -> None:
    strategy = FedRobustMerge(device="cpu", min_train_nodes=3, fraction_evaluate=0.0, server_lr=1.0)
    run_federation(
        ThreeSites(),  # type: ignore[arg-type]
        MessageRounds(strategy),
        LoopSettings(num_rounds=ROUNDS, round_timeout=60.0, run_dir=run_dir, resume=resume),
        initial=start if start is not None else make_global(),
        store=CheckpointStore(run_dir, ADAPTER_CONFIG),
        summary={"run-config": {"num-server-rounds": ROUNDS}},
    )


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real run, copied afresh for each test (the copy is the test's to tamper with)."""
    run_dir = tmp_path_factory.mktemp("real-run")
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as conftest's
    try:
        run(run_dir)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    return run_dir


@pytest.fixture
def run_dir(real_run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(real_run, target)
    return target


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / AUDIT_FILE).read_text().splitlines()]


def reseal_from(
    run_dir: Path, index: int, change: Callable[[list[dict[str, Any]]], object]
) -> None:
    """``change`` the records, then recompute every hash and prev from record ``index`` on."""
    chain = records(run_dir)
    change(chain)
    prev = chain[index - 1]["hash"] if index > 0 else ZERO_HASH
    for record in chain[index:]:
        record["prev"] = prev
        record["hash"] = record_hash(record)
        prev = record["hash"]
    text = "".join(
        json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n" for record in chain
    )
    (run_dir / AUDIT_FILE).write_text(text)


def fault(run_dir: Path) -> AuditError:
    with pytest.raises(AuditError) as caught:
        verify_run(run_dir)
    return caught.value


def test_the_real_run_verifies_and_records_the_hostile_reply_as_rejected(run_dir: Path) -> None:
    summary = verify_run(run_dir)
    assert (summary.rounds, summary.accepted, summary.ended, summary.final_checked) == (
        ROUNDS,
        2 * ROUNDS,
        True,
        True,
    )
    assert summary.rejected == ROUNDS  # the x1000 update, above 10x the median norm
    events = [record["event"] for record in records(run_dir)]
    assert events == ["run-start", "round", "round", "round", "run-end"]


def test_a_resealed_verdict_passes_the_chain_but_moves_the_head(run_dir: Path) -> None:
    pinned = verify_run(run_dir).head

    def acquit(chain: list[dict[str, Any]]) -> None:
        (verdict,) = [r for r in chain[2]["replies"] if r["node"] == HOSTILE]
        assert verdict["status"] == "rejected"
        verdict["status"] = "accepted"
        del verdict["reason"]

    reseal_from(run_dir, 2, acquit)
    # What docs/audit.md says the chain cannot prove: a full reseal verifies on its own ...
    summary = verify_run(run_dir)
    # ... and shows only against a head hash kept elsewhere.
    assert summary.head != pinned


def test_a_resealed_global_digest_breaks_the_next_rounds_global_before(run_dir: Path) -> None:
    def swap(chain: list[dict[str, Any]]) -> None:
        chain[2]["global-after"] = "f" * 64

    reseal_from(run_dir, 2, swap)
    error = fault(run_dir)
    assert error.line == 4 and "global-before" in error.reason


def test_a_resealed_global_digest_carried_forward_disagrees_with_the_checkpoints(
    run_dir: Path,
) -> None:
    def swap(chain: list[dict[str, Any]]) -> None:
        chain[2]["global-after"] = chain[3]["global-before"] = "f" * 64

    reseal_from(run_dir, 2, swap)
    error = fault(run_dir)
    assert error.line == 3 and "checkpoint round 2" in error.reason


def test_a_resealed_first_global_breaks_round_ones_global_before(run_dir: Path) -> None:
    def swap(chain: list[dict[str, Any]]) -> None:
        chain[0]["global-initial"] = "e" * 64

    reseal_from(run_dir, 0, swap)
    error = fault(run_dir)
    assert error.line == 2 and "global-before" in error.reason


@pytest.mark.parametrize(("numbers", "line"), [((1, 3, 4), 3), ((2, 3, 4), 2), ((1, 2, 2), 4)])
def test_renumbered_rounds_are_named(run_dir: Path, numbers: tuple[int, ...], line: int) -> None:
    def renumber(chain: list[dict[str, Any]]) -> None:
        for record, number in zip(chain[1:4], numbers, strict=True):
            record["server-round"] = number
        chain[4]["server-round"] = numbers[-1]

    reseal_from(run_dir, 1, renumber)
    error = fault(run_dir)
    assert error.line == line and "follows round" in error.reason


def test_run_end_pointed_at_another_global_is_named(run_dir: Path) -> None:
    def repoint(chain: list[dict[str, Any]]) -> None:
        assert chain[4]["global"] == chain[3]["global-after"]
        chain[4]["global"] = chain[2]["global-after"]  # round 2's global, also a real one

    reseal_from(run_dir, 4, repoint)
    error = fault(run_dir)
    assert error.line == 5 and "run-end" in error.reason


def test_run_end_pointed_at_another_round_is_named(run_dir: Path) -> None:
    def repoint(chain: list[dict[str, Any]]) -> None:
        chain[4]["server-round"] = 2

    reseal_from(run_dir, 4, repoint)
    error = fault(run_dir)
    assert error.line == 5 and "run-end" in error.reason


def test_a_fresh_run_archives_the_earlier_log_whole_and_starts_a_new_chain(run_dir: Path) -> None:
    before = (run_dir / AUDIT_FILE).read_bytes()
    first_head = verify_run(run_dir).head
    run(run_dir, start=make_global(9))
    (archived,) = list((run_dir / "archive").iterdir())
    assert (archived / AUDIT_FILE).read_bytes() == before
    assert verify_run(archived).head == first_head  # with its checkpoints and final/
    fresh = records(run_dir)
    assert fresh[0]["event"] == "run-start" and fresh[0]["prev"] == ZERO_HASH
    assert len(fresh) == ROUNDS + 2
    summary = verify_run(run_dir)
    assert summary.rounds == ROUNDS and summary.head != first_head
