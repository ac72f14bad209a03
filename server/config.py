"""The ServerApp's run config, read once and checked key by key at start-up."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strategies.combinations import combination_refusal, robust_refusal
from strategies.merging import available_methods
from strategies.merging.robustmerge import MODES
from strategies.merging.rounds import TARGETS as MERGE_TARGETS
from strategies.robust import ROBUST_AGGREGATIONS, RobustSettings
from strategies.robust.registry import DEFAULT_HISTORY, DEFAULT_NORM_FACTOR, DEFAULT_TRIM_FRACTION
from strategies.wire import UPLINKS
from workload.kinds import available_task_kinds

OUTPUT_ROOT_ENV = "ROBUSTMERGE_FL_OUTPUT_ROOT"
DEFAULT_OUTPUT_ROOT = Path.home() / "robustmerge-fl"
MERGE_DEVICES = ("auto", "cpu", "cuda")
DP_MODES = ("none", "server-clipping", "client-clipping")


class ConfigError(ValueError):
    """A run-config value of the wrong type or out of range; names the key and what is allowed."""


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

    def __post_init__(self) -> None:
        refusal = combination_refusal(
            self.merge_method, self.merge_mode, self.merge_target, self.uplink
        ) or robust_refusal(self.robust, self.uplink)
        if refusal is not None:
            raise ConfigError(f"run config: {refusal}")
        if self.dp != "none" and self.uplink == "sparse":
            raise ConfigError(
                f"run config 'dp' = {self.dp!r} needs uplink = 'dense': Flower's DP wrappers "
                "clip each reply's dense update against the global adapter, and a sparse reply "
                "holds only the kept entries"
            )

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> ServerSettings:
        """Validate every key the server reads; the first bad one raises ConfigError."""
        reader = _Reader(config)
        method = reader.choice("merge-method", available_methods(), "robustmerge")
        max_norm = reader.number("max-update-norm", 0.0, low=0.0)
        return cls(
            num_server_rounds=reader.integer("num-server-rounds", 5, low=1),
            seed=reader.integer("seed", 0, low=0),
            output_dir=resolve_output_dir(reader.string("output-dir", "outputs")),
            resume=reader.boolean("resume", False),
            merge_method=method,
            merge_mode=reader.choice("merge-mode", MODES, "paper-exact"),
            merge_target=reader.choice("merge-target", MERGE_TARGETS, "delta"),
            keep_ratio=reader.number("keep-ratio", 0.2, low=0.0, high=1.0, low_open=True),
            scale_quantile=reader.number("scale-quantile", 0.2, low=0.0, high=1.0, high_open=True),
            fuse_weight=reader.number("fuse-weight", 2.0),
            server_lr=reader.number("server-lr", 1.0, low=0.0, low_open=True),
            weight_by_examples=reader.boolean("weight-by-examples", False),
            fraction_train=reader.number("fraction-train", 1.0, low=0.0, high=1.0),
            min_train_nodes=reader.integer("min-train-nodes", 2, low=1),
            fraction_evaluate=reader.number("fraction-evaluate", 0.0, low=0.0, high=1.0),
            min_evaluate_nodes=reader.integer("min-evaluate-nodes", 0, low=0),
            merge_device=_device(reader.choice("merge-device", MERGE_DEVICES, "auto")),
            round_timeout=reader.number("round-timeout", 3600.0, low=0.0, low_open=True),
            server_eval=reader.boolean("server-eval", True),
            eval_examples=reader.integer("eval-examples", 256, low=1),
            seen_tasks=reader.names("seen-tasks", "banking77,stackoverflow,sentiment,hwu64"),
            unseen_tasks=reader.names("unseen-tasks", "clinc150,mcid", allow_empty=True),
            max_update_norm=max_norm if max_norm > 0 else None,
            min_merge_replies=reader.integer("min-merge-replies", 1, low=1),
            keep_checkpoints=reader.integer("keep-checkpoints", 3, low=1),
            task=reader.choice("task", available_task_kinds(), "classification"),
            server_eval_data=reader.text("server-eval-data", ""),
            uplink=reader.choice("uplink", UPLINKS, "dense"),
            dp=reader.choice("dp", DP_MODES, "none"),
            dp_clipping_norm=reader.number("dp-clipping-norm", 1.0, low=0.0, low_open=True),
            dp_noise_multiplier=reader.number("dp-noise-multiplier", 0.0, low=0.0),
            dp_delta=reader.number(
                "dp-delta", 1e-5, low=0.0, high=1.0, low_open=True, high_open=True
            ),
            secure_aggregation=reader.boolean("secure-aggregation", False),
            secagg_num_shares=reader.number("secagg-num-shares", 3, low=0.0, low_open=True),
            secagg_reconstruction_threshold=reader.number(
                "secagg-reconstruction-threshold", 2, low=0.0, low_open=True
            ),
            secagg_clipping_range=reader.number(
                "secagg-clipping-range", 8.0, low=0.0, low_open=True
            ),
            secagg_quantization_range=reader.integer("secagg-quantization-range", 4194304, low=2),
            robust=RobustSettings(
                aggregation=reader.choice("robust-aggregation", ROBUST_AGGREGATIONS, "norm"),
                norm_factor=reader.number("robust-norm-factor", DEFAULT_NORM_FACTOR, low=1.0),
                clip=reader.boolean("robust-clip", False),
                history=reader.integer("robust-history", DEFAULT_HISTORY, low=0),
                krum_malicious=reader.integer("robust-krum-malicious", 1, low=0),
                krum_select=reader.integer("robust-krum-select", 0, low=0),
                trim_fraction=reader.number(
                    "robust-trim-fraction", DEFAULT_TRIM_FRACTION, low=0.0, high=0.5, high_open=True
                ),
            ),
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


class _Reader:
    """Typed access to a run config that names the key and the allowed values on error."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config

    def _get(self, key: str, default: Any) -> Any:
        return self.config.get(key, default)

    def integer(self, key: str, default: int, *, low: int | None = None) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ConfigError(f"run config {key!r} must be an integer, got {value!r}")
        if low is not None and value < low:
            raise ConfigError(f"run config {key!r} must be >= {low}, got {value!r}")
        return int(value)

    def number(
        self,
        key: str,
        default: float,
        *,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
    ) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"run config {key!r} must be a number, got {value!r}")
        number = float(value)
        below = low is not None and (number <= low if low_open else number < low)
        above = high is not None and (number >= high if high_open else number > high)
        if not math.isfinite(number) or below or above:
            left = "-inf" if low is None else f"{low:g}"
            right = "inf" if high is None else f"{high:g}"
            interval = f"{'(' if low_open or low is None else '['}{left}, {right}"
            interval += ")" if high_open or high is None else "]"
            raise ConfigError(f"run config {key!r} must be in {interval}, got {value!r}")
        return number

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"run config {key!r} must be true or false, got {value!r}")
        return value

    def string(self, key: str, default: str) -> str:
        value = self._get(key, default)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"run config {key!r} must be a non-empty string, got {value!r}")
        return value

    def text(self, key: str, default: str) -> str:
        """A string that may be empty (stripped)."""
        value = self._get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"run config {key!r} must be a string, got {value!r}")
        return value.strip()

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        value = self._get(key, default)
        if value not in allowed:
            raise ConfigError(
                f"run config {key!r} must be one of {', '.join(allowed)}; got {value!r}"
            )
        return str(value)

    def names(self, key: str, default: str, *, allow_empty: bool = False) -> tuple[str, ...]:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"run config {key!r} must be a comma-separated string, got {value!r}")
        names = tuple(part.strip() for part in value.split(",") if part.strip())
        if not names and not allow_empty:
            raise ConfigError(f"run config {key!r} must name at least one entry, got {value!r}")
        return names
