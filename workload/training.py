"""Local training and evaluation of the LoRA adapters, with no task head.

A text is classified by comparing its sentence embedding with the embeddings of its task's label
names, both produced by the same LoRA-adapted encoder:

    e(x)        = normalise(mean over unmasked tokens of last_hidden_state(x))      (d,)
    logits[c]   = cos(e(text), e(label_name[c])) / temperature                       (C,)
    loss        = cross_entropy(logits, label)

Gradients flow through both embeddings, so the adapters learn to move texts towards their label
names and away from the others. Because the only trainable tensors are LoRA factors, every client
update is mergeable, clients with different label sets (tasks) share one model, and a task never
trained on is still scored from its label names.

Training is deterministic for a given seed on a given machine: the example order comes from a
seeded generator and dropout from the seeded torch RNG, forked so the caller's RNG state is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch.nn import functional
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from workload.config import Reader, read_float, read_int
from workload.model import ADAPTER_NAME, trainable_parameters
from workload.tasks import TaskData

# Texts are cut to this many characters per token of max_length before tokenising: a word
# piece covers at least one character, so the cut never changes the truncated token sequence of
# ordinary text, and 20NG posts of 750k characters do not cost a full tokenisation.
_CHARS_PER_TOKEN = 32
# Gradient-norm clip per step: keeps early steps stable at temperature 0.05 (logits up to 20).
_MAX_GRAD_NORM = 1.0
# Batches per window of the length grouping in train_lora (see _length_grouped_batches).
_GROUP_WINDOW = 16
# Label names per forward pass when embedding them.
_LABEL_CHUNK = 64


@dataclass(frozen=True)
class TrainSettings:
    """Local training hyperparameters.

    Parameters
    ----------
    learning_rate : float (default: 5e-4)
        AdamW step size for the LoRA factors.
    local_epochs : int (default: 1)
        Passes over the client's examples per round.
    batch_size : int (default: 32)
        Texts per step (all label names of the task are embedded in every step).
    temperature : float (default: 0.05)
        Divides the cosine similarities before the softmax.
    max_length : int (default: 64)
        Tokens per text (and per label name) after truncation.
    train_factors : str (default: "ab")
        ``"ab"`` trains both LoRA factors; ``"b"`` freezes every ``lora_A`` and trains only
        ``lora_B`` (FFA-LoRA; ``workload.model.trainable_parameters``).
    """

    learning_rate: float = 5e-4
    local_epochs: int = 1
    batch_size: int = 32
    temperature: float = 0.05
    max_length: int = 64
    train_factors: str = "ab"

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> TrainSettings:
        """Read ``learning-rate``, ``local-epochs``, ``batch-size``, ``temperature``,
        ``max-length`` and ``train-factors``.

        Absent keys take the defaults above; a wrong type or range raises ValueError naming the
        key and the allowed values.
        """
        default = cls()
        return cls(
            learning_rate=read_float(
                config, "learning-rate", default.learning_rate, low=0.0, low_open=True
            ),
            local_epochs=read_int(config, "local-epochs", default.local_epochs, minimum=1),
            batch_size=read_int(config, "batch-size", default.batch_size, minimum=1),
            temperature=read_float(
                config, "temperature", default.temperature, low=0.0, low_open=True
            ),
            max_length=read_int(config, "max-length", default.max_length, minimum=4, maximum=8192),
            train_factors=Reader(config).choice("train-factors", default=default.train_factors),
        )


@dataclass(frozen=True)
class TrainResult:
    """What one call of ``train_lora`` did.

    ``num_examples`` is the number of distinct examples (the weight of this client's update);
    ``mean_loss`` the training loss averaged over every example seen in every local epoch.
    """

    num_examples: int
    mean_loss: float


@dataclass(frozen=True)
class TrainProgress:
    """Where ``train_lora`` is, reported after every optimiser step.

    ``step`` of ``steps`` counts the steps of all local epochs together (``epoch`` is 1-based,
    of ``epochs``); ``mean_loss`` averages the training loss over the ``examples`` seen so far.
    """

    epoch: int
    epochs: int
    step: int
    steps: int
    examples: int
    mean_loss: float


ProgressCallback = Callable[[TrainProgress], None]
# The callback train_lora reports to when its caller passes none: set by a caller that does not
# call train_lora itself (the ClientApp, through the task kind) with ``reporting_progress``.
_PROGRESS: ContextVar[ProgressCallback | None] = ContextVar("train_progress", default=None)


@contextmanager
def reporting_progress(callback: ProgressCallback) -> Iterator[None]:
    """Within the block, ``train_lora`` calls without a ``progress`` argument report to
    ``callback``."""
    token = _PROGRESS.set(callback)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy and accuracy over ``num_examples`` examples."""

    num_examples: int
    loss: float
    accuracy: float


@lru_cache(maxsize=4)
def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of the model at ``path``, loaded once per process (offline)."""
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return tokenizer


def model_path(model: torch.nn.Module) -> str:
    """Where the base model of a LoRA model was loaded from (its tokenizer lives there too)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping) or ADAPTER_NAME not in configs:
        raise ValueError("expected a PEFT model built with workload.model.build_lora_model")
    path = configs[ADAPTER_NAME].base_model_name_or_path
    if not isinstance(path, str) or not path:
        raise ValueError("the LoRA model's config does not say where its base model came from")
    return path


def _token_ids(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> list[list[int]]:
    """Token ids of each text (with the special tokens), truncated to ``max_length``."""
    limit = max_length * _CHARS_PER_TOKEN
    encoded = tokenizer([text[:limit] for text in texts], truncation=True, max_length=max_length)
    ids: list[list[int]] = encoded["input_ids"]
    return ids


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id
    if not isinstance(pad, int):
        raise ValueError("the tokenizer has no padding token; use a model whose tokenizer has one")
    return pad


def _collate(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (n, longest sequence)."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def embed(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Unit-length sentence embeddings (n, d): mean of the token states under the attention mask."""
    hidden = model(**batch).last_hidden_state  # (n, L, d)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (n, L, 1)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return functional.normalize(pooled, dim=-1)


def _embed_sequences(
    model: torch.nn.Module, sequences: Sequence[Sequence[int]], pad_id: int, chunk: int
) -> torch.Tensor:
    """Embeddings (n, d) of token sequences, in their order, computed in length-sorted chunks.

    Sorting by length before padding cuts the padded tokens (which cost as much as real ones)
    to a few per sequence; the embedding of a sequence does not depend on its chunk.
    """
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    parts = [
        embed(model, _collate([sequences[i] for i in order[start : start + chunk]], pad_id))
        for start in range(0, len(order), chunk)
    ]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return torch.cat(parts)[inverse]


def _length_grouped_batches(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    """One epoch of batches: a seeded shuffle, sorted by length within windows, batches shuffled.

    Each window of ``_GROUP_WINDOW`` batches' worth of shuffled examples is sorted by token
    length (a stable sort: ties keep their random order) and cut into batches, so a batch pads
    to about its own length rather than to the longest text of the epoch; the batch order is
    then shuffled again.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * _GROUP_WINDOW
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        group = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def _check_data(data: TaskData) -> None:
    if not data.texts:
        raise ValueError(f"task {data.name!r}: no examples")
    if len(data.texts) != len(data.labels):
        raise ValueError(
            f"task {data.name!r}: {len(data.texts)} texts but {len(data.labels)} labels"
        )
    classes = len(data.label_names)
    bad = [label for label in data.labels if not 0 <= label < classes]
    if bad:
        raise ValueError(
            f"task {data.name!r}: label {bad[0]} outside [0, {classes}) ({classes} label names)"
        )


def train_lora(
    model: torch.nn.Module,
    data: TaskData,
    settings: TrainSettings,
    *,
    seed: int,
    progress: ProgressCallback | None = None,
) -> TrainResult:
    """Train the LoRA factors of ``model`` on ``data`` in place (CPU, fp32).

    AdamW (no weight decay, so the update is only what the data asks for) over the trainable
    parameters, which are the LoRA factors of a model from ``build_lora_model`` (only the
    ``lora_B`` ones with ``settings.train_factors = "b"``: every ``lora_A`` then stays exactly
    as it came); a fresh optimizer per call, as every round starts from the global adapter.
    Each local epoch visits the examples in a new seeded order. Same model state, data, settings
    and seed give the same result. ``progress`` (default: the one ``reporting_progress`` set,
    else none) is called with a ``TrainProgress`` after every step; it decides what to show.
    """
    _check_data(data)
    tokenizer = load_tokenizer(model_path(model))
    pad_id = _pad_id(tokenizer)
    label_ids = _token_ids(tokenizer, data.label_names, settings.max_length)
    text_ids = _token_ids(tokenizer, data.texts, settings.max_length)
    lengths = [len(ids) for ids in text_ids]
    targets = torch.tensor(data.labels, dtype=torch.long)
    order_generator = torch.Generator().manual_seed(seed)
    loss_sum, seen, step = 0.0, 0, 0
    report = progress if progress is not None else _PROGRESS.get()
    steps = settings.local_epochs * math.ceil(len(text_ids) / settings.batch_size)
    was_training = model.training
    with trainable_parameters(model, settings.train_factors) as parameters:
        optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)
        model.train()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for epoch in range(1, settings.local_epochs + 1):
                    for positions in _length_grouped_batches(
                        lengths, settings.batch_size, order_generator
                    ):
                        texts = embed(model, _collate([text_ids[i] for i in positions], pad_id))
                        labels = _embed_sequences(model, label_ids, pad_id, _LABEL_CHUNK)
                        logits = texts @ labels.T / settings.temperature
                        loss = functional.cross_entropy(logits, targets[positions])
                        if not torch.isfinite(loss):
                            raise FloatingPointError(
                                f"task {data.name!r}: the training loss became {float(loss)}; "
                                "lower learning-rate or raise temperature"
                            )
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()  # type: ignore[no-untyped-call]
                        torch.nn.utils.clip_grad_norm_(parameters, _MAX_GRAD_NORM)
                        optimizer.step()
                        loss_sum += float(loss.detach()) * len(positions)
                        seen += len(positions)
                        step += 1
                        if report is not None:
                            report(
                                TrainProgress(
                                    epoch=epoch,
                                    epochs=settings.local_epochs,
                                    step=step,
                                    steps=steps,
                                    examples=seen,
                                    mean_loss=loss_sum / seen,
                                )
                            )
        finally:
            model.train(was_training)
    return TrainResult(num_examples=len(data.texts), mean_loss=loss_sum / seen)


def evaluate_lora(model: torch.nn.Module, data: TaskData, settings: TrainSettings) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` on ``data`` (eval mode, no gradients).

    Uses ``temperature``, ``max_length`` and ``batch_size`` of ``settings``; the model's mode is
    restored afterwards.
    """
    logits = example_logits(model, data, settings)
    targets = torch.tensor(data.labels, dtype=torch.long)
    loss_sum = float(functional.cross_entropy(logits, targets, reduction="sum"))
    correct = int((logits.argmax(dim=-1) == targets).sum())
    count = len(data.texts)
    return EvalResult(num_examples=count, loss=loss_sum / count, accuracy=correct / count)


def example_logits(model: torch.nn.Module, data: TaskData, settings: TrainSettings) -> torch.Tensor:
    """The logits (n, C) of every example of ``data``, in its order (eval mode, no gradients).

    What ``evaluate_lora`` scores; per-example results (e.g. the quality benchmark's paired
    bootstrap over test examples) read them directly. The model's mode is restored afterwards.
    """
    _check_data(data)
    tokenizer = load_tokenizer(model_path(model))
    pad_id = _pad_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            labels = _embed_sequences(
                model,
                _token_ids(tokenizer, data.label_names, settings.max_length),
                pad_id,
                _LABEL_CHUNK,
            )
            texts = _embed_sequences(
                model,
                _token_ids(tokenizer, data.texts, settings.max_length),
                pad_id,
                settings.batch_size,
            )
            logits = texts @ labels.T / settings.temperature
    finally:
        model.train(was_training)
    return logits
