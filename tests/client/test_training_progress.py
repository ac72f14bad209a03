"""The client's local-training progress: train_lora's optional callback, and the ClientApp's
log lines (plain, rate-limited on a fake clock) or bar (on a terminal)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from client.app import TrainingProgressLog, train
from protocol.wire import SERVER_ROUND
from tests.client.test_app import context, instruction
from tests.workload.tiny_model import tiny_run_config
from workload.model import LoraSettings, build_lora_model, initial_adapter
from workload.tasks import load_task
from workload.training import TrainProgress, TrainSettings, reporting_progress, train_lora


def steps(total: int, epochs: int = 1) -> list[TrainProgress]:
    per_epoch = total // epochs
    return [
        TrainProgress(
            epoch=(step - 1) // per_epoch + 1,
            epochs=epochs,
            step=step,
            steps=total,
            examples=8 * step,
            mean_loss=1.0 / step,
        )
        for step in range(1, total + 1)
    ]


def test_plain_lines_every_interval_or_step_fraction_and_the_last_step(
    flower_log: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    progress = TrainingProgressLog(
        4, isatty=lambda: False, clock=lambda: now[0], interval=10.0, step=0.25
    )  # 20 steps: a line every 5 steps, or 10 s
    for report in steps(20, epochs=2):
        now[0] += 3.0 if report.step <= 4 else 0.1  # steps 1-4: 3 s each, then fast
        progress(report)
    lines = [m for m in flower_log.messages if m.startswith("client: round 4 training")]
    # step 4 at 12 s (interval), then 9 (5 steps later), 14, 19, and the last step
    assert [line.split(", ")[2] for line in lines] == [
        "step 4/20",
        "step 9/20",
        "step 14/20",
        "step 19/20",
        "step 20/20",
    ]
    assert lines[-1] == "client: round 4 training, epoch 2/2, step 20/20, train-loss 0.0500"


def test_a_terminal_gets_a_bar_and_no_log_lines(flower_log: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    with TrainingProgressLog(2, stream=stream, isatty=lambda: True) as progress:
        for report in steps(4):
            progress(report)
        assert progress.bar is not None
    assert progress.bar is None  # closed on the way out
    assert "client: round 2 training" in stream.getvalue() and "4/4" in stream.getvalue()
    assert not [m for m in flower_log.messages if "training, epoch" in m]


def test_train_lora_reports_every_step_to_its_callback_only_when_asked(
    tiny_model_dir: Path,
) -> None:
    config = tiny_run_config(tiny_model_dir)
    lora = LoraSettings.from_run_config(config)
    data = load_task("mcid", "train", limit=20, seed=0)
    assert len(data.texts) == 20
    settings = TrainSettings(batch_size=8, local_epochs=2, max_length=16)
    model = build_lora_model(lora)
    reports: list[TrainProgress] = []
    result = train_lora(model, data, settings, seed=0, progress=reports.append)
    # 20 examples in batches of 8: 3 steps per epoch, 2 epochs
    assert [(r.epoch, r.step, r.steps) for r in reports] == [
        (1, 1, 6), (1, 2, 6), (1, 3, 6), (2, 4, 6), (2, 5, 6), (2, 6, 6),
    ]  # fmt: skip
    assert reports[-1].examples == 40
    assert reports[-1].mean_loss == pytest.approx(result.mean_loss)

    routed: list[TrainProgress] = []
    train_lora(model, data, settings, seed=0)  # no callback, none set: nothing reported
    with reporting_progress(routed.append):
        train_lora(model, data, settings, seed=0)
    assert [r.step for r in routed] == [1, 2, 3, 4, 5, 6]
    train_lora(model, data, settings, seed=0)  # outside the block again
    assert len(routed) == 6


def test_the_client_app_logs_its_training_progress(
    tiny_model_dir: Path, flower_log: pytest.LogCaptureFixture
) -> None:
    config: dict[str, Any] = tiny_run_config(tiny_model_dir)
    adapter = initial_adapter(LoraSettings.from_run_config(config), seed=0)
    node = context(config, **{"partition-id": 0, "num-partitions": 2})
    train(instruction(adapter, "train", {SERVER_ROUND: 3}), node)
    lines = [m for m in flower_log.messages if m.startswith("client: round 3 training")]
    # train-examples 16, batch-size 8: 2 steps, each a 10 % step of the round
    assert [line.split(", ")[2] for line in lines] == ["step 1/2", "step 2/2"]
