"""The Flower ClientApp: train the global LoRA adapter on local data, reply with LoRA tensors only.

Wire format (the server relies on it)
-------------------------------------
Train instruction content:
    ``"arrays"``: ArrayRecord of the global LoRA tensors (keys as ``client.model.get_lora_state``);
    ``"config"``: ConfigRecord with ``"server-round"`` (int) and optionally ``"learning-rate"``.
Train reply content:
    ``"arrays"``: ArrayRecord of the trained LoRA tensors, fp32, exactly the received keys, in
    the received order, with the received shapes;
    ``"metrics"``: MetricRecord ``{"num-examples": int, "train-loss": float}``.
    With run-config ``uplink = "sparse"``, ``"arrays"`` holds the pruned delta instead and a
    ConfigRecord ``"config"`` says ``{"uplink": "sparse"}`` (``client.uplink``).
Evaluate instruction content: ``"arrays"`` as above (a ``"config"`` is accepted and ignored).
Evaluate reply content:
    ``"metrics"``: MetricRecord ``{"num-examples": int, "eval-loss": float,
    "eval-accuracy": float}``.

Nothing else leaves the client: no texts, labels, label names, base weights or file paths.

With run-config ``task = "causal-lm"`` the same wire format carries a causal LM's LoRA tensors
(``client.causal_lm``); the evaluate reply then holds ``{"num-examples", "eval-loss",
"eval-perplexity"}``, the loss being over response tokens of the site's held-out examples.

Local data
----------
A real site sets node-config ``data-path`` (a JSONL or CSV file, see
``client.tasks.load_data_file``) and optionally ``eval-data-path``; without the latter, a fixed
10 % of ``data-path`` (by a hash of each text, ``client.tasks.split_holdout``) is held out for
evaluation and never trained on. Otherwise (simulation) the node trains on the default workload:
task ``seen-tasks[partition-id % len(seen-tasks)]``, a class-balanced subset of
``train-examples`` of its train split, redrawn each round with seed
``seed + partition-id + server-round``; it evaluates on ``eval-examples`` of its dev split
(seed ``seed``, the same subset every round).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from logging import INFO
from typing import Any, Literal

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from peft import PeftModel

from client import causal_lm
from client.config import read_float, read_int, read_names, read_str
from client.model import LoraSettings, build_lora_model, get_lora_state, set_lora_state
from client.privacy import clip_when_asked
from client.secure_aggregation import secure_aggregation_mod
from client.tasks import (
    TASK_NAMES,
    TaskData,
    balanced_subset,
    load_data_file,
    load_task,
    split_holdout,
)
from client.training import TrainSettings, evaluate_lora, train_lora
from client.uplink import reply_records

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"

app = ClientApp(mods=[clip_when_asked])

# One model per process, shared by the nodes a simulation worker runs; the lock keeps a
# (load global adapter, train, read adapter) sequence from interleaving with another.
_MODEL_LOCK = threading.Lock()


@dataclass(frozen=True)
class WorkloadSettings:
    """Which local data a node uses (run-config ``seed``, ``train-examples``, ``eval-examples``,
    ``seen-tasks``)."""

    seed: int = 0
    train_examples: int = 512
    eval_examples: int = 256
    seen_tasks: tuple[str, ...] = ("banking77", "stackoverflow", "sentiment", "hwu64")

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> WorkloadSettings:
        """Read and validate the keys; absent keys take the defaults above."""
        default = cls()
        return cls(
            seed=read_int(config, "seed", default.seed, minimum=0),
            train_examples=read_int(config, "train-examples", default.train_examples, minimum=1),
            eval_examples=read_int(config, "eval-examples", default.eval_examples, minimum=1),
            seen_tasks=read_names(
                config, "seen-tasks", ",".join(default.seen_tasks), allowed=TASK_NAMES
            ),
        )


@lru_cache(maxsize=1)
def _cached_model(settings: LoraSettings) -> PeftModel:
    """The LoRA model for ``settings``, built once per process (its adapters are overwritten
    with the global ones before every use)."""
    return build_lora_model(settings, seed=0)


def _partition_id(context: Context) -> int | None:
    value = context.node_config.get("partition-id")
    if value is None:
        return None
    return read_int(context.node_config, "partition-id", 0, minimum=0, source="node-config")


def _local_data(
    context: Context,
    workload: WorkloadSettings,
    split: Literal["train", "dev"],
    *,
    limit: int,
    seed: int,
) -> TaskData:
    """The node's training or evaluation examples (see the module docstring)."""
    node = context.node_config
    if "data-path" in node:
        data_path = read_str(node, "data-path", "", source="node-config")
        eval_path = read_str(node, "eval-data-path", "", source="node-config")
        if eval_path:
            data = load_data_file(data_path if split == "train" else eval_path)
        else:
            train_part, dev_part = split_holdout(load_data_file(data_path))
            data = train_part if split == "train" else dev_part
        return balanced_subset(data, limit, seed=seed)
    partition = _partition_id(context)
    if partition is None:
        raise ValueError(
            "node-config has neither 'data-path' (a site's own data file) nor 'partition-id' "
            "(a simulated node of the default workload)"
        )
    task = workload.seen_tasks[partition % len(workload.seen_tasks)]
    return load_task(task, split, limit=limit, seed=seed)


def _global_adapter(msg: Message) -> dict[str, torch.Tensor]:
    """The global LoRA tensors of an instruction, as fp32 CPU tensors in the received order."""
    records = msg.content.array_records
    if ARRAYS_KEY not in records:
        raise ValueError(
            f"the instruction has no ArrayRecord {ARRAYS_KEY!r} with the global LoRA tensors "
            f"(records present: {sorted(msg.content.keys())})"
        )
    state = records[ARRAYS_KEY].to_torch_state_dict()
    return {key: tensor.to(dtype=torch.float32) for key, tensor in state.items()}


def _message_config(msg: Message) -> ConfigRecord:
    records = msg.content.config_records
    return records[CONFIG_KEY] if CONFIG_KEY in records else ConfigRecord()


def _train_config(msg: Message) -> tuple[int, float | None]:
    """The train instruction's ``server-round`` (required) and ``learning-rate`` (optional)."""
    config = _message_config(msg)
    if "server-round" not in config:
        raise ValueError(
            f"the train instruction's ConfigRecord {CONFIG_KEY!r} lacks 'server-round'"
        )
    server_round = read_int(config, "server-round", 0, minimum=0, source="train config")
    if "learning-rate" not in config:
        return server_round, None
    return server_round, read_float(
        config, "learning-rate", 0.0, low=0.0, low_open=True, source="train config"
    )


@app.train(mods=[secure_aggregation_mod])  # SecAgg+ stages only; other messages pass through
def train(msg: Message, context: Context) -> Message:
    """Load the global adapter, train it on local data, reply with its LoRA tensors and metrics."""
    started = time.perf_counter()
    lora = LoraSettings.from_run_config(context.run_config)
    if lora.task == "causal-lm":
        return _train_causal_lm(msg, context, lora, started)
    training = TrainSettings.from_run_config(context.run_config)
    workload = WorkloadSettings.from_run_config(context.run_config)
    server_round, learning_rate = _train_config(msg)
    if learning_rate is not None:
        training = replace(training, learning_rate=learning_rate)
    seed = workload.seed + (_partition_id(context) or 0) + server_round
    data = _local_data(context, workload, "train", limit=workload.train_examples, seed=seed)
    global_state = _global_adapter(msg)
    with _MODEL_LOCK:
        model = _cached_model(lora)
        set_lora_state(model, global_state)
        result = train_lora(model, data, training, seed=seed)
        trained = get_lora_state(model)
    records = reply_records(trained, global_state, context.run_config)
    metrics = MetricRecord({"num-examples": result.num_examples, "train-loss": result.mean_loss})
    log(
        INFO,
        "client: round %d, %s, %d examples, train-loss %.4f, %.1f s",
        server_round,
        data.name,
        result.num_examples,
        result.mean_loss,
        time.perf_counter() - started,
    )
    return Message(RecordDict({**records, METRICS_KEY: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Load the global adapter, score it on local held-out data, reply with metrics only."""
    lora = LoraSettings.from_run_config(context.run_config)
    if lora.task == "causal-lm":
        return _evaluate_causal_lm(msg, context, lora)
    training = TrainSettings.from_run_config(context.run_config)
    workload = WorkloadSettings.from_run_config(context.run_config)
    data = _local_data(context, workload, "dev", limit=workload.eval_examples, seed=workload.seed)
    global_state = _global_adapter(msg)
    with _MODEL_LOCK:
        model = _cached_model(lora)
        set_lora_state(model, global_state)
        result = evaluate_lora(model, data, training)
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "eval-loss": result.loss,
            "eval-accuracy": result.accuracy,
        }
    )
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


def _train_causal_lm(msg: Message, context: Context, lora: LoraSettings, started: float) -> Message:
    """The train handler of the causal-LM kind: same instruction and reply format."""
    settings = causal_lm.CausalLmSettings.from_run_config(context.run_config)
    server_round, learning_rate = _train_config(msg)
    if learning_rate is not None:
        settings = replace(settings, learning_rate=learning_rate)
    base_seed = read_int(context.run_config, "seed", 0, minimum=0)
    seed = base_seed + (_partition_id(context) or 0) + server_round
    examples = causal_lm.site_examples(context.node_config, context.run_config, "train")
    global_state = _global_adapter(msg)
    with causal_lm.MODEL_LOCK:
        model, tokenizer = causal_lm.shared_causal_lm(lora, settings)
        set_lora_state(model, global_state)
        result = causal_lm.train_causal_lm(model, tokenizer, examples, settings, seed=seed)
        trained = get_lora_state(model)
    records = reply_records(trained, global_state, context.run_config)
    metrics = MetricRecord({"num-examples": result.num_examples, "train-loss": result.loss})
    log(
        INFO,
        "client: round %d, causal-lm, %d examples, %d response tokens, train-loss %.4f, %.1f s",
        server_round,
        result.num_examples,
        result.num_tokens,
        result.loss,
        time.perf_counter() - started,
    )
    return Message(RecordDict({**records, METRICS_KEY: metrics}), reply_to=msg)


def _evaluate_causal_lm(msg: Message, context: Context, lora: LoraSettings) -> Message:
    """The evaluate handler of the causal-LM kind: loss and perplexity on held-out examples."""
    settings = causal_lm.CausalLmSettings.from_run_config(context.run_config)
    examples = causal_lm.site_examples(context.node_config, context.run_config, "eval")
    global_state = _global_adapter(msg)
    with causal_lm.MODEL_LOCK:
        model, tokenizer = causal_lm.shared_causal_lm(lora, settings)
        set_lora_state(model, global_state)
        result = causal_lm.evaluate_causal_lm(model, tokenizer, examples, settings)
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "eval-loss": result.loss,
            "eval-perplexity": result.perplexity,
        }
    )
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)
