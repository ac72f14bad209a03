"""The causal-LM kind (run-config ``task = "causal-lm"``): instruction tuning of a causal LM.

``AutoModelForCausalLM`` with LoRA (PEFT ``CAUSAL_LM``, recorded in ``adapter_config.json``),
trained on the response tokens of a site's JSONL examples (``workload.causal_lm``); the evaluate
reply holds ``num-examples``, ``eval-loss`` and ``eval-perplexity``. The server scores the global
adapter only on a file of its own (run-config ``server-eval-data``); there are no seen or unseen
tasks to plot.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import replace
from logging import INFO
from typing import Any

import torch
from flwr.common import log
from peft import TaskType
from transformers import AutoModelForCausalLM

from protocol import wire
from workload.causal_lm import (
    CausalLmResult,
    CausalLmSettings,
    build_causal_lm,
    evaluate_causal_lm,
    site_examples,
    train_causal_lm,
)
from workload.evaluation import CausalLmEvaluator
from workload.kinds.base import (
    Evaluate,
    LoadedModel,
    LocalRound,
    LocalTraining,
    Metrics,
    ServerWorkload,
    TaskKind,
)
from workload.kinds.registry import register_task_kind
from workload.model import LoraSettings, get_lora_state


def _model_settings(run_config: Mapping[str, Any]) -> CausalLmSettings:
    """Only the settings that shape the loaded model (precision, quantization, checkpointing)."""
    settings = CausalLmSettings.from_run_config(run_config)
    return CausalLmSettings(
        precision=settings.precision,
        quantization=settings.quantization,
        gradient_checkpointing=settings.gradient_checkpointing,
    )


@register_task_kind("causal-lm")
class CausalLm(TaskKind):
    """Instruction tuning of a causal language model on each site's JSONL examples."""

    peft_task_type = TaskType.CAUSAL_LM
    records_task_type = True
    base_model_class = AutoModelForCausalLM

    def model_key(self, lora: LoraSettings, run_config: Mapping[str, Any]) -> Hashable:
        """The LoRA settings and the settings that shape the model (not the training ones)."""
        return lora, _model_settings(run_config)

    def load_model(self, lora: LoraSettings, run_config: Mapping[str, Any]) -> LoadedModel:
        """``build_causal_lm`` (seed 0: the adapters are overwritten before every use)."""
        model, tokenizer = build_causal_lm(lora, _model_settings(run_config))
        return LoadedModel(model, tokenizer)

    def train_round(
        self, lora: LoraSettings, run: LocalRound, global_state: Mapping[str, torch.Tensor]
    ) -> LocalTraining:
        """``train_causal_lm`` on the site's training examples for this round."""
        settings = CausalLmSettings.from_run_config(run.run_config)
        if run.learning_rate is not None:
            settings = replace(settings, learning_rate=run.learning_rate)
        seed = run.seed()
        examples = site_examples(run.node_config, run.run_config, "train")

        def train(model: LoadedModel) -> tuple[CausalLmResult, dict[str, torch.Tensor]]:
            result = train_causal_lm(model.peft, model.tokenizer, examples, settings, seed=seed)
            return result, get_lora_state(model.peft)

        result, trained = self.on_shared_model(lora, run.run_config, global_state, train)
        summary = f"causal-lm, {result.num_tokens} response tokens"
        return LocalTraining(trained, result.num_examples, result.loss, summary)

    def evaluate_local(
        self, lora: LoraSettings, run: LocalRound, global_state: Mapping[str, torch.Tensor]
    ) -> Metrics:
        """``num-examples``, ``eval-loss`` and ``eval-perplexity`` on the held-out examples."""
        settings = CausalLmSettings.from_run_config(run.run_config)
        examples = site_examples(run.node_config, run.run_config, "eval")
        result = self.on_shared_model(
            lora,
            run.run_config,
            global_state,
            lambda model: evaluate_causal_lm(model.peft, model.tokenizer, examples, settings),
        )
        return {
            wire.NUM_EXAMPLES: result.num_examples,
            wire.EVAL_LOSS: result.loss,
            wire.EVAL_PERPLEXITY: result.perplexity,
        }

    def check_server_workload(
        self, workload: ServerWorkload, run_config: Mapping[str, Any]
    ) -> None:
        """Valid training settings (the server itself reads no data of the sites)."""
        CausalLmSettings.from_run_config(run_config)

    def server_evaluator(
        self, lora: LoraSettings, run_config: Mapping[str, Any], workload: ServerWorkload
    ) -> Evaluate | None:
        """Loss and perplexity on ``server-eval-data``, with ``server-eval`` and that file set."""
        if workload.server_eval and workload.server_eval_data:
            settings = CausalLmSettings.from_run_config(run_config)
            return CausalLmEvaluator(lora, settings, workload.server_eval_data).evaluate
        log(INFO, "task causal-lm: no server-side evaluation (set run config 'server-eval-data')")
        return None
