"""Pure tensor merge math for LoRA adapters: no Flower, no file I/O.

Importing this package registers every shipped method.
"""

from strategies.merging import (  # noqa: F401
    dare,
    exact_mean,
    fedavg,
    robustmerge,
    svd,
    task_arithmetic,
    ties,
)
from strategies.merging.api import (
    MergeReport,
    MergeResult,
    merge_lora,
    merge_lora_with_report,
    resolve_device,
)
from strategies.merging.errors import MergeInputError
from strategies.merging.lora_keys import AdapterLayout, LoraModule, is_lora_key, parse_layout
from strategies.merging.registry import (
    accepted_hyperparameters,
    available_methods,
    create_method,
    register_method,
)

__all__ = [
    "AdapterLayout",
    "LoraModule",
    "MergeInputError",
    "MergeReport",
    "MergeResult",
    "accepted_hyperparameters",
    "available_methods",
    "create_method",
    "is_lora_key",
    "merge_lora",
    "merge_lora_with_report",
    "parse_layout",
    "register_method",
    "resolve_device",
]
