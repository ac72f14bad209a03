"""The coordinate-wise stage: each client's delta clamped to the range a robust statistic trusts.

Flower's FedMedian and FedTrimmedAvg return one aggregate (the coordinate-wise median or trimmed
mean) for dense FedAvg. A merge method such as RobustMerge, TIES or SVD needs the clients'
deltas, one per client, so this stage keeps T deltas but takes from each coordinate what the
statistic would discard: with k values trimmed on each side, every client's value is clamped to
[k-th smallest + 1, k-th largest + 1] of that coordinate over the clients (winsorising). Then

- k attackers cannot push any coordinate outside the range the honest clients span;
- for the median (k = floor((T - 1) / 2)) the range is the median itself (T odd) or the two
  middle values (T even), and the plain mean of the clamped deltas *is* the coordinate-wise
  median: FedMedian's result when the merge is fedavg;
- for the trimmed mean the plain mean of the clamped deltas is the winsorised mean, the trimmed
  mean's sibling that keeps the trimmed clients at the boundary instead of dropping them;
- the merge method still sees T clients (RobustMerge's per-client scales, TIES' sign election).

This happens before RobustMerge's pruning: the merge prunes the clamped deltas.
"""

from __future__ import annotations

import numpy as np
import torch


def trim_count(count: int, fraction: float | None) -> int:
    """Values trimmed on each side of T = ``count``: floor(fraction x T) for a trimmed mean
    (fraction in [0, 0.5), as Flower's ``trim_mean``), floor((T - 1) / 2) for the median
    (``fraction`` None)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if fraction is None:
        return (count - 1) // 2
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {fraction}")
    return int(fraction * count)


def trimmed_range(stack: torch.Tensor, trim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate-wise (low, high): the (trim + 1)-th smallest and largest of ``stack``'s rows
    (T x ...); ``trim`` must leave at least one value (2 trim < T). Both are copies: rows of
    the ordered stack would keep all T rows alive for as long as a round holds its bounds.

    On CPU (float32 / float64, no autograd) the two order statistics are selected with NumPy's
    partition along the clients: one copy of the stack, where ``torch.sort`` makes the sorted
    values and their int64 positions (three copies' worth) and, at T = 64, took four times as
    long on this project's CPU. Selection and sorting return the same values.
    """
    count = stack.shape[0]
    if not 0 <= 2 * trim < count:
        raise ValueError(f"cannot trim {trim} of {count} values on each side")
    low, high = trim, count - 1 - trim
    selectable = stack.device.type == "cpu" and stack.dtype in (torch.float32, torch.float64)
    if selectable and not stack.requires_grad:
        ordered = np.partition(stack.numpy(), sorted({low, high}), axis=0)
        # np.array: a copy, and an ndarray even where a 1-D stack (0-dim keys) gives scalars
        return torch.from_numpy(np.array(ordered[low])), torch.from_numpy(np.array(ordered[high]))
    ordered_stack = torch.sort(stack, dim=0).values
    return ordered_stack[low].clone(), ordered_stack[high].clone()


def clamp_to_range(delta: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``delta`` with each coordinate clamped to [low, high] (same shapes)."""
    return torch.minimum(torch.maximum(delta, low), high)
