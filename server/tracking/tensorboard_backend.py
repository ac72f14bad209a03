"""``tracking = "tensorboard"``: event files written with ``torch.utils.tensorboard``.

One TensorBoard run per federation: ``<output-dir>/tensorboard/<UTC start time>/``; a resumed
run (``resume = true`` that found a checkpoint) appends to the newest one, so its curves go on
where they stopped. ``tensorboard --logdir <output-dir>/tensorboard`` compares the runs made in
one output folder, ``--logdir ~/robustmerge-fl`` every output folder's.

What is written: the run config as a markdown table (text ``run/config``) and as HParams (so the
HParams tab sets runs side by side), every round scalar under its name (step = round), each
client's scalars under ``clients/node-<id>/...`` with the round's verdict table (text
``clients/verdicts``), and at the end the final adapter's folder and the audit head (text
``run/final-adapter``, ``run/audit-head``). Every call flushes, so a failing disk surfaces in
the call (the writer's thread keeps the error until then) and the files are readable mid-run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from server.tracking.base import ClientRow, ParamValue

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

TENSORBOARD_DIR = "tensorboard"
# Listed in the HParams tab against each run's config.
HPARAM_METRICS = ("eval/seen-accuracy", "eval/unseen-accuracy", "train/train-loss")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table (TensorBoard's text tab renders it)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def log_dir_for(run_dir: Path, first_round: int) -> Path:
    """Where this run's events go: the newest earlier folder when resuming, else a new one."""
    root = run_dir / TENSORBOARD_DIR
    earlier = sorted(path for path in root.glob("*") if path.is_dir()) if root.is_dir() else []
    if first_round > 1 and earlier:
        return earlier[-1]
    return root / datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


class TensorBoardTracker:
    """Event files under ``run_dir``/tensorboard (see the module docstring)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.log_dir: Path | None = None
        self._writer: SummaryWriter | None = None

    @property
    def writer(self) -> SummaryWriter:
        """The open writer (``start`` opens it)."""
        if self._writer is None:
            raise RuntimeError("TensorBoardTracker: start() was not called or failed")
        return self._writer

    def start(self, params: Mapping[str, ParamValue], *, first_round: int) -> None:
        """Open the writer; the run config as text and as HParams."""
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.log_dir = log_dir_for(self.run_dir, first_round)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        step = first_round - 1
        table = markdown_table(("key", "value"), sorted(params.items()))
        self.writer.add_text("run/config", table, global_step=step)
        if first_round == 1:
            experiment, start_info, end_info = hparams(  # type: ignore[no-untyped-call]
                dict(params), dict.fromkeys(HPARAM_METRICS, 0.0)
            )
            file_writer = self.writer._get_file_writer()  # type: ignore[no-untyped-call]
            for summary in (experiment, start_info, end_info):
                file_writer.add_summary(summary)
        self.writer.flush()

    def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """Each scalar at step ``server_round``."""
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=server_round)
        self.writer.flush()

    def log_clients(self, server_round: int, rows: Sequence[ClientRow]) -> None:
        """``clients/node-<id>/<scalar>`` for each row, and the verdict table."""
        for row in rows:
            for key, value in row.scalars().items():
                self.writer.add_scalar(
                    f"clients/node-{row.node_id}/{key}", value, global_step=server_round
                )
        table = markdown_table(
            ("node", "verdict", "reason", "train-loss", "num-examples", "update-norm"),
            [
                (r.node_id, r.verdict, r.reason, r.train_loss, r.num_examples, r.update_norm)
                for r in rows
            ],
        )
        self.writer.add_text("clients/verdicts", table, global_step=server_round)
        self.writer.flush()

    def finish(self, final_dir: Path, audit_head: str) -> None:
        """The final adapter's folder and the audit head as text; close the writer."""
        self.writer.add_text("run/final-adapter", str(final_dir))
        self.writer.add_text("run/audit-head", audit_head)
        self.writer.flush()
        self.abort()

    def abort(self) -> None:
        """Close the writer (what was written stays)."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()
