"""Whether one adapter folder holds what its config says: LoRA A/B pairs of its rank on its targets.

``read_adapter_dir`` checks that a folder's files are well formed; it reads any tensors. A merge
needs more of each input, on its own, before it is compared with the others (``compat``): a
folder of non-LoRA tensors, or one whose factors have another rank than its ``r``, would
otherwise be "merged" into an adapter that does nothing, or be blamed on the folder it is
compared with. ``check_lora_content`` refuses, naming the folder, the weights file and the key:

- a folder without any LoRA A/B pair (keys ``<module>.lora_A...`` / ``<module>.lora_B...``, as
  ``strategies.merging.lora_keys`` pairs them), or an A without its B or a B without its A;
- a LoRA module that none of the config's ``target_modules`` names (PEFT's matching: a list
  entry is the module's name or its last dotted part(s); a string is a regular expression over
  the whole name; ``"all-linear"`` takes any module);
- an A whose first dimension, or a B whose second, is not the module's rank: ``r``, or the
  ``rank_pattern`` entry that matches the module, as PEFT resolves it.

Other keys (``modules_to_save``, DoRA magnitudes) are allowed beside the pairs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.layout import ADAPTER_CONFIG, AdapterFolder
from strategies.merging.errors import MergeInputError
from strategies.merging.lora_keys import parse_layout

PEFT_PREFIX = "base_model.model."
"""What PEFT puts before a module's name in a saved state dict."""

ALL_LINEAR = "all-linear"


def check_lora_content(folder: AdapterFolder) -> AdapterFolder:
    """Check that ``folder`` holds LoRA A/B pairs for its config's targets at its rank.

    Returns
    -------
    AdapterFolder
        ``folder`` itself, so a read can be checked in one expression:
        ``check_lora_content(read_adapter_dir(path))``.

    Raises
    ------
    AdapterFileError
        Naming the folder, the weights file (or adapter_config.json) and the first fault.
    """
    try:
        layout = parse_layout(folder.tensors)
    except MergeInputError as error:
        raise AdapterFileError(
            folder.path, folder.weights_name, f"key {error.key!r}: {error.reason}"
        ) from None
    if not layout.modules:
        shown = ", ".join(repr(key) for key in sorted(folder.tensors)[:3])
        more = "" if len(folder.tensors) <= 3 else f" and {len(folder.tensors) - 3} more"
        raise AdapterFileError(
            folder.path,
            folder.weights_name,
            f"holds no LoRA A/B pair (its {len(folder.tensors)} tensor(s): {shown}{more}); "
            "expected keys such as '<module>.lora_A.weight' and '<module>.lora_B.weight' of a "
            "PEFT LoRA adapter",
        )
    config = folder.config
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets != ALL_LINEAR:
        try:
            re.compile(targets)
        except re.error as error:
            raise AdapterFileError(
                folder.path,
                ADAPTER_CONFIG,
                f"target_modules {targets!r} is not a valid regular expression ({error})",
            ) from None
    rank = int(config["r"])
    pattern = config.get("rank_pattern") or {}
    for module in layout.modules:
        name = _module_name(module.a_key)
        if not _targeted(name, targets):
            raise AdapterFileError(
                folder.path,
                folder.weights_name,
                f"key {module.a_key!r} is a LoRA factor of module {name!r}, which "
                f"{ADAPTER_CONFIG} target_modules {targets!r} does not name",
            )
        expected = _module_rank(name, rank, pattern)
        for key, axis, factor in ((module.a_key, 0, "A"), (module.b_key, 1, "B")):
            shape = tuple(folder.tensors[key].shape)
            if len(shape) < 2 or shape[axis] != expected:
                where = "first" if axis == 0 else "second"
                raise AdapterFileError(
                    folder.path,
                    folder.weights_name,
                    f"key {key!r} has shape {shape}, but {ADAPTER_CONFIG} gives this module "
                    f"rank {expected}: a LoRA {factor} factor has the rank as its {where} "
                    "dimension",
                )
    return folder


def _module_name(key: str) -> str:
    """The module's name in the base model: the key before ``.lora_``, without PEFT's prefix."""
    name = key[: key.rindex(".lora_")]
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def _targeted(name: str, targets: object) -> bool:
    """Whether ``target_modules`` names the module, as PEFT's check_target_module_exists."""
    if isinstance(targets, str):
        return targets == ALL_LINEAR or re.fullmatch(targets, name) is not None  # checked
    if isinstance(targets, list):
        return any(name == target or name.endswith(f".{target}") for target in targets)
    return False


def _module_rank(name: str, rank: int, pattern: Mapping[str, Any]) -> int:
    """The module's rank: the first ``rank_pattern`` entry matching it (PEFT's get_pattern_key),
    else ``r``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name) and isinstance(value, int):
            return value
    return rank
