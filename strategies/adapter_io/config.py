"""``adapter_config.json``: parse and type-check one from an untrusted folder, or build one.

Reading checks only the fields a LoRA merge depends on, and says which field is wrong and how.
Building goes through ``peft.LoraConfig`` so the file carries every field the installed PEFT
expects, and ``config_text`` writes either kind as stable JSON.
"""

from __future__ import annotations

import enum
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.json_values import is_int, is_number, json_type, unique_keys
from strategies.adapter_io.layout import ADAPTER_CONFIG
from strategies.adapter_io.untrusted_files import read_limited

MAX_CONFIG_BYTES = 16_000_000
"""Largest adapter_config.json accepted; real ones are a few kB."""


def read_config(folder: Path) -> dict[str, Any]:
    """Parse ``folder``'s adapter_config.json and check the fields a LoRA merge depends on.

    Raises
    ------
    AdapterFileError
        If the file is missing, too large (see ``MAX_CONFIG_BYTES``), not UTF-8, not a JSON
        object (duplicate keys included), or fails ``check_config``.
    """
    raw = read_limited(folder, folder / ADAPTER_CONFIG, MAX_CONFIG_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise AdapterFileError(folder, ADAPTER_CONFIG, f"not UTF-8 text ({error.reason})") from None
    try:
        config = json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as error:
        raise AdapterFileError(
            folder, ADAPTER_CONFIG, f"not valid JSON: {error.msg} (line {error.lineno})"
        ) from None
    except (ValueError, RecursionError) as error:
        raise AdapterFileError(folder, ADAPTER_CONFIG, f"not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise AdapterFileError(
            folder, ADAPTER_CONFIG, f"must be a JSON object, got {json_type(config)}"
        )
    check_config(config, folder=folder)
    return config


def check_config(config: Mapping[str, Any], *, folder: str | os.PathLike[str] = ".") -> None:
    """Check the LoRA fields of an adapter config; raise AdapterFileError naming the field.

    ``peft_type`` must be ``"LORA"``, ``r`` an integer > 0, ``lora_alpha`` a finite number,
    ``target_modules`` a string or a list of strings, ``base_model_name_or_path`` a string or
    null.

    Parameters
    ----------
    config : Mapping
        A parsed ``adapter_config.json``.
    folder : str or os.PathLike, default "."
        The folder to name in errors.
    """

    def fail(field: str, expected: str) -> AdapterFileError:
        value = config.get(field)
        got = "missing" if field not in config else f"{value!r} ({json_type(value)})"
        return AdapterFileError(
            folder, ADAPTER_CONFIG, f"field {field!r} must be {expected}, got {got}"
        )

    if config.get("peft_type") != "LORA":
        raise fail("peft_type", '"LORA" (only LoRA adapters can be merged)')
    rank = config.get("r")
    if not is_int(rank) or rank <= 0:
        raise fail("r", "an integer > 0")
    alpha = config.get("lora_alpha")
    if not (is_number(alpha) and math.isfinite(alpha)):
        raise fail("lora_alpha", "a finite number")
    targets = config.get("target_modules")
    if not (
        isinstance(targets, str)
        or (isinstance(targets, list) and all(isinstance(item, str) for item in targets))
    ):
        raise fail("target_modules", "a string or a list of strings")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise fail("base_model_name_or_path", "a string or null")


def adapter_config_for(
    base_model: str | None,
    r: int,
    lora_alpha: float,
    target_modules: Sequence[str],
    **extra: Any,
) -> dict[str, Any]:
    """A JSON-ready ``adapter_config.json`` dict that the installed PEFT accepts.

    Built from ``peft.LoraConfig(...).to_dict()`` so that it carries every field the installed
    PEFT version expects; sets become sorted lists and enums their values, as PEFT's own
    ``save_pretrained`` writes them. ``inference_mode`` is True, as in saved adapters, unless
    ``extra`` says otherwise.

    Parameters
    ----------
    base_model : str or None
        ``base_model_name_or_path``: a hub id or a local folder.
    r : int
        LoRA rank.
    lora_alpha : float
        LoRA scaling numerator (the update is ``lora_alpha / r * B @ A``).
    target_modules : Sequence of str
        Module names LoRA wraps, e.g. ``["query", "value"]``.
    **extra
        Any other ``peft.LoraConfig`` field (``lora_dropout``, ``modules_to_save``, ...).

    Raises
    ------
    ValueError
        If PEFT rejects the settings (the message is PEFT's).
    """
    from peft import LoraConfig

    fields: dict[str, Any] = {
        "inference_mode": True,
        **extra,
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": list(target_modules),
        "base_model_name_or_path": base_model,
    }
    try:
        lora = LoraConfig(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"peft.LoraConfig refused these settings: {error}") from None
    converted = _to_json(lora.to_dict())  # type: ignore[no-untyped-call]
    assert isinstance(converted, dict)
    return converted


def config_text(folder: Path, config: Mapping[str, Any]) -> str:
    """``config`` as the text of adapter_config.json: indented, keys sorted, no NaN or infinity.

    Raises
    ------
    AdapterFileError
        If the config is not JSON-serialisable, naming ``folder`` (the folder to be written).
    """
    try:
        return json.dumps(_to_json(dict(config)), indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise AdapterFileError(
            folder, ADAPTER_CONFIG, f"config cannot be written as JSON: {error}"
        ) from None


def _to_json(value: object) -> object:
    """Sets -> sorted lists, enums -> values, tuples -> lists, recursively."""
    if isinstance(value, enum.Enum):
        return _to_json(value.value)
    if isinstance(value, Mapping):
        return {str(key): _to_json(item) for key, item in value.items()}
    if isinstance(value, (set, frozenset)):
        items = [_to_json(item) for item in value]
        try:
            return sorted(items)  # type: ignore[type-var]
        except TypeError:
            return sorted(items, key=repr)
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    return value
