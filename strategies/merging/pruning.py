"""Magnitude pruning with ties kept (spec step 1), and the complementary scale (spec step 2)."""

from __future__ import annotations

import math

import torch

from strategies.merging.threshold import kth_smallest


def prune_count(num_entries: int, keep_ratio: float) -> int:
    """k = floor(n * (1 - rho)): the 1-based rank of the threshold; 0 means keep everything."""
    return math.floor(num_entries * (1.0 - keep_ratio))


def magnitude_mask(stack: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Boolean mask of the entries of each task's tensor (stack: T x ...) that survive pruning.

    For each task, tau is the k-th smallest |x| with k = floor(n * (1 - keep_ratio)); every entry
    with |x| >= tau survives, so ties at tau are all kept and, with no ties, n - k + 1 entries
    survive (13,109 of a 16 x 4096 tensor at keep_ratio 0.2). k == 0 keeps everything.
    """
    magnitudes = stack.abs()
    flat = magnitudes.reshape(stack.shape[0], -1)
    k = prune_count(flat.shape[1], keep_ratio)
    if k == 0:
        return torch.ones_like(stack, dtype=torch.bool)
    tau = kth_smallest(flat, k)
    return magnitudes >= tau.reshape((-1,) + (1,) * (stack.dim() - 1))


def prune_by_magnitude(stack: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Each task's tensor with the entries below its magnitude threshold set to zero."""
    return stack * magnitude_mask(stack, keep_ratio)


def scale_floor_position(rank: int, scale_quantile: float) -> int:
    """0-based position of the floor in the ascending scales: min(floor(r * (1 - a)), r - 1)."""
    return min(math.floor(rank * (1.0 - scale_quantile)), rank - 1)


def complementary_scale(
    a_stack: torch.Tensor,
    a_pruned: torch.Tensor,
    scale_quantile: float | None,
) -> torch.Tensor:
    """Per-task, per-rank-row scale s~ (T x r) from A (T x r x d_in) and its pruned copy.

    s[i] = sum_j |A[i, j]| / sum_j |A^[i, j]| (>= 1): how much of row i's mass pruning removed.
    A row whose kept mass is zero (an all-zero row, the spec's 0/0) gets s = 1.
    With ``scale_quantile`` a, every s below the value at ascending position
    min(floor(r * (1 - a)), r - 1) is raised to it; ``None`` skips the floor (the paper's
    equations have none).
    """
    total = a_stack.abs().sum(dim=-1)
    kept = a_pruned.abs().sum(dim=-1)
    ones = torch.ones_like(total)
    scale = torch.where(kept == 0, ones, total / torch.where(kept == 0, ones, kept))
    if scale_quantile is None:
        return scale
    position = scale_floor_position(scale.shape[-1], scale_quantile)
    floor = scale.sort(dim=-1).values[:, position : position + 1]
    return torch.maximum(scale, floor)
