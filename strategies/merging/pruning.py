"""Magnitude pruning with ties kept (spec step 1), and the complementary scale (spec step 2)."""

from __future__ import annotations

import math

import torch

from strategies.merging.threshold import INTEGER_VIEW, kth_smallest


def prune_count(num_entries: int, keep_ratio: float) -> int:
    """k = floor(n * (1 - rho)): the 1-based rank of the threshold; 0 means keep everything."""
    return math.floor(num_entries * (1.0 - keep_ratio))


def magnitude_mask(stack: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Boolean mask of the entries of each task's tensor (stack: T x ...) that survive pruning.

    For each task, tau is the k-th smallest |x| with k = floor(n * (1 - keep_ratio)); every entry
    with |x| >= tau survives, so ties at tau are all kept and, with no ties, n - k + 1 entries
    survive (13,109 of a 16 x 4096 tensor at keep_ratio 0.2). k == 0 keeps everything.
    """
    k = prune_count(_entries_per_task(stack), keep_ratio)
    if k == 0:
        return torch.ones_like(stack, dtype=torch.bool)
    magnitudes = stack.abs()
    tau = kth_smallest(magnitudes.reshape(stack.shape[0], -1), k)
    return magnitudes >= _per_task(tau, stack)


def prune_by_magnitude(stack: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Each task's tensor with the entries below its magnitude threshold set to zero.

    Bit for bit ``stack * magnitude_mask(stack, keep_ratio)`` for inputs without NaN (merge
    inputs are checked finite; a pruned negative entry becomes -0.0, as x * 0 does), computed on
    the IEEE bit patterns: |x| is the pattern without its sign bit, the comparison with tau is
    an integer subtraction whose sign bit, spread over the word by an arithmetic shift, selects
    what to clear. The integer passes run in place on one buffer and replace abs, a boolean
    comparison and a float-by-bool product, which cost 2-4 times as much on CPU (torch's
    boolean kernels are slow there).
    """
    k = prune_count(_entries_per_task(stack), keep_ratio)
    if stack.dtype not in INTEGER_VIEW or (stack.requires_grad and torch.is_grad_enabled()):
        return stack * magnitude_mask(stack, keep_ratio)  # integers, or a result autograd tracks
    if k == 0:
        return stack.clone()
    bits = stack.view(INTEGER_VIEW[stack.dtype])
    work = _magnitude_bits(stack)
    tau = _threshold_bits(work, stack.dtype, k)
    # In place on one buffer (fresh buffers cost page faults): |x| - tau is negative exactly for
    # the entries to drop (both are >= 0, so no overflow); an arithmetic shift spreads its sign
    # over the word (-1 drop, 0 keep); clearing the magnitude bits of the dropped entries
    # leaves their sign, +0.0 or -0.0.
    work.sub_(_per_task(tau, stack))
    work.bitwise_right_shift_(torch.iinfo(bits.dtype).bits - 1)
    work.bitwise_and_(torch.iinfo(bits.dtype).max).bitwise_not_().bitwise_and_(bits)
    return work.view(stack.dtype)


def _entries_per_task(stack: torch.Tensor) -> int:
    return math.prod(stack.shape[1:])


def _per_task(values: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """A length-T vector shaped to broadcast against the T x ... stack."""
    return values.reshape((-1,) + (1,) * (stack.dim() - 1))


def _magnitude_bits(stack: torch.Tensor) -> torch.Tensor:
    """The bit patterns of |x| as signed integers of the same width (sign bit cleared)."""
    int_dtype = INTEGER_VIEW[stack.dtype]
    return stack.view(int_dtype) & torch.iinfo(int_dtype).max


def _threshold_bits(magnitude_bits: torch.Tensor, dtype: torch.dtype, k: int) -> torch.Tensor:
    """tau per task as a bit pattern: the k-th smallest |x| of each task (T entries)."""
    flat = magnitude_bits.reshape(magnitude_bits.shape[0], -1)
    return kth_smallest(flat.view(dtype), k).view(magnitude_bits.dtype)


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
