"""Writes a run folder's tamper-evident audit log, ``audit.jsonl`` (chain logic and verifier:
``strategies.audit``).

One record per event, each line written, flushed and fsynced before the run goes on:

* ``run-start``: the run config's digest, the versions, the initial global adapter's digest;
* ``round``: the global's digest before and after, and per reply its node, the digest of its
  arrays, accepted or rejected (with the reason) and its update norm; under secure aggregation
  only the summed node ids (the server never sees a single reply);
* ``resume``: the checkpoint round resumed from and its digest, the config digest and versions
  of the resuming process, and a partial last line dropped after a crash, if there was one;
* ``run-end``: the final global's digest.

A round's record is written before its checkpoint, so a crash between the two leaves a record
the resumed run re-does (the verifier follows the latest record of each round).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from logging import WARNING
from pathlib import Path
from typing import Any

import flwr
import torch
from flwr.app import Message
from flwr.supercore import log

from strategies.adapter_io.digest import tensors_checksum
from strategies.audit import (
    AUDIT_FILE,
    ZERO_HASH,
    canonical_json,
    config_digest,
    package_version,
    python_version,
    seal,
)
from strategies.round_report import RoundReport

Tensors = Mapping[str, torch.Tensor]
SECURE_NOTE = (
    "secure aggregation: the server sees only the sum of the sampled clients' terms, so there "
    "are no per-reply digests, norms or rejections; summed-nodes lists who contributed"
)


def versions() -> dict[str, str]:
    """The software that made the run: flwr, torch, python, robustmerge-fl."""
    return {
        "flwr": flwr.__version__,
        "torch": torch.__version__,
        "python": python_version(),
        "robustmerge-fl": package_version(),
    }


class AuditLog:
    """Appends sealed records to ``run_dir/audit.jsonl`` and tracks the global's digest."""

    def __init__(self, run_dir: Path, *, seq: int = 0, prev: str = ZERO_HASH) -> None:
        self.path = run_dir / AUDIT_FILE
        self.seq = seq
        self.prev = prev
        self.global_digest = ""
        self.last_round = 0

    @classmethod
    def open(
        cls, run_dir: Path, config: Mapping[str, Any], start_round: int, tensors: Tensors
    ) -> AuditLog:
        """A fresh log with its run-start record (``start_round`` 0), or the run folder's log
        continued with a resume record (a partial last line is dropped and reported there)."""
        if start_round == 0:
            audit = cls(run_dir)
            audit._start(config, tensors, {})
            return audit
        audit, dropped = cls._continue(run_dir)
        if audit.seq == 0:  # no earlier log (a run from before audit logs): start one here
            audit._start(config, tensors, {"note": f"log begun on resuming after {start_round}"})
        audit.global_digest = tensors_checksum(tensors)
        audit.last_round = start_round
        fields: dict[str, Any] = {
            "from-round": start_round,
            "checkpoint-sha256": audit.global_digest,
            "config-sha256": config_digest(config),
            "versions": versions(),
        }
        if dropped:
            fields["dropped-partial-line"] = {
                "bytes": len(dropped),
                "sha256": hashlib.sha256(dropped).hexdigest(),
            }
        audit.append("resume", fields)
        return audit

    def _start(self, config: Mapping[str, Any], tensors: Tensors, extra: Mapping[str, Any]) -> None:
        self.global_digest = tensors_checksum(tensors)
        self.append(
            "run-start",
            {
                "config-sha256": config_digest(config),
                "versions": versions(),
                "global-initial": self.global_digest,
                **extra,
            },
        )

    @classmethod
    def _continue(cls, run_dir: Path) -> tuple[AuditLog, bytes]:
        """The log positioned after its last complete record, and the partial line cut off."""
        path = run_dir / AUDIT_FILE
        data = path.read_bytes() if path.is_file() else b""
        complete, _, partial = data.rpartition(b"\n")
        if partial:
            log(WARNING, "%s ends in a partial line (%d bytes): dropped", path, len(partial))
            with path.open("r+b") as handle:
                handle.truncate(len(complete) + 1 if complete else 0)
                handle.flush()
                os.fsync(handle.fileno())
        lines = complete.split(b"\n") if complete else []
        if not lines:
            return cls(run_dir), partial
        try:
            last = json.loads(lines[-1])
            prev, seq = str(last["hash"]), int(last["seq"]) + 1
        except (ValueError, KeyError, TypeError):
            log(WARNING, "%s: last record unreadable; its chain will not verify", path)
            prev, seq = ZERO_HASH, len(lines)
        return cls(run_dir, seq=seq, prev=prev), partial

    def append(self, event: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Seal, write, flush and fsync one record; returns it."""
        record = seal(
            {"event": event, "time": datetime.now(UTC).isoformat(timespec="seconds"), **fields},
            self.seq,
            self.prev,
        )
        line = canonical_json(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="ascii") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.seq += 1
        self.prev = record["hash"]
        return record

    def round(self, server_round: int, after: Tensors, fields: Mapping[str, Any]) -> None:
        """A round record: the global before (the last one recorded) and after, and ``fields``."""
        before = self.global_digest
        self.global_digest = tensors_checksum(after)
        self.last_round = server_round
        self.append(
            "round",
            {
                "server-round": server_round,
                "global-before": before,
                "global-after": self.global_digest,
                **fields,
            },
        )

    def end(self) -> None:
        """The run-end record: the last round and the final global's digest."""
        self.append("run-end", {"server-round": self.last_round, "global": self.global_digest})


def reply_digests(replies: Iterable[Message]) -> list[tuple[int, str | None]]:
    """(node id, digest of the reply's arrays) per reply, in arrival order; taken before
    aggregation (a DP wrapper swaps reply contents for clipped copies). The digest is
    ``tensors_checksum`` over every ArrayRecord's tensors, keyed ``<record>/<key>``; None for
    an error reply or arrays that do not decode."""
    digests: list[tuple[int, str | None]] = []
    for message in replies:
        digest: str | None = None
        if message.has_content():  # an error reply has none
            try:
                tensors = {
                    f"{name}/{key}": value
                    for name, record in message.content.array_records.items()
                    for key, value in record.to_torch_state_dict().items()
                }
                digest = tensors_checksum(tensors)
            except (ValueError, TypeError, RuntimeError):
                digest = None
        digests.append((message.metadata.src_node_id, digest))
    return digests


def train_round_fields(
    sampled: Sequence[int],
    digests: Sequence[tuple[int, str | None]],
    report: RoundReport | None,
    prescreen: RoundReport | None,
    skipped: bool,
) -> dict[str, Any]:
    """The round record of the FedRobustMerge path: who was asked, and per reply its digest,
    verdict and update norm (the pre-DP-clipping norm when a wrapper screened first; None when
    the strategy measured none, e.g. robust-aggregation none without max-update-norm)."""
    norms = dict(report.update_norms) if report else {}
    norms.update(prescreen.update_norms if prescreen else {})
    entries = []
    for node, digest in digests:
        entry: dict[str, Any] = {"node": node, "arrays-sha256": digest}
        if report is not None and node in report.rejected:
            entry.update(status="rejected", reason=report.rejected[node])
        elif report is not None and node in report.accepted_nodes:
            entry.update(status="accepted", clipped=node in report.clipped)
        else:
            entry["status"] = "unknown"
        entry["update-norm"] = norms.get(node)
        entries.append(entry)
    replied = {node for node, _ in digests}
    return {
        "aggregation": "fedrobustmerge",
        "sampled": list(sampled),
        "timed-out": [node for node in sampled if node not in replied],
        "skipped": skipped,
        "replies": entries,
    }


def secure_round_fields(
    sampled: Sequence[int], summed: Sequence[int], skipped: bool
) -> dict[str, Any]:
    """The round record of the SecAgg+ path: who was asked and whose terms were summed."""
    return {
        "aggregation": "secure-aggregation",
        "sampled": list(sampled),
        "summed-nodes": list(summed),
        "skipped": skipped,
        "replies": [],
        "note": SECURE_NOTE,
    }
