"""FlexLoRA: weighted sum of the full updates B_t A_t, factored back to rank r by SVD.

Paper: Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
and Client Resources", NeurIPS 2024 (arXiv:2402.11505). delta_W = sum_t p_t B_t A_t, then
B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T; the relative Frobenius error of the truncation is reported.

With every site at one rank this is the rank-r truncation of the exact mean (``exact-mean``), and
the two give the same merge; FlexLoRA's own step, handing each site the global truncated to that
site's rank, is what sets it apart once sites train different ranks.
"""

from __future__ import annotations

from strategies.merging.exact_mean import ExactMean
from strategies.merging.registry import register_method


@register_method("svd")
class SvdMerge(ExactMean):
    """Weighted mean of the products B_t A_t, truncated to the adapters' rank (FlexLoRA)."""

    def describe(self) -> dict[str, object]:
        return {"method": "svd"}
