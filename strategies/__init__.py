"""Aggregation for federated LoRA: the merge math (``strategies.merging``) and the Flower strategy.

``FedRobustMerge`` is loaded on first use so that the merge math imports without Flower.
"""

from typing import TYPE_CHECKING, Any

from strategies.merging import (
    MergeInputError,
    MergeReport,
    MergeResult,
    available_methods,
    merge_lora,
    merge_lora_with_report,
)

if TYPE_CHECKING:
    from strategies.fed_robustmerge import FedRobustMerge

__all__ = [
    "FedRobustMerge",
    "MergeInputError",
    "MergeReport",
    "MergeResult",
    "available_methods",
    "merge_lora",
    "merge_lora_with_report",
]


def __getattr__(name: str) -> Any:
    if name == "FedRobustMerge":
        from strategies.fed_robustmerge import FedRobustMerge

        return FedRobustMerge
    raise AttributeError(f"module 'strategies' has no attribute {name!r}")
