"""The ServerApp: run config -> FedRobustMerge -> resumable round loop with checkpoints."""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from logging import INFO
from typing import Any

import flwr
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from client.model import (
    LoraSettings,
    initial_adapter,
    peft_task_type,
    resolve_model_path,
    resolve_target_modules,
)
from client.tasks import TASK_NAMES
from client.training import TrainSettings
from server.checkpoints import CheckpointStore
from server.config import ConfigError, ServerSettings
from server.privacy import core_strategy, wrap_with_privacy
from server.run_loop import LoopSettings, run_federation
from strategies.adapter_io.config import adapter_config_for
from strategies.fed_robustmerge import FedRobustMerge

app = ServerApp()


def build_strategy(settings: ServerSettings, rank: int = 8) -> Strategy:
    """The strategy the run config describes: FedRobustMerge, inside a DP wrapper if asked
    (``rank``, the LoRA rank, enters the DP sensitivity bound it logs)."""
    return wrap_with_privacy(
        build_merge_strategy(settings),
        settings.dp,
        clipping_norm=settings.dp_clipping_norm,
        noise_multiplier=settings.dp_noise_multiplier,
        num_sampled_clients=settings.min_train_nodes,
        rank=rank,
        delta=settings.dp_delta,
    )


def build_merge_strategy(settings: ServerSettings) -> FedRobustMerge:
    """FedRobustMerge as the run config describes it."""
    return FedRobustMerge(
        fraction_train=settings.fraction_train,
        min_train_nodes=settings.min_train_nodes,
        min_available_nodes=settings.min_train_nodes,
        fraction_evaluate=settings.fraction_evaluate,
        min_evaluate_nodes=settings.min_evaluate_nodes,
        merge_method=settings.merge_method,
        mode=settings.merge_mode,
        keep_ratio=settings.keep_ratio,
        scale_quantile=settings.scale_quantile,
        fuse_weight=settings.fuse_weight,
        merge_target=settings.merge_target,
        server_lr=settings.server_lr,
        weight_by_examples=settings.weight_by_examples,
        device=settings.merge_device,
        max_update_norm=settings.max_update_norm,
        min_merge_replies=settings.min_merge_replies,
        seed=settings.seed,
        uplink=settings.uplink,
        robust=settings.robust,
    )


def check_tasks(settings: ServerSettings) -> None:
    """Seen and unseen tasks must be known and must not overlap."""
    for key, names in (
        ("seen-tasks", settings.seen_tasks),
        ("unseen-tasks", settings.unseen_tasks),
    ):
        for name in names:
            if name not in TASK_NAMES:
                raise ConfigError(
                    f"run config {key!r} names unknown task {name!r}; "
                    f"known: {', '.join(TASK_NAMES)}"
                )
    overlap = sorted(set(settings.seen_tasks) & set(settings.unseen_tasks))
    if overlap:
        raise ConfigError(
            f"tasks {overlap} are both seen and unseen: unseen tasks are never trained on"
        )


def run_summary(context: Context, settings: ServerSettings, strategy: Strategy) -> dict[str, Any]:
    """What metrics.json says about the run: config, versions, machine."""
    return {
        "run-config": dict(context.run_config),
        "output-dir": str(settings.output_dir),
        "merge-device": core_strategy(strategy).device,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"flwr": flwr.__version__, "torch": torch.__version__},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config, build the initial adapter from the model config, run the rounds."""
    settings = ServerSettings.from_run_config(context.run_config)
    if settings.secure_aggregation:
        from server.secure_aggregation import check_secure_aggregation

        check_secure_aggregation(settings)  # refuses what SecAgg+ cannot honour, before any load
    lora = LoraSettings.from_run_config(context.run_config)
    training = TrainSettings.from_run_config(context.run_config)
    if settings.task == "classification":
        check_tasks(settings)
    strategy = build_strategy(settings, lora.r)
    if not settings.secure_aggregation:  # the secure path logs its own (SecAgg+) summary
        strategy.summary()
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    log(INFO, "Outputs: %s", settings.output_dir)
    store = CheckpointStore(
        settings.output_dir,
        adapter_config_for(
            resolve_model_path(lora.model),
            lora.r,
            lora.alpha,
            resolve_target_modules(lora),
            # PEFT's task type only for causal-lm (classification adapters keep writing none)
            **({"task_type": peft_task_type(lora).value} if lora.task == "causal-lm" else {}),
        ),
        keep=settings.keep_checkpoints,
    )
    evaluate = None
    causal = settings.task == "causal-lm"
    if causal and settings.server_eval and settings.server_eval_data:
        from client.causal_lm import CausalLmSettings
        from server.evaluation import CausalLmEvaluator

        evaluate = CausalLmEvaluator(
            lora, CausalLmSettings.from_run_config(context.run_config), settings.server_eval_data
        ).evaluate
    elif causal:
        log(INFO, "task causal-lm: no server-side evaluation (set run config 'server-eval-data')")
    elif settings.server_eval:
        from server.evaluation import TaskEvaluator

        evaluator = TaskEvaluator(
            lora,
            training,
            settings.seen_tasks,
            settings.unseen_tasks,
            examples=settings.eval_examples,
            seed=settings.seed,
        )
        evaluate = evaluator.evaluate
    # the causal-LM kind has no seen/unseen tasks to plot
    seen, unseen = ((), ()) if causal else (settings.seen_tasks, settings.unseen_tasks)
    if settings.secure_aggregation:
        from server.secure_aggregation import run_secure_federation

        run_secure_federation(
            grid,
            context,
            settings,
            initial=initial_adapter(lora, seed=settings.seed),
            store=store,
            summary=run_summary(context, settings, strategy),
            evaluate=evaluate,
            seen_tasks=seen,
            unseen_tasks=unseen,
        )
        return
    run_federation(
        grid,
        strategy,
        LoopSettings(
            num_rounds=settings.num_server_rounds,
            round_timeout=settings.round_timeout,
            run_dir=settings.output_dir,
            resume=settings.resume,
            seen_tasks=seen,
            unseen_tasks=unseen,
            uplink=settings.uplink,
        ),
        initial=initial_adapter(lora, seed=settings.seed),
        store=store,
        summary=run_summary(context, settings, strategy),
        evaluate=evaluate,
    )
