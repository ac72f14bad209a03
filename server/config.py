"""The ServerApp's run config, read once and checked key by key at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.tracking import backend_refusal
from strategies.combinations import (
    combination_refusal,
    mixed_rank_refusal,
    personalization_refusal,
    robust_refusal,
)
from strategies.merging import available_methods
from strategies.merging.registry import method_class
from strategies.merging.robustmerge import MODES
from strategies.merging.server_step import TARGETS as MERGE_TARGETS
from strategies.robust import RobustSettings, aggregation_choices
from workload.config import SCHEMA, SHARED_A, ConfigError, Reader, schema_default
from workload.kinds import available_task_kinds

__all__ = ["ConfigError", "ServerSettings", "resolve_output_dir"]

OUTPUT_ROOT_ENV = "ROBUSTMERGE_FL_OUTPUT_ROOT"
DEFAULT_OUTPUT_ROOT = Path.home() / "robustmerge-fl"
MERGE_DEVICES = SCHEMA["merge-device"].choices or ()
DP_MODES = SCHEMA["dp"].choices or ()


@dataclass(frozen=True)
class ServerSettings:
    """Everything the server side of a run needs from ``[tool.flwr.app.config]``."""

    num_server_rounds: int
    seed: int
    output_dir: Path
    resume: bool
    merge_method: str
    merge_mode: str
    merge_target: str
    keep_ratio: float
    scale_quantile: float
    fuse_weight: float
    server_lr: float
    weight_by_examples: bool
    fraction_train: float
    min_train_nodes: int
    fraction_evaluate: float
    min_evaluate_nodes: int
    merge_device: str | None
    round_timeout: float
    server_eval: bool
    eval_examples: int
    seen_tasks: tuple[str, ...]
    unseen_tasks: tuple[str, ...]
    max_update_norm: float | None
    min_merge_replies: int
    keep_checkpoints: int
    task: str = "classification"
    server_eval_data: str = ""
    uplink: str = "dense"
    dp: str = "none"
    dp_clipping_norm: float = 1.0
    dp_noise_multiplier: float = 0.0
    dp_delta: float = 1e-5
    secure_aggregation: bool = False
    secagg_num_shares: float = 3
    secagg_reconstruction_threshold: float = 2
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304
    robust: RobustSettings = field(default_factory=RobustSettings)
    buffer_replies: int = schema_default("buffer-replies", int)
    client_ranks: tuple[int, ...] = ()
    dare_drop_rate: float = 0.5
    tracking: str = "none"
    tracking_uri: str = ""
    personalization: str = "none"

    @property
    def mixes_ranks(self) -> bool:
        """Whether run-config ``client-ranks`` gives the sites more than one LoRA rank."""
        return len(set(self.client_ranks)) > 1

    def __post_init__(self) -> None:
        resolved = self.robust.resolve(
            uplink=self.uplink,
            mixes_ranks=self.mixes_ranks,
            secure_aggregation=self.secure_aggregation,
        )
        object.__setattr__(self, "robust", resolved)  # frozen: "auto" chosen once, here
        refusal = (
            combination_refusal(self.merge_method, self.merge_mode, self.merge_target, self.uplink)
            or robust_refusal(self.robust, self.uplink)
            or personalization_refusal(
                self.personalization, self.merge_method, self.merge_mode, self.uplink
            )
            or self._shared_a_refusal()
        )
        if refusal is not None:
            raise ConfigError(f"run config: {refusal}")
        if self.mixes_ranks and not self.secure_aggregation:
            mixed = mixed_rank_refusal(
                self.merge_method,
                self.merge_mode,
                self.merge_target,
                self.uplink,
                self.robust,
                self.dp,
            )
            if mixed is not None:
                raise ConfigError(
                    f"run config 'client-ranks' = {','.join(map(str, self.client_ranks))!r} "
                    f"mixes LoRA ranks, refused: {mixed} (or give every site one rank)"
                )
        if self.dp != "none" and self.uplink == "sparse":
            raise ConfigError(
                f"run config 'dp' = {self.dp!r} needs uplink = 'dense': Flower's DP wrappers "
                "clip each reply's dense update against the global adapter, and a sparse reply "
                "holds only the kept entries"
            )
        if self.tracking_uri and self.tracking != "mlflow":
            raise ConfigError(
                f"run config 'tracking-uri' = {self.tracking_uri!r} is read only with "
                f"tracking = 'mlflow' (got tracking = {self.tracking!r}): set both, or neither"
            )
        if self.personalization != "none" and self.fraction_evaluate == 0.0:
            raise ConfigError(
                f"run config 'personalization' = {self.personalization!r} is scored in the sites' "
                "own evaluation, but fraction-evaluate = 0 asks no site to evaluate: set "
                "fraction-evaluate > 0 (1.0: every site), or personalization = 'none'"
            )
        tracking_refusal = backend_refusal(self.tracking)
        if tracking_refusal is not None:
            raise ConfigError(tracking_refusal)

    def _shared_a_refusal(self) -> str | None:
        """Why personalization "shared-a" cannot run with the app's other features, or None:
        each of them needs every site's whole adapter, or scores one the sites do not use."""
        if self.personalization != SHARED_A:
            return None
        needs = [
            (
                self.mixes_ranks,
                "client-ranks mixes LoRA ranks, which shared-a does not support (the server "
                "reads each site's B as the global's, at the global's rank)",
                "one rank for every site",
            ),
            (
                self.secure_aggregation,
                "secure-aggregation = true sums RobustMerge's per-client "
                "terms, which are made of both factors",
                "secure-aggregation = false",
            ),
            (
                self.dp != "none",
                f"dp = {self.dp!r} clips each reply's update against the whole global "
                "adapter (Flower's DP wrappers compare every key)",
                "dp = 'none'",
            ),
            (
                self.server_eval,
                "server-eval = true scores the global adapter, whose B stays the "
                "one the run started with (every site keeps its own)",
                "server-eval = false (the sites' personalised scores are logged from "
                "client-side evaluation)",
            ),
        ]
        for refused, why, instead in needs:
            if refused:
                kept = "personalization = 'shared-a' keeps each site's LoRA B"
                return f"{kept}, but {why}; set {instead}"
        return None

    def merge_options(self) -> dict[str, float]:
        """The merge method's own hyperparameters from the run config (``merge_options`` of
        FedRobustMerge): each key the method declares (``MergeMethod.run_config_options``, e.g.
        dare's ``dare-drop-rate`` -> ``drop_rate``) read from this setting of the same name."""
        declared = method_class(self.merge_method).run_config_options()
        return {kwarg: getattr(self, key.replace("-", "_")) for key, kwarg in declared.items()}

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> ServerSettings:
        """Validate every key the server reads, with the defaults and bounds of
        ``workload.config.SCHEMA``; the first bad one raises ConfigError."""
        reader = Reader(config)
        max_norm = reader.number("max-update-norm")
        return cls(
            num_server_rounds=reader.integer("num-server-rounds"),
            seed=reader.integer("seed"),
            output_dir=resolve_output_dir(reader.string("output-dir")),
            resume=reader.boolean("resume"),
            merge_method=reader.choice("merge-method", available_methods()),
            merge_mode=reader.choice("merge-mode", MODES),
            merge_target=reader.choice("merge-target", MERGE_TARGETS),
            keep_ratio=reader.number("keep-ratio"),
            scale_quantile=reader.number("scale-quantile"),
            fuse_weight=reader.number("fuse-weight"),
            server_lr=reader.number("server-lr"),
            weight_by_examples=reader.boolean("weight-by-examples"),
            fraction_train=reader.number("fraction-train"),
            min_train_nodes=reader.integer("min-train-nodes"),
            fraction_evaluate=reader.number("fraction-evaluate"),
            min_evaluate_nodes=reader.integer("min-evaluate-nodes"),
            merge_device=_device(reader.choice("merge-device")),
            round_timeout=reader.number("round-timeout"),
            server_eval=reader.boolean("server-eval"),
            eval_examples=reader.integer("eval-examples"),
            seen_tasks=reader.names("seen-tasks"),
            unseen_tasks=reader.names("unseen-tasks"),
            max_update_norm=max_norm if max_norm > 0 else None,
            min_merge_replies=reader.integer("min-merge-replies"),
            buffer_replies=reader.integer("buffer-replies"),
            keep_checkpoints=reader.integer("keep-checkpoints"),
            task=reader.choice("task", available_task_kinds()),
            server_eval_data=reader.string("server-eval-data"),
            uplink=reader.choice("uplink"),
            dp=reader.choice("dp"),
            dp_clipping_norm=reader.number("dp-clipping-norm"),
            dp_noise_multiplier=reader.number("dp-noise-multiplier"),
            dp_delta=reader.number("dp-delta"),
            secure_aggregation=reader.boolean("secure-aggregation"),
            secagg_num_shares=reader.number("secagg-num-shares"),
            secagg_reconstruction_threshold=reader.number("secagg-reconstruction-threshold"),
            secagg_clipping_range=reader.number("secagg-clipping-range"),
            secagg_quantization_range=reader.integer("secagg-quantization-range"),
            robust=RobustSettings(
                aggregation=reader.choice("robust-aggregation", aggregation_choices()),
                norm_factor=reader.number("robust-norm-factor"),
                clip=reader.boolean("robust-clip"),
                history=reader.integer("robust-history"),
                pool=reader.integer("robust-pool"),
                krum_malicious=reader.integer("robust-krum-malicious"),
                krum_select=reader.integer("robust-krum-select"),
                trim_fraction=reader.number("robust-trim-fraction"),
            ),
            client_ranks=reader.ranks("client-ranks"),
            dare_drop_rate=reader.number("dare-drop-rate"),
            tracking=reader.choice("tracking"),
            tracking_uri=reader.string("tracking-uri"),
            personalization=reader.choice("personalization"),
        )


def resolve_output_dir(value: str) -> Path:
    """An absolute path is used as is; a relative one lands under ~/robustmerge-fl/.

    The ServerApp runs from Flower's app cache, not from the project folder, so a path relative
    to the process's working directory would be hard to find. ROBUSTMERGE_FL_OUTPUT_ROOT moves
    the root.
    """
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    root = Path(os.environ.get(OUTPUT_ROOT_ENV, str(DEFAULT_OUTPUT_ROOT))).expanduser()
    return root / path


def _device(value: str) -> str | None:
    return None if value == "auto" else value
