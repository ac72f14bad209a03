"""The audit log's hash chain and its verifier (``robustmerge-fl audit verify RUN_DIR``).

A run folder's ``audit.jsonl`` holds one JSON record per line, appended and fsynced as the run
goes: ``run-start``, one ``round`` per server round, ``resume`` when a run picks up from a
checkpoint, ``run-end``. Each record carries ``seq`` (its 0-based line number), ``prev`` (the
previous record's ``hash``; 64 zeros for the first) and ``hash``: the SHA-256 of the record's
canonical JSON without ``hash``. Editing, removing, inserting or reordering a record therefore
breaks the chain at that line, and the verifier names the first line where it breaks.

The chain is evidence against changes made after the fact by anyone who does not also recompute
every later hash; the global adapter digests it records are cross-checked against the
checkpoints' ``state.json`` and tensors, and the head hash that ``verify`` prints can be kept
elsewhere (a ticket, a signed mail) to pin the whole log.

Pure Python and torch (no Flower): the writer is ``server.audit_log``.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from strategies.adapter_io.digest import tensors_checksum
from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.reading import read_adapter_dir

AUDIT_FILE = "audit.jsonl"
ZERO_HASH = "0" * 64
EVENTS = ("run-start", "resume", "round", "run-end")


class AuditError(Exception):
    """The log or the run folder disagrees with itself; ``line`` is the first bad record's
    1-based line number (None when the fault is outside the log, e.g. a checkpoint)."""

    def __init__(self, line: int | None, reason: str) -> None:
        self.line = line
        self.reason = reason
        where = f"{AUDIT_FILE} line {line}: " if line is not None else ""
        super().__init__(f"{where}{reason}")


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, ASCII only: the bytes a record's hash is taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def json_safe(value: Any) -> Any:
    """``value`` with tuples as lists and non-finite floats as strings (JSON has no inf/nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def config_digest(config: Mapping[str, Any]) -> str:
    """SHA-256 of the run config's canonical JSON."""
    return hashlib.sha256(canonical_json(json_safe(config)).encode()).hexdigest()


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 of the record's canonical JSON, ``hash`` itself left out."""
    body = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def seal(record: Mapping[str, Any], seq: int, prev: str) -> dict[str, Any]:
    """The record as written: with ``seq``, ``prev`` and its own ``hash``."""
    sealed = {**json_safe(record), "seq": seq, "prev": prev}
    sealed["hash"] = record_hash(sealed)
    return sealed


def package_version() -> str:
    """The installed robustmerge-fl version ("unknown" from a bare checkout)."""
    try:
        return metadata.version("robustmerge-fl")
    except metadata.PackageNotFoundError:
        return "unknown"


def python_version() -> str:
    """The interpreter's version, as the audit log's run-start and resume records give it."""
    return platform.python_version()


@dataclass
class AuditSummary:
    """What an intact log says: counts, the first and last global adapter digests, the head."""

    records: int = 0
    rounds: int = 0
    resumes: int = 0
    accepted: int = 0
    rejected: int = 0
    summed: int = 0
    first_global: str | None = None
    last_global: str | None = None
    head: str = ZERO_HASH
    ended: bool = False
    checkpoints: list[int] = field(default_factory=list)
    final_checked: bool = False

    def lines(self) -> list[str]:
        """The summary ``verify`` prints."""
        return [
            f"audit log intact: {self.records} records, {self.rounds} rounds, "
            f"{self.resumes} resumes",
            f"replies: {self.accepted} accepted, {self.rejected} rejected"
            + (f", {self.summed} securely summed" if self.summed else ""),
            f"first global: {self.first_global}",
            f"last global:  {self.last_global}",
            "checkpoints agree: "
            + (", ".join(f"round {r}" for r in self.checkpoints) or "none kept")
            + ("; final/ agrees" if self.final_checked else ""),
            "run ended" if self.ended else "no run-end record: run in progress or interrupted",
            f"head hash: {self.head}",
        ]


@dataclass
class _Walk:
    """The verifier's position in the log: the global now, each round's last global after."""

    summary: AuditSummary = field(default_factory=AuditSummary)
    current: str | None = None
    last_round: int = 0
    after: dict[int, str] = field(default_factory=dict)
    line_of: dict[int, int] = field(default_factory=dict)


def verify_run(run_dir: Path) -> AuditSummary:
    """Check ``run_dir/audit.jsonl``'s chain and contents, then the kept checkpoints and final/
    against it; AuditError names the first fault."""
    path = run_dir / AUDIT_FILE
    if not path.is_file():
        raise AuditError(None, f"no {AUDIT_FILE} in {run_dir}")
    walk = _Walk()
    prev = ZERO_HASH
    for number, raw in enumerate(_lines(path.read_bytes()), start=1):
        record = _parse(number, raw)
        if record_hash(record) != record["hash"]:
            raise AuditError(number, "record edited: its contents do not match its hash")
        if record["prev"] != prev:
            raise AuditError(
                number,
                "chain broken: prev is not the hash of the record before it "
                "(a record was removed, inserted or reordered)"
                if number > 1
                else f"chain broken: the first record's prev is not {ZERO_HASH[:8]}...",
            )
        if record["seq"] != number - 1:
            raise AuditError(
                number, f"seq {record['seq']} where {number - 1} was expected (removed/reordered)"
            )
        _follow(walk, number, record)
        prev = record["hash"]
        walk.summary.records = number
    if walk.summary.records == 0:
        raise AuditError(None, f"{AUDIT_FILE} is empty")
    walk.summary.head = prev
    walk.summary.last_global = walk.current
    _check_checkpoints(run_dir, walk)
    return walk.summary


def _lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if lines[-1]:
        raise AuditError(
            len(lines),
            "partial last line (a write was cut short, e.g. by a crash; "
            "a resume drops it and says so in its resume record)",
        )
    return lines[:-1]


def _parse(number: int, raw: bytes) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except ValueError:
        raise AuditError(number, "not a JSON record") from None
    if not isinstance(record, dict):
        raise AuditError(number, "not a JSON object")
    for key, kind in (("hash", str), ("prev", str), ("seq", int), ("event", str)):
        if not isinstance(record.get(key), kind):
            raise AuditError(number, f"field {key!r} missing or not a {kind.__name__}")
    if record["event"] not in EVENTS:
        raise AuditError(number, f"unknown event {record['event']!r}")
    return record


def _follow(walk: _Walk, number: int, record: Mapping[str, Any]) -> None:
    """Check one record against the log so far and move the walk on."""
    event = record["event"]
    if (event == "run-start") != (number == 1):
        raise AuditError(number, "the first record, and only it, must be run-start")
    summary = walk.summary
    if event == "run-start":
        walk.current = _digest(number, record, "global-initial")
        summary.first_global = walk.current
    elif event == "resume":
        from_round = record.get("from-round")
        digest = _digest(number, record, "checkpoint-sha256")
        if not isinstance(from_round, int) or from_round < 0:
            raise AuditError(number, "resume without a from-round")
        known = walk.after.get(from_round)
        if known is not None and known != digest:
            raise AuditError(
                number,
                f"resumed from a round-{from_round} checkpoint whose digest is not the "
                f"global the log recorded after round {from_round}",
            )
        if known is None and walk.after:
            raise AuditError(number, f"resumed from round {from_round}, never recorded before")
        walk.current, walk.last_round = digest, from_round
        summary.resumes += 1
    elif event == "round":
        _follow_round(walk, number, record)
    elif record.get("global") != walk.current or record.get("server-round") != walk.last_round:
        raise AuditError(number, "run-end does not name the last round's global adapter")
    else:
        summary.ended = True


def _follow_round(walk: _Walk, number: int, record: Mapping[str, Any]) -> None:
    server_round = record.get("server-round")
    if server_round != walk.last_round + 1:
        raise AuditError(
            number, f"round {server_round} follows round {walk.last_round} (expected the next)"
        )
    if _digest(number, record, "global-before") != walk.current:
        raise AuditError(number, f"round {server_round}'s global-before is not the global so far")
    walk.current = _digest(number, record, "global-after")
    walk.last_round = server_round
    walk.after[server_round] = walk.current
    walk.line_of[server_round] = number
    summary = walk.summary
    summary.rounds += 1
    replies = record.get("replies", [])
    if not isinstance(replies, list):
        raise AuditError(number, "replies is not a list")
    for reply in replies:
        status = reply.get("status") if isinstance(reply, dict) else None
        summary.accepted += status == "accepted"
        summary.rejected += status == "rejected"
    summed = record.get("summed-nodes")
    summary.summed += len(summed) if isinstance(summed, list) else 0


def _digest(number: int, record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    if not (isinstance(value, str) and len(value) == 64):
        raise AuditError(number, f"{key} missing or not a SHA-256")
    return value


def _check_checkpoints(run_dir: Path, walk: _Walk) -> None:
    """Each kept checkpoint's tensors, its state.json and the log's round record agree;
    final/ holds the global the log ends with."""
    checkpoints = run_dir / "checkpoints"
    folders = sorted(checkpoints.glob("round-[0-9]*"))  # none when there is no folder
    for folder in folders:
        server_round = int(folder.name.removeprefix("round-"))
        digest = _adapter_digest(folder)
        try:
            state = json.loads((folder / "state.json").read_text())
        except (OSError, ValueError) as error:
            raise AuditError(None, f"{folder}: unreadable state.json ({error})") from None
        if not isinstance(state, dict) or state.get("tensors-sha256") != digest:
            raise AuditError(None, f"{folder}: tensors do not match its state.json digest")
        recorded = walk.after.get(server_round)
        if recorded != digest:
            why = "has no round record" if recorded is None else f"recorded {recorded[:12]}..."
            raise AuditError(
                walk.line_of.get(server_round),
                f"checkpoint round {server_round} (digest {digest[:12]}...) does not agree with "
                f"the log: it {why}",
            )
        walk.summary.checkpoints.append(server_round)
    final = run_dir / "final"
    if final.is_dir():
        if _adapter_digest(final) != walk.current:
            raise AuditError(
                walk.summary.records, f"{final}: its adapter is not the global the log ends with"
            )
        walk.summary.final_checked = True


def _adapter_digest(folder: Path) -> str:
    try:
        return tensors_checksum(read_adapter_dir(folder).tensors)
    except AdapterFileError as error:
        raise AuditError(None, str(error)) from None
