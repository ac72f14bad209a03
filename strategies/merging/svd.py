"""FlexLoRA: weighted sum of the full updates B_t A_t, factored back to rank r by SVD.

Paper: Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
and Client Resources", NeurIPS 2024 (arXiv:2402.11505). delta_W = sum_t p_t B_t A_t, then
B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T; the relative Frobenius error of the truncation is reported.
"""

from __future__ import annotations

import torch

from strategies.merging.lowrank import truncate_product
from strategies.merging.method import MergeMethod, PairMerge
from strategies.merging.registry import register_method


@register_method("svd")
class SvdMerge(MergeMethod):
    """Weighted mean of the products B_t A_t, truncated to the adapters' rank."""

    def merge_pair(
        self,
        a_stack: torch.Tensor,
        b_stack: torch.Tensor,
        weights: torch.Tensor,
        *,
        module_index: int,
    ) -> PairMerge:
        count, rank, d_in = a_stack.shape
        left = (
            (b_stack * weights[:, None, None])
            .permute(1, 0, 2)
            .reshape(b_stack.shape[1], count * rank)
        )
        return truncate_product(left, a_stack.reshape(count * rank, d_in), rank)

    def describe(self) -> dict[str, object]:
        return {"method": "svd"}
