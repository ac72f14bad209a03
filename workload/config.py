"""The run-config schema and the one typed reader that server and client both validate with.

Flower hands each app its settings as a flat ``Mapping[str, bool | int | float | str]``
(``context.run_config``, filled from ``[tool.flwr.app.config]`` and ``--run-config``; likewise
``context.node_config`` and a message's ConfigRecord). A value of the wrong type or outside its
range must fail at the first read with a message that names the key, where it came from, what is
allowed and what came, instead of surfacing later as an obscure tensor error.

``SCHEMA`` holds every run-config key once: its kind, default, range or choices and a line of
help. ``tests/workload/test_run_config_schema.py`` checks that it matches pyproject.toml's
``[tool.flwr.app.config]`` key for key and value for value, so a default is written there and
here only. ``Reader`` reads a key by the schema (or, for keys outside it such as node-config
``partition-id`` or a task kind's own default, by the bounds the caller gives).

An integer setting takes an integer only: ``3.0`` is refused (a float in an integer setting
usually means a mistyped key), and so is a bool (``True`` is an int in Python, never a count).
Every refusal is a ``ConfigError`` worded
``<source> key '<key>' must be <allowed>; got <value> (<type>)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from protocol import wire

Kind = Literal["integer", "number", "boolean", "string", "choice", "names", "ranks"]

# The largest LoRA rank a site may choose (run-config ``client-ranks``, node-config ``lora-r``):
# far above what LoRA fine-tuning uses (4-256), low enough that a typo (8000) is caught.
MAX_LORA_RANK = 1024

# Run-config ``train-factors``: which LoRA factors a client trains. "ab" both; "b" only every
# lora_B, with every lora_A frozen at the global value (FFA-LoRA, Sun et al., ICLR 2024).
TRAIN_FACTORS: tuple[str, ...] = ("ab", "b")

# Run-config ``personalization`` (issue 27): "none", today's behaviour; "local-finetune": each
# site also scores a copy of the global fine-tuned for ``personalization-steps`` local steps on
# its own training data (``client.personalization``); "shared-a" (FedSA-LoRA): sites send only
# their LoRA A factors and keep their own B (``client.shared_a``).
LOCAL_FINETUNE = "local-finetune"
SHARED_A = "shared-a"
PERSONALIZATION_MODES: tuple[str, ...] = ("none", LOCAL_FINETUNE, SHARED_A)


class ConfigError(ValueError):
    """A config value of the wrong type or out of range; names the key, the source, what is
    allowed and what came."""


@dataclass(frozen=True)
class Setting:
    """One run-config key: its kind, default, bounds (integer, number), choices, and help.

    ``choices`` None for a choice means the caller passes them (a registry, such as the merge
    methods, that lives above this module). ``non_empty`` refuses "" (string); ``allow_empty``
    accepts "" as no names (names).
    """

    kind: Kind
    default: bool | int | float | str
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    non_empty: bool = False
    allow_empty: bool = False


def _n(
    default: float,
    help: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Setting:
    return Setting("number", default, help, low, high, low_open, high_open)


def _i(default: int, help: str, low: int | None = None, high: int | None = None) -> Setting:
    return Setting("integer", default, help, low, high)


def _c(default: str, help: str, choices: tuple[str, ...] | None = None) -> Setting:
    return Setting("choice", default, help, choices=choices)


def _b(default: bool, help: str) -> Setting:
    return Setting("boolean", default, help)


def _s(default: str, help: str, *, non_empty: bool = False) -> Setting:
    return Setting("string", default, help, non_empty=non_empty)


SCHEMA: Mapping[str, Setting] = {
    # Run loop and outputs
    "num-server-rounds": _i(5, "federated rounds", low=1),
    "seed": _i(0, "seed of sampling, data subsets and initialisation", low=0),
    "output-dir": _s("outputs", "where checkpoints and metrics go", non_empty=True),
    "resume": _b(False, "continue from the last checkpoint in output-dir"),
    # Experiment tracking (server.tracking, docs/tracking.md)
    "tracking": _c("none", "experiment tracking backend", ("none", "tensorboard", "mlflow")),
    "tracking-uri": _s("", "MLflow tracking URI; '' = output-dir/mlflow.db"),
    # Aggregation
    "merge-method": _c("robustmerge", "merge method (strategies.merging registry)"),
    "merge-mode": _c("paper-exact", "RobustMerge form (strategies.merging.robustmerge.MODES)"),
    "merge-target": _c("delta", "what is merged (strategies.merging.server_step.TARGETS)"),
    "keep-ratio": _n(0.2, "fraction of entries kept by pruning", 0.0, 1.0, low_open=True),
    "scale-quantile": _n(0.2, "rank directions keeping their scale", 0.0, 1.0, high_open=True),
    "dare-drop-rate": _n(
        0.5, "dare: probability a client's delta entry is dropped", 0.0, 1.0, high_open=True
    ),
    "fuse-weight": _n(2.0, "lambda, the merge's fuse weight"),
    # 4.0: the quality benchmark v2's dev winner (robustmerge paper-exact, fuse 2) checked at the
    # app's own client training (benchmarks.defaults_check; docs/quality.md, "The defaults")
    "server-lr": _n(4.0, "server step size", 0.0, low_open=True),
    "weight-by-examples": _b(False, "weight clients by num-examples"),
    "fraction-train": _n(1.0, "fraction of nodes sampled to train", 0.0, 1.0),
    "min-train-nodes": _i(2, "fewest nodes sampled to train", low=1),
    "fraction-evaluate": _n(0.0, "fraction of nodes sampled to evaluate", 0.0, 1.0),
    "min-evaluate-nodes": _i(0, "fewest nodes sampled to evaluate", low=0),
    "merge-device": _c("auto", "where the merge runs", ("auto", "cpu", "cuda")),
    "min-merge-replies": _i(1, "fewer usable replies skip the round", low=1),
    "max-update-norm": _n(0.0, "0 = no bound; > 0 rejects larger update norms", 0.0),
    "round-timeout": _n(3600.0, "seconds to wait for replies", 0.0, low_open=True),
    "buffer-replies": _i(4, "buffered rounds: replies kept in memory, more spill to disk", low=1),
    # Robust aggregation
    "robust-aggregation": _c("auto", "robust defence (strategies.robust registry), or auto"),
    "robust-norm-factor": _n(10.0, "bound = factor x median update norm", 1.0),
    "robust-clip": _b(False, "clip outsized updates instead of rejecting them"),
    "robust-history": _i(64, "accepted update norms remembered", low=0),
    "robust-pool": _i(8, "first-round replies held back to screen the rest", low=2),
    "robust-krum-malicious": _i(1, "krum: replies assumed malicious", low=0),
    "robust-krum-select": _i(0, "krum: replies merged (0 = all but f)", low=0),
    "robust-trim-fraction": _n(
        0.25, "trimmed-mean: fraction trimmed per side", 0.0, 0.5, high_open=True
    ),
    "keep-checkpoints": _i(3, "checkpoints kept", low=1),
    "server-eval": _b(True, "score the global adapter every round"),
    # Privacy and communication
    "uplink": _c("dense", "what a train reply carries", wire.UPLINKS),
    "dp": _c("none", "Flower's DP wrappers", ("none", "server-clipping", "client-clipping")),
    "dp-clipping-norm": _n(1.0, "L2 bound on each client's update", 0.0, low_open=True),
    "dp-noise-multiplier": _n(0.0, "Gaussian noise std / clipping-norm", 0.0),
    "dp-delta": _n(
        0.00001, "delta of the reported epsilon", 0.0, 1.0, low_open=True, high_open=True
    ),
    "secure-aggregation": _b(False, "SecAgg+: the server learns only sums"),
    "secagg-num-shares": _n(3, "shares per secret (>= 3, or a fraction < 1)", 0.0, low_open=True),
    "secagg-reconstruction-threshold": _n(2, "shares needed to unmask", 0.0, low_open=True),
    "secagg-clipping-range": _n(8.0, "|value| bound before quantisation", 0.0, low_open=True),
    "secagg-quantization-range": _i(4194304, "quantisation levels", low=2),
    # Task kind, model and LoRA
    "task": _c("classification", "task kind (workload.kinds registry)"),
    "model": _s("", "base model; '' = the embedded all-MiniLM-L6-v2"),
    "lora-r": _i(8, "LoRA rank", low=1, high=MAX_LORA_RANK),
    "lora-alpha": _i(16, "LoRA alpha", low=1),
    "client-ranks": Setting(
        "ranks", "", "simulation: partition i trains rank i mod len ('' = lora-r)", 1, MAX_LORA_RANK
    ),
    "lora-dropout": _n(0.0, "LoRA dropout", 0.0, 1.0, high_open=True),
    "target-modules": _s("auto", "modules LoRA wraps (comma-separated, or auto)"),
    # Local training
    "local-epochs": _i(1, "local epochs per round", low=1),
    "learning-rate": _n(0.0005, "local learning rate", 0.0, low_open=True),
    "train-factors": _c("ab", "LoRA factors trained: ab, or b (A frozen)", TRAIN_FACTORS),
    "batch-size": _i(32, "local batch size", low=1),
    "temperature": _n(0.05, "contrastive temperature", 0.0, low_open=True),
    "max-length": _i(64, "tokens per example", low=2),
    "train-examples": _i(512, "train examples per client and round", low=1),
    "eval-examples": _i(256, "eval examples per task", low=1),
    "seen-tasks": Setting("names", "banking77,stackoverflow,sentiment,hwu64", "trained tasks"),
    "unseen-tasks": Setting("names", "clinc150,mcid", "evaluated-only tasks", allow_empty=True),
    # Personalisation (client.personalization; issue 27)
    "personalization": _c("none", "site-side personalisation", PERSONALIZATION_MODES),
    "personalization-steps": _i(4, "local-finetune: local steps of the personal copy", low=1),
    # simulated sites' data (workload.partitioners): task i mod len, or flwr-datasets' partitioners
    # over the pooled seen tasks
    "partitioner": _c(
        "task", "simulated sites' data", ("task", "iid", "dirichlet", "pathological")
    ),
    "partition-alpha": _n(0.5, "dirichlet: concentration (small = skewed)", 0.0, low_open=True),
    "partition-classes": _i(2, "pathological: classes per site", low=1),
    # causal-lm only
    "data-path": _s("", "site data when node-config has none"),
    "server-eval-data": _s("", "JSONL the server scores every round"),
    "prompt-template": _s("", "'' = the default template"),
    "gradient-accumulation": _i(1, "micro-batches per step", low=1),
    "gradient-checkpointing": _b(False, "trade compute for memory"),
    "precision": _c("auto", "autocast precision"),
    "quantization": _c("none", "base-model quantisation (bitsandbytes)"),
}


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    left = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
    right = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
    return f"{left}, {right}"


def _int_range(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"an integer in [{low:g}, {high:g}]"
    if low is not None:
        return f"an integer >= {low:g}"
    if high is not None:
        return f"an integer <= {high:g}"
    return "an integer"


Plain = TypeVar("Plain", bool, int, float, str)


def schema_default(key: str, kind: type[Plain]) -> Plain:
    """The default of run-config ``key`` (here, its one home), checked to be a ``kind``: library
    code takes its defaults from this, so a library user and an app user get the same run."""
    value = SCHEMA[key].default
    if type(value) is not kind:
        raise TypeError(f"the schema's default of {key!r} is {value!r}, not a {kind.__name__}")
    return kind(value)


class Reader:
    """Typed, validated reads of one flat config (``source`` names it in errors).

    Each method takes the key's default and bounds from ``SCHEMA`` unless the caller gives them
    (keys outside the schema, or a task kind's own defaults); one error type and wording.
    """

    def __init__(self, config: Mapping[str, Any], source: str = "run config") -> None:
        self.config = config
        self.source = source

    def _fail(self, key: str, allowed: str, value: object) -> ConfigError:
        return ConfigError(f"{self.source} key {key!r} must be {allowed}; got {_describe(value)}")

    def _value(self, key: str, default: Any) -> Any:
        if default is None:
            default = SCHEMA[key].default
        return self.config.get(key, default)

    @staticmethod
    def _bounds(
        key: str, low: float | None, high: float | None, low_open: bool, high_open: bool
    ) -> tuple[float | None, float | None, bool, bool]:
        """The caller's bounds when it gives any, else the schema's (none for other keys)."""
        setting = SCHEMA.get(key)
        if setting is None or low is not None or high is not None:
            return low, high, low_open, high_open
        return setting.low, setting.high, setting.low_open, setting.high_open

    def integer(
        self,
        key: str,
        default: int | None = None,
        *,
        low: int | None = None,
        high: int | None = None,
    ) -> int:
        """An integer (never a float, not even 3.0, nor a bool) within the key's bounds."""
        value = self._value(key, default)
        low_, high_, _, _ = self._bounds(key, low, high, False, False)
        allowed = _int_range(low_, high_)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, allowed, value)
        if (low_ is not None and value < low_) or (high_ is not None and value > high_):
            raise self._fail(key, allowed, value)
        return value

    def number(
        self,
        key: str,
        default: float | None = None,
        *,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
    ) -> float:
        """A finite number (an integer is accepted) within the key's interval."""
        value = self._value(key, default)
        low, high, low_open, high_open = self._bounds(key, low, high, low_open, high_open)
        allowed = f"a finite number in {_interval(low, high, low_open, high_open)}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(key, allowed, value)
        number = float(value)
        below = low is not None and (number <= low if low_open else number < low)
        above = high is not None and (number >= high if high_open else number > high)
        if not math.isfinite(number) or below or above:
            raise self._fail(key, allowed, value)
        return number

    def boolean(self, key: str, default: bool | None = None) -> bool:
        """true or false (TOML booleans only)."""
        value = self._value(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def string(self, key: str, default: str | None = None, *, non_empty: bool = False) -> str:
        """A string, stripped of surrounding whitespace; "" refused with ``non_empty`` (or the
        schema's)."""
        value = self._value(key, default)
        setting = SCHEMA.get(key)
        non_empty = non_empty or (setting is not None and setting.non_empty)
        if not isinstance(value, str) or (non_empty and not value.strip()):
            raise self._fail(key, "a non-empty string" if non_empty else "a string", value)
        return value.strip()

    def choice(
        self, key: str, choices: tuple[str, ...] | None = None, default: str | None = None
    ) -> str:
        """One of ``choices`` (the schema's when not given)."""
        allowed = choices if choices is not None else SCHEMA[key].choices
        if allowed is None:
            raise TypeError(f"the schema gives no choices for {key!r}; pass them")
        value = self._value(key, default)
        if not isinstance(value, str) or value.strip() not in allowed:
            raise self._fail(key, f"one of {', '.join(allowed)}", value)
        return value.strip()

    def names(
        self,
        key: str,
        default: str | None = None,
        *,
        allowed: tuple[str, ...] | None = None,
        allow_empty: bool | None = None,
    ) -> tuple[str, ...]:
        """A comma-separated list of names: without empty entries or duplicates, in order;
        "" is no names where ``allow_empty`` (or the schema) says so. With ``allowed`` given,
        every name must be one of them."""
        value = self._value(key, default)
        setting = SCHEMA.get(key)
        if allow_empty is None:
            allow_empty = setting is not None and setting.allow_empty
        shape = "a comma-separated list of names without empty entries (e.g. 'query,value')"
        if not isinstance(value, str):
            raise self._fail(key, shape, value)
        raw = value.strip()
        if not raw and allow_empty:
            return ()
        names = tuple(part.strip() for part in raw.split(","))
        if not raw or any(not name for name in names):
            raise self._fail(key, f"{shape}, at least one", value)
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(
                f"{self.source} key {key!r} lists {duplicates} more than once; got {raw!r}"
            )
        unknown = [name for name in names if allowed is not None and name not in allowed]
        if unknown:
            raise ConfigError(
                f"{self.source} key {key!r} has unknown name(s) {unknown}; "
                f"allowed: {list(allowed or ())}"
            )
        return names

    def ranks(self, key: str, default: str | None = None) -> tuple[int, ...]:
        """A comma-separated list of LoRA ranks (integers within the key's bounds, repeats
        allowed, order kept); "" is no ranks."""
        value = self._value(key, default)
        low, high, _, _ = self._bounds(key, 1, None, False, False)
        setting = SCHEMA.get(key)
        if setting is not None and setting.high is not None:
            high = setting.high
        allowed = f"a comma-separated list of ranks, each {_int_range(low, high)} (e.g. '4,8,16')"
        if not isinstance(value, str):
            raise self._fail(key, f"{allowed} or ''", value)
        raw = value.strip()
        if not raw:
            return ()
        parts = [part.strip() for part in raw.split(",")]
        ranks: list[int] = []
        for part in parts:
            if not part.isdigit():
                raise self._fail(key, allowed, value)
            rank = int(part)
            if (low is not None and rank < low) or (high is not None and rank > high):
                raise self._fail(key, allowed, value)
            ranks.append(rank)
        return tuple(ranks)


def read_int(
    config: Mapping[str, Any],
    key: str,
    default: int,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    source: str = "run config",
) -> int:
    """``Reader(config, source).integer`` with an explicit default and bounds."""
    return Reader(config, source).integer(key, default, low=minimum, high=maximum)


def read_float(
    config: Mapping[str, Any],
    key: str,
    default: float,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    source: str = "run config",
) -> float:
    """``Reader(config, source).number`` with an explicit default and interval."""
    return Reader(config, source).number(
        key,
        default,
        low=low,
        high=None if high == math.inf else high,
        low_open=low_open,
        high_open=high_open,
    )


def read_str(
    config: Mapping[str, Any], key: str, default: str, *, source: str = "run config"
) -> str:
    """``Reader(config, source).string`` with an explicit default (may be empty)."""
    return Reader(config, source).string(key, default)


def read_names(
    config: Mapping[str, Any],
    key: str,
    default: str,
    *,
    allowed: tuple[str, ...] | None = None,
    source: str = "run config",
) -> tuple[str, ...]:
    """``Reader(config, source).names`` with an explicit default; at least one name."""
    return Reader(config, source).names(key, default, allowed=allowed, allow_empty=False)
