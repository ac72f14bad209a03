"""Per-round checkpoints in PEFT's format, written atomically, verified on resume.

Layout under the run's output folder::

    checkpoints/round-0003/adapter_model.safetensors   the global adapter after round 3
    checkpoints/round-0003/adapter_config.json          so PeftModel.from_pretrained loads it
    checkpoints/round-0003/state.json                   round, content checksum, run state
    checkpoints/round-0003/README.md                    its model card (server.model_card)
    final/                                              the last global adapter (same format)

Each folder is written beside its target and renamed into place (see
``strategies.adapter_io.writing.write_adapter_dir``), so a crash leaves either the old set or
the new one. ``state.json`` carries a SHA-256 over the tensors' names, dtypes, shapes and bytes; a
checkpoint that fails to load or to match it is reported and the previous one is used. The model
card, when there is one, is written in the same atomic step and its SHA-256 kept in ``state.json``
too; a card that no longer matches is reported, but does not make the checkpoint unusable (it
only describes the adapter: resume needs the tensors and the state).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.supercore import log

from server.model_card import CARD_FILE
from strategies.adapter_io.digest import tensors_checksum
from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.reading import read_adapter_dir
from strategies.adapter_io.writing import write_adapter_dir

STATE_FILE = "state.json"
STATE_FORMAT = 1
# state.json keys the store writes itself; a caller's state must not overwrite them.
FORMAT_KEY = "format"
ROUND_KEY = "server-round"
CHECKSUM_KEY = "tensors-sha256"
CARD_DIGEST_KEY = "model-card-sha256"
RESERVED_STATE_KEYS = frozenset({FORMAT_KEY, ROUND_KEY, CHECKSUM_KEY, CARD_DIGEST_KEY})

__all__ = ["CARD_FILE", "STATE_FILE", "Checkpoint", "CheckpointStore", "tensors_checksum"]


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: the round it closes, the global adapter, the saved run state."""

    server_round: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    path: Path


class CheckpointStore:
    """Writes and finds the checkpoints of one run folder."""

    def __init__(self, run_dir: Path, adapter_config: Mapping[str, Any], keep: int = 3) -> None:
        self.run_dir = run_dir
        self.checkpoint_dir = run_dir / "checkpoints"
        self.adapter_config = dict(adapter_config)
        self.keep = keep

    def round_path(self, server_round: int) -> Path:
        """Folder of the checkpoint that closes ``server_round``."""
        return self.checkpoint_dir / f"round-{server_round:04d}"

    def save(
        self,
        server_round: int,
        tensors: Mapping[str, torch.Tensor],
        state: Mapping[str, Any],
        card: str | None = None,
    ) -> Path:
        """Write the checkpoint of ``server_round`` atomically (with its model card ``card``,
        the text of README.md, when given) and prune old ones. ``state`` may not use the keys
        the store writes itself (the format, the round, the checksums): a resume trusts them."""
        clashing = sorted(set(state) & RESERVED_STATE_KEYS)
        if clashing:
            raise ValueError(
                f"checkpoint state for round {server_round} uses the store's own keys {clashing}"
            )
        payload = {
            FORMAT_KEY: STATE_FORMAT,
            ROUND_KEY: server_round,
            CHECKSUM_KEY: tensors_checksum(tensors),
            **state,
        }
        extras: dict[str, str] = {}
        if card is not None:
            payload[CARD_DIGEST_KEY] = _text_digest(card)
            extras[CARD_FILE] = card
        extras[STATE_FILE] = json.dumps(payload, indent=1, sort_keys=True)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = write_adapter_dir(
            self.round_path(server_round),
            dict(tensors),
            self.adapter_config,
            extra_files=extras,
            overwrite=True,
        )
        self._prune()
        return path

    def save_final(
        self,
        tensors: Mapping[str, torch.Tensor],
        report: Mapping[str, Any],
        card: str | None = None,
    ) -> Path:
        """Write the final global adapter to ``final/`` with a small JSON about the run (and its
        model card ``card`` as README.md, when given)."""
        extras = {"run_report.json": json.dumps(report, indent=1, sort_keys=True)}
        if card is not None:
            extras[CARD_FILE] = card
        return write_adapter_dir(
            self.run_dir / "final",
            dict(tensors),
            self.adapter_config,
            extra_files=extras,
            overwrite=True,
        )

    def rounds(self) -> list[int]:
        """Rounds that have a checkpoint folder, ascending (not yet verified)."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = []
        for child in self.checkpoint_dir.iterdir():
            name = child.name
            if child.is_dir() and name.startswith("round-") and name[6:].isdigit():
                found.append(int(name[6:]))
        return sorted(found)

    def load(self, server_round: int) -> Checkpoint:
        """Read and verify one checkpoint; AdapterFileError says what is wrong with it."""
        path = self.round_path(server_round)
        folder = read_adapter_dir(path)
        state_path = path / STATE_FILE
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError) as error:
            raise AdapterFileError(
                path, STATE_FILE, f"unreadable checkpoint state ({error})"
            ) from None
        if not isinstance(state, dict) or state.get(ROUND_KEY) != server_round:
            raise AdapterFileError(
                path, STATE_FILE, f"state does not describe round {server_round}"
            )
        if tensors_checksum(folder.tensors) != state.get(CHECKSUM_KEY):
            raise AdapterFileError(path, None, f"tensors do not match the checksum in {STATE_FILE}")
        _check_card(path, state.get(CARD_DIGEST_KEY))
        return Checkpoint(server_round, folder.tensors, state, path)

    def latest_valid(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; corrupt ones are logged and skipped."""
        for server_round in reversed(self.rounds()):
            try:
                return self.load(server_round)
            except AdapterFileError as error:
                log(
                    WARNING,
                    "checkpoint of round %d is unusable, trying the previous one: %s",
                    server_round,
                    error,
                )
        return None

    def _prune(self) -> None:
        for server_round in self.rounds()[: -self.keep]:
            shutil.rmtree(self.round_path(server_round), ignore_errors=True)


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_card(path: Path, expected: object) -> None:
    """Warn when a checkpoint's model card is missing or differs from the digest its state.json
    recorded; the checkpoint stays usable (the card describes it, resume does not read it)."""
    if expected is None:
        return  # written without a card (or before cards existed)
    card = path / CARD_FILE
    try:
        actual = hashlib.sha256(card.read_bytes()).hexdigest()
    except OSError as error:
        log(WARNING, "%s: model card unreadable (%s); the checkpoint is still used", card, error)
        return
    if actual != expected:
        log(
            WARNING,
            "%s does not match the digest in %s (edited after the run?); the checkpoint is "
            "still used",
            card,
            STATE_FILE,
        )
