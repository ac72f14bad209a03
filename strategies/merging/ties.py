"""TIES-Merging on LoRA factors.

Paper: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
NeurIPS 2023 (arXiv:2306.01708). Per tensor: trim each task to its top keep_ratio entries by
magnitude (ties at the threshold kept, as in RobustMerge's step 1), elect each entry's sign as
the sign of the sum of the trimmed values, average only the values that agree with it (disjoint
mean), scale by lambda. Caller weights p scale each task's values by T p_t before electing.
"""

from __future__ import annotations

import torch

from strategies.merging.method import (
    MergeMethod,
    PairMerge,
    check_fuse_weight,
    check_unit_interval,
)
from strategies.merging.pruning import prune_by_magnitude
from strategies.merging.registry import register_method


def ties_merge(stack: torch.Tensor, weights: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Trim, elect sign, disjoint mean of one tensor stacked over tasks (T x ...)."""
    count = stack.shape[0]
    scaled = stack * (weights * count).reshape((-1,) + (1,) * (stack.dim() - 1))
    trimmed = prune_by_magnitude(scaled, keep_ratio)
    elected = torch.sign(trimmed.sum(dim=0))
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
    total = (trimmed * agrees).sum(dim=0)
    voters = agrees.sum(dim=0)
    return torch.where(voters > 0, total / voters.clamp(min=1), torch.zeros_like(total))


@register_method("ties")
class Ties(MergeMethod):
    """TIES on A and on B separately.

    Parameters
    ----------
    keep_ratio : float, default 0.2
        Fraction of entries each task keeps, in (0, 1].
    fuse_weight : float, default 1.0
        lambda applied to the disjoint mean.
    """

    def __init__(self, keep_ratio: float = 0.2, fuse_weight: float = 1.0) -> None:
        self.keep_ratio = check_unit_interval(
            "keep_ratio", keep_ratio, low_open=True, high_open=False
        )
        weight = check_fuse_weight(fuse_weight)
        if isinstance(weight, tuple):
            raise ValueError(
                "ties takes one shared fuse_weight; pass weights for per-adapter weighting"
            )
        self.fuse_weight = weight

    def merge_pair(
        self,
        a_stack: torch.Tensor,
        b_stack: torch.Tensor,
        weights: torch.Tensor,
        *,
        module_index: int,
    ) -> PairMerge:
        return PairMerge(
            a=self.fuse_weight * ties_merge(a_stack, weights, self.keep_ratio),
            b=self.fuse_weight * ties_merge(b_stack, weights, self.keep_ratio),
        )

    def describe(self) -> dict[str, object]:
        return {"method": "ties", "keep_ratio": self.keep_ratio, "fuse_weight": self.fuse_weight}
