"""Whether adapter folders can be merged: same base model, LoRA settings, tensor keys and shapes.

Merging adapters trained with different settings would give meaningless numbers, so the first
difference is reported, naming both folders, the field or key and both values.
"""

from __future__ import annotations

from collections.abc import Sequence

from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.json_values import is_number
from strategies.adapter_io.layout import ADAPTER_CONFIG, AdapterFolder

_COMPARED_FIELDS: tuple[tuple[str, object], ...] = (
    ("base_model_name_or_path", None),
    ("r", None),
    ("lora_alpha", None),
    ("target_modules", None),
    ("use_rslora", False),
    ("rank_pattern", {}),
    ("alpha_pattern", {}),
)
"""Config fields that must agree before adapters are merged, with the PEFT default if absent."""


def check_compatible(folders: Sequence[AdapterFolder]) -> None:
    """Check that adapters can be merged: same base model, LoRA settings, keys and shapes.

    Compared against the first folder: ``base_model_name_or_path``, ``r``, ``lora_alpha``,
    ``target_modules`` (order-insensitive), ``use_rslora``, ``rank_pattern`` and
    ``alpha_pattern`` (a different scaling rule would make the merged numbers meaningless), then
    the tensor keys and shapes.

    Raises
    ------
    AdapterFileError
        Naming the folder that differs, the field (or key), its value and the first folder's.
    """
    if not folders:
        return
    first = folders[0]
    for other in folders[1:]:
        _check_configs_agree(first, other)
        _check_tensors_agree(first, other)


def _check_configs_agree(first: AdapterFolder, other: AdapterFolder) -> None:
    for field, default in _COMPARED_FIELDS:
        mine = _comparable(field, first.config.get(field, default))
        theirs = _comparable(field, other.config.get(field, default))
        if mine != theirs:
            raise AdapterFileError(
                other.path,
                ADAPTER_CONFIG,
                f"{field} is {other.config.get(field, default)!r} but adapter folder "
                f"'{first.path}' has {first.config.get(field, default)!r}",
            )


def _check_tensors_agree(first: AdapterFolder, other: AdapterFolder) -> None:
    mine, theirs = set(first.tensors), set(other.tensors)
    for keys, relation, counted in (
        (sorted(mine - theirs), "is missing but present in", "missing"),
        (sorted(theirs - mine), "is absent from", "extra"),
    ):
        if keys:
            raise AdapterFileError(
                other.path,
                other.weights_name,
                f"key {keys[0]!r} {relation} adapter folder '{first.path}' "
                f"({len(keys)} {counted} in all)",
            )
    for key, tensor in first.tensors.items():
        shape = tuple(other.tensors[key].shape)
        if shape != tuple(tensor.shape):
            raise AdapterFileError(
                other.path,
                other.weights_name,
                f"key {key!r} has shape {shape} but adapter folder '{first.path}' has "
                f"{tuple(tensor.shape)}",
            )


def _comparable(field: str, value: object) -> object:
    """A field's value in the form compared: target lists as sorted sets, alpha as float."""
    if field == "target_modules" and isinstance(value, list):
        return sorted(set(value))
    if field == "lora_alpha" and is_number(value):
        return float(value)
    return value
