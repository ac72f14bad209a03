"""The Flower ClientApp: train the global LoRA adapter on local data, reply with LoRA tensors only.

Wire format (the server relies on it; the keys are spelled once in ``protocol.wire``)
-------------------------------------------------------------------------------------
Train instruction content:
    ``"arrays"``: ArrayRecord of the global LoRA tensors (keys as
    ``workload.model.get_lora_state``);
    ``"config"``: ConfigRecord with ``"server-round"`` (int), optionally ``"learning-rate"``,
    and ``"uplink"``; with ``"uplink" = "sparse"`` the merge settings the client prunes with
    (``keep-ratio``, ``scale-quantile``, ``merge-mode``, ``fuse-weight``).
Train reply content:
    ``"arrays"``: ArrayRecord of the trained LoRA tensors, fp32, exactly the received keys, in
    the received order, with the received shapes;
    ``"metrics"``: MetricRecord ``{"num-examples": int, "train-loss": float, "lora-rank": int}``.
    The site trains at its own rank (``workload.model.site_rank``: node-config ``lora-r``, else
    run-config ``client-ranks[partition-id mod len]``, else ``lora-r``): it receives the global
    at the federation's largest rank and starts from its truncation to its own rank
    (``strategies.merging.ranks.adapter_at_rank``), so its reply's tensors have its rank.
    When the instruction says ``uplink = "sparse"``, ``"arrays"`` holds the pruned delta
    instead and a ConfigRecord ``"config"`` says ``{"uplink": "sparse"}`` (``client.uplink``).
Evaluate instruction content: ``"arrays"`` as above (a ``"config"`` is accepted and ignored).
Evaluate reply content:
    ``"metrics"``: MetricRecord ``{"num-examples": int, "eval-loss": float,
    "eval-accuracy": float}``; with run-config ``personalization = "local-finetune"`` also
    ``"personalized-steps"`` (int) and the scores of the site's personal copy,
    ``"personalized-loss"`` and ``"personalized-accuracy"`` (``client.personalization``).

Nothing else leaves the client: no texts, labels, label names, base weights or file paths.

With run-config ``task = "causal-lm"`` the same wire format carries a causal LM's LoRA tensors
(``workload.causal_lm``); the evaluate reply then holds ``{"num-examples", "eval-loss",
"eval-perplexity"}``, the loss being over response tokens of the site's held-out examples.
The handlers do what every kind shares (read the instruction, build the reply); the kind
(``workload.kinds``, looked up by run-config ``task``) trains and scores.

Local data (the classification kind, ``workload.kinds.classification``)
-----------------------------------------------------------------------
A real site sets node-config ``data-path`` (a JSONL or CSV file, see
``workload.tasks.load_data_file``) and optionally ``eval-data-path``; without the latter, a fixed
10 % of ``data-path`` (by a hash of each text, ``workload.tasks.split_holdout``) is held out for
evaluation and never trained on. Otherwise (simulation) the node trains on the default workload:
task ``seen-tasks[partition-id % len(seen-tasks)]``, a class-balanced subset of
``train-examples`` of its train split, redrawn each round with seed
``seed + partition-id + server-round``; it evaluates on ``eval-examples`` of its dev split
(seed ``seed``, the same subset every round).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from logging import INFO
from types import TracebackType
from typing import IO

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from client.personalization import PersonalizationSettings, personal_scores, personalize
from client.privacy import clip_when_asked
from client.secure_aggregation import secure_aggregation_mod
from client.shared_a import SiteBStore, own_b_shapes, shared_part, start_with_own_b
from client.uplink import reply_records
from protocol import wire
from strategies.merging.ranks import adapter_at_rank
from workload.config import read_float, read_int
from workload.kinds import get_task_kind
from workload.kinds.base import LocalRound
from workload.model import LoraSettings
from workload.training import TrainProgress, reporting_progress

app = ClientApp(mods=[clip_when_asked])

# A local-training progress line at least this often (seconds), and every this fraction of the
# steps, whichever comes first (when the log is not a terminal).
PROGRESS_INTERVAL_SECONDS = 10.0
PROGRESS_STEP = 0.1


class TrainingProgressLog:
    """The local training's progress (``workload.training.TrainProgress``) in round
    ``server_round``: a rich bar when the log stream (default ``sys.stderr``) is a terminal,
    else log lines at most one per ``interval`` seconds or per ``step`` of the steps, whichever
    comes first, and one for the last step. Use as a context manager (it closes the bar)."""

    def __init__(
        self,
        server_round: int,
        *,
        stream: IO[str] | None = None,
        isatty: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval: float = PROGRESS_INTERVAL_SECONDS,
        step: float = PROGRESS_STEP,
    ) -> None:
        self.server_round = server_round
        self.stream = stream if stream is not None else sys.stderr
        self.on_terminal = (isatty if isatty is not None else self.stream.isatty)()
        self.clock = clock
        self.interval = interval
        self.step = step
        self.bar: Progress | None = None
        self._last = (clock(), 0)  # (time, step) of the last line

    def __call__(self, progress: TrainProgress) -> None:
        if self.on_terminal:
            self._show_bar(progress)
            return
        now = self.clock()
        last_time, last_step = self._last
        every = max(1, math.ceil(self.step * progress.steps))
        if (
            progress.step == progress.steps
            or now - last_time >= self.interval
            or progress.step - last_step >= every
        ):
            log(
                INFO,
                "client: round %d training, epoch %d/%d, step %d/%d, train-loss %.4f",
                self.server_round,
                progress.epoch,
                progress.epochs,
                progress.step,
                progress.steps,
                progress.mean_loss,
            )
            self._last = (now, progress.step)

    def _show_bar(self, progress: TrainProgress) -> None:
        if self.bar is None:
            self.bar = Progress(
                TextColumn(f"client: round {self.server_round} training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("steps, epoch {task.fields[epoch]}, train-loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
            )
            self.bar.add_task("train", total=progress.steps, epoch="", loss="")
            self.bar.start()
        self.bar.update(
            self.bar.task_ids[0],
            completed=progress.step,
            epoch=f"{progress.epoch}/{progress.epochs}",
            loss=f"{progress.mean_loss:.4f}",
        )

    def __enter__(self) -> TrainingProgressLog:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _global_adapter(msg: Message) -> dict[str, torch.Tensor]:
    """The global LoRA tensors of an instruction, as fp32 CPU tensors in the received order."""
    records = msg.content.array_records
    if wire.ARRAYS not in records:
        raise ValueError(
            f"the instruction has no ArrayRecord {wire.ARRAYS!r} with the global LoRA tensors "
            f"(records present: {sorted(msg.content.keys())})"
        )
    state = records[wire.ARRAYS].to_torch_state_dict()
    return {key: tensor.to(dtype=torch.float32) for key, tensor in state.items()}


def site_start(
    global_state: dict[str, torch.Tensor], lora: LoraSettings
) -> dict[str, torch.Tensor]:
    """The adapter this site starts from: the global truncated to the site's rank
    (``adapter_at_rank``; the global itself at its own rank). A site whose rank is above the
    global's is refused: the server keeps the global at the largest rank in use."""
    a_keys = [key for key in global_state if ".lora_A." in key]
    if not a_keys:
        return global_state  # set_lora_state says what is missing
    global_rank = int(global_state[a_keys[0]].shape[0])
    if lora.r == global_rank:
        return global_state
    if lora.r > global_rank:
        raise ValueError(
            f"this site's LoRA rank {lora.r} (node-config 'lora-r', or run-config "
            f"'client-ranks') is above the global adapter's rank {global_rank}; the server keeps "
            "the global at max(client-ranks) (or lora-r): list this rank in run-config "
            "'client-ranks', or lower the node's 'lora-r'"
        )
    return adapter_at_rank(global_state, lora.r).tensors


def _own_b_store(context: Context) -> SiteBStore | None:
    """Where this site keeps its own LoRA B under personalization "shared-a"; None otherwise."""
    if not PersonalizationSettings.from_run_config(context.run_config).shared_a:
        return None
    return SiteBStore(context)


def _message_config(msg: Message) -> ConfigRecord:
    records = msg.content.config_records
    return records[wire.CONFIG] if wire.CONFIG in records else ConfigRecord()


def _train_config(msg: Message) -> tuple[int, float | None]:
    """The train instruction's ``server-round`` (required) and ``learning-rate`` (optional)."""
    config = _message_config(msg)
    if wire.SERVER_ROUND not in config:
        raise ValueError(
            f"the train instruction's ConfigRecord {wire.CONFIG!r} lacks {wire.SERVER_ROUND!r}"
        )
    server_round = read_int(config, wire.SERVER_ROUND, 0, minimum=0, source="train config")
    if wire.LEARNING_RATE not in config:
        return server_round, None
    return server_round, read_float(
        config, wire.LEARNING_RATE, 0.0, low=0.0, low_open=True, source="train config"
    )


@app.train(mods=[secure_aggregation_mod])  # SecAgg+ stages only; other messages pass through
def train(msg: Message, context: Context) -> Message:
    """Load the global adapter, train it on local data, reply with its LoRA tensors and metrics."""
    started = time.perf_counter()
    lora = LoraSettings.for_site(context.run_config, context.node_config)
    kind = get_task_kind(lora.task)
    server_round, learning_rate = _train_config(msg)
    run = LocalRound(context.run_config, context.node_config, server_round, learning_rate)
    start = site_start(_global_adapter(msg), lora)
    own_b = _own_b_store(context)
    if own_b is not None:
        start = start_with_own_b(start, own_b.load(own_b_shapes(start)))
    # Local training's progress in the log (classification kind: workload.training.train_lora).
    with TrainingProgressLog(server_round) as progress, reporting_progress(progress):
        result = kind.train_round(lora, run, start)
    if own_b is None:
        records = reply_records(result.trained, start, _message_config(msg))
    else:  # shared-a: keep the trained B, send the rest
        own_b.save({key: result.trained[key] for key in own_b_shapes(start)})
        records = reply_records(
            shared_part(result.trained), shared_part(start), _message_config(msg)
        )
    metrics = MetricRecord(
        {
            wire.NUM_EXAMPLES: result.num_examples,
            wire.TRAIN_LOSS: result.train_loss,
            wire.LORA_RANK: lora.r,
        }
    )
    log(
        INFO,
        "client: round %d, %s, %d examples, train-loss %.4f, %.1f s",
        server_round,
        result.summary,
        result.num_examples,
        result.train_loss,
        time.perf_counter() - started,
    )
    return Message(RecordDict({**records, wire.METRICS: metrics}), reply_to=msg)


def _evaluate_round(msg: Message) -> int:
    """The evaluate instruction's ``server-round`` (0 when absent): seeds the personal copy's
    training as a train round of the same number is seeded."""
    config = _message_config(msg)
    if wire.SERVER_ROUND not in config:
        return 0
    return read_int(config, wire.SERVER_ROUND, 0, minimum=0, source="evaluate config")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Load the global adapter, score it (truncated to this site's rank) on local held-out data,
    reply with metrics only.

    With run-config ``personalization = "local-finetune"`` the site also fine-tunes a copy of
    that adapter for ``personalization-steps`` local steps on its training data and scores it on
    the same held-out data (``client.personalization``); the reply adds ``personalized-steps``
    and the copy's scores (``personalized-loss``, ``personalized-accuracy`` or
    ``personalized-perplexity``), and one log line compares them with the global's."""
    lora = LoraSettings.for_site(context.run_config, context.node_config)
    personalization = PersonalizationSettings.from_run_config(context.run_config)
    kind = get_task_kind(lora.task)
    run = LocalRound(context.run_config, context.node_config)
    start = site_start(_global_adapter(msg), lora)
    scores = kind.evaluate_local(lora, run, start)
    values = dict(scores)
    own_b = _own_b_store(context)
    if own_b is not None:  # shared-a: the global A with this site's own B
        kept = own_b.load(own_b_shapes(start))
        own_scores = kind.evaluate_local(lora, run, start_with_own_b(start, kept))
        values.update(personal_scores(own_scores))
        log(
            INFO,
            "client: global vs personalised (shared-a, %s B): %s",
            "own" if kept is not None else "no own yet, the global's",
            ", ".join(
                f"{key} {scores[key]:.4f} -> {own_scores[key]:.4f}"
                for key, _ in wire.PERSONALIZED_SCORES
                if key in scores and key in own_scores
            ),
        )
    if personalization.local_finetune:
        server_round = _evaluate_round(msg)
        personal_run = replace(run, server_round=server_round)
        personal = personalize(kind, lora, personal_run, start, personalization.steps)
        values.update(personal.metrics)
        log(
            INFO,
            "client: round %d, global vs personalised (%d local steps): %s",
            server_round,
            personal.steps,
            ", ".join(
                f"{key} {scores[key]:.4f} -> {personal.metrics[name]:.4f}"
                for key, name in wire.PERSONALIZED_SCORES
                if key in scores and name in personal.metrics
            ),
        )
    metrics = MetricRecord({name: value for name, value in values.items()})
    return Message(RecordDict({wire.METRICS: metrics}), reply_to=msg)
