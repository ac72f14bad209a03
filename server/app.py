"""The ServerApp: run config -> FedRobustMerge -> resumable round loop with checkpoints."""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from logging import INFO, WARNING
from typing import Any

import flwr
import torch
from flwr.app import Context
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from server.checkpoints import CheckpointStore
from server.config import ConfigError, ServerSettings
from server.local_work import run_config_warning
from server.model_card import DEFENCE_KEY
from server.privacy import wrap_with_privacy
from server.round_modes import MessageRounds, RoundMode
from server.run_loop import LoopSettings, run_federation
from server.secure_aggregation import check_secure_aggregation
from server.secure_rounds import SecureRounds
from server.tracking import open_tracking
from strategies.adapter_io.config import adapter_config_for
from strategies.fed_robustmerge import FedRobustMerge
from workload.kinds import get_task_kind
from workload.kinds.base import ServerWorkload
from workload.model import LoraSettings, initial_adapter, resolve_model_path, resolve_target_modules

app = ServerApp()


def build_strategy(
    settings: ServerSettings, rank: int = 8, core: FedRobustMerge | None = None
) -> Strategy:
    """The strategy the run config describes: FedRobustMerge (``core``, or a new one), inside a
    DP wrapper if asked (``rank``, the LoRA rank, enters the DP sensitivity bound it logs)."""
    return wrap_with_privacy(
        core if core is not None else build_merge_strategy(settings),
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
        merge_options=settings.merge_options(),
        merge_target=settings.merge_target,
        server_lr=settings.server_lr,
        weight_by_examples=settings.weight_by_examples,
        device=settings.merge_device,
        max_update_norm=settings.max_update_norm,
        min_merge_replies=settings.min_merge_replies,
        seed=settings.seed,
        uplink=settings.uplink,
        robust=settings.robust,
        personalization=settings.personalization,
        buffer_replies=settings.buffer_replies,
        spill_dir=settings.output_dir / "spill",
    )


def server_workload(settings: ServerSettings) -> ServerWorkload:
    """The workload's view of the server settings (what a task kind checks, plots, scores)."""
    return ServerWorkload(
        seen_tasks=settings.seen_tasks,
        unseen_tasks=settings.unseen_tasks,
        eval_examples=settings.eval_examples,
        seed=settings.seed,
        server_eval=settings.server_eval,
        server_eval_data=settings.server_eval_data,
    )


def build_round_mode(
    settings: ServerSettings,
    context: Context,
    initial: dict[str, torch.Tensor],
    rank: int = 8,
    secure_workflow: SecAggPlusWorkflow | None = None,
) -> RoundMode:
    """How the rounds run: SecAgg+ with ``secure_workflow`` (what ``check_secure_aggregation``
    built from the run config), else the Message API with FedRobustMerge, inside a DP wrapper
    if asked. One core either way."""
    core = build_merge_strategy(settings)
    if secure_workflow is not None:
        core.summary()
        return SecureRounds(core, secure_workflow, context, settings, initial)
    strategy = build_strategy(settings, rank, core)
    strategy.summary()
    return MessageRounds(strategy, settings.uplink)


def run_summary(context: Context, settings: ServerSettings, core: FedRobustMerge) -> dict[str, Any]:
    """What metrics.json says about the run: config, versions, machine."""
    return {
        "run-config": dict(context.run_config),
        "output-dir": str(settings.output_dir),
        "merge-device": core.settings.device,
        DEFENCE_KEY: core.settings.robust.describe(),
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
    step_warning = run_config_warning(context.run_config)
    if step_warning is not None:
        log(WARNING, "%s", step_warning)
    # Refuses what SecAgg+ cannot honour, before anything is loaded.
    secure_workflow = check_secure_aggregation(settings)
    # The global adapter lives at the largest rank in use (run-config client-ranks, else
    # lora-r), at the run config's alpha / r; every site starts from its truncation.
    lora = LoraSettings.for_global(context.run_config)
    kind = get_task_kind(settings.task)
    workload = server_workload(settings)
    try:
        kind.check_server_workload(workload, context.run_config)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    initial = initial_adapter(lora, seed=settings.seed)
    mode = build_round_mode(settings, context, initial, lora.r, secure_workflow)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    log(INFO, "Outputs: %s", settings.output_dir)
    store = CheckpointStore(
        settings.output_dir,
        adapter_config_for(
            resolve_model_path(lora.model),
            lora.r,
            lora.alpha,
            resolve_target_modules(lora),
            **kind.adapter_config_fields(),
        ),
        keep=settings.keep_checkpoints,
    )
    evaluate = kind.server_evaluator(lora, context.run_config, workload)
    seen, unseen = kind.plotted_tasks(workload)
    run_federation(
        grid,
        mode,
        LoopSettings(
            num_rounds=settings.num_server_rounds,
            round_timeout=settings.round_timeout,
            run_dir=settings.output_dir,
            resume=settings.resume,
            seen_tasks=seen,
            unseen_tasks=unseen,
        ),
        initial=initial,
        store=store,
        summary=run_summary(context, settings, mode.core),
        evaluate=evaluate,
        tracking=open_tracking(settings.tracking, settings.tracking_uri, settings.output_dir),
    )
