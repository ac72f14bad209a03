"""Exact k-th smallest value per row: the pruning threshold of the spec's step 1."""

from __future__ import annotations

import torch


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Return the k-th smallest (1-based) entry of each row of ``values`` (shape T x n).

    Equal, bit for bit, to ``torch.kthvalue(values, k, dim=1).values`` for finite,
    non-negative inputs.
    """
    return torch.kthvalue(values, k, dim=1).values
