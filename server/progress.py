"""Live progress of a training round while it waits for the sampled sites' replies.

``RoundProgress`` is the pure state of one round's wait: sites sampled, replies in, the
strategy's verdicts so far (accepted, rejected) and when the instructions went out. A renderer
shows it: a rich progress bar when the log is a terminal (``ProgressBar``), otherwise plain log
lines (``ProgressLines``), at most one per ``interval`` seconds or per ``step`` of the sampled
sites, whichever comes first, and one line when the round closes (CI logs, files).

``server.run_loop`` opens a ``RoundWatch`` around each round's training (``watching``) and
``server.reply_stream.stream_replies`` reports to whatever watch is open (``current_watch``):
the push, each reply, and each pull. The watch is found through a context variable rather than
passed down, so the round modes between the two (``server.round_modes``) need not carry it; a
mode that does not stream (SecAgg+) shows no progress.

Verdicts: a streamed round (``FedRobustMerge._aggregate_streamed``) checks each reply before the
next is pulled, so the counts follow the replies; a buffered round (robust selection, DP) checks
them all after the last one, so accepted and rejected stay 0 until the closing line.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from logging import INFO
from typing import IO, Protocol

from flwr.supercore import log
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# A plain line at least this often while a round waits (seconds) ...
LINE_INTERVAL_SECONDS = 10.0
# ... and whenever this fraction of the sampled sites has answered since the last line.
LINE_STEP = 0.1

Clock = Callable[[], float]
Verdicts = Callable[[], tuple[int, int]]


@dataclass(frozen=True)
class RoundProgress:
    """One round's wait for replies: ``sampled`` sites asked at ``opened_at`` (clock seconds),
    ``answered`` replies in, ``accepted`` / ``rejected`` of them by the strategy's verdict."""

    server_round: int
    sampled: int
    opened_at: float
    answered: int = 0
    accepted: int = 0
    rejected: int = 0

    def answer(self) -> RoundProgress:
        """One more reply in."""
        return replace(self, answered=self.answered + 1)

    def judged(self, accepted: int, rejected: int) -> RoundProgress:
        """The strategy's verdicts so far."""
        return replace(self, accepted=accepted, rejected=rejected)

    def open_seconds(self, now: float) -> float:
        """How long the round has been open at ``now``."""
        return max(0.0, now - self.opened_at)

    def line(self, now: float) -> str:
        """The plain-text form of the state at ``now``."""
        return (
            f"round {self.server_round}: {self.answered}/{self.sampled} sites answered "
            f"({self.accepted} accepted, {self.rejected} rejected), "
            f"open {self.open_seconds(now):.0f}s"
        )

    def closing_line(self, now: float) -> str:
        """The line that closes the round at ``now`` (sites without a reply named)."""
        return (
            f"round {self.server_round} closed after {self.open_seconds(now):.1f}s: "
            f"{self.answered}/{self.sampled} sites answered ({self.accepted} accepted, "
            f"{self.rejected} rejected, {self.sampled - self.answered} no reply)"
        )


class Renderer(Protocol):
    """Shows a round's progress: ``show`` whenever it may have changed, ``close`` once."""

    def show(self, progress: RoundProgress, now: float) -> None: ...

    def close(self, progress: RoundProgress, now: float) -> None: ...


class ProgressLines:
    """Plain log lines, rate-limited: one when ``interval`` seconds have passed since the last
    line, or when ``step`` of the sampled sites (at least one site) have answered since it;
    one when the round closes."""

    def __init__(
        self,
        interval: float = LINE_INTERVAL_SECONDS,
        step: float = LINE_STEP,
        emit: Callable[[str], None] | None = None,
    ) -> None:
        self.interval = interval
        self.step = step
        self.emit = emit if emit is not None else _log_line
        self._last: tuple[float, int] | None = None  # (time, answered) of the last line

    def show(self, progress: RoundProgress, now: float) -> None:
        last_time, last_answered = self._last or (progress.opened_at, 0)
        every = max(1, math.ceil(self.step * progress.sampled))
        if now - last_time >= self.interval or progress.answered - last_answered >= every:
            self.emit(progress.line(now))
            self._last = (now, progress.answered)

    def close(self, progress: RoundProgress, now: float) -> None:
        self.emit(progress.closing_line(now))


class ProgressBar:
    """A rich progress bar on ``stream`` (a terminal): replies in of sampled, the verdicts, and
    the time the round has been open; left on screen, complete, when the round closes."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._bar: Progress | None = None

    def show(self, progress: RoundProgress, now: float) -> None:
        if self._bar is None:
            self._bar = Progress(
                TextColumn(f"round {progress.server_round}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("sites answered, {task.fields[verdicts]}"),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
            )
            self._bar.add_task("replies", total=progress.sampled, verdicts="")
            self._bar.start()
        self._bar.update(
            self._bar.task_ids[0],
            completed=progress.answered,
            verdicts=f"{progress.accepted} accepted, {progress.rejected} rejected",
        )

    def close(self, progress: RoundProgress, now: float) -> None:
        self.show(progress, now)
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def renderer_for(
    stream: IO[str] | None = None, isatty: Callable[[], bool] | None = None
) -> Renderer:
    """A bar when the log stream (default ``sys.stderr``) is a terminal, else plain lines."""
    stream = stream if stream is not None else sys.stderr
    on_terminal = isatty if isatty is not None else stream.isatty
    return ProgressBar(stream) if on_terminal() else ProgressLines()


class ReplyWatch(Protocol):
    """What ``stream_replies`` reports to: the push, each reply in, each pull done."""

    def opened(self, sampled: int) -> None: ...

    def arrived(self) -> None: ...

    def update(self) -> None: ...


class RoundWatch:
    """Round ``server_round``'s progress, kept from the reply stream's reports and the
    strategy's ``verdicts`` (accepted, rejected so far), shown by ``renderer``."""

    def __init__(
        self,
        server_round: int,
        renderer: Renderer,
        *,
        verdicts: Verdicts | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.server_round = server_round
        self.renderer = renderer
        self.verdicts = verdicts
        self.clock = clock
        self.progress: RoundProgress | None = None  # None until the instructions go out

    def opened(self, sampled: int) -> None:
        """The instructions went out to ``sampled`` sites."""
        self.progress = RoundProgress(self.server_round, sampled, self.clock())

    def arrived(self) -> None:
        """One more reply in (shown on the next ``update``, with its verdict if streamed)."""
        if self.progress is not None:
            self.progress = self.progress.answer()

    def update(self) -> None:
        """Take the verdicts so far and show the state (the renderer decides whether)."""
        if self.progress is not None:
            self.progress = self._judged(self.progress)
            self.renderer.show(self.progress, self.clock())

    def close(self) -> None:
        """The round's last word: final verdicts, closing line or bar."""
        if self.progress is not None:
            self.progress = self._judged(self.progress)
            self.renderer.close(self.progress, self.clock())

    def _judged(self, progress: RoundProgress) -> RoundProgress:
        return progress if self.verdicts is None else progress.judged(*self.verdicts())


class _NoWatch:
    """The watch when no round is watched: reports go nowhere."""

    def opened(self, sampled: int) -> None:
        pass

    def arrived(self) -> None:
        pass

    def update(self) -> None:
        pass


_IGNORED = _NoWatch()
_CURRENT: ContextVar[ReplyWatch | None] = ContextVar("round_watch", default=None)


def current_watch() -> ReplyWatch:
    """The watch ``watching`` opened in this context (one that ignores reports if none)."""
    return _CURRENT.get() or _IGNORED


@contextmanager
def watching(watch: RoundWatch) -> Iterator[RoundWatch]:
    """Make ``watch`` the reply stream's for the block; closes it on the way out."""
    token = _CURRENT.set(watch)
    try:
        yield watch
    finally:
        _CURRENT.reset(token)
        watch.close()


def _log_line(text: str) -> None:
    log(INFO, "%s", text)
