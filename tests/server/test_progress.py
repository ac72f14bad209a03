"""Live progress of a round (server.progress): the pure state, the rate-limited plain lines on a
fake clock, the bar chosen for a terminal, the reply stream's reports, and a real round of the
run loop logging its progress.

No test reads the wall clock for its asserts: the plain lines and the stream run on a
``FakeClock``; the run-loop round asserts counts only.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import server.reply_stream
import server.run_loop
from client.app import train
from server.progress import (
    ProgressBar,
    ProgressLines,
    RoundProgress,
    RoundWatch,
    current_watch,
    renderer_for,
    watching,
)
from server.reply_stream import stream_replies
from tests.server.test_reply_stream import FakeClock, ScheduledGrid, instruction
from tests.server.test_run_loop import STREAM_CLOCK, ThreadGrid, crashing, run, slow
from tests.workload.tiny_model import save_tiny_bert, tiny_run_config

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def test_round_progress_counts_and_its_lines() -> None:
    progress = RoundProgress(server_round=3, sampled=4, opened_at=100.0)
    progress = progress.answer().answer().answer().judged(accepted=2, rejected=1)
    assert (progress.answered, progress.accepted, progress.rejected) == (3, 2, 1)
    assert progress.open_seconds(112.4) == pytest.approx(12.4)
    assert progress.open_seconds(99.0) == 0.0  # a clock read before the open: never negative
    assert progress.line(112.4) == (
        "round 3: 3/4 sites answered (2 accepted, 1 rejected), open 12s"
    )
    assert progress.closing_line(112.4) == (
        "round 3 closed after 12.4s: 3/4 sites answered (2 accepted, 1 rejected, 1 no reply)"
    )


def test_plain_lines_every_interval_or_every_step_whichever_first() -> None:
    lines: list[str] = []
    renderer = ProgressLines(interval=10.0, step=0.1, emit=lines.append)  # 20 sampled: 2 sites
    progress = RoundProgress(server_round=1, sampled=20, opened_at=0.0)
    renderer.show(progress, 5.0)  # nothing new, 5 s
    progress = progress.answer()
    renderer.show(progress, 6.0)  # 1 site (< 2), 6 s
    assert lines == []
    progress = progress.answer()
    renderer.show(progress, 7.0)  # 2 sites: a step
    assert lines == ["round 1: 2/20 sites answered (0 accepted, 0 rejected), open 7s"]
    renderer.show(progress.answer(), 16.9)  # 1 site, 9.9 s since the last line
    assert len(lines) == 1
    progress = progress.answer()
    renderer.show(progress, 17.0)  # 10 s since the last line
    assert lines[-1] == "round 1: 3/20 sites answered (0 accepted, 0 rejected), open 17s"
    renderer.show(progress, 20.0)
    assert len(lines) == 2
    renderer.close(progress.judged(2, 1), 21.0)
    assert lines[-1] == (
        "round 1 closed after 21.0s: 3/20 sites answered (2 accepted, 1 rejected, 17 no reply)"
    )


def test_a_terminal_gets_a_bar_anything_else_plain_lines() -> None:
    stream = io.StringIO()
    assert isinstance(renderer_for(stream, isatty=lambda: True), ProgressBar)
    assert isinstance(renderer_for(stream, isatty=lambda: False), ProgressLines)
    assert isinstance(renderer_for(stream), ProgressLines)  # a StringIO is no terminal

    bar = renderer_for(stream, isatty=lambda: True)
    progress = RoundProgress(server_round=2, sampled=4, opened_at=0.0).answer().answer()
    bar.show(progress, 1.0)
    bar.close(progress.judged(1, 1), 2.0)
    drawn = stream.getvalue()
    assert "round 2" in drawn and "2/4" in drawn and "1 accepted, 1 rejected" in drawn


def test_the_reply_stream_reports_each_reply_with_the_consumers_verdict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Node 2 answers at 1.5 s, node 3 never; the consumer rejects node 2, accepts the rest."""
    clock = FakeClock()
    monkeypatch.setattr(
        server.reply_stream, "time", SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep)
    )
    lines: list[str] = []
    verdicts = {"accepted": 0, "rejected": 0}
    watch = RoundWatch(
        5,
        ProgressLines(interval=1.0, step=0.5, emit=lines.append),  # 3 sampled: every 2 sites
        verdicts=lambda: (verdicts["accepted"], verdicts["rejected"]),
        clock=clock.monotonic,
    )
    grid = ScheduledGrid({1: 0.0, 2: 1.5, 3: None}, clock)
    with watching(watch):
        assert current_watch() is watch
        for reply in stream_replies(grid, [instruction(n) for n in (1, 2, 3)], 3.0, pause=0.5):
            verdicts["rejected" if reply.metadata.src_node_id == 2 else "accepted"] += 1
    assert current_watch() is not watch  # the block's end restores the previous (none)
    assert lines == [
        "round 5: 1/3 sites answered (1 accepted, 0 rejected), open 1s",  # 1 s, not a step
        "round 5: 2/3 sites answered (1 accepted, 1 rejected), open 2s",
        "round 5: 2/3 sites answered (1 accepted, 1 rejected), open 3s",
        "round 5 closed after 3.0s: 2/3 sites answered (1 accepted, 1 rejected, 1 no reply)",
    ]


def test_without_a_watch_the_stream_reports_nowhere(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(
        server.reply_stream, "time", SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep)
    )
    grid = ScheduledGrid({1: 0.0}, clock)
    assert len(list(stream_replies(grid, [instruction(1)], 1.0))) == 1


@pytest.fixture(scope="module")
def run_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return tiny_run_config(save_tiny_bert(tmp_path_factory.mktemp("tiny-bert")))


def test_a_round_of_the_run_loop_logs_its_progress(
    tmp_path: Path,
    run_config: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    flower_log: pytest.LogCaptureFixture,
) -> None:
    """Two punctual sites, one late (no reply), one crashing (rejected): the plain lines count
    the replies as they come, the closing line has the strategy's verdicts."""
    monkeypatch.setattr(server.reply_stream, "time", STREAM_CLOCK)
    monkeypatch.setattr(server.run_loop, "renderer_for", lambda: renderer_for(isatty=lambda: False))
    grid = ThreadGrid({1: train, 2: train, 3: slow(train), 4: crashing}, run_config)
    run(tmp_path, grid, 1, run_config)
    progress = [m for m in flower_log.messages if m.startswith("round 1")]
    answered = [
        int(match.group(1))
        for line in progress
        if (match := re.match(r"round 1: (\d)/4 sites answered", line))
    ]
    assert answered == sorted(answered) and answered[-1] == 3  # each reply: 4 sampled, step 1
    assert set(range(1, 4)) <= set(answered)
    assert re.fullmatch(
        r"round 1 closed after [0-9.]+s: 3/4 sites answered \(2 accepted, 1 rejected, "
        r"1 no reply\)",
        progress[-1],
    )
