"""A site's personal copy of the global adapter (run-config ``personalization``; issue 27).

With ``personalization = "local-finetune"`` a site scores, besides the global adapter, a personal
copy: the global (truncated to the site's rank, as the site starts every round) fine-tuned for
``personalization-steps`` local optimiser steps on the site's own training data, then scored on
the same held-out split as the global. The global itself is never changed, and nothing of the
copy leaves the site but its scores.

The copy is trained by the task kind's own round of local training (``TaskKind.train_round``:
``workload.training.train_lora`` for classification, ``workload.causal_lm.train_causal_lm`` for
causal-lm) under a run config that makes one round exactly the personal steps:

    local-epochs          = 1
    gradient-accumulation = 1                       (one micro-batch per optimiser step)
    train-examples        = steps x batch-size

so one pass over at most ``steps x batch-size`` of the site's training examples takes
``ceil(examples / batch-size)`` optimiser steps: ``steps`` whenever the site has that many
examples, fewer on a site with less data (the reply says how many were taken). The draw of the
examples is the kind's, seeded as a train round of the same ``server-round`` is; the learning
rate is run-config ``learning-rate``.

With ``personalization = "none"`` nothing here runs and the evaluate reply is today's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from protocol import wire
from workload.config import LOCAL_FINETUNE, SHARED_A, Reader, schema_default
from workload.kinds.base import LocalRound, Metrics, TaskKind
from workload.model import LoraSettings


@dataclass(frozen=True)
class PersonalizationSettings:
    """Run-config ``personalization`` and ``personalization-steps`` (defaults: the schema's)."""

    mode: str = schema_default("personalization", str)
    steps: int = schema_default("personalization-steps", int)

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> PersonalizationSettings:
        """Read and validate both keys; absent keys take the schema's defaults."""
        reader = Reader(config)
        return cls(
            mode=reader.choice("personalization"),
            steps=reader.integer("personalization-steps"),
        )

    @property
    def local_finetune(self) -> bool:
        """Whether the site scores a locally fine-tuned copy of the global."""
        return self.mode == LOCAL_FINETUNE

    @property
    def shared_a(self) -> bool:
        """Whether the site keeps its own LoRA B and sends only A (``client.shared_a``)."""
        return self.mode == SHARED_A


@dataclass(frozen=True)
class Personalized:
    """The personal copy's tensors, the optimiser steps that made it, and its evaluate-reply
    metrics (``PERSONALIZED_STEPS`` and each score under its personalised key)."""

    tensors: dict[str, torch.Tensor]
    steps: int
    metrics: Metrics


def finetune_run_config(run_config: Mapping[str, Any], steps: int) -> dict[str, Any]:
    """``run_config`` with one round of local training made ``steps`` optimiser steps (at most;
    see the module docstring)."""
    batch_size = Reader(run_config).integer("batch-size")
    return {
        **run_config,
        "local-epochs": 1,
        "gradient-accumulation": 1,
        "train-examples": steps * batch_size,
    }


def personal_scores(scores: Mapping[str, int | float]) -> Metrics:
    """The scores of ``scores`` (an evaluate reply's metrics) under their personalised keys
    (``wire.PERSONALIZED_SCORES``); ``num-examples`` and unknown keys are left out."""
    return {personal: scores[key] for key, personal in wire.PERSONALIZED_SCORES if key in scores}


def personalize(
    kind: TaskKind,
    lora: LoraSettings,
    run: LocalRound,
    start: Mapping[str, torch.Tensor],
    steps: int,
) -> Personalized:
    """Fine-tune a copy of ``start`` for ``steps`` local steps and score it as ``run`` scores the
    global (``kind.evaluate_local``, same held-out split). ``start`` is not changed."""
    finetune = replace(
        run, run_config=finetune_run_config(run.run_config, steps), learning_rate=None
    )
    trained = kind.train_round(lora, finetune, start)
    batch_size = Reader(run.run_config).integer("batch-size")
    taken = math.ceil(trained.num_examples / batch_size)
    scores = kind.evaluate_local(lora, run, trained.trained)
    metrics: Metrics = {wire.PERSONALIZED_STEPS: taken, **personal_scores(scores)}
    return Personalized(trained.trained, taken, metrics)
