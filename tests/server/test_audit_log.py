"""The audit log: a clean log verifies; edits, cuts, reorderings, truncations, broken chains and
checkpoints that disagree are each caught at the first bad record; resumes continue the chain."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from server.audit_log import AuditLog, secure_round_fields
from server.checkpoints import CheckpointStore
from strategies.adapter_io.digest import tensors_checksum
from strategies.audit import AUDIT_FILE, ZERO_HASH, AuditError, record_hash, verify_run
from strategies.cli import main

CONFIG = {"num-server-rounds": 3, "merge-method": "robustmerge"}
ADAPTER_CONFIG = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q"]}


def adapter(step: float) -> dict[str, torch.Tensor]:
    return {
        "base_model.model.q.lora_A.weight": torch.full((1, 4), step),
        "base_model.model.q.lora_B.weight": torch.full((4, 1), -step),
    }


def round_fields() -> dict[str, object]:
    return {
        "aggregation": "fedrobustmerge",
        "sampled": [1, 2],
        "timed-out": [],
        "skipped": False,
        "replies": [
            {"node": 1, "arrays-sha256": "a" * 64, "status": "accepted", "update-norm": 1.0},
            {
                "node": 2,
                "arrays-sha256": "b" * 64,
                "status": "rejected",
                "reason": "update norm 1e6 exceeds ...",
                "update-norm": 1e6,
            },
        ],
    }


def make_run(run_dir: Path, rounds: int = 3, *, end: bool = True) -> CheckpointStore:
    """A run folder as the loop leaves it: log, checkpoints (round record first), final/."""
    store = CheckpointStore(run_dir, ADAPTER_CONFIG, keep=2)
    audit = AuditLog.open(run_dir, CONFIG, 0, adapter(0.0))
    for server_round in range(1, rounds + 1):
        audit.round(server_round, adapter(float(server_round)), round_fields())
        store.save(server_round, adapter(float(server_round)), {})
    if end:
        store.save_final(adapter(float(rounds)), {})
        audit.end()
    return store


def lines(run_dir: Path) -> list[str]:
    return (run_dir / AUDIT_FILE).read_text().splitlines(keepends=True)


def write(run_dir: Path, new_lines: list[str]) -> None:
    (run_dir / AUDIT_FILE).write_text("".join(new_lines))


def reseal(run_dir: Path, index: int, change: Callable[[dict[str, Any]], object]) -> None:
    """Change record ``index`` and give it a matching hash, as a careful forger would."""
    edited = lines(run_dir)
    record = json.loads(edited[index])
    change(record)
    record["hash"] = record_hash(record)
    edited[index] = json.dumps(record) + "\n"
    write(run_dir, edited)


def fault(run_dir: Path) -> AuditError:
    with pytest.raises(AuditError) as caught:
        verify_run(run_dir)
    return caught.value


def test_clean_log_verifies_with_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(tmp_path)
    records = [json.loads(line) for line in lines(tmp_path)]
    assert [r["event"] for r in records] == ["run-start", "round", "round", "round", "run-end"]
    assert records[0]["prev"] == ZERO_HASH
    assert all(r["prev"] == p["hash"] for p, r in itertools.pairwise(records))
    assert all(r["hash"] == record_hash(r) for r in records)
    assert set(records[0]["versions"]) == {"flwr", "torch", "python", "robustmerge-fl"}
    assert records[1]["global-before"] == tensors_checksum(adapter(0.0))
    assert records[3]["global-after"] == tensors_checksum(adapter(3.0))

    summary = verify_run(tmp_path)
    assert (summary.records, summary.rounds, summary.accepted, summary.rejected) == (5, 3, 3, 3)
    assert summary.first_global == tensors_checksum(adapter(0.0))
    assert summary.last_global == tensors_checksum(adapter(3.0))
    assert summary.checkpoints == [2, 3] and summary.final_checked and summary.ended

    assert main(["audit", "verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "5 records, 3 rounds" in out and "3 accepted, 3 rejected" in out


def test_an_edited_record_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path)
    edited = lines(tmp_path)
    edited[2] = edited[2].replace('"status":"rejected"', '"status":"accepted"')
    write(tmp_path, edited)
    error = fault(tmp_path)
    assert error.line == 3 and "edited" in error.reason
    assert main(["audit", "verify", str(tmp_path)]) == 2
    assert "line 3" in capsys.readouterr().err


def test_an_edited_record_with_its_hash_recomputed_breaks_the_next_link(tmp_path: Path) -> None:
    make_run(tmp_path)
    edited = lines(tmp_path)
    record = json.loads(edited[1])
    record["replies"][1]["status"] = "accepted"
    record["hash"] = record_hash(record)
    edited[1] = json.dumps(record) + "\n"
    write(tmp_path, edited)
    error = fault(tmp_path)
    assert error.line == 3 and "chain broken" in error.reason


def test_a_removed_record_is_named(tmp_path: Path) -> None:
    make_run(tmp_path)
    cut = lines(tmp_path)
    del cut[2]
    write(tmp_path, cut)
    error = fault(tmp_path)
    assert error.line == 3 and "removed" in error.reason


def test_reordered_records_are_named(tmp_path: Path) -> None:
    make_run(tmp_path)
    swapped = lines(tmp_path)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    write(tmp_path, swapped)
    error = fault(tmp_path)
    assert error.line == 2 and "chain broken" in error.reason


def test_a_partial_last_line_is_named(tmp_path: Path) -> None:
    make_run(tmp_path)
    data = (tmp_path / AUDIT_FILE).read_bytes()
    (tmp_path / AUDIT_FILE).write_bytes(data[:-30])
    error = fault(tmp_path)
    assert error.line == 5 and "partial last line" in error.reason


def test_a_broken_first_link_is_named(tmp_path: Path) -> None:
    make_run(tmp_path)
    broken = lines(tmp_path)
    record = json.loads(broken[0])
    record["prev"] = "f" * 64
    record["hash"] = record_hash(record)
    broken[0] = json.dumps(record) + "\n"
    write(tmp_path, broken)
    error = fault(tmp_path)
    assert error.line == 1 and "chain broken" in error.reason


def test_a_cut_tail_disagrees_with_the_checkpoints(tmp_path: Path) -> None:
    make_run(tmp_path)
    write(tmp_path, lines(tmp_path)[:3])  # run-start, rounds 1-2: round 3 and run-end gone
    error = fault(tmp_path)
    assert "checkpoint round 3" in error.reason and "no round record" in error.reason


def test_a_checkpoint_whose_digest_disagrees_with_the_log_is_named(tmp_path: Path) -> None:
    store = make_run(tmp_path)
    store.save(3, adapter(9.0), {})  # a replaced checkpoint, consistent with its own state.json
    error = fault(tmp_path)
    assert error.line == 4 and "checkpoint round 3" in error.reason


def test_a_replaced_final_adapter_is_named(tmp_path: Path) -> None:
    store = make_run(tmp_path)
    store.save_final(adapter(9.0), {})
    assert "final" in fault(tmp_path).reason


def test_a_resume_continues_the_chain_and_drops_a_partial_line(tmp_path: Path) -> None:
    store = make_run(tmp_path, rounds=2, end=False)
    with (tmp_path / AUDIT_FILE).open("a") as handle:
        handle.write('{"event":"round","server-r')  # the crash cut this write short
    assert "partial last line" in fault(tmp_path).reason

    checkpoint = store.latest_valid()
    assert checkpoint is not None
    audit = AuditLog.open(tmp_path, CONFIG, checkpoint.server_round, checkpoint.tensors)
    audit.round(3, adapter(3.0), round_fields())
    store.save(3, adapter(3.0), {})
    store.save_final(adapter(3.0), {})
    audit.end()

    records = [json.loads(line) for line in lines(tmp_path)]
    assert [r["event"] for r in records] == [
        "run-start",
        "round",
        "round",
        "resume",
        "round",
        "run-end",
    ]
    resume = records[3]
    assert resume["from-round"] == 2
    assert resume["checkpoint-sha256"] == tensors_checksum(adapter(2.0))
    assert resume["dropped-partial-line"]["bytes"] == 26
    summary = verify_run(tmp_path)
    assert (summary.rounds, summary.resumes, summary.records) == (3, 1, 6)


def test_a_resume_from_a_checkpoint_the_log_disagrees_with_is_named(tmp_path: Path) -> None:
    make_run(tmp_path, rounds=2, end=False)
    AuditLog.open(tmp_path, CONFIG, 2, adapter(7.0))
    error = fault(tmp_path)
    assert error.line == 4 and "resumed from a round-2 checkpoint" in error.reason


def test_secure_rounds_record_the_summed_nodes(tmp_path: Path) -> None:
    audit = AuditLog.open(tmp_path, CONFIG, 0, adapter(0.0))
    audit.round(1, adapter(1.0), secure_round_fields([1, 2, 3], [1, 3], skipped=False))
    audit.end()
    record = json.loads(lines(tmp_path)[1])
    assert record["summed-nodes"] == [1, 3] and record["replies"] == []
    assert "no per-reply digests" in record["note"]
    assert verify_run(tmp_path).summed == 2
