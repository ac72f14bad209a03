"""The exact weighted mean of the clients' weight updates, factored back to rank r.

Averaging A and B separately (FedAvg / FedIT) is not the mean of the updates:
mean(B_t A_t) != mean(B_t) mean(A_t). This method averages the products themselves,
M = sum_t p_t (B_t A_t - B_G A_G) in rounds (sum_t p_t B_t A_t one-shot), and hands back the
best rank-r factors of the result (truncated SVD, B = U sqrt(S), A = sqrt(S) V^T), reporting the
truncation error. FedEx-LoRA (Singhal et al., 2024) and FLoRA (Wang et al., NeurIPS 2024) start
from the same observation.
"""

from __future__ import annotations

import torch

from strategies.merging.lowrank import truncate_product
from strategies.merging.method import MergeMethod, PairMerge
from strategies.merging.registry import register_method


@register_method("exact-mean")
class ExactMean(MergeMethod):
    """Weighted mean of the products B_t A_t (of the updates, in rounds), truncated to rank r."""

    def weights_by_examples(self) -> bool:
        """An example-weighted mean by definition: rounds weight by num-examples."""
        return True

    def merge_pair(
        self,
        a_stack: torch.Tensor,
        b_stack: torch.Tensor,
        weights: torch.Tensor,
        *,
        module_index: int,
    ) -> PairMerge:
        left, right = self.product_terms(a_stack, b_stack, weights)
        return truncate_product(left, right, a_stack.shape[1])

    def merges_products(self) -> bool:
        return True

    def product_terms(
        self, a_stack: torch.Tensor, b_stack: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L = [p_1 B_1 | ... | p_T B_T], R = [A_1; ...; A_T]: L @ R = sum_t p_t B_t A_t."""
        count, rank, d_in = a_stack.shape
        left = (
            (b_stack * weights[:, None, None])
            .permute(1, 0, 2)
            .reshape(b_stack.shape[1], count * rank)
        )
        return left, a_stack.reshape(count * rank, d_in)

    def update_terms(
        self,
        a_global: torch.Tensor,
        b_global: torch.Tensor,
        a_stack: torch.Tensor,
        b_stack: torch.Tensor,
        weights: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """sum_t p_t (B_t A_t - B_G A_G) = [p_t B_t | -B_G] @ [A_t; A_G] (the p_t sum to 1)."""
        left, right = self.product_terms(a_stack, b_stack, weights)
        return torch.cat([left, -b_global], dim=1), torch.cat([right, a_global], dim=0)

    def describe(self) -> dict[str, object]:
        return {"method": "exact-mean"}
