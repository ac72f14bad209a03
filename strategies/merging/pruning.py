"""Magnitude pruning with ties kept (spec step 1), and the complementary scale (spec step 2)."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from strategies.merging.threshold import INTEGER_VIEW, kth_smallest

# The CPU threshold of 32- and 64-bit rows: NumPy's partition (a vectorised quickselect, about
# 0.7 ns an entry on the 2-core CPU of benchmarks/results) is 2-3 times faster than
# ``kth_smallest``'s bracket scans for rows of up to this many entries; longer rows outgrow the
# caches and keep ``kth_smallest``.
PARTITION_MAX_LENGTH = 1 << 21
# Entries per row sampled to spot a heavy tie (see ``_heavy_tie``), and the share of the sample
# one value may hold before the row goes to ``kth_smallest``.
TIE_SAMPLE_SIZE = 256
TIE_SHARE = 1 / 32
_PARTITION_DTYPES = (torch.int32, torch.int64)
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


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
    tau = magnitude_threshold(magnitudes.detach().reshape(stack.shape[0], -1), k)
    return magnitudes >= _per_task(tau, stack)


def magnitude_threshold(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """tau: the k-th smallest (1-based) entry of each row of ``magnitudes`` (T x n, >= 0).

    Bit for bit ``torch.kthvalue(magnitudes, k, dim=1).values``; the threshold the merge uses
    (see ``_threshold_bits`` for how it is found). Carries no autograd history.
    """
    if magnitudes.dtype not in INTEGER_VIEW:
        return kth_smallest(magnitudes, k)
    flat = magnitudes.detach()
    bits = flat.view(INTEGER_VIEW[flat.dtype])
    return _threshold_bits(bits, flat.dtype, k)[0].view(flat.dtype)


def prune_by_magnitude(stack: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Each task's tensor with the entries below its magnitude threshold set to zero.

    Bit for bit ``stack * magnitude_mask(stack, keep_ratio)`` for inputs without NaN (merge
    inputs are checked finite; a pruned negative entry becomes -0.0, as x * 0 does), and
    computed that way, with the mask as 1.0 / 0.0 in the stack's float dtype: |x|, a
    comparison written into the same buffer, one product. These float passes cost about half
    of the integer bit tricks they replace, and a boolean mask (torch's boolean CPU kernels are
    slow) is never formed.
    """
    k = prune_count(_entries_per_task(stack), keep_ratio)
    if stack.dtype not in INTEGER_VIEW or (stack.requires_grad and torch.is_grad_enabled()):
        return stack * magnitude_mask(stack, keep_ratio)  # integers, or a result autograd tracks
    if k == 0:
        return stack.clone()
    magnitude = stack.abs()
    tau = _threshold_in_place(magnitude, stack, k)
    torch.ge(magnitude, _per_task(tau, stack), out=magnitude)
    return magnitude.mul_(stack)


def prune_with_row_mass(
    stack: torch.Tensor, keep_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``prune_by_magnitude`` and each row's mass before and after it, in fewer passes.

    Returns (X^, sum_j |X[..., j]|, sum_j |X^[..., j]|), the last two summed over the last
    dimension: bit for bit ``(prune_by_magnitude(stack, keep_ratio), stack.abs().sum(-1),
    X^.abs().sum(-1))``. The complementary scale needs both masses of A; here they come from the
    |x| buffer the threshold needs anyway (|x| times the 1.0 / 0.0 mask is |x^|), instead of two
    more ``abs`` buffers.
    """
    k = prune_count(_entries_per_task(stack), keep_ratio)
    tracked = stack.requires_grad and torch.is_grad_enabled()
    if stack.dtype not in INTEGER_VIEW or tracked or k == 0:
        pruned = prune_by_magnitude(stack, keep_ratio)
        return pruned, stack.abs().sum(dim=-1), pruned.abs().sum(dim=-1)
    magnitude = stack.abs()
    total = magnitude.sum(dim=-1)
    tau = _threshold_in_place(magnitude, stack, k)
    keep = torch.ge(magnitude, _per_task(tau, stack), out=torch.empty_like(magnitude))
    kept = magnitude.mul_(keep).sum(dim=-1)
    return keep.mul_(stack), total, kept


def _threshold_in_place(magnitude: torch.Tensor, stack: torch.Tensor, k: int) -> torch.Tensor:
    """tau per task (T values, the stack's dtype) from ``magnitude`` = |stack|, which is left
    holding |stack| again (the selection may reorder it in place; it is then recomputed)."""
    bits = magnitude.view(INTEGER_VIEW[magnitude.dtype])
    tau, reordered = _threshold_bits(bits, magnitude.dtype, k, reorder=True)
    if reordered:
        torch.abs(stack, out=magnitude)
    return tau.view(magnitude.dtype)


def _entries_per_task(stack: torch.Tensor) -> int:
    return math.prod(stack.shape[1:])


def _per_task(values: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """A length-T vector shaped to broadcast against the T x ... stack."""
    return values.reshape((-1,) + (1,) * (stack.dim() - 1))


def _threshold_bits(
    magnitude_bits: torch.Tensor, dtype: torch.dtype, k: int, *, reorder: bool = False
) -> tuple[torch.Tensor, bool]:
    """tau per task as a bit pattern: the k-th smallest |x| of each task (T entries), and
    whether ``magnitude_bits`` was reordered (only allowed with ``reorder``: each row is then
    partitioned in place, saving a copy; the caller recomputes what it still needs).

    Bit patterns of non-negative floats order like the floats, so the k-th smallest pattern is
    the k-th smallest |x|, exactly. On CPU, 32- and 64-bit rows of at most
    ``PARTITION_MAX_LENGTH`` entries are selected with ``np.partition``, unless a sample shows a
    heavy tie: NumPy's vectorised quickselect makes no progress when its pivot keeps landing on
    one repeated value and then sorts the rest (30-60 times slower: an 80 % zero row), which
    ``kth_smallest`` handles in its stride. Everything else goes to ``kth_smallest``. Both
    return the same entry, so the choice changes the time, never the result.
    """
    flat = magnitude_bits.reshape(magnitude_bits.shape[0], -1)
    if (
        flat.device.type == "cpu"
        and flat.dtype in _PARTITION_DTYPES
        and flat.shape[0] > 0
        and flat.shape[1] <= PARTITION_MAX_LENGTH
    ):
        rows = flat.numpy()
        if not _heavy_tie(rows):
            in_place = reorder and flat.is_contiguous()
            if not in_place:
                rows = rows.copy()
            rows.partition(k - 1, axis=1)
            return torch.from_numpy(rows[:, k - 1].copy()), in_place
    return kth_smallest(flat.view(dtype), k).view(magnitude_bits.dtype), False


def _heavy_tie(rows: npt.NDArray[np.integer[Any]]) -> bool:
    """Whether one value holds more than ``TIE_SHARE`` of a fixed sample of some row (T x n).

    In a sorted sample a value repeated more than L times shows as two equal entries L apart.
    """
    length = rows.shape[1]
    size = min(TIE_SAMPLE_SIZE, length)
    sample = np.sort(np.take(rows, _tie_sample_positions(length, size), axis=1), axis=1)
    gap = max(int(size * TIE_SHARE), 1)
    return bool((sample[:, gap:] == sample[:, :-gap]).any())


@functools.lru_cache(maxsize=64)
def _tie_sample_positions(length: int, size: int) -> npt.NDArray[np.int64]:
    """``size`` well-spread positions in [0, length): the golden-ratio sequence, so they never
    line up with the column period of a flattened ``d_out x r`` factor (every position when
    ``size`` equals ``length``; a position drawn twice only sends the row to ``kth_smallest``)."""
    positions: npt.NDArray[np.int64]
    if size == length:
        positions = np.arange(length, dtype=np.int64)
    else:
        positions = np.floor(np.modf(np.arange(size) * _GOLDEN)[0] * length).astype(np.int64)
    return positions


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
    return scale_from_row_mass(
        a_stack.abs().sum(dim=-1), a_pruned.abs().sum(dim=-1), scale_quantile
    )


def scale_from_row_mass(
    total: torch.Tensor, kept: torch.Tensor, scale_quantile: float | None
) -> torch.Tensor:
    """``complementary_scale`` from each row's mass before (``total``) and after (``kept``)
    pruning, both T x r; what ``prune_with_row_mass`` returns beside the pruned A."""
    ones = torch.ones_like(total)
    scale = torch.where(kept == 0, ones, total / torch.where(kept == 0, ones, kept))
    if scale_quantile is None:
        return scale
    position = scale_floor_position(scale.shape[-1], scale_quantile)
    floor = scale.sort(dim=-1).values[:, position : position + 1]
    return torch.maximum(scale, floor)
