"""FedAvg on LoRA factors (FedIT).

Paper: Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
ICASSP 2024 (arXiv:2305.05644); McMahan et al., "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017. A and B are averaged separately, weighted by
the adapters' weights (example counts in federated rounds), as Flower's FlowerTune does.
"""

from __future__ import annotations

import torch

from strategies.merging.method import MergeMethod, PairMerge
from strategies.merging.registry import register_method


@register_method("fedavg")
class FedAvg(MergeMethod):
    """Weighted mean of A and of B: A_m = sum_t p_t A_t, B_m = sum_t p_t B_t."""

    def weights_by_examples(self) -> bool:
        """An example-weighted mean by definition: rounds weight by num-examples."""
        return True

    def dp_sensitivity_factor(self, server_lr: float, clients: int, rank: int) -> float | None:
        """A mean of the clipped updates, which Flower's noise is calibrated for: factor 1.

        One client clipped to C moves a mean of m updates by at most C / m, whatever the server
        step (the wrappers clip and noise the mean before it).
        """
        return 1.0

    def merge_pair(
        self,
        a_stack: torch.Tensor,
        b_stack: torch.Tensor,
        weights: torch.Tensor,
        *,
        module_index: int,
    ) -> PairMerge:
        return PairMerge(
            a=torch.tensordot(weights, a_stack, dims=1), b=torch.tensordot(weights, b_stack, dims=1)
        )

    def describe(self) -> dict[str, object]:
        return {"method": "fedavg"}
