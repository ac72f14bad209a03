"""Multi-Krum selection (Blanchard et al. 2017; El Mhamdi et al. 2018) on flattened deltas.

Flower's ``select_multikrum`` scores whole RecordDicts with float32 distances from the Gram
expansion ||x||^2 + ||y||^2 - 2 x.y; the strategy's deltas arrive key by key, and next to one
huge update that expansion cancels the honest clients' small distances to rounding noise. Here
the distances are accumulated key by key in float64, pair by pair (no Gram expansion); the
scoring rule is Flower's: the sum of the n - f - 2 smallest distances to the others (at least
one), the m lowest scores kept, ties broken by position.
"""

from __future__ import annotations

import math

import torch


def pairwise_squared_distances(stack: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``stack`` (T x ...), float64, T x T
    (0 x 0 for a stack with no rows)."""
    flat = stack.reshape(stack.shape[0], math.prod(stack.shape[1:])).to(torch.float64)
    distances = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")
    return distances.square()


def multikrum_select(distances: torch.Tensor, num_malicious: int, num_select: int) -> list[int]:
    """Positions (ascending) of the ``num_select`` rows with the lowest Krum scores.

    ``distances`` is a symmetric T x T matrix of squared distances; ``num_malicious`` is f;
    ``num_select`` is m, clamped to [1, T]. With T <= 2 every row scores the same and the first
    m are kept.
    """
    count = distances.shape[0]
    if distances.shape != (count, count):
        raise ValueError(f"distances must be square, got {tuple(distances.shape)}")
    if num_malicious < 0:
        raise ValueError(f"num_malicious must be >= 0, got {num_malicious}")
    if count == 0:
        return []
    keep = min(max(num_select, 1), count)
    closest = max(1, count - num_malicious - 2)
    scores = []
    for row in range(count):
        others = torch.cat([distances[row, :row], distances[row, row + 1 :]])
        nearest = torch.sort(others).values[:closest]
        scores.append(float(nearest.sum()) if others.numel() else 0.0)
    order = sorted(range(count), key=lambda position: (scores[position], position))
    return sorted(order[:keep])
