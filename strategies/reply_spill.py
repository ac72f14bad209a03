"""A buffered round's accepted replies past a bound, spilled to disk as they arrive.

Rounds that cannot fold their replies into running sums (svd, exact-mean, paper-equation, mixed
ranks, multi-Krum, the coordinate-wise clamps, centered clipping; docs/strategy.md, "What
buffers, and why") need every accepted reply at merge time. The first ``bound`` of them stay in
memory in their wire form; each further one is written, decoded to float32 as ``tensor(key)``
gives it, to one safetensors file in the spill folder and then read back key by key
(``safe_open``, ``get_tensor``): its ArrayRecord, and the RecordDict that held it, are dropped
(its metric records are kept for the round's train metrics). The merge reads replies module by
module, so the round holds ``bound`` replies plus one module stacked over all of them, whatever
the number of clients. The tensors read back are the ones the reply would have decoded, so the
merge is bit-identical to the in-memory one.

The files live in a folder of their own (under the run's output folder when the app runs; under
the system temp folder for library use), removed when the round closes, on errors too. Only
plain dense replies spill: sparse-uplink replies and rewritten ones keep what they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from logging import INFO
from pathlib import Path
from types import TracebackType

import torch
from flwr.app import ArrayRecord
from flwr.supercore import log
from safetensors import safe_open
from safetensors.torch import save_file

from strategies.reply_checks import AcceptedReply, decode_float32
from strategies.robust import Rows
from strategies.round_metrics import metrics_only

# The spill folders' name prefix (one folder a round).
SPILL_PREFIX = "robustmerge-spill-"


@dataclasses.dataclass(frozen=True)
class SpillFile:
    """One spilled reply's tensors (``reply_checks.TensorSource``): a safetensors file read
    key by key, and what the reply's ArrayRecord answered for its order and keys."""

    path: Path
    object_id: str
    names: tuple[str, ...]

    def keys(self) -> list[str]:
        """The reply's keys, in its wire order."""
        return list(self.names)

    def tensor(self, key: str) -> torch.Tensor:
        """The float32 tensor of ``key``, read from the file (KeyError for a key it lacks)."""
        if key not in self.names:
            raise KeyError(key)
        with safe_open(str(self.path), framework="pt") as handle:
            tensor: torch.Tensor = handle.get_tensor(key)
        return tensor

    def tensor_rows(self, key: str, rows: Rows) -> torch.Tensor:
        """Rows ``rows`` of ``tensor(key)``, only those read from the file (``get_slice``)."""
        if rows is ...:
            return self.tensor(key)
        if key not in self.names:
            raise KeyError(key)
        with safe_open(str(self.path), framework="pt") as handle:
            part: torch.Tensor = handle.get_slice(key)[rows]
        return part


class ReplySpill:
    """One buffered round's spill: ``keep`` returns a reply as the round holds it (the first
    ``bound`` in memory, later ones spilled to a file); ``close`` (or leaving the ``with``
    block) deletes every file and the folder.

    ``parent``: where the round's folder is made (created if missing); None: the system temp
    folder.
    """

    def __init__(self, bound: int, parent: Path | None = None, label: str = "round") -> None:
        if bound < 1:
            raise ValueError(f"buffer-replies must be >= 1, got {bound}")
        self.bound = bound
        self.parent = parent
        self.label = label
        self.in_memory = 0
        self.folder: Path | None = None
        self.files: dict[int, SpillFile] = {}  # node id of the kept reply -> its file
        self.written = 0
        self.made_parent = False  # ``parent`` made here (removed again when left empty)

    def __enter__(self) -> ReplySpill:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def keep(self, reply: AcceptedReply) -> AcceptedReply:
        """``reply`` as the round holds it: itself while fewer than ``bound`` are in memory (or
        when it is not a plain dense reply), else a copy whose tensors are read from its file."""
        if (
            self.in_memory < self.bound
            or type(reply) is not AcceptedReply
            or reply.backing is not None
        ):
            self.in_memory += 1
            return reply
        folder = self._folder()
        path = folder / f"{self.written:06d}-node-{reply.node_id}.safetensors"
        names = reply.array_keys()
        save_file({key: decode_float32(reply.arrays, key) for key in names}, str(path))
        self.written += 1
        source = SpillFile(path, reply.arrays.object_id, tuple(names))
        kept = dataclasses.replace(
            reply,
            arrays=ArrayRecord(),
            content=metrics_only(reply.content),
            backing=source,
        )
        self.files[kept.node_id] = source
        return kept

    def discard(self, reply: AcceptedReply) -> None:
        """Forget a kept reply (its node was rejected after all): delete its file, if any."""
        source = self.files.pop(reply.node_id, None)
        if source is None:
            self.in_memory = max(0, self.in_memory - 1)
            return
        source.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Delete every spill file and the round's folder."""
        self.files.clear()
        if self.written:
            log(
                INFO,
                "%s: %d replies past buffer-replies = %d were spilled to %s (now removed)",
                self.label,
                self.written,
                self.bound,
                self.folder,
            )
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        if self.made_parent and self.parent is not None:
            with contextlib.suppress(OSError):  # not empty: something else uses it
                self.parent.rmdir()
            self.made_parent = False

    def _folder(self) -> Path:
        """The round's spill folder, made on the first spill."""
        if self.folder is None:
            if self.parent is not None and not self.parent.exists():
                self.parent.mkdir(parents=True, exist_ok=True)
                self.made_parent = True
            parent = str(self.parent) if self.parent is not None else None
            self.folder = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{self.label}-", dir=parent))
        return self.folder
