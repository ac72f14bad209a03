"""What the audit writer (server.audit_log) puts in each record, field by field, and what the
verifier (strategies.audit) says about each malformed record (issue 29: the tamper tests proved
the chain, but a writer that dropped a verdict, a norm or a time-out, or a verifier with a
weakened field check, still passed them)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import flwr
import pytest
import torch
from flwr.app import ArrayRecord, Error, MetricRecord, RecordDict

from server.audit_log import (
    SECURE_NOTE,
    AuditLog,
    reply_digests,
    secure_round_fields,
    train_round_fields,
    versions,
)
from server.checkpoints import CheckpointStore
from strategies.adapter_io.digest import tensors_checksum
from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.reading import read_adapter_dir
from strategies.audit import (
    AUDIT_FILE,
    ZERO_HASH,
    AuditError,
    AuditSummary,
    canonical_json,
    config_digest,
    json_safe,
    package_version,
    python_version,
    record_hash,
    seal,
    verify_run,
)
from strategies.round_report import RoundReport
from tests.messages import from_node
from tests.server.test_audit_log import ADAPTER_CONFIG, CONFIG, adapter, fault


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / AUDIT_FILE).read_text().splitlines()]


def test_versions_name_the_software_that_made_the_run() -> None:
    assert versions() == {
        "flwr": flwr.__version__,
        "torch": torch.__version__,
        "python": python_version(),
        "robustmerge-fl": package_version(),
    }


def test_the_train_round_record_holds_each_replys_verdict_norm_and_the_timed_out() -> None:
    report = RoundReport(
        server_round=3,
        accepted_nodes=[1, 2],
        rejected={3: "update norm 9 above the bound 5"},
        update_norms={1: 1.5, 2: 2.5, 3: 9.0},
        clipped=[2],
    )
    prescreen = RoundReport(server_round=3, update_norms={2: 7.0})
    digests = [(1, "a" * 64), (2, None), (3, "c" * 64), (4, "d" * 64)]
    fields = train_round_fields([1, 2, 3, 4, 5], digests, report, prescreen, False)
    assert fields == {
        "aggregation": "fedrobustmerge",
        "sampled": [1, 2, 3, 4, 5],
        "timed-out": [5],
        "skipped": False,
        "replies": [
            {
                "node": 1,
                "arrays-sha256": "a" * 64,
                "status": "accepted",
                "clipped": False,
                "update-norm": 1.5,
            },
            {
                "node": 2,
                "arrays-sha256": None,
                "status": "accepted",
                "clipped": True,
                "update-norm": 7.0,  # the pre-clipping norm of the DP wrapper's screen
            },
            {
                "node": 3,
                "arrays-sha256": "c" * 64,
                "status": "rejected",
                "reason": "update norm 9 above the bound 5",
                "update-norm": 9.0,
            },
            {"node": 4, "arrays-sha256": "d" * 64, "status": "unknown", "update-norm": None},
        ],
    }
    bare = train_round_fields([1], [(1, "a" * 64)], None, None, True)
    assert bare["skipped"] is True and bare["timed-out"] == []
    assert bare["replies"] == [
        {"node": 1, "arrays-sha256": "a" * 64, "status": "unknown", "update-norm": None}
    ]


def test_the_secure_round_record_names_only_who_was_summed() -> None:
    assert secure_round_fields([1, 2, 3], [1, 3], True) == {
        "aggregation": "secure-aggregation",
        "sampled": [1, 2, 3],
        "summed-nodes": [1, 3],
        "skipped": True,
        "replies": [],
        "note": SECURE_NOTE,
    }


def test_reply_digests_cover_every_array_record_and_mark_error_replies() -> None:
    tensors = adapter(1.0)
    content = RecordDict({"arrays": ArrayRecord(tensors), "extra": ArrayRecord(adapter(2.0))})
    content["metrics"] = MetricRecord({"num-examples": 3})
    only_metrics = RecordDict({"metrics": MetricRecord({"num-examples": 3})})
    replies = [
        from_node(4, content),
        from_node(5, Error(code=1, reason="boom")),
        from_node(6, only_metrics),
    ]
    expected = tensors_checksum(
        {f"arrays/{k}": v for k, v in tensors.items()}
        | {f"extra/{k}": v for k, v in adapter(2.0).items()}
    )
    assert reply_digests(replies) == [(4, expected), (5, None), (6, tensors_checksum({}))]


def test_a_fresh_log_starts_with_its_run_start_record(tmp_path: Path) -> None:
    audit = AuditLog.open(tmp_path, CONFIG, 0, adapter(0.0))
    (start,) = records(tmp_path)
    assert start["event"] == "run-start"
    assert start["seq"] == 0 and start["prev"] == ZERO_HASH
    assert start["config-sha256"] == config_digest(CONFIG)
    assert start["versions"] == versions()
    assert start["global-initial"] == tensors_checksum(adapter(0.0)) == audit.global_digest
    assert "note" not in start
    assert start["hash"] == record_hash(start) == audit.prev
    assert audit.seq == 1 and audit.last_round == 0


def test_round_and_end_records_chain_the_globals(tmp_path: Path) -> None:
    audit = AuditLog.open(tmp_path, CONFIG, 0, adapter(0.0))
    audit.round(1, adapter(1.0), {"replies": []})
    audit.round(2, adapter(2.0), {"replies": []})
    audit.end()
    start, first, second, end = records(tmp_path)
    assert [r["seq"] for r in (start, first, second, end)] == [0, 1, 2, 3]
    assert first["prev"] == start["hash"] and end["prev"] == second["hash"]
    assert first["server-round"] == 1
    assert first["global-before"] == start["global-initial"]
    assert first["global-after"] == tensors_checksum(adapter(1.0)) == second["global-before"]
    assert end == {
        **end,
        "event": "run-end",
        "server-round": 2,
        "global": tensors_checksum(adapter(2.0)),
    }
    assert verify_run(tmp_path).ended


def test_a_resume_of_a_run_without_a_log_begins_one_and_says_so(tmp_path: Path) -> None:
    audit = AuditLog.open(tmp_path, CONFIG, 4, adapter(4.0))
    start, resume = records(tmp_path)
    assert start["event"] == "run-start"
    assert start["note"] == "log begun on resuming after 4"
    assert start["config-sha256"] == config_digest(CONFIG)
    assert resume["event"] == "resume" and resume["seq"] == 1 and resume["prev"] == start["hash"]
    assert resume["from-round"] == 4
    assert resume["checkpoint-sha256"] == tensors_checksum(adapter(4.0)) == audit.global_digest
    assert resume["config-sha256"] == config_digest(CONFIG)
    assert resume["versions"] == versions()
    assert "dropped-partial-line" not in resume
    assert audit.last_round == 4


def test_a_resume_after_a_cut_write_drops_the_partial_line_and_records_it(tmp_path: Path) -> None:
    audit = AuditLog.open(tmp_path, CONFIG, 0, adapter(0.0))
    audit.round(1, adapter(1.0), {"replies": []})
    partial = b'{"event":"round","seq":2'
    with (tmp_path / AUDIT_FILE).open("ab") as handle:
        handle.write(partial)
    resumed = AuditLog.open(tmp_path, CONFIG, 1, adapter(1.0))
    _start, first, resume = records(tmp_path)
    assert resume["seq"] == 2 and resume["prev"] == first["hash"] == record_hash(first)
    assert resume["dropped-partial-line"] == {
        "bytes": len(partial),
        "sha256": hashlib.sha256(partial).hexdigest(),
    }
    assert resumed.seq == 3
    summary = verify_run(tmp_path)
    assert summary.resumes == 1 and summary.rounds == 1


def test_a_log_cut_to_a_partial_first_line_restarts_the_chain(tmp_path: Path) -> None:
    (tmp_path / AUDIT_FILE).write_bytes(b'{"event":"run-st')
    AuditLog.open(tmp_path, CONFIG, 2, adapter(2.0))
    start, resume = records(tmp_path)
    assert start["prev"] == ZERO_HASH and start["seq"] == 0
    assert resume["dropped-partial-line"]["bytes"] == len(b'{"event":"run-st')
    assert verify_run(tmp_path).resumes == 1


def test_an_unreadable_last_record_continues_by_line_count(tmp_path: Path) -> None:
    (tmp_path / AUDIT_FILE).write_bytes(b"not json\nnot json either\n")
    audit = AuditLog.open(tmp_path, CONFIG, 3, adapter(3.0))
    assert audit.seq == 3
    lines = (tmp_path / AUDIT_FILE).read_text().splitlines()
    assert lines[:2] == ["not json", "not json either"]  # kept as they are, for the verifier
    resume = json.loads(lines[2])
    assert (resume["event"], resume["seq"], resume["prev"]) == ("resume", 2, ZERO_HASH)
    with pytest.raises(AuditError, match="line 1: not a JSON record"):
        verify_run(tmp_path)


def test_the_hash_is_taken_over_canonical_ascii_json() -> None:
    assert canonical_json({"b": 1, "a": [1.5, "é"]}) == '{"a":[1.5,"\\u00e9"],"b":1}'
    assert json_safe({1: (float("inf"), float("nan"), -float("inf"), 2.0)}) == {
        "1": ["inf", "nan", "-inf", 2.0]
    }
    sealed = seal({"event": "run-end", "x": (1, 2)}, 5, "f" * 64)
    assert sealed["seq"] == 5 and sealed["prev"] == "f" * 64 and sealed["x"] == [1, 2]
    body = {k: v for k, v in sealed.items() if k != "hash"}
    assert sealed["hash"] == hashlib.sha256(canonical_json(body).encode()).hexdigest()
    assert record_hash(sealed) == sealed["hash"]
    assert config_digest({"a": float("inf")}) == hashlib.sha256(b'{"a":"inf"}').hexdigest()


def test_the_summary_lines_say_what_was_checked() -> None:
    summary = AuditSummary(records=5, rounds=2, resumes=1, accepted=3, rejected=1)
    summary.first_global, summary.last_global, summary.head = "a" * 64, "b" * 64, "c" * 64
    assert summary.lines() == [
        "audit log intact: 5 records, 2 rounds, 1 resumes",
        "replies: 3 accepted, 1 rejected",
        f"first global: {'a' * 64}",
        f"last global:  {'b' * 64}",
        "checkpoints agree: none kept",
        "no run-end record: run in progress or interrupted",
        f"head hash: {'c' * 64}",
    ]
    summary.summed, summary.checkpoints, summary.final_checked, summary.ended = (
        4,
        [1, 2],
        True,
        True,
    )
    assert summary.lines()[1] == "replies: 3 accepted, 1 rejected, 4 securely summed"
    assert summary.lines()[4] == "checkpoints agree: round 1, round 2; final/ agrees"
    assert summary.lines()[5] == "run ended"


def write_log(run_dir: Path, bodies: list[dict[str, Any]]) -> None:
    """Records sealed into a valid chain, whatever they hold."""
    prev, lines = ZERO_HASH, []
    for seq, body in enumerate(bodies):
        record = seal(body, seq, prev)
        prev = record["hash"]
        lines.append(canonical_json(record))
    (run_dir / AUDIT_FILE).write_text("".join(line + "\n" for line in lines))


G0, G1, G2 = "0a" * 32, "1b" * 32, "2c" * 32
START = {"event": "run-start", "global-initial": G0}


def round_record(number: Any, before: str, after: str, **extra: Any) -> dict[str, Any]:
    return {
        "event": "round",
        "server-round": number,
        "global-before": before,
        "global-after": after,
        **extra,
    }


@pytest.mark.parametrize(
    ("bodies", "line", "reason"),
    [
        ([], None, f"{AUDIT_FILE} is empty"),
        ([{"event": "round"}], 1, "the first record, and only it, must be run-start"),
        ([START, START], 2, "the first record, and only it, must be run-start"),
        ([{"event": "run-start"}], 1, "global-initial missing or not a SHA-256"),
        (
            [{"event": "run-start", "global-initial": "ab"}],
            1,
            "global-initial missing or not a SHA-256",
        ),
        ([START, {"event": "launch"}], 2, "unknown event 'launch'"),
        ([START, round_record(1, G0, "x")], 2, "global-after missing or not a SHA-256"),
        ([START, round_record(2, G0, G1)], 2, "round 2 follows round 0 (expected the next)"),
        ([START, round_record(1, G1, G2)], 2, "round 1's global-before is not the global so far"),
        ([START, round_record(1, G0, G1, replies={})], 2, "replies is not a list"),
        (
            [START, round_record(1, G0, G1), {"event": "run-end", "server-round": 1, "global": G0}],
            3,
            "run-end does not name the last round's global adapter",
        ),
        (
            [START, round_record(1, G0, G1), {"event": "run-end", "server-round": 0, "global": G1}],
            3,
            "run-end does not name the last round's global adapter",
        ),
        ([START, {"event": "resume", "checkpoint-sha256": G1}], 2, "resume without a from-round"),
        (
            [START, {"event": "resume", "from-round": -1, "checkpoint-sha256": G1}],
            2,
            "resume without a from-round",
        ),
        (
            [START, {"event": "resume", "from-round": 1}],
            2,
            "checkpoint-sha256 missing or not a SHA-256",
        ),
        (
            [
                START,
                round_record(1, G0, G1),
                {"event": "resume", "from-round": 1, "checkpoint-sha256": G2},
            ],
            3,
            "resumed from a round-1 checkpoint whose digest is not the global the log recorded "
            "after round 1",
        ),
        (
            [
                START,
                round_record(1, G0, G1),
                {"event": "resume", "from-round": 2, "checkpoint-sha256": G1},
            ],
            3,
            "resumed from round 2, never recorded before",
        ),
    ],
)
def test_each_malformed_record_is_named(
    tmp_path: Path, bodies: list[dict[str, Any]], line: int | None, reason: str
) -> None:
    write_log(tmp_path, bodies)
    with pytest.raises(AuditError) as caught:
        verify_run(tmp_path)
    assert (caught.value.line, caught.value.reason) == (line, reason)


def test_a_sound_log_with_resumes_and_replies_is_summarised(tmp_path: Path) -> None:
    replies = [{"status": "accepted"}, {"status": "rejected"}, {"status": "accepted"}, "odd"]
    write_log(
        tmp_path,
        [
            START,
            {"event": "resume", "from-round": 0, "checkpoint-sha256": G0},  # before any round
            round_record(1, G0, G1, replies=replies),
            round_record(2, G1, G2, **{"summed-nodes": [4, 5, 6]}),
            {"event": "resume", "from-round": 1, "checkpoint-sha256": G1},
            round_record(2, G1, G2, **{"summed-nodes": "not a list"}),
            {"event": "run-end", "server-round": 2, "global": G2},
        ],
    )
    summary = verify_run(tmp_path)
    assert (summary.records, summary.rounds, summary.resumes) == (7, 3, 2)
    assert (summary.accepted, summary.rejected, summary.summed) == (2, 1, 3)
    assert (summary.first_global, summary.last_global) == (G0, G2)
    assert summary.ended and summary.checkpoints == [] and not summary.final_checked


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[1, 2]\n", "not a JSON object"),
        (b"{\n", "not a JSON record"),
        (
            b'{"hash": 1, "prev": "", "seq": 0, "event": "run-start"}\n',
            "field 'hash' missing or not a str",
        ),
        (
            b'{"hash": "", "prev": 0, "seq": 0, "event": "run-start"}\n',
            "field 'prev' missing or not a str",
        ),
        (
            b'{"hash": "", "prev": "", "seq": "0", "event": "run-start"}\n',
            "field 'seq' missing or not a int",
        ),
        (b'{"hash": "", "prev": "", "seq": 0, "event": 1}\n', "field 'event' missing or not a str"),
    ],
)
def test_records_that_are_not_audit_records_are_named(
    tmp_path: Path, raw: bytes, reason: str
) -> None:
    (tmp_path / AUDIT_FILE).write_bytes(raw)
    with pytest.raises(AuditError) as caught:
        verify_run(tmp_path)
    assert (caught.value.line, caught.value.reason) == (1, reason)
    assert str(caught.value) == f"{AUDIT_FILE} line 1: {reason}"


def test_a_missing_log_and_a_bad_seq_are_named(tmp_path: Path) -> None:
    with pytest.raises(AuditError) as caught:
        verify_run(tmp_path)
    assert caught.value.line is None and str(caught.value) == f"no {AUDIT_FILE} in {tmp_path}"
    record = seal(START, 1, ZERO_HASH)  # a first record that says it is the second
    (tmp_path / AUDIT_FILE).write_text(canonical_json(record) + "\n")
    with pytest.raises(AuditError) as caught:
        verify_run(tmp_path)
    assert (caught.value.line, caught.value.reason) == (
        1,
        "seq 1 where 0 was expected (removed/reordered)",
    )


def checkpointed_run(run_dir: Path, rounds: int = 2) -> CheckpointStore:
    """A log of ``rounds`` rounds and a checkpoint of each (keep all), no run-end, no final/."""
    store = CheckpointStore(run_dir, ADAPTER_CONFIG, keep=rounds)
    audit = AuditLog.open(run_dir, CONFIG, 0, adapter(0.0))
    for server_round in range(1, rounds + 1):
        audit.round(server_round, adapter(float(server_round)), {"replies": []})
        store.save(server_round, adapter(float(server_round)), {})
    return store


def test_kept_checkpoints_are_each_checked_against_the_log(tmp_path: Path) -> None:
    checkpointed_run(tmp_path)
    summary = verify_run(tmp_path)
    assert summary.checkpoints == [1, 2] and not summary.final_checked


def test_a_checkpoint_of_a_round_the_log_never_recorded_is_named(tmp_path: Path) -> None:
    store = checkpointed_run(tmp_path)
    store.save(3, adapter(3.0), {})
    error = fault(tmp_path)
    digest = tensors_checksum(adapter(3.0))
    assert (error.line, error.reason) == (
        None,
        f"checkpoint round 3 (digest {digest[:12]}...) does not agree with the log: it has no "
        "round record",
    )


def test_a_replaced_checkpoint_names_both_digests_and_the_rounds_line(tmp_path: Path) -> None:
    store = checkpointed_run(tmp_path)
    store.save(2, adapter(9.0), {})  # consistent with its own state.json, not with the log
    error = fault(tmp_path)
    ours, recorded = tensors_checksum(adapter(9.0)), tensors_checksum(adapter(2.0))
    assert (error.line, error.reason) == (
        3,
        f"checkpoint round 2 (digest {ours[:12]}...) does not agree with the log: it recorded "
        f"{recorded[:12]}...",
    )


@pytest.mark.parametrize("state", ["{broken", "[]", '{"tensors-sha256": "0"}'])
def test_a_checkpoints_state_json_must_hold_its_tensors_digest(tmp_path: Path, state: str) -> None:
    store = checkpointed_run(tmp_path)
    folder = store.checkpoint_dir / "round-0002"
    (folder / "state.json").write_text(state)
    error = fault(tmp_path)
    assert error.line is None
    if state == "{broken":
        assert error.reason.startswith(f"{folder}: unreadable state.json (Expecting")
    else:
        assert error.reason == f"{folder}: tensors do not match its state.json digest"


def test_an_unreadable_checkpoint_adapter_is_named_with_the_readers_reason(tmp_path: Path) -> None:
    store = checkpointed_run(tmp_path)
    folder = store.checkpoint_dir / "round-0001"
    for tensors_file in folder.glob("*.safetensors"):
        tensors_file.unlink()
    with pytest.raises(AdapterFileError) as reader:
        read_adapter_dir(folder)
    error = fault(tmp_path)
    assert (error.line, error.reason) == (None, str(reader.value))


def test_a_replaced_final_adapter_is_named_at_the_last_record(tmp_path: Path) -> None:
    store = checkpointed_run(tmp_path)
    store.save_final(adapter(9.0), {})
    error = fault(tmp_path)
    assert (error.line, error.reason) == (
        3,
        f"{tmp_path / 'final'}: its adapter is not the global the log ends with",
    )
    store.save_final(adapter(2.0), {})
    assert verify_run(tmp_path).final_checked


def test_a_bad_global_before_names_its_own_line(tmp_path: Path) -> None:
    write_log(tmp_path, [START, round_record(1, G0, G1), round_record(2, "short", G2)])
    error = fault(tmp_path)
    assert (error.line, error.reason) == (3, "global-before missing or not a SHA-256")


def test_a_resumed_log_warns_about_what_it_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    AuditLog.open(tmp_path, CONFIG, 0, adapter(0.0))
    with (tmp_path / AUDIT_FILE).open("ab") as handle:
        handle.write(b"{cut")
    with caplog.at_level(logging.WARNING):
        AuditLog.open(tmp_path, CONFIG, 1, adapter(1.0))
    path = tmp_path / AUDIT_FILE
    assert f"{path} ends in a partial line (4 bytes): dropped" in caplog.messages
    (tmp_path / AUDIT_FILE).write_bytes(b"not json\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        AuditLog.open(tmp_path, CONFIG, 1, adapter(1.0))
    assert caplog.messages == [f"{path}: last record unreadable; its chain will not verify"]


def test_a_reply_whose_arrays_do_not_decode_has_no_digest() -> None:
    record = ArrayRecord(adapter(1.0))
    record["base_model.model.q.lora_A.weight"].data = b"\x00\x01"
    content = RecordDict({"arrays": record})
    assert reply_digests([from_node(8, content)]) == [(8, None)]


def test_package_version_is_the_installed_one_or_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    assert package_version() == metadata.version("robustmerge-fl")

    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert package_version() == "unknown"


def test_each_record_carries_its_utc_time_to_the_second(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "runs" / "new")  # the run folder is made as needed
    record = audit.append("run-start", {"global-initial": G0})
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", record["time"])
    assert records(tmp_path / "runs" / "new") == [record]


def test_an_edited_record_is_named_whole(tmp_path: Path) -> None:
    write_log(tmp_path, [START, round_record(1, G0, G1)])
    edited = (tmp_path / AUDIT_FILE).read_text().replace('"server-round":1', '"server-round":2')
    (tmp_path / AUDIT_FILE).write_text(edited)
    error = fault(tmp_path)
    assert (error.line, error.reason) == (2, "record edited: its contents do not match its hash")


def test_broken_links_and_cut_writes_are_named_whole(tmp_path: Path) -> None:
    write_log(tmp_path, [START, round_record(1, G0, G1), round_record(2, G1, G2)])
    path = tmp_path / AUDIT_FILE
    first, second, third = path.read_text().splitlines(keepends=True)
    path.write_text(first + third)  # the second record removed: line 2 links to nothing
    error = fault(tmp_path)
    assert (error.line, error.reason) == (
        2,
        "chain broken: prev is not the hash of the record before it (a record was removed, "
        "inserted or reordered)",
    )
    forged = seal(START, 0, "1" * 64)
    path.write_text(canonical_json(forged) + "\n")
    error = fault(tmp_path)
    assert (error.line, error.reason) == (
        1,
        "chain broken: the first record's prev is not 00000000...",
    )
    path.write_text(first + second + third[:-9])
    error = fault(tmp_path)
    assert (error.line, error.reason) == (
        3,
        "partial last line (a write was cut short, e.g. by a crash; a resume drops it and says so "
        "in its resume record)",
    )
