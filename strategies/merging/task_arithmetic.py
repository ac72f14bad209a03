"""Task Arithmetic on LoRA factors.

Paper: Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (arXiv:2212.04089).
A_m = sum_t lambda_t A_t and B_m = sum_t lambda_t B_t, with lambda_t = fuse_weight * T * p_t.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from strategies.merging.method import (
    MergeMethod,
    PairMerge,
    RoundFormError,
    check_fuse_weight,
    task_coefficients,
)
from strategies.merging.registry import register_method


@register_method("task_arithmetic")
class TaskArithmetic(MergeMethod):
    """lambda-scaled sum of each factor.

    Parameters
    ----------
    fuse_weight : float or sequence of float, default 1.0
        lambda, shared or one per adapter.
    """

    def __init__(self, fuse_weight: float | Sequence[float] = 1.0) -> None:
        self.fuse_weight = check_fuse_weight(fuse_weight)

    def merge_pair(
        self,
        a_stack: torch.Tensor,
        b_stack: torch.Tensor,
        weights: torch.Tensor,
        *,
        module_index: int,
    ) -> PairMerge:
        lambdas = task_coefficients(self.fuse_weight, weights)
        return PairMerge(
            a=torch.tensordot(lambdas, a_stack, dims=1), b=torch.tensordot(lambdas, b_stack, dims=1)
        )

    def sums_scaled_a(self) -> bool:
        """A_m = sum_t lambda_t A_t: adapters sharing one initial A give about lambda T times it."""
        return True

    def round_form(self) -> MergeMethod:
        raise RoundFormError(
            "merge method 'task_arithmetic' has no round form: it sums the clients' updates, so "
            "its step grows with the number of clients (T identical clients move the global T "
            "times as far as one); averaged instead, it is fedavg with server-lr = fuse-weight. "
            "Use merge-method 'fedavg' and tune server-lr (or 'ties' / 'robustmerge'); "
            "task_arithmetic stays available for one-shot merges (the CLI)"
        )

    def describe(self) -> dict[str, object]:
        return {"method": "task_arithmetic", "fuse_weight": self.fuse_weight}
